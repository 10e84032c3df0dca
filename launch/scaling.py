"""`dmhpc scaling`, for those who start Python scripts: the same command, the same options.

    python launch/scaling.py configs/scaling/resnet.yaml            # submit, wait, tabulate
    python launch/scaling.py configs/scaling/resnet.yaml --no-wait  # slurm: submit and return

From Python: `dmhpc.launch.launch_scaling(FILE)`. The study file format: dmhpc/launch/scaling.py and docs/cluster.md.
"""

import sys

from dmhpc.cli import run

if __name__ == "__main__":
    run(["scaling", *sys.argv[1:]])
