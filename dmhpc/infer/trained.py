"""A run's checkpoint as predict, explain and export use it: weights, configuration and data
statistics from one read of the file.

Read apart (the weights from the checkpoint, the statistics from run.json), a run replaced with
`--resume none --overwrite` while a command read it gave a catalog or a model card of one run's
weights and another's normalization.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from dmhpc.config import Config
from dmhpc.run import RunDir
from dmhpc.train.checkpoint import checkpoint_info, load_checkpoint_sha256, load_weights
from dmhpc.train.objective import build_backbone


@dataclass(frozen=True)
class Trained:
    net: nn.Module  # eval mode, on the CPU, in the default memory format
    cfg: Config     # config.yaml, checked against the checkpoint's (RunDir.check_trained_with)
    path: Path      # the checkpoint file
    info: dict      # checkpoint_info: name, epoch, step, selection
    sha256: str     # of the bytes the weights were loaded from (a moved or copied run keeps it)
    data: dict      # the data sets it was trained on, by role, with shape and statistics

    @property
    def shape(self) -> list:
        """The (C, H, W) of the images the network takes."""
        return list(self.data["source"]["shape"])


def load_trained(run: RunDir, checkpoint: str) -> Trained:
    """The run's checkpoint `checkpoint` ("best" or "last"); a config.yaml edited since it was
    trained, or weights that do not fit its network, are one line naming the file."""
    path = run.checkpoint(checkpoint)
    state, sha256 = load_checkpoint_sha256(path)
    cfg = run.check_trained_with(state, path)  # the config.yaml compared, not one read again
    data = run.trained_data(state, path)
    net = build_backbone(cfg, data["source"]["shape"][0])
    load_weights(net, state, path)
    return Trained(net.eval(), cfg, path, checkpoint_info(checkpoint, state, path), sha256, data)
