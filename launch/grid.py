"""`dmhpc grid`, for those who start Python scripts: the same command, the same options.

    python launch/grid.py configs/grid/mmd-fisher-weights.yaml            # submit, wait, rank
    python launch/grid.py configs/grid/mmd-fisher-weights.yaml --no-wait  # slurm: submit and return
    python launch/grid.py configs/study/deepmerge2-laptop.yaml --executor local
    python launch/grid.py configs/grid/mmd-fisher-weights.yaml --report   # the tables now; launch nothing

From Python: `dmhpc.launch.launch_grid(FILE)`. The grid file format: dmhpc/launch/grid.py and docs/cluster.md.
"""

import sys

from dmhpc.cli import run

if __name__ == "__main__":
    run(["grid", *sys.argv[1:]])
