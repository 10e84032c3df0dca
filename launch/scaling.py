"""Run a scaling study (ResNet depth x GPUs x nodes, weak and strong) and write its table and plot.

    python launch/scaling.py configs/scaling/resnet.yaml            # submit, wait, tabulate
    python launch/scaling.py configs/scaling/resnet.yaml --no-wait  # slurm: submit and return

Running it again skips finished points and tabulates. The study file format:
dmhpc/launch/scaling.py and docs/cluster.md.
"""

import argparse
import sys
from pathlib import Path

from dmhpc.errors import DmhpcError
from dmhpc.launch import launch_scaling


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="scaling study file (YAML)")
    parser.add_argument("--no-wait", action="store_true",
                        help="slurm: return after submitting; run again later to write the table")
    args = parser.parse_args(argv)
    try:
        launch_scaling(args.study, wait=not args.no_wait)
    except DmhpcError as exc:
        print(f"launch/scaling.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
