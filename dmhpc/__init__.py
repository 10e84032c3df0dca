"""dmhpc: domain-adaptive deep learning on galaxy images, from a laptop to many SLURM nodes."""

__version__ = "0.1.0"
