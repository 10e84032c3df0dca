"""A stand-in for the trainer, launched by the cluster tests through slurm/lib.sh.

    python ddp_probe.py OUT_DIR [--until-signal]

Joins the process group the way the trainer's bootstrap does (torchrun's RANK/WORLD_SIZE/
LOCAL_RANK, else srun's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID with MASTER_ADDR/MASTER_PORT),
all-reduces rank + 1 over gloo and writes OUT_DIR/rank<R>-run<N>.json (N = SLURM_RESTART_COUNT).
With --until-signal the first run then waits for SIGUSR2, "checkpoints" (sleeps CHECKPOINT_S, then
writes OUT_DIR/rank<R>-run0.signal) and exits with EXIT_ON_SIGNAL, as the trainer does; a
requeued run (N >= 1) exits 0.
"""

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_ON_SIGNAL = 3
WAIT_FOR_SIGNAL_S = 120
# The trainer takes a while to checkpoint after the signal: the launcher must not kill it meanwhile.
CHECKPOINT_S = 2.0

got_signal = False


def on_usr2(signum, frame):
    global got_signal
    got_signal = True


def _publish(path: Path, text: str) -> None:
    # The test polls for these files while the job runs: a rename never shows a half-written one.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> int:
    signal.signal(signal.SIGUSR2, on_usr2)  # first, as the trainer must: USR2 may come any time
    out = Path(sys.argv[1])
    until_signal = "--until-signal" in sys.argv[2:]
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", "0")))
    world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "1")))
    local_rank = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0")))
    run = int(env.get("SLURM_RESTART_COUNT", "0"))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    record = {
        "rank": rank, "world_size": world_size, "local_rank": local_rank, "result": total.item(),
        "node_id": int(env["SLURM_NODEID"]), "node": env["SLURMD_NODENAME"], "run": run,
        "launched_by_torchrun": "TORCHELASTIC_RUN_ID" in env, "host": socket.gethostname(),
    }
    _publish(out / f"rank{rank}-run{run}.json", json.dumps(record))
    code = 0
    if until_signal and run == 0:
        deadline = time.monotonic() + WAIT_FOR_SIGNAL_S
        while not got_signal and time.monotonic() < deadline:
            time.sleep(0.1)
        # Like the trainer: every rank stops together once all have seen the signal.
        flag = torch.tensor([1.0 if got_signal else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        code = EXIT_ON_SIGNAL if flag.item() == 1.0 else 1
        time.sleep(CHECKPOINT_S)
        _publish(out / f"rank{rank}-run{run}.signal", str(code))
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
