"""`python -m dmhpc.train ...` (what torchrun, srun and mpiexec start) is `dmhpc train ...`."""

import sys

from dmhpc.cli import run

run(["train", *sys.argv[1:]])
