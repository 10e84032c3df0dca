"""`dmhpc demo` (what `make demo` runs): the main job on the embedded data set, from nothing.

synth -> prepare -> verify -> info -> train DeepMerge without adaptation and with
MMD + Fisher + entropy -> evaluate both on the test split -> a merger catalog of the noisy test
images and an explanation grid from the adapted model -> a table and the paths of the plots.
Every step is the same command a user would type, so the demo is also a smoke test of the CLI.

The demo replaces its runs, catalog and explanations at every start, so it works only in a folder of
its own: one it made (marked by MARK, which also records the render its shards were prepared
from), or an earlier demo's; any other folder that is not empty is refused.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import yaml

from dmhpc.checks import Invalid, integer
from dmhpc.config import load_config, override_text
from dmhpc.data.prepare import Options
from dmhpc.data.shards import INCOMPLETE
from dmhpc.errors import DmhpcError
from dmhpc.files import atomic_write
from dmhpc.run import RunDir
from dmhpc.train.evaluate import format_table

RUNS = {
    "no adaptation": "configs/deepmerge-noda.yaml",
    "MMD + Fisher + entropy": "configs/deepmerge-mmd-fisher-entropy.yaml",
}
MARK = ".dmhpc-demo.json"
CATALOG = "noisy_test_catalog.ecsv"
# What a demo writes in its folder (a run's lock lies beside its folder).
_OWN_NAMES = {MARK, "data", "shards", "explain", CATALOG, *(Path(c).stem for c in RUNS.values()),
              *(f"{Path(c).stem}.lock" for c in RUNS.values())}


def demo_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for the data and the runs")
    parser.add_argument("--n-per-class", type=int, default=1000,
                        help="objects per class in the embedded set (default 1000; at least enough for one "
                             "training batch: 92 with the shipped configs' batch of 128)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of each run")
    parser.add_argument("--workers", type=int, default=2, help="processes for rendering")
    parser.add_argument("--seed", type=int, default=0, help="of the render, the split and the runs (default 0)")


def demo_main(args, run_command) -> int:
    """`run_command(argv) -> int` runs one dmhpc command line (the CLI's `main`)."""
    root = Path(__file__).resolve().parent.parent
    out = args.out.resolve()
    raw, shards = out / "data", out / "shards"
    t0 = time.perf_counter()
    try:  # (synth would refuse it too, as a second line under "demo step failed")
        integer(1)(args.workers)
    except Invalid as exc:
        raise DmhpcError(f"--workers: {exc}") from None
    _check_size(root, args.n_per_class)
    for config in RUNS.values():  # --epochs and --seed as the runs take them: said before minutes of rendering
        load_config(root / config, _overrides(shards, out / Path(config).stem, args))
    record = _claim(out)

    def step(title: str, argv: list[str]) -> None:
        print(f"\n== {title}: dmhpc {' '.join(argv)}", flush=True)
        if run_command(argv) != 0:
            raise DmhpcError(f"demo step failed: dmhpc {' '.join(argv)}")

    # A render of other arguments is replaced, and the shards follow every render: a second demo with
    # another --n-per-class or --seed never trains on the first one's data, nor on an earlier render's
    # shards where the conversion of this one was interrupted (prepare keeps a data set until it
    # publishes the new one).
    rendered = _rendered(raw / "meta.json")
    asked = {"n_per_class": args.n_per_class, "seed": args.seed}
    if rendered != asked:
        _record(out, record, prepared=None)
        step("render the embedded data set", ["synth", "--out", str(raw), "--n-per-class", str(args.n_per_class),
                                               "--seed", str(args.seed), "--workers", str(args.workers)]
             + (["--overwrite"] if rendered is not None else []))
    if record.get("prepared") != asked or not all((shards / d / "manifest.json").exists()
                                                  for d in ("pristine", "noisy")):
        step("convert to sharded HDF5", ["prepare", "--data-config", str(root / "configs/data/embedded.yaml"),
                                         "--root", str(raw), "--out", str(shards), "--seed", str(args.seed),
                                         "--overwrite"])
        _record(out, record, prepared=asked)
    for domain in ("pristine", "noisy"):
        step(f"verify {domain}", ["verify", str(shards / domain)])
        step(f"summarize {domain}", ["info", str(shards / domain)])

    results = {}
    for name, config in RUNS.items():
        run_dir = out / Path(config).stem
        # --overwrite: the demo owns its runs, and a second `make demo` replaces them.
        step(f"train: {name}", ["train", "--config", str(root / config), "--resume", "none", "--overwrite",
                                *_overrides(shards, run_dir, args)])
        results[name] = RunDir(run_dir).read_result("best", "test")

    # The last mile: the adapted model's merger catalog of the noisy test images, and what it looks at.
    adapted = out / Path(RUNS["MMD + Fisher + entropy"]).stem
    catalog = out / CATALOG
    step("merger catalog of the noisy test images", ["predict", "--run", str(adapted), "--data", str(shards / "noisy"),
                                                      "--split", "test", "--out", str(catalog), "--overwrite"])
    explained = out / "explain"
    # The embedded set's channels are F814W, F356W, F160W: drawn red to blue in wavelength order.
    step("what the network looks at", ["explain", "--run", str(adapted), "--n", "4", "--rgb", "1,2,0",
                                         "--out", str(explained), "--overwrite"])

    print(f"\n== DeepMerge on the embedded set: test split, source = pristine, target = noisy "
          f"({time.perf_counter() - t0:.0f} s)\n")
    print(format_table(results))
    print("\nplots:")
    for config in RUNS.values():
        for png in RunDir(out / Path(config).stem).plot_files():
            print(f"  {png}")
    print(f"\nmerger catalog of the noisy test images (MMD + Fisher + entropy): {catalog}")
    print("explanations (Grad-CAM, integrated gradients):")
    for png in sorted(explained.glob("*.png")):
        print(f"  {png}")
    return 0


def _overrides(shards: Path, run_dir: Path, args) -> list[str]:
    """A demo run's settings on the trainer's command line."""
    return [override_text(k, v) for k, v in (("data.source", str(shards / "pristine")), ("data.target", str(shards / "noisy")),
                                             ("run.dir", str(run_dir)), ("train.epochs", args.epochs), ("seed", args.seed))]


def _check_size(root: Path, n_per_class: int) -> None:
    """Refuse, before minutes of rendering, a set whose training split holds less than one batch:
    the runs would be refused at their start. One image per object, split with prepare's fractions."""
    batch = max(load_config(root / config).train.batch_size for config in RUNS.values())
    rows = round(Options().fractions[0] * 2 * n_per_class)
    if rows < batch:
        least = math.ceil(batch / (2 * Options().fractions[0]))
        raise DmhpcError(f"--n-per-class {n_per_class}: about {rows} training images per domain, fewer than one "
                         f"batch of {batch}; give at least {least}")


def _claim(out: Path) -> dict:
    """The demo's record of its folder `out` (made, and marked, here when it is new). An earlier
    demo's folder without the mark (its render and nothing but a demo's files) is taken on, its
    shards prepared again; any other folder that is not empty is refused: the demo would replace
    the runs in it (`--out runs` held the shipped configs' own run folders)."""
    if out.exists() and not out.is_dir():  # (its mark unreadable, it was taken for a demo's folder)
        raise DmhpcError(f"--out {out}: exists and is not a folder; name a folder for the demo")
    try:
        record = json.loads((out / MARK).read_text())
        return record if isinstance(record, dict) else {}
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        return {}  # unreadable or hand-edited: its shards prepared again
    try:
        names = sorted(p.name for p in out.iterdir())
    except FileNotFoundError:
        names = []
    except OSError as exc:
        raise DmhpcError(f"--out {out}: cannot list ({exc.strerror})") from None
    foreign = [n for n in names if n not in _OWN_NAMES]
    if foreign or (names and not (out / "data" / "meta.json").is_file()):
        raise DmhpcError(f"--out {out}: holds {(foreign or names)[0]}, and is not a demo's folder (the demo replaces "
                         f"its runs at every start); give --out a new folder")
    for name in (Path(c).stem for c in RUNS.values()):
        # A run of the demo's name trained on other data is no demo's (a folder of the user's runs
        # beside a data/meta.json was taken on, and its run replaced).
        if (out / name).is_dir() and not _trained_on(out / name, out / "shards"):
            raise DmhpcError(f"--out {out}: holds {name}, a run not of the demo's data ({out / 'shards'}), and is not "
                             f"a demo's folder (the demo replaces its runs at every start); give --out a new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DmhpcError(f"--out {out}: cannot create: {exc.strerror}") from None
    return _record(out, {}, prepared=None)


def _trained_on(run: Path, shards: Path) -> bool:
    """Whether the run folder holds nothing, or a run whose source data set lies in `shards`."""
    try:
        if not any(run.iterdir()):
            return True
        config = yaml.safe_load((run / "config.yaml").read_text())
        source = Path(config["data"]["source"])
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError):
        return False
    return shards.resolve() in source.resolve().parents


def _record(out: Path, record: dict, **changes) -> dict:
    """`record` with `changes`, written to the folder's mark (durably: it says which render the
    shards are of)."""
    record.update(changes)
    atomic_write(out / MARK, json.dumps(record) + "\n")
    return record


def _rendered(meta: Path) -> dict | None:
    """The arguments of the finished render in the demo's data folder; None when there is none."""
    if (meta.parent / INCOMPLETE).exists():  # a synth killed as it replaced its files: prepare refuses it
        return {}  # (rendered again, --overwrite: its old meta.json may still be there)
    try:
        record = json.loads(meta.read_text())
        return {k: record[k] for k in ("n_per_class", "seed")}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # unreadable or hand-edited: rendered again
