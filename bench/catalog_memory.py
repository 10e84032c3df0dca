"""Memory a survey's catalog costs `dmhpc predict`: reading it (every rank) and merging the parts
into the catalog written (rank 0), per row, at commit --old and in this checkout.

    python bench/catalog_memory.py                   # 1,000,000 rows
    python bench/catalog_memory.py --rows 4000000 --old cc88769 --formats parquet,fits

Reading: a Parquet catalog of --rows rows with 19-digit text ids (SDSS objids), a file column
(`cutouts/partNNN/ID.fits`) and --extra float64 columns (default 50: a survey's photometry,
which predict does not read), read by `read_catalog` as predict's cutout sources are. Merging:
parts of 4096 rows as predict writes them (index, text id, p_merger, and log_odds where the code
measured writes them; in input order, as the parts
of a catalog or an --images file are), merged into each format by `_merge`. Each measurement runs
in a fresh process and reports the growth of its peak resident memory (ru_maxrss) over the inputs
already made, divided by the rows, and its time.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MEASURE = r"""
import inspect, json, resource, shutil, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[1])
what, work, rows, catalog = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
from dmhpc.data.inputs import read_catalog
from dmhpc.infer import predict as P
import astropy.io.ascii, astropy.io.fits, astropy.table, pyarrow.parquet  # their imports are not the rows'

class Parts:  # what _merge asks of its source
    count, shape, id_dtype, kind, columns = rows, (3, 75, 75), None, "catalog", ("index", "id")
    def positions(self, a, b): return np.arange(a, b, dtype=np.int64)
    def changed(self): return False

# The parts' checksums were made with the digest "bench": a commit before parts of two fills took
# one digest, a later one a tuple of those its parts may have.
digests = ("bench",) if "spec_digests" in inspect.signature(P._merge).parameters else "bench"
parts = work / f"{what}.parts"
if what != "read":
    shutil.copytree(work / "parts", parts)
    if "log_odds" not in getattr(P, "COLUMN_ORDER", ()):  # parts as a commit before the column wrote them
        for path in parts.glob("part-*.npz"):
            with np.load(path) as f:
                columns = {k: f[k] for k in f.files if k not in ("log_odds", P.PART_CHECKSUM)}
            columns[P.PART_CHECKSUM] = P._part_checksum(columns, "bench")
            np.savez(path, **columns)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
if what == "read":
    held = read_catalog(work / f"catalog.{catalog}", file_column="file", cutouts=work)
else:
    P._merge(work / f"catalog.{what}", parts, Parts(), 4096, False, {"DMHPC": "bench"}, True, digests)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(json.dumps({"bytes_per_row": peak / rows, "seconds": seconds}))
"""


def make_inputs(work: Path, rows: int, extra: int, catalog: str, source: Path) -> None:
    """The catalog and the parts, made by `source`'s dmhpc (the part format is the same at both; an
    older commit's parts lose the log_odds column in MEASURE)."""
    make = r"""
import sys
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[1])
from astropy.table import Table
from dmhpc.infer import predict as P
work, rows, extra, catalog = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
ids = np.array([str(1237651191354687000 + i) for i in range(rows)])
table = Table({"id": ids, "file": np.char.add(np.char.add(
    np.array([f"cutouts/part{i // 10000:03d}/" for i in range(rows)]), ids), ".fits")})
for k in range(extra):
    table[f"mag{k}"] = np.random.default_rng(k).normal(20, 2, rows)
table.write(work / f"catalog.{catalog}", **({"path": "catalog"} if catalog in ("h5", "hdf5") else {}))
(work / "parts").mkdir()
rng = np.random.default_rng(0)
for k in range(-(-rows // 4096)):
    a, b = k * 4096, min((k + 1) * 4096, rows)
    columns = {"index": np.arange(a, b, dtype=np.int64), "id": ids[a:b], "p_merger": rng.random(b - a).astype(np.float32),
               "log_odds": rng.normal(0.0, 5.0, b - a), P.PART_INPUTS: ""}
    columns[P.PART_CHECKSUM] = P._part_checksum(columns, "bench")
    np.savez(P._part_path(work / "parts", k), **columns)
"""
    subprocess.run([sys.executable, "-c", make, str(source), str(work), str(rows), str(extra), catalog], check=True)


def measure(source: Path, what: str, work: Path, rows: int, catalog: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(source), what, str(work), str(rows), catalog],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{what} at {source}: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--extra", type=int, default=50, help="catalog columns predict does not read")
    parser.add_argument("--old", default="cc88769", help="the commit to compare with (default: before this bench)")
    parser.add_argument("--catalog", default="parquet", choices=("parquet", "fits", "csv", "ecsv", "h5"),
                        help="the format of the catalog read (default parquet)")
    parser.add_argument("--formats", default="parquet,fits,csv,ecsv", help="of the merged catalog")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        old.mkdir()
        subprocess.run(f"git -C {ROOT} archive {args.old} dmhpc | tar -x -C {old}", shell=True, check=True)
        work = Path(tmp) / "work"
        work.mkdir()
        make_inputs(work, args.rows, args.extra, args.catalog, ROOT)
        print(f"{args.rows} rows, {args.extra} more catalog columns ({args.catalog}); "
              f"{platform.processor() or platform.machine()}, {platform.python_version()}")
        print(f"{'what':<14} {'old B/row':>10} {'new B/row':>10} {'old s':>7} {'new s':>7}")
        for what in ["read", *args.formats.split(",")]:
            a, b = (measure(source, what, work, args.rows, args.catalog) for source in (old, ROOT))
            label = "read catalog" if what == "read" else f"merge {what}"
            print(f"{label:<14} {a['bytes_per_row']:>10.0f} {b['bytes_per_row']:>10.0f} "
                  f"{a['seconds']:>7.1f} {b['seconds']:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
