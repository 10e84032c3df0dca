"""The trainer: configuration-driven training loop, checkpoints and signal handling (see loop.py)."""
