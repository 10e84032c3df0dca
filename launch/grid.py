"""Submit a grid of training runs (submitit job array) and write its leaderboard.

    python launch/grid.py configs/grid/mmd-fisher-weights.yaml            # submit, wait, rank
    python launch/grid.py configs/grid/mmd-fisher-weights.yaml --no-wait  # slurm: submit and return
    python launch/grid.py configs/grid/mmd-fisher-weights.yaml --report   # the tables now; launch nothing

Running it again skips finished points, resumes unfinished ones and waits for those still queued.
The grid file format: dmhpc/launch/grid.py and docs/cluster.md.
"""

import argparse
import sys
from pathlib import Path

from dmhpc.errors import DmhpcError
from dmhpc.launch import launch_grid, report_grid


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path, help="grid file (YAML)")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--no-wait", action="store_true",
                      help="slurm: return after submitting; run again later to collect the leaderboard")
    when.add_argument("--report", action="store_true",
                      help="write the leaderboard and summary from the run directories as they are; launch nothing")
    args = parser.parse_args(argv)
    try:
        if args.report:
            report_grid(args.grid)
        else:
            launch_grid(args.grid, wait=not args.no_wait)
    except DmhpcError as exc:
        print(f"launch/grid.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
