"""`slurm_cluster`: a real two-node SLURM cluster on this machine (start.sh, stop.sh).

The cluster starts once per session, in its own state directory and on free ports, so it
cannot meet a site's Slurm or another session's cluster. Where it cannot start (not root,
packages not installable) every test that asks for it is skipped with the reason.
Without accounting there is no sacct: jobs are followed with `scontrol show job`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
# start.sh's exit status when the cluster cannot be had here (automake's "skipped").
UNAVAILABLE = 77
START_TIMEOUT_S = 900  # includes installing the packages
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                   "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cluster: runs jobs on the two-node SLURM test cluster (tests/cluster/start.sh); "
        "skipped where it cannot start")


@dataclass(repr=False)
class Job:
    id: str
    state: str
    exit_code: int
    signal: int
    restarts: int
    output: str  # the job's stdout file, as far as it was written

    def __repr__(self):  # what a failed assertion shows
        return (f"job {self.id}: {self.state}, exit code {self.exit_code}:{self.signal}, "
                f"{self.restarts} restart(s); output:\n{self.output}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({exc})"


class SlurmCluster:
    """The running cluster: its state directory, client environment and job helpers."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.conf = state_dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, timeout: float = 30, env: dict | None = None) -> str:
        """Run a Slurm client command (sinfo, scontrol, scancel, ...); return its stdout."""
        proc = subprocess.run(args, env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}"
        return proc.stdout

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> str:
        """Submit (sbatch ARGS, from cwd, with env added to the cluster's); return the job id."""
        proc = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"sbatch {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}"
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Job:
        record = self.run("scontrol", "show", "job", "-o", job_id)

        def field(name):
            m = re.search(rf"\b{name}=(\S*)", record)
            return m.group(1) if m else ""

        exit_code, _, sig = field("ExitCode").partition(":")
        stdout = Path(field("StdOut"))
        return Job(job_id, field("JobState"), int(exit_code or 0), int(sig or 0), int(field("Restarts") or 0),
                   stdout.read_text(errors="replace") if stdout.is_file() else "")

    def wait(self, job_id: str, timeout: float = 120) -> Job:
        """Poll until the job has finished for good; fail with diagnostics after timeout seconds.

        A requeued job passes through REQUEUED and PENDING: only terminal states end the wait.
        """
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.state in TERMINAL_STATES:
                return job
            if time.monotonic() > deadline:
                self._give_up(job_id, f"job {job_id} still {job.state} after {timeout:.0f} s")
            time.sleep(0.5)

    def wait_for(self, condition, what: str, job_id: str, timeout: float = 90) -> None:
        """Poll condition() while the job runs; fail early if the job ends, or after timeout."""
        deadline = time.monotonic() + timeout
        while not condition():
            state = self.job(job_id).state
            if state in TERMINAL_STATES:
                self._give_up(job_id, f"job {job_id} ended ({state}) before {what}")
            if time.monotonic() > deadline:
                self._give_up(job_id, f"no {what} after {timeout:.0f} s")
            time.sleep(0.25)

    def _give_up(self, job_id: str, why: str):
        report = self.diagnostics(job_id)
        subprocess.run(["scancel", job_id], env=self.env, capture_output=True, timeout=30)
        pytest.fail(f"{why}\n{report}", pytrace=False)

    def diagnostics(self, job_id: str | None = None) -> str:
        parts = []
        if job_id is not None:
            job = self.job(job_id)
            parts.append(self.run("scontrol", "show", "job", job_id))
            parts.append(f"--- job output:\n{job.output[-4000:]}")
        for log in sorted((self.state_dir / "log").glob("*.log")):
            parts.append(f"--- tail of {log}:\n{_tail(log)}")
        return "\n".join(parts)


def _why_unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the SLURM test cluster needs Linux"
    if os.geteuid() != 0:
        return "the SLURM test cluster needs root (tests/cluster/start.sh runs slurmd and may apt-get install)"
    if not all(shutil.which(t) for t in ("slurmctld", "slurmd", "munged")) and not shutil.which("apt-get"):
        return "slurm-wlm and munge are not installed and there is no apt-get to install them"
    return None


@pytest.fixture(scope="session")
def slurm_cluster_session(tmp_path_factory):
    reason = _why_unavailable()
    if reason:
        pytest.skip(reason)
    state_dir = tmp_path_factory.mktemp("slurm")
    try:
        proc = subprocess.run([str(HERE / "start.sh"), str(state_dir)], capture_output=True, text=True,
                              timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        subprocess.run([str(HERE / "stop.sh"), str(state_dir)], capture_output=True, timeout=120)
        pytest.fail(f"tests/cluster/start.sh {state_dir} took more than {START_TIMEOUT_S} s", pytrace=False)
    if proc.returncode == UNAVAILABLE:
        pytest.skip((proc.stderr.strip().splitlines() or ["start.sh: cluster unavailable"])[-1])
    if proc.returncode != 0:
        subprocess.run([str(HERE / "stop.sh"), str(state_dir)], capture_output=True, timeout=120)
        pytest.fail(f"tests/cluster/start.sh {state_dir} failed ({proc.returncode}):\n{proc.stderr}",
                    pytrace=False)
    try:
        yield SlurmCluster(state_dir)
    finally:
        subprocess.run([str(HERE / "stop.sh"), str(state_dir)], capture_output=True, timeout=120)


@pytest.fixture
def slurm_cluster(slurm_cluster_session, monkeypatch):
    """The cluster, with SLURM_CONF set for this test (and every subprocess it starts)."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster_session.conf))
    return slurm_cluster_session
