"""Where the ranks of a SLURM job meet: one rule for every way dmhpc starts them.

The trainer's bootstrap (srun tasks), the submitit jobs of `dmhpc grid` and `dmhpc scaling`, and
slurm/lib.sh (torchrun's rendezvous endpoint, through `python -m dmhpc.rendezvous`) all use it:

- address: the first node of the job's node list, as other nodes reach it: its name where the name
  resolves (most sites), else its NodeAddr from `scontrol show node` (sites, and tests/cluster,
  whose node names are not host names). Asking slurmctld only then keeps a job of thousands of
  tasks from sending it thousands of requests at once;
- port: 29500 + (job id + 889 x step id) % 2000: the same on every node and after a requeue,
  different for jobs running side by side on one node (unless their ids are a multiple of 2000
  apart) and for job steps side by side in one job (two `srun` trainers packed into one allocation
  met at one port: the second failed to bind, or its ranks joined the first's store; 889 apart, not
  1, so that step 1 of one job is not step 0 of the next job's id: steps 1 to 8 of a job land at
  least 222 ids away from any job's step 0, where 997 put step 2 at job id - 6), and below Linux's
  ephemeral range (32768 and up), so no outgoing connection holds it. The batch script, outside any
  step, and a job's first step (0) compute the same port.

MASTER_ADDR and MASTER_PORT, when set, win over both. This module imports no torch: the batch
script runs it before anything else.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from itertools import product
from typing import Mapping

from dmhpc.errors import DmhpcError

PORT_BASE = 29500
PORT_SPAN = 2000


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a SLURM node list such as `n[1-3,5],gpu[01-02]-ib` (pure Python)."""
    item_re = r"(?:[^,\[\]]|\[[^\[\]]*\])+"  # one host pattern: text and [ranges], no top-level comma
    if not re.fullmatch(f"{item_re}(?:,{item_re})*", nodelist):
        raise DmhpcError(f"SLURM node list {nodelist!r}: not a comma-separated list of host[ranges]")
    hosts: list[str] = []
    for item in re.findall(item_re, nodelist):
        choices: list[list[str]] = []
        for piece in re.split(r"(\[[^\]]*\])", item):
            if not piece.startswith("["):
                choices.append([piece])
                continue
            values: list[str] = []
            for part in piece[1:-1].split(","):
                m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
                if not m:
                    raise DmhpcError(f"SLURM node list {nodelist!r}: cannot read range {part!r}")
                lo, hi = m.group(1), m.group(2) or m.group(1)
                if int(hi) < int(lo):
                    raise DmhpcError(f"SLURM node list {nodelist!r}: range {part!r} runs backwards")
                values += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
            choices.append(values)
        hosts += ["".join(parts) for parts in product(*choices)]
    return hosts


def _scontrol(env: Mapping[str, str], *args: str) -> str | None:
    """scontrol's output, or None where it is missing or cannot run (a container without slurm.conf)."""
    scontrol = shutil.which("scontrol", path=env.get("PATH", os.defpath))
    if not scontrol:
        return None
    try:
        return subprocess.run([scontrol, *args], capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None


def hosts(nodelist: str, env: Mapping[str, str]) -> list[str]:
    """The hosts of a SLURM node list: scontrol's expansion, or ours when scontrol is unusable."""
    return (_scontrol(env, "show", "hostnames", nodelist) or "").split() or expand_nodelist(nodelist)


def first_host(nodelist: str, env: Mapping[str, str]) -> str:
    return hosts(nodelist, env)[0]


def _nodelist(env: Mapping[str, str]) -> str:
    """The node list whose first node hosts the rendezvous: the step's inside an srun step, else the
    job's. A step list that is not within the job's came from elsewhere (exported by a shell that
    ran inside another job's step, and passed on by sbatch): the job's then."""
    step = env.get("SLURM_STEP_NODELIST")
    job = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if step and job and first_host(step, env) not in hosts(job, env):
        return job
    if step or job:
        return step or job
    raise DmhpcError("environment: no SLURM_STEP_NODELIST or SLURM_JOB_NODELIST to find the job's first node in")


def node_address(node: str, env: Mapping[str, str]) -> str:
    """How the other nodes reach `node`: its name where it resolves, else Slurm's NodeAddr for it."""
    try:
        socket.getaddrinfo(node, None)
        return node
    except (socket.gaierror, UnicodeError):
        pass
    m = re.search(r"\bNodeAddr=(\S+)", _scontrol(env, "show", "node", "-o", node) or "")
    return m.group(1) if m else node


STEP_IDS = 0xFFFFFFF0  # SLURM's own steps (batch, extern, interactive) are numbered from here up
# Prime to 2000 (2000 steps of a job take 2000 ports), and its first 8 multiples at least 222 from
# 0 mod 2000, the most any stride gives: a job's steps stay away from its neighbours' step 0.
STEP_STRIDE = 889


def slurm_port(env: Mapping[str, str]) -> int:
    job, step = env.get("SLURM_JOB_ID", ""), env.get("SLURM_STEP_ID", "")
    if not job.isdecimal():
        return PORT_BASE
    step_id = int(step) if step.isdecimal() and int(step) < STEP_IDS else 0
    return PORT_BASE + (int(job) + STEP_STRIDE * step_id) % PORT_SPAN


def slurm_rendezvous(env: Mapping[str, str]) -> tuple[str, int]:
    """(address, port) where the ranks of this SLURM job meet; MASTER_ADDR/MASTER_PORT win."""
    addr = env.get("MASTER_ADDR")
    if addr:
        nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or "1"
        check_master_addr(addr, int(nodes) if nodes.isdecimal() else 1)
    else:
        addr = node_address(first_host(_nodelist(env), env), env)
    port = master_port(env)
    return addr, slurm_port(env) if port is None else port


def check_master_addr(addr: str, nodes: int) -> None:
    """Refuse a loopback MASTER_ADDR (a tutorial's `localhost` in ~/.bashrc) for ranks on several
    nodes: each node formed a world of its own and waited 30 minutes for the others."""
    import ipaddress

    name = addr.strip("[]").rstrip(".").lower()
    try:
        loopback = ipaddress.ip_address(name).is_loopback
    except ValueError:
        loopback = name == "localhost" or name.endswith(".localhost")
    if loopback and nodes > 1:
        raise DmhpcError(f"environment variable MASTER_ADDR={addr}: a loopback address, and the ranks are on "
                         f"{nodes} nodes, each of which would meet alone; unset it (the job's first node is "
                         f"used) or name a node of the job")


def master_port(env: Mapping[str, str]) -> int | None:
    """MASTER_PORT as a port number, None when it is not set; a one-line error naming it otherwise."""
    port = env.get("MASTER_PORT")
    if port is None:
        return None
    if not port.strip().isdecimal() or not 0 < int(port) < 65536:
        raise DmhpcError(f"environment variable MASTER_PORT: expected a port number, got {port!r}")
    return int(port)


def main() -> int:
    """Print `ADDRESS PORT` for this job (slurm/lib.sh reads it)."""
    try:
        addr, port = slurm_rendezvous(os.environ)
    except DmhpcError as exc:
        print(f"dmhpc rendezvous: error: {exc}", file=sys.stderr)
        return 1
    print(addr, port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
