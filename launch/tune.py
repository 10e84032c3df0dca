"""`dmhpc tune`, for those who start Python scripts: the same command, the same options.

    python launch/tune.py configs/tune/coral-fisher-entropy-laptop.yaml                 # here, 2 at a time
    python launch/tune.py configs/tune/coral-fisher-entropy-laptop.yaml --executor slurm  # trials as SLURM jobs

From Python: `dmhpc.launch.tune(FILE)`. The tune file format: dmhpc/launch/tune.py and docs/cluster.md.
"""

import sys

from dmhpc.cli import run

if __name__ == "__main__":
    run(["tune", *sys.argv[1:]])
