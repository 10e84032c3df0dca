"""slurm/train_ddp.sh, slurm/prepare_mpi.sh and slurm/predict.sh, submitted with sbatch to the two-node test cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
# What the jobs get on top of the submitting environment: this interpreter, one thread per rank.
JOB_ENV = {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def test_train_ddp_refuses_a_missing_config_before_starting_anything(slurm_cluster, tmp_path):
    job = slurm_cluster.wait(slurm_cluster.sbatch(
        "--cpus-per-task=1", f"--output={tmp_path}/out", str(REPO / "slurm" / "train_ddp.sh"), "no/such.yaml",
        cwd=tmp_path, env=JOB_ENV), timeout=60)
    # Exit 2 with this message also shows that the spooled copy of the script found slurm/lib.sh.
    assert (job.state, job.exit_code) == ("FAILED", 2), job
    assert job.output.strip() == f"train_ddp.sh: error: config 'no/such.yaml' not found (in {tmp_path})", job
    # Submitted by a relative path with --chdir: the job runs elsewhere, and its Command (relative to
    # the submit directory) named a slurm/lib.sh there that was not.
    job = slurm_cluster.wait(slurm_cluster.sbatch(
        "--cpus-per-task=1", f"--chdir={tmp_path}", f"--output={tmp_path}/out2", "slurm/train_ddp.sh",
        "no/such.yaml", cwd=REPO, env=JOB_ENV), timeout=60)
    assert (job.state, job.exit_code) == ("FAILED", 2), job
    assert job.output.strip() == f"train_ddp.sh: error: config 'no/such.yaml' not found (in {tmp_path})", job


def test_train_ddp_refuses_train_signals_without_the_one_it_forwards(slurm_cluster, tmp_path, make_domains):
    # The ranks start with SIGUSR2 ignored and the script forwards the time limit's warning as SIGUSR2:
    # without it in train.signals the ranks trained on to the limit, unsaved and not requeued.
    data = make_domains(48)
    job = slurm_cluster.wait(slurm_cluster.sbatch(
        "--cpus-per-task=1", f"--output={tmp_path}/out", "slurm/train_ddp.sh", "configs/tiny.yaml",
        f"data.source={data / 'pristine'}", f"data.target={data / 'noisy'}", f"run.dir={tmp_path / 'run'}",
        "train.signals=[SIGTERM]", cwd=REPO, env=JOB_ENV), timeout=120)
    assert job.state == "FAILED", job
    assert ("error: command line: train.signals SIGTERM: the batch script passes the time limit's warning and its "
            "stops on to the ranks as SIGUSR2, which the ranks would ignore (no checkpoint, no requeue): add SIGUSR2"
            in job.output), job
    assert not (tmp_path / "run").exists()


def test_prepare_mpi_renders_the_survey_a_survey_config_reads(slurm_cluster, tmp_path):
    """The survey config reads survey_X.npy, which synth writes only with --survey (the job rendered
    without it and prepare failed on the missing file); that render also serves embedded.yaml,
    converted by one MPI world of ranks on both nodes."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install dmhpc[mpi])")
    raw, shards = tmp_path / "raw", tmp_path / "shards"

    def submit(config, name):
        return slurm_cluster.sbatch(
            "--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/{name}", "slurm/prepare_mpi.sh", config,
            "--synth", "4", "--root", str(raw), "--out", str(shards), cwd=REPO, env=JOB_ENV)

    job = slurm_cluster.wait(submit("configs/data/embedded-survey.yaml", "survey"), timeout=240)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), job
    assert "--n-per-class 4 --seed 0 --survey" in job.output and "survey: 8 images" in job.output, job
    job = slurm_cluster.wait(submit("configs/data/embedded.yaml", "pristine"), timeout=240)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), job
    assert "already holds the render --n-per-class 4 --seed 0 --survey" in job.output, job
    assert "dmhpc synth:" not in job.output, job
    # One MPI world of 2 ranks reports once per domain; 2 worlds of 1 would each report.
    assert job.output.count("pristine: 8 images") == 1 and job.output.count("noisy: 8 images") == 1, job
    for domain in ("pristine", "noisy"):
        verify = subprocess.run([sys.executable, "-m", "dmhpc", "verify", str(shards / domain)],
                                capture_output=True, text=True, timeout=120)
        assert verify.returncode == 0, verify.stdout + verify.stderr

    # --set counts as prepare counts it: the noisy domain read from the survey's files needs them.
    overrides = [f"--set=domains.noisy.{key}=survey_{name}.npy" for key, name in
                 (("images", "X"), ("labels", "y"), ("objects", "objects"))]
    job = slurm_cluster.wait(slurm_cluster.sbatch(
        "--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/set", "slurm/prepare_mpi.sh",
        "configs/data/embedded.yaml", "--synth", "4", "--root", str(tmp_path / "raw2"), "--out",
        str(tmp_path / "shards2"), *overrides, cwd=REPO, env=JOB_ENV), timeout=240)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), job
    assert "--seed 0 --survey" in job.output and "noisy: 8 images" in job.output, job

    # A config prepare would refuse is its one line before anything runs (it was a traceback).
    bad = tmp_path / "bad.yaml"
    bad.write_text("root: raw\nout: shards\ndomains:\n  survey: {imagez: survey_X.npy}\n")
    job = slurm_cluster.wait(submit(str(bad), "bad"), timeout=120)
    assert (job.state, job.exit_code) == ("FAILED", 2), job
    assert job.output.startswith(f"prepare_mpi.sh: error: {bad}: 2 problems, nothing written:\n"
                                 f"{bad}: domains.survey.imagez: unknown key"), job


def test_prepare_mpi_with_synth_can_be_submitted_again(slurm_cluster, tmp_path):
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install dmhpc[mpi])")
    raw, shards = tmp_path / "raw", tmp_path / "shards"

    def submit(n, *extra, name):
        return slurm_cluster.sbatch(
            "--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/{name}", "slurm/prepare_mpi.sh",
            "configs/data/embedded.yaml", "--synth", str(n), "--root", str(raw), "--out", str(shards), *extra,
            cwd=REPO, env=JOB_ENV)

    # A job cancelled while synth renders leaves its staged files: the next job finishes the render.
    job_id = submit(5000, name="cancelled")
    slurm_cluster.wait_for(lambda: bool(list(raw.glob(".pristine_X.npy.*.tmp"))), "staged synth files", job_id)
    slurm_cluster.run("scancel", job_id)
    assert slurm_cluster.wait(job_id, timeout=60).state == "CANCELLED"
    job = slurm_cluster.wait(submit(4, name="finished"), timeout=240)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), job
    assert "dmhpc synth: 8 images" in job.output and "pristine: 8 images" in job.output, job
    assert not list(raw.glob(".*.tmp")), job
    meta = (raw / "meta.json").read_bytes()

    # The same render again is kept (prepare's --overwrite replaces the finished data sets).
    job = slurm_cluster.wait(submit(4, "--overwrite", name="same"), timeout=240)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), job
    assert "already holds the render --n-per-class 4 --seed 0" in job.output and "dmhpc synth:" not in job.output, job
    assert (raw / "meta.json").read_bytes() == meta

    # Another render into a finished root is refused before anything runs, unless --overwrite.
    job = slurm_cluster.wait(submit(2, name="other"), timeout=120)
    assert (job.state, job.exit_code) == ("FAILED", 2), job
    assert job.output.strip() == (
        f"prepare_mpi.sh: error: {raw} holds a finished render of other settings (--n-per-class 4 --seed 0, from "
        f"its meta.json) than --synth asks (--n-per-class 2 --seed 0); pass --overwrite to replace it, or choose "
        f"another --root"), job
    assert (raw / "meta.json").read_bytes() == meta
    job = slurm_cluster.wait(submit(2, "--overwrite", name="replaced"), timeout=240)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), job
    assert "dmhpc synth: 4 images" in job.output and "pristine: 4 images" in job.output, job
    assert json.loads((raw / "meta.json").read_text())["n_per_class"] == 2


def test_train_ddp_under_export_none_hands_its_environment_to_the_ranks(slurm_cluster, tmp_path, make_domains):
    """A site submitting with --export=NONE (a wrapper activating the environment in the job) gives
    the job SLURM_EXPORT_ENV=NONE, which the script's own srun took up: the ranks started without
    the wrapper's PATH, OMP_NUM_THREADS and torchrun's shutdown timeout, and `python` was not found."""
    data = make_domains(64)
    wrapper = tmp_path / "wrapper.sh"
    wrapper.write_text(f'#!/bin/bash\nexport PATH="{Path(sys.executable).parent}:$PATH" OMP_NUM_THREADS=1\n'
                       f'exec bash {REPO}/slurm/train_ddp.sh "$@"\n')
    job = slurm_cluster.wait(slurm_cluster.sbatch(
        "--export=NONE", "--cpus-per-task=1", f"--output={tmp_path}/out", str(wrapper), "configs/tiny.yaml",
        f"data.source={data / 'pristine'}", f"data.target={data / 'noisy'}", f"run.dir={tmp_path / 'run'}",
        "train.epochs=1", "train.batch_size=4", cwd=REPO), timeout=240)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), job
    assert (tmp_path / "run" / "eval" / "best_test.json").is_file(), job


def test_train_ddp_checkpoints_on_usr2_requeues_and_resumes(slurm_cluster, tmp_path, make_domains):
    # 480 images, 70 % for training, 4 per rank and batch on 2 ranks: one epoch of 42 steps, so the
    # signal, sent after the first step, lands well inside it.
    data = make_domains(480)
    run, reference = tmp_path / "run", tmp_path / "reference"

    def submit(run_dir, output):
        # One CPU per node each, so that the uninterrupted reference runs alongside.
        return slurm_cluster.sbatch(
            "--nodes=2", "--cpus-per-task=1", f"--output={output}", "slurm/train_ddp.sh", "configs/tiny.yaml",
            f"data.source={data / 'pristine'}", f"data.target={data / 'noisy'}", f"run.dir={run_dir}",
            "train.epochs=1", "train.batch_size=4", "train.log_every=1", cwd=REPO, env=JOB_ENV)

    reference_id = submit(reference, tmp_path / "reference.out")
    job_id = submit(run, tmp_path / "out")
    metrics = run / "metrics.jsonl"
    slurm_cluster.wait_for(lambda: metrics.is_file() and '"kind": "step"' in metrics.read_text(),
                           "training step", job_id, timeout=120)
    slurm_cluster.run("scancel", "--signal=USR2", "--batch", job_id)
    job = slurm_cluster.wait(job_id, timeout=300)
    assert (job.state, job.exit_code, job.restarts) == ("COMPLETED", 0, 1), job
    # The ranks stopped with the trainer's requeue code (75), which torchrun saw, and the job
    # requeued; the second run resumed where the first stopped and finished. (Usually both nodes'
    # torchrun report the 75; when the first node's agent, which hosts the rendezvous store, exits
    # before the second has collected its worker, the second reports the lost store instead: seen
    # once in CI under load. The checkpoint, the requeue and the weights below are what matter.)
    assert "torch.distributed.run --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d" in job.output, job
    assert job.output.count("exitcode: 75") >= 1 and "requeueing job" in job.output, job
    assert "checkpoint written at step" in job.output and "resumed from" in job.output, job
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"kind": "step"' in line]
    assert steps == list(range(1, 42 + 1)), steps
    assert (run / "eval" / "best_test.json").is_file(), job
    # The requeued run ends with exactly the weights of the uninterrupted one (same world size,
    # same threads: JOB_ENV's OMP_NUM_THREADS=1 in both).
    ref = slurm_cluster.wait(reference_id, timeout=300)
    assert (ref.state, ref.exit_code, ref.restarts) == ("COMPLETED", 0, 0), ref
    import torch

    a = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_train_ddp_cancelled_checkpoints_before_the_job_ends_and_is_not_requeued(slurm_cluster, tmp_path,
                                                                                make_domains):
    """scancel sends SIGTERM to every process of the job, the batch shell among them, which died of
    it at once: the job ended with it and its ranks were killed while they saved. The shell now
    waits for them and requeues nothing: a cancelled job stays cancelled."""
    data = make_domains(480)
    run = tmp_path / "run"
    job_id = slurm_cluster.sbatch(
        "--nodes=1", "--cpus-per-task=1", f"--output={tmp_path}/out", "slurm/train_ddp.sh", "configs/tiny.yaml",
        f"data.source={data / 'pristine'}", f"data.target={data / 'noisy'}", f"run.dir={run}", "train.epochs=1",
        "train.batch_size=4", "train.log_every=1", cwd=REPO, env=JOB_ENV)
    metrics = run / "metrics.jsonl"
    slurm_cluster.wait_for(lambda: metrics.is_file() and '"kind": "step"' in metrics.read_text(),
                           "training step", job_id, timeout=120)
    slurm_cluster.run("scancel", job_id)
    job = slurm_cluster.wait(job_id, timeout=120)  # CANCELLED at once; its processes end after
    out, deadline = tmp_path / "out", time.monotonic() + 120
    while "not requeueing" not in out.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    text = out.read_text()
    assert (job.state, slurm_cluster.job(job_id).restarts) == ("CANCELLED", 0), text
    assert "SIGTERM: checkpoint written at step" in text and "after SIGTERM; not requeueing" in text, text
    import torch

    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] >= 1, text


def test_predict_on_two_nodes_requeues_on_usr2_and_ends_with_the_catalog_of_one_process(
        slurm_cluster, tmp_path, make_domains):
    """slurm/predict.sh: a torchrun per node, parts per rank; the time-limit signal stops every rank
    after its part, the job requeues, the next start skips the finished parts and merges."""
    import numpy as np

    data = make_domains(64)
    run = tmp_path / "run"
    trained = subprocess.run([sys.executable, "-m", "dmhpc", "train", "--config", "configs/tiny.yaml",
                              f"data.source={data / 'pristine'}", f"data.target={data / 'noisy'}", f"run.dir={run}",
                              "train.epochs=1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-2000:]
    survey = np.random.default_rng(0).normal(size=(600, 3, 75, 75)).astype(np.float32)
    np.save(tmp_path / "survey.npy", survey)
    options = ["--images", str(tmp_path / "survey.npy"), "--part-size", "16", "--batch-size", "8", "--tta"]
    single = tmp_path / "single.parquet"
    local = subprocess.run([sys.executable, "-m", "dmhpc", "predict", "--run", str(run), *options, "--out", str(single)],
                           cwd=REPO, env={**os.environ, **JOB_ENV}, capture_output=True, text=True,
                           timeout=600)
    assert local.returncode == 0, local.stderr[-2000:]
    out = tmp_path / "catalog.parquet"
    job_id = slurm_cluster.sbatch("--nodes=2", "--cpus-per-task=1", f"--output={tmp_path}/out", "slurm/predict.sh",
                                  str(run), *options, "--out", str(out), cwd=REPO, env=JOB_ENV)
    parts = Path(f"{out}.parts")
    slurm_cluster.wait_for(lambda: len(list(parts.glob("part-*.npz"))) >= 2, "two parts", job_id, timeout=180)
    slurm_cluster.run("scancel", "--signal=USR2", "--batch", job_id)
    job = slurm_cluster.wait(job_id, timeout=600)
    assert (job.state, job.exit_code, job.restarts) == ("COMPLETED", 0, 1), job
    assert "requeueing job" in job.output and "done before" in job.output and "world 2" in job.output, job
    from astropy.table import Table

    a, b = Table.read(single, format="parquet"), Table.read(out, format="parquet")
    for column in a.colnames:
        assert np.array_equal(np.asarray(a[column]), np.asarray(b[column])), column
