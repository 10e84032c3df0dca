"""Fisher loss (FisherDA): pull source features to learnable class centres, push centres apart."""

from __future__ import annotations

import torch
from torch import nn

from dmhpc.errors import DmhpcError
from dmhpc.losses.collective import all_reduce_sum, is_global
from dmhpc.losses.precision import full_precision, upcast

FORMS = ("tr", "td")
NORMALIZE = ("sum", "mean")
LABEL_DTYPES = (torch.int64, torch.int32)  # what indexing takes as class numbers (uint8 would be a mask)


class FisherLoss(nn.Module):
    """Trace-ratio or trace-difference Fisher loss with learnable class centres.

    intra = sum over samples of ||x_i - c_{y_i}||^2 (divided by the number of samples when
            normalize="mean"; the original sums, so its weight grows with the batch size)
    inter = sum over classes of ||c_k - mean_k c_k||^2
    form="tr": loss = intra_weight * intra / (inter_weight * inter)
    form="td": loss = intra_weight * intra - inter_weight * inter

    The centres are a parameter (`self.centres`, (num_classes, feat_dim)) drawn from N(0, 1)
    with a private generator seeded by `seed`, so constructing the loss never touches the global
    RNG and every rank draws the same centres. Give them an optimiser group and, under DDP, wrap
    this module in DDP (or average its gradients) like any other parameter.

    scope="global" sums intra (and counts samples) over all ranks: the same value on every rank
    and exact gradients for features and centres after DDP's averaging, with one all-reduce of
    two numbers. scope="local" uses this rank's samples only.

    forward(feats (N, feat_dim), labels (N,) int in [0, num_classes)) -> (loss, intra, inter),
    computed in float32 at least, outside autocast.
    """

    def __init__(
        self,
        num_classes: int,
        feat_dim: int,
        form: str = "tr",
        *,
        intra_weight: float,
        inter_weight: float,
        normalize: str = "sum",
        scope: str = "global",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if form not in FORMS:
            raise DmhpcError(f"fisher form: {form!r} is not one of {', '.join(FORMS)}")
        if normalize not in NORMALIZE:
            raise DmhpcError(f"fisher normalize: {normalize!r} is not one of {', '.join(NORMALIZE)}")
        if num_classes < 2 or feat_dim < 1:
            raise DmhpcError(f"fisher: needs num_classes >= 2 and feat_dim >= 1; got {num_classes} and {feat_dim}")
        if form == "tr" and inter_weight == 0:
            # The original's defaults gave 0/0 = NaN here.
            raise DmhpcError("fisher inter_weight: must be non-zero for the trace-ratio form (it divides by it)")
        is_global(scope)  # validates the name now rather than at the first step
        self.form, self.normalize, self.scope = form, normalize, scope
        self.intra_weight, self.inter_weight = float(intra_weight), float(inter_weight)
        generator = torch.Generator().manual_seed(seed)
        self.centres = nn.Parameter(torch.randn(num_classes, feat_dim, generator=generator))

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if feats.ndim != 2 or feats.shape[1] != self.centres.shape[1] or labels.shape != feats.shape[:1]:
            raise DmhpcError(
                f"fisher: expects feats (N, {self.centres.shape[1]}) and labels (N,); "
                f"got {tuple(feats.shape)} and {tuple(labels.shape)}"
            )
        self._check_labels(labels)
        if self.normalize == "mean" and not is_global(self.scope) and not feats.shape[0]:
            raise DmhpcError("fisher: a mean over the batch's rows needs at least one; the batch is empty")
        with full_precision(feats.device):
            feats, centres = upcast(feats, self.centres)
            # Each row's centre as a one-hot product, not centres[labels]: the indexing's backward
            # adds the rows into the centres' gradient with atomic adds, in another order each step
            # on a CPU's threads as on a GPU (two identical runs parted in the 7th digit of the first
            # epoch's loss); a product sums them in one order. Exact forward: each row is 1 x its
            # centre plus 0 x the others.
            # (compared with an arange, not F.one_hot, which reads the labels' range on the host)
            one_hot = labels.unsqueeze(1) == torch.arange(centres.shape[0], device=labels.device)
            diff = feats - one_hot.to(centres.dtype) @ centres
            intra = diff.square().sum()
            count = intra.new_full((), float(feats.shape[0]))  # a fill on the device, not a copy from the host
            if is_global(self.scope):
                intra, count = all_reduce_sum(torch.stack([intra, count])).unbind()
            if self.normalize == "mean":
                intra = intra / count
            inter = (centres - centres.mean(dim=0)).square().sum()
            a, b = self.intra_weight * intra, self.inter_weight * inter
            loss = a / b if self.form == "tr" else a - b
        return loss, intra, inter

    def _check_labels(self, labels: torch.Tensor) -> None:
        """Integer labels in [0, num_classes), without waiting for the device: the range is a
        device-side assertion (raised at once on the CPU; on a GPU it fails the next synchronising
        call). The trainer's labels come checked from the shards (dmhpc.data.shards.check_labels)."""
        if labels.dtype not in LABEL_DTYPES:
            raise DmhpcError(f"fisher labels: dtype {labels.dtype}; expected integer class numbers "
                             f"(torch.int64 or torch.int32)")
        k = self.centres.shape[0]
        message = f"fisher labels: a label outside 0 ... {k - 1} (one per class centre)"
        try:
            torch._assert_async(((labels >= 0) & (labels < k)).all(), message)
        except RuntimeError:  # the CPU's assertion, raised here
            raise DmhpcError(message) from None
