"""`python -m dmhpc.train ...` (what torchrun, srun and mpiexec start) is `dmhpc train ...`."""

import sys

from dmhpc.cli import main

raise SystemExit(main(["train", *sys.argv[1:]]))
