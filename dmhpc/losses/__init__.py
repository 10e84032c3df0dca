"""Domain-adaptation losses, exact under DistributedDataParallel (see docs/losses.md).

Every loss takes scope="global" (default: the loss of the batch of all ranks, the same value on
every rank, gradients exact after DDP's averaging) or scope="local" (this rank's batch only), and
computes in float32 at least, outside autocast.
"""

from dmhpc.losses.adversarial import GradientReversal, dann_loss, grad_reverse, grl_coefficient
from dmhpc.losses.coral import coral
from dmhpc.losses.entropy import entropy
from dmhpc.losses.fisher import FisherLoss
from dmhpc.losses.mmd import DEEPMERGE_SIGMAS, MEDIAN_SCALES, mmd

__all__ = [
    "DEEPMERGE_SIGMAS",
    "MEDIAN_SCALES",
    "FisherLoss",
    "GradientReversal",
    "coral",
    "dann_loss",
    "entropy",
    "grad_reverse",
    "grl_coefficient",
    "mmd",
]
