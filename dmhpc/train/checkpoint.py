"""Checkpoint files, RNG states, and stopping cleanly on a signal.

Checkpoints are dicts of plain data (what `TrainState.state_dict` returns, plus "selection" and
"config"), so that `torch.load(weights_only=True)` reads them without running any pickled code:
tensors (Parameters too), dicts (OrderedDicts too), lists, tuples (torch.Size too), str, int, float,
bool and None only, of exactly those types (numpy arrays and scalars, enums, namedtuples,
defaultdicts, dataclasses and other objects are refused at save time, not discovered at resume
time). Where they live is the run directory's business (dmhpc/run.py).

Writes are atomic (dmhpc/files.py): a job killed mid-write, or a full disk, leaves the previous
checkpoint intact.

Signals: `StopRequest` catches the configured signals (SLURM sends SIGTERM at the time limit or on
preemption, `--signal=USR2@90` gives warning ahead of it). The handler only records the signal;
the loop polls `should_stop()` after each step, the ranks agree, all write the checkpoint and exit
with REQUEUE_EXIT_CODE.

REQUEUE_EXIT_CODE = 75 is EX_TEMPFAIL of sysexits.h, "temporary failure, the user is invited to
retry": it differs from a failure (1), a usage error (2), the shell's 126/127 (cannot execute / not
found) and 128+N (killed by signal N, 129-165 for the usual signals), so a launcher that sees the
trainer's own exit code (srun or mpiexec starting one process per rank) can requeue on exactly this
code. torchrun reports any failed worker as 1, so slurm/train_ddp.sh requeues a torchrun step on the
signal it forwarded instead.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
import signal
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist

from dmhpc.config import TrainConfig
from dmhpc.distributed import all_gather_object, is_distributed
from dmhpc.errors import DmhpcError
from dmhpc.files import atomic_write
from dmhpc.names import CRITERIA
from dmhpc.run_records import Unfit, check_checkpoint_info

REQUEUE_EXIT_CODE = 75
# What the scheduler sends before it stops a job (train.signals' default; predict's).
STOP_SIGNALS = TrainConfig().signals
SELECTION_KEYS = ("criterion", "score", "epoch")  # what the trainer records of a selected checkpoint

# Exact types, not subclasses: torch.load(weights_only=True) refuses an IntEnum (a signal), a
# namedtuple or a defaultdict, though isinstance takes them for an int, a tuple or a dict.
_PLAIN_LEAVES = (str, int, float, bool, type(None))
_PLAIN_DICTS = (dict, OrderedDict)  # state_dict() gives OrderedDicts
_PLAIN_SEQUENCES = (list, tuple, torch.Size)


def _check_plain(value: Any, where: str) -> None:
    kind = type(value)
    if kind in _PLAIN_DICTS:
        for k, v in value.items():
            if type(k) not in (str, int, bool):
                raise TypeError(f"checkpoint state: {where}: key {k!r} is a {type(k).__name__}, not str or int")
            _check_plain(v, f"{where}.{k}" if where else str(k))
    elif kind in _PLAIN_SEQUENCES:
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif kind not in _PLAIN_LEAVES and not isinstance(value, torch.Tensor):
        raise TypeError(f"checkpoint state: {where or 'state'}: a {kind.__module__}.{kind.__name__} cannot "
                        f"be loaded with weights_only=True; store tensors, lists or plain numbers instead")


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` to `path` atomically; a failed write is a DmhpcError and the old file stays."""
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
    _check_plain(state, "")
    atomic_write(path, writer=lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint on the CPU with weights_only=True; a missing or unreadable file is a DmhpcError."""
    path = Path(path)
    if not path.is_file():
        raise DmhpcError(f"{path}: checkpoint not found")
    return _load(path, path)


def load_checkpoint_sha256(path: str | os.PathLike) -> tuple[dict, str]:
    """(`load_checkpoint(path)`, the SHA-256 of the very bytes it was loaded from): hashing the file
    apart, before or after, could name a checkpoint written in between (a run still training
    rewrites last.pt every epoch)."""
    path = Path(path)
    if not path.is_file():
        raise DmhpcError(f"{path}: checkpoint not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DmhpcError(f"{path}: cannot read the checkpoint: {exc.strerror}") from None
    return _load(path, io.BytesIO(data)), hashlib.sha256(data).hexdigest()


def _load(path: Path, source) -> dict:
    """The checkpoint read from `source` (its path, or its bytes), its errors naming `path`."""
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError ... for bad files
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DmhpcError(f"{path}: not a readable dmhpc checkpoint (truncated, corrupt, or holding "
                         f"pickled objects): {reason}") from None
    if not isinstance(state, dict):
        raise DmhpcError(f"{path}: not a dmhpc checkpoint: holds a {type(state).__name__}, not a dict")
    return state


def checkpoint_info(name: str, state: dict, path: str | os.PathLike) -> dict:
    """What the checkpoint `path` holds, for result files, model cards and titles: its name, step,
    selection, and the epoch of its weights, numbered as metrics.jsonl numbers epochs (from 0). The
    progress says where a resume starts, which for a checkpoint written at an epoch's end is the
    next epoch. An entry of another type than a run writes is a one-line error naming the file."""
    for key in ("progress", "selection"):
        if not isinstance(state.get(key, {}), dict):
            raise unfit(path, EditedCheckpoint(f"its {key!r} entry is a {type(state[key]).__name__}, not a dict"))
    epoch = state.get("epoch")
    if isinstance(epoch, int) and epoch > 0 and state.get("progress", {}).get("step_in_epoch") == 0:
        epoch -= 1
    info = {"name": name, "epoch": epoch, "step": state.get("step")}
    # What the trainer selects by, and nothing else: a "name" or "early_stopping" of an edited file
    # renamed the checkpoint on a card (its result looked up outside the run) or chose its oracle flag.
    info.update((k, v) for k, v in state.get("selection", {}).items() if k in SELECTION_KEYS)
    config = state.get("config")
    if not state.get("selection") and isinstance(config, dict):
        # What may have ended the run at an unselected checkpoint, as it trained: config.yaml holds
        # the next start's (a resume changes train.early_stopping; one killed before its first
        # checkpoint leaves config.yaml ahead of last.pt).
        train, select = config.get("train"), config.get("select")
        if isinstance(train, dict) and isinstance(select, dict):
            info["early_stopping"] = {"evaluations": train.get("early_stopping"), "criterion": select.get("criterion")}
    try:
        check_checkpoint_info(info, "selection.")
    except Unfit as exc:
        raise unfit(path, EditedCheckpoint(str(exc))) from None
    return info


def check_selected(best: dict, best_score: float, path: Path) -> None:
    """Refuse a best checkpoint that is not the one the run's progress (`best_score`, from last.pt)
    says it selected: a run directory copied while it trained (rsync copies best.pt before last.pt)
    resumed with an earlier best.pt, and its final test reported that epoch as the run's result."""
    selection = best.get("selection") or {}
    if math.isfinite(best_score) and selection.get("score") != best_score:
        raise DmhpcError(f"{path}: of epoch {selection.get('epoch')}, scored {selection.get('score')}; the run's "
                         f"progress says its selected checkpoint scored {best_score}: a best.pt of another moment "
                         f"of the run (a copy taken while it trained?); put the run's own best.pt back")


def chosen_with_target_labels(info: dict, cfg) -> bool:
    """Whether target labels chose this checkpoint (`checkpoint_info`): its selection criterion is an
    oracle, or, for one without a selection (last.pt), early stopping watched an oracle criterion
    and may have ended the run there: as the checkpoint records it, else as `cfg` says."""
    if info.get("criterion") is not None:
        return CRITERIA.get(info["criterion"], False)
    stopping = info.get("early_stopping") or {"evaluations": cfg.train.early_stopping,
                                              "criterion": cfg.select.criterion}
    return bool(stopping["evaluations"]) and CRITERIA.get(stopping["criterion"], False)


class EditedCheckpoint(ValueError):
    """An entry of a checkpoint that no run writes (its type, a progress field): said as it is."""


def unfit(path: str | os.PathLike, exc: Exception) -> DmhpcError:
    """The one-line error of a checkpoint whose content does not fit what loads it (hand-edited, of
    an older format, or another model's): torch's KeyError or multi-line RuntimeError, named."""
    if isinstance(exc, KeyError):
        return DmhpcError(f"{path}: no {exc.args[0]!r} entry (an edited checkpoint, or not one of dmhpc)")
    if isinstance(exc, EditedCheckpoint):
        return DmhpcError(f"{path}: {exc} (an edited checkpoint, or not one of dmhpc)")
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return DmhpcError(f"{path}: does not fit this run's model ({reason[:300]})")


# Restarted attempts in a row that may write no checkpoint. One is a node lost, a crash or a stop that
# could not save; two mean the next would most likely fail the same way, and requeue forever.
IDLE_ATTEMPTS = 2


def check_requeue_progress(path: Path, state: dict | None, now: dict | None, started: list[int] | None) -> None:
    """Refuse to train in a restarted job (a SLURM requeue, a torchrun restart) whose previous
    IDLE_ATTEMPTS attempts that started this run wrote no checkpoint. `path` is the run's last.pt,
    `state` what it holds (None: there is none yet), `now` this attempt (`DistInfo.attempt`),
    `started` the restart counts of this job's attempts that started the run
    (`RunDir.started_attempts`; None where run.json predates them: every earlier attempt is then
    taken to have). Checkpoints record the attempt that wrote them as
    "attempt". Counted from the job's restart count alone, attempts that never reached this run (a
    new run.dir in a job requeued twice, grid points run inside one) refused it.

    The requeue after a stop signal (slurm/lib.sh, submitit) happens whether or not the stop's save
    succeeded: a quota reached, or a stop longer than the signal's warning time, otherwise fails
    every attempt the same way, and each waits in the queue and runs to its time limit again."""
    if now is None or now["restart"] == 0:
        return
    if state is not None and "attempt" not in state:
        return  # written by dmhpc before checkpoints said by which attempt: nothing to compare
    written = state.get("attempt") if state is not None else None
    by_this_job = isinstance(written, dict) and written.get("job") == now["job"] and \
        isinstance(written.get("restart"), int)
    since = written["restart"] if by_this_job else -1
    idle = now["restart"] - 1 - since if started is None else len({r for r in started if since < r < now["restart"]})
    if idle >= IDLE_ATTEMPTS:
        since = (f"since attempt {written['restart']} wrote it" if by_this_job
                 else "and none of its attempts wrote it")
        raise DmhpcError(f"{path}: this is attempt {now['restart']} of job {now['job']}; {idle} of its attempts "
                         f"started this run without writing a checkpoint ({since}); not training again to fail the "
                         f"same way: the job's log says why they did not save (a crash, a full disk, a stop longer "
                         f"than the signal's warning), then submit it again")


UNFIT = (KeyError, RuntimeError, ValueError, TypeError)  # what load_state_dict raises for content that does not fit


def load_weights(module: torch.nn.Module, checkpoint: dict, path: str | os.PathLike, key: str = "model") -> None:
    """Put checkpoint[key] into `module`; what does not fit, or is not finite, is one line naming the file."""
    try:
        module.load_state_dict(checkpoint[key])
    except UNFIT as exc:
        raise unfit(path, exc) from None
    check_finite_weights(module, path, f"{key}.")


def check_finite_weights(module: torch.nn.Module, path: str | os.PathLike, prefix: str = "") -> None:
    """The trainer never saves a non-finite weight: one is an edited or damaged file, which export
    wrote out silently (safetensors, TorchScript) and predict turned into a catalog of NaN."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DmhpcError(f"{path}: {prefix}{name} holds NaN or Inf, which dmhpc never saves: an edited or "
                             f"damaged file")


# --- random number generators ----------------------------------------------------------------------

def capture_rng_state() -> dict:
    """This process's RNG states (torch CPU, this rank's CUDA device, numpy global, python) as plain data."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": int(py_version), "state": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Put back what `capture_rng_state` took. A CUDA state is skipped on a machine without CUDA."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states() -> list[dict]:
    """Every rank's RNG states in rank order, for one checkpoint. A collective: all ranks call it."""
    return all_gather_object(capture_rng_state())


def restore_rank_rng_state(states: list[dict], rank: int) -> bool:
    """Restore this rank's entry of `gather_rng_states()`; False when the saved run had no such rank.

    After a resume on more ranks than were saved, the new ranks keep their freshly seeded state:
    the data shards change with the world size anyway, so the run is not bit-identical to an
    uninterrupted one; on the same world size it is.
    """
    if rank >= len(states):
        return False
    restore_rng_state(states[rank])
    return True


# --- stopping on signals ---------------------------------------------------------------------------

class StopRequest:
    """Catches `signals` and tells the training loop, in agreement across ranks, when to stop.

    Call `should_stop()` exactly once after every step on every rank. In a single process it is
    True right after a signal. Under a process group each call starts an asynchronous MAX
    all-reduce of the local flag and reads the one started by the previous call; every rank gets
    True at the same call, at most two steps after the first signal on any rank (a signal just
    after a call's reduce started travels in the next call's, read at the one after). The flag lives in
    host memory and travels over a gloo group (the default group when it is gloo, a gloo group of
    the same ranks under NCCL), and is read from its numpy buffer: the poll never waits for the
    GPU. Use as a context manager (or call `close()`) so the previous handlers come back and no
    collective is left in flight.
    """

    def __init__(self, signals: Iterable[str]):
        self.signal_name: str | None = None  # first signal this process received
        self._pending: tuple[Any, np.ndarray] | None = None
        self._group = None
        if is_distributed():  # a collective: every rank constructs its StopRequest at the same point
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self._previous: dict[signal.Signals, Any] = {}
        for name in signals:
            signum = signal.Signals[name]
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        # Only a flag: I/O or collectives here could deadlock or run mid-step.
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def should_stop(self) -> bool:
        """True when the loop should checkpoint and exit; the same answer on every rank."""
        if not is_distributed():
            return self.signal_name is not None
        stop = False
        if self._pending is not None:
            (work, flag), self._pending = self._pending, None  # waited for once, even if a peer is gone
            work.wait()  # a gloo all-reduce of one int, started a step ago: on the host only
            stop = bool(flag[0])
        if stop:
            return True
        flag = np.array([int(self.signal_name is not None)], dtype=np.int32)
        work = dist.all_reduce(torch.from_numpy(flag), op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (work, flag)
        return False

    def poll_now(self) -> bool:
        """`should_stop`'s answer now, waited for (between epochs, not after a step): True when any
        rank has caught a signal so far."""
        if not is_distributed():
            return self.signal_name is not None
        self.settle()  # what it carried is in the flag below too: a signal caught stays caught
        flag = np.array([int(self.signal_name is not None)], dtype=np.int32)
        dist.all_reduce(torch.from_numpy(flag), op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag[0])

    def settle(self) -> None:
        """Finish the poll in flight (the loop is left: no collective of it may overlap what follows)."""
        if self._pending is not None:
            (work, _), self._pending = self._pending, None
            work.wait()

    def close(self) -> None:
        """Finish the collective in flight and restore the previous signal handlers (also when that
        collective fails: a peer gone)."""
        try:
            self.settle()
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
            self._previous = {}

    def __enter__(self) -> StopRequest:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
