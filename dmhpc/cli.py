"""The one front door: `dmhpc COMMAND ...`.

Each command lives in the module that owns its idea, as `<command>_arguments(parser)` and
`<command>_main(args) -> int`; `COMMANDS` below names both for every command. Only the chosen
command's module is imported, so `dmhpc --help` does not pay for torch or GalSim.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import traceback
from typing import Callable, NamedTuple

from dmhpc import code_version
from dmhpc.errors import DmhpcError


class Command(NamedTuple):
    """One command: how to load its two functions, and its help."""

    load: Callable[[], tuple[Callable, Callable]]  # -> (add_arguments(parser), main(args) -> int)
    summary: str  # one line, in `dmhpc --help`
    example: str  # shown in `dmhpc NAME --help`


# Each command's functions, imported only when it runs: `dmhpc --help` does not pay for torch or GalSim.
def _synth():
    from dmhpc.data.synth import synth_arguments, synth_main

    return synth_arguments, synth_main


def _prepare():
    from dmhpc.data.prepare import prepare_arguments, prepare_main

    return prepare_arguments, prepare_main


def _verify():
    from dmhpc.data.check import verify_arguments, verify_main

    return verify_arguments, verify_main


def _info():
    from dmhpc.data.shards import info_arguments, info_main

    return info_arguments, info_main


def _train():
    from dmhpc.train.loop import train_arguments, train_main

    return train_arguments, train_main


def _eval():
    from dmhpc.train.evaluate import eval_arguments, eval_main

    return eval_arguments, eval_main


def _predict():
    from dmhpc.infer.predict import predict_arguments, predict_main

    return predict_arguments, predict_main


def _explain():
    from dmhpc.infer.explain import explain_arguments, explain_main

    return explain_arguments, explain_main


def _export():
    from dmhpc.infer.export import export_arguments, export_main

    return export_arguments, export_main


def _grid():
    from dmhpc.launch.grid import grid_arguments, grid_main

    return grid_arguments, grid_main


def _tune():
    from dmhpc.launch.tune import tune_arguments, tune_main

    return tune_arguments, tune_main


def _scaling():
    from dmhpc.launch.scaling import scaling_arguments, scaling_main

    return scaling_arguments, scaling_main


def _demo():
    from dmhpc.demo import demo_arguments, demo_main

    # The demo runs other commands through this front door; it is handed `main` instead of
    # importing this module, which sits above it.
    return demo_arguments, functools.partial(demo_main, run_command=main)


COMMANDS: dict[str, Command] = {
    "synth": Command(
        _synth,
        "render the embedded GalSim merger data set (pristine and noisy domains) as .npy files",
        "dmhpc synth --out data/embedded --n-per-class 2000 --seed 0 --workers 2\n"
        "  mpiexec -n 4 dmhpc synth --out data/embedded --n-per-class 2000 --seed 0",
    ),
    "prepare": Command(
        _prepare,
        "convert .npy images and labels to sharded, checksummed HDF5 (serial or under mpiexec)",
        "dmhpc prepare --images X.npy --labels y.npy --objects o.npy --out data/pristine\n"
        "  dmhpc prepare --data-config configs/data/embedded.yaml\n"
        "  mpiexec -n 4 dmhpc prepare --data-config configs/data/deepmerge2-simsim.yaml --root /path/to/zenodo",
    ),
    "verify": Command(
        _verify,
        "check a sharded data set: manifest, split lists, shard structure and checksums; exit 1 naming each problem",
        "dmhpc verify data/embedded/shards/pristine",
    ),
    "info": Command(
        _info,
        "print a summary of a sharded data set: counts per split and class, shape, statistics",
        "dmhpc info data/embedded/shards/pristine",
    ),
    "train": Command(
        _train,
        "train a model with domain adaptation (single process, torchrun, srun or mpiexec)",
        "dmhpc train --config configs/deepmerge-mmd-fisher-entropy.yaml train.epochs=20 seed=1\n"
        "  torchrun --nproc_per_node=4 -m dmhpc.train --config configs/resnet18-dann.yaml --resume auto\n"
        "  torchrun --standalone --nproc_per_node=1 -m dmhpc.train --config configs/tiny.yaml debug=true \\\n"
        "      run.dir=runs/tiny-debug",
    ),
    "eval": Command(
        _eval,
        "evaluate a run's selected checkpoint: metrics JSON and ROC, confusion, curve and latent-space plots",
        "dmhpc eval --run runs/deepmerge-mmd-fisher-entropy --split test",
    ),
    "predict": Command(
        _predict,
        "a merger probability per image as a catalog (Parquet, FITS, CSV, ECSV, HDF5): streamed, any number "
        "of ranks, resumable",
        "dmhpc predict --run runs/demo/deepmerge-mmd-fisher-entropy --data runs/demo/shards/noisy --out noisy.parquet\n"
        "  torchrun --nproc_per_node=4 -m dmhpc predict --run-dir RUN --catalog survey.csv --id-column objid "
        "--file-column file "
        "--out candidates.fits --tta",
    ),
    "explain": Command(
        _explain,
        "what the network looks at: Grad-CAM and integrated gradients (captum) over RGB composites, one PNG "
        "grid per domain and class",
        "dmhpc explain --run runs/demo/deepmerge-mmd-fisher-entropy --out explain/\n"
        "  dmhpc explain --run RUN --catalog candidates.fits --n 12 --out explain/",
    ),
    "export": Command(
        _export,
        "hand the model on: ONNX, TorchScript or safetensors with the normalization built in, and a model card",
        "dmhpc export --run runs/demo/deepmerge-mmd-fisher-entropy --format onnx --out merger.onnx",
    ),
    "grid": Command(
        _grid,
        "run a grid or a study of training runs (SLURM job array, or here) and write its leaderboard and summary",
        "dmhpc grid configs/study/deepmerge2.yaml --no-wait            # on a cluster: submit; again later: the tables\n"
        "  dmhpc grid configs/study/deepmerge2-laptop.yaml --executor local\n"
        "  dmhpc grid configs/study/deepmerge2.yaml --report",
    ),
    "tune": Command(
        _tune,
        "search hyperparameters with Optuna (TPE, median pruning) by a label-free criterion; trials run "
        "as training jobs (SLURM or here)",
        "dmhpc tune configs/tune/coral-fisher-entropy-laptop.yaml\n"
        "  dmhpc tune configs/tune/coral-fisher-entropy-laptop.yaml --executor slurm      # trials as SLURM jobs",
    ),
    "scaling": Command(
        _scaling,
        "run a scaling study (ResNet depth x GPUs x nodes, weak and strong) and write its table and plot",
        "dmhpc scaling configs/scaling/resnet.yaml",
    ),
    "demo": Command(
        _demo,
        "run the main job on the embedded data set from scratch",
        "dmhpc demo --out runs/demo",
    ),
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The example epilog as written, and each option's default in its help where it has one and
    the help does not say it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default not in (None, False, argparse.SUPPRESS, [], ()) and "default" not in text
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


class _Version(argparse.Action):
    """argparse's version action, asking git only when given: not at every command's start."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"dmhpc {code_version()}")
        parser.exit()


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmhpc",
        description="dmhpc: domain-adaptive deep learning on galaxy images.",
        epilog="Run `dmhpc COMMAND --help` for a command's options and an example.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="show the version (and git commit) and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (load, summary, example) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=summary,
            description=summary,
            epilog="example:\n  " + example,
            formatter_class=_HelpFormatter,
            # Scripts outlive option lists: `--over` taken for `--overwrite` today could mean
            # another option once one with the same prefix is added.
            allow_abbrev=False,
        )
        if name == command:
            add_arguments, _ = load()
            add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(command if command in COMMANDS else None)
        args, extra = parser.parse_known_args(argv)
    except KeyboardInterrupt:  # Ctrl-C while the command's modules load (torch: seconds): a traceback
        print(f"dmhpc{' ' + command if command in COMMANDS else ''}: interrupted", file=sys.stderr)
        return 130
    if extra and isinstance(getattr(args, "overrides", None), list) and not any(a.startswith("-") for a in extra):
        # argparse fills a positional list once: overrides after an option (`run.dir=R --overwrite
        # train.epochs=1`) were "unrecognized arguments". They are taken in the order given.
        args.overrides += extra
    elif extra:
        parser.parse_args(argv)  # argparse's own error, exit 2
    code = 0
    stdout, sys.stdout = sys.stdout, _Output(sys.stdout)
    stderr, sys.stderr = sys.stderr, _Output(sys.stderr)
    try:
        _, command_main = COMMANDS[args.command].load()
        code = int(command_main(args) or 0)
        # Output to a pipe is buffered: a reader gone (`dmhpc info DIR | head`) shows here, in the
        # handler below, not in the interpreter's last flush (exit 120 and "Exception ignored").
        sys.stdout.flush()
        return code
    except DmhpcError as exc:
        print(f"dmhpc {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dmhpc {args.command}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        from dmhpc.data.loaders import worker_died  # torch only where it was running
        from dmhpc.distributed import peer_lost

        said = worker_died(exc) or peer_lost(exc)
        if said is None:
            raise
        print(f"dmhpc {args.command}: error: {said}", file=sys.stderr)
        return 1
    except OSError as exc:
        failed = getattr(exc, "from_output", None)
        if failed is None:
            raise  # the command's own (a file, a pipe to a child, a socket), which its traceback names
        # `dmhpc info DS > /dev/full`, or a full disk under a redirected output (a job's --error file):
        # that output is lost, which is a failure, said in one line on the other.
        lost, other, name = ((stderr, stdout, "standard error") if failed is sys.stderr
                             else (stdout, stderr, "standard output"))
        os.dup2(os.open(os.devnull, os.O_WRONLY), lost.fileno())  # the interpreter's last flush goes nowhere
        print(f"dmhpc {args.command}: error: {name}: {exc.strerror or exc}", file=other)
        return 1
    finally:
        sys.stdout, sys.stderr = stdout, stderr


class _Output:
    """Standard output (or error) as the command sees it. A reader gone (`dmhpc info DIR | head`, a
    `tee` that ended) is no error: the command goes on, its output discarded, and keeps its own
    exit code. A training run stopped at that write, between checkpoints, and exited 0. Other write
    errors are marked as the output's: an OSError alone does not say whether the output or a file
    the command writes failed."""

    def __init__(self, stream):
        # None: the process started with the descriptor closed (`>&-`, a daemon's), where Python
        # itself discards what print writes; the first write was an AttributeError traceback.
        self._stream = stream if stream is not None else open(os.devnull, "w", encoding="utf-8")

    def write(self, text: str) -> int:
        return self._marked(self._stream.write, text)

    def flush(self) -> None:
        self._marked(self._stream.flush)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    def _marked(self, call, *args):
        try:
            return call(*args)
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())  # what is still buffered goes there too
            os.close(devnull)
            return len(args[0]) if args else None
        except OSError as exc:
            exc.from_output = self  # which stream failed
            raise


def _mpi_world():
    """MPI.COMM_WORLD where this command's ranks met through MPI (`dmhpc.distributed.mpi_world`),
    else None; never loads torch for a command that did not."""
    distributed = sys.modules.get("dmhpc.distributed")
    return None if distributed is None else distributed.mpi_world()


def _end_mpi_world(code: int) -> None:
    """Under mpiexec, a rank that fails ends every rank (MPI_Abort), as srun's --kill-on-bad-exit and
    torchrun do. It waited at exit in mpi4py's MPI_Finalize for ranks that waited for it (in an NCCL
    collective until its 30-minute timeout; busy with a part or a step before that), and mpiexec saw
    no failure. Ranks that agreed on an error have each said it by then. (Waiting for the others to
    fail too, in a barrier on COMM_WORLD, met a command's own pending barrier there and hung.)"""
    world = _mpi_world()
    if world is not None:
        from dmhpc.mpi import abort_all

        abort_all(world, code)


def run(argv: list[str] | None = None) -> None:
    """The process's entry point (the `dmhpc` script, `python -m dmhpc`, `python -m dmhpc.train`):
    main's exit code as the process's."""
    try:
        code = main(argv)
    except SystemExit:  # argparse's (before the launch: no rank met another)
        raise
    except BaseException:  # a defect's traceback, said before the world ends
        if _mpi_world() is not None:
            traceback.print_exc()
            _end_mpi_world(1)
        raise
    stops = sys.modules.get("dmhpc.train.checkpoint")  # loaded by every command that catches stop signals
    if code not in (0, getattr(stops, "REQUEUE_EXIT_CODE", 0)):
        _end_mpi_world(code)
    if stops is not None and code in (0, stops.REQUEUE_EXIT_CODE):
        # Done, or leaving to be requeued, the process ignores further stop signals while it ends
        # (CUDA's teardown at exit): srun's --kill-on-bad-exit sends SIGTERM to the ranks still there
        # when the first exits, and a preemption may come just then; their exit read 143, a failure,
        # not the requeue code, nor the success of a run or catalog that was written. Every signal
        # train.signals may name, not only the defaults: the run's own had been put back by then.
        from dmhpc.config import STOP_SIGNAL_NAMES

        for name in STOP_SIGNAL_NAMES:
            signal.signal(signal.Signals[name], signal.SIG_IGN)
    raise SystemExit(code)


if __name__ == "__main__":
    run()
