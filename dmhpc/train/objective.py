"""The domain-adaptation objective as one module: backbone, optional discriminator and Fisher centres.

Everything with parameters lives in one `nn.Module` whose forward computes every loss term, so
a single DistributedDataParallel wrapper averages all gradients (backbone, discriminator, Fisher
centres) and no parameter can silently drift apart across ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmhpc.losses import DEEPMERGE_SIGMAS, FisherLoss, coral, dann_loss, entropy, mmd
from dmhpc.models import DomainDiscriminator, build_model

NUM_CLASSES = 2


def build_backbone(cfg, in_channels: int) -> nn.Module:
    """The classifier named by the configuration for images of `in_channels` channels (the data's,
    not the config's: a single-filter survey has 1); forward returns (features, logits)."""
    m = cfg.model
    options = {"num_classes": NUM_CLASSES, "in_channels": in_channels}
    if m.name.startswith("resnet"):
        options["stem"] = m.stem
    elif m.name == "deepmerge":
        options.update({k: v for k, v in (("dropout", m.dropout), ("l2", m.l2)) if v is not None})
    return build_model(m.name, **options)


def term_labels(loss) -> dict[str, str]:
    """Each loss term `DomainAdaptation` logs, as a figure's legend names it: the log holds the terms
    unweighted, so each says its weight in the total (`loss`: the run's `cfg.loss`)."""
    return {"classifier": "classifier (cross-entropy, weight 1)",
            "transfer": f"transfer ({loss.transfer}, weight {loss.transfer_weight:g})",
            "fisher": f"fisher (weight {loss.fisher.weight:g})",
            "fisher_intra": "fisher intra-class (within fisher)",
            "fisher_inter": "fisher inter-class (within fisher)",
            "entropy": f"entropy (weight {loss.entropy_weight:g})",
            "total": "total (the weighted sum trained on)"}


def fisher_scale_note(loss, ranks: int) -> str | None:
    """A note for a run whose Fisher term weighs more than on one GPU: the original's summed
    intra-class term over the global batch (`loss.fisher.normalize: sum`, scope global) grows with
    the number of ranks, so the same weight at the same per-GPU batch is `ranks` times stronger."""
    fisher = loss.fisher
    if ranks > 1 and fisher.weight > 0 and fisher.normalize == "sum" and loss.scope == "global":
        return (f"loss.fisher.normalize sum over the global batch of {ranks} ranks: the Fisher term weighs "
                f"{ranks}x what it does on one GPU at this per-GPU batch (loss.fisher.normalize=mean keeps a "
                f"weight's meaning across GPU counts)")
    return None


class DomainAdaptation(nn.Module):
    """Backbone + the transfer, Fisher and entropy terms of DeepMerge II, as configured."""

    def __init__(self, cfg, seed: int, in_channels: int):
        """`in_channels`: the data's image channels."""
        super().__init__()
        loss = cfg.loss
        self.loss_cfg = loss  # the config's loss section: `loss.transfer` below reads as the dotted key
        self.backbone = build_backbone(cfg, in_channels)
        feat_dim = self.backbone.feature_dim
        self.discriminator = DomainDiscriminator(feat_dim) if loss.transfer == "dann" else None
        self.fisher = None
        if loss.fisher.weight > 0:
            self.fisher = FisherLoss(NUM_CLASSES, feat_dim, form=loss.fisher.form,
                                     intra_weight=loss.fisher.intra_weight,
                                     inter_weight=loss.fisher.inter_weight,
                                     normalize=loss.fisher.normalize, scope=loss.scope, seed=seed)
        self.sigmas = DEEPMERGE_SIGMAS if loss.mmd.sigmas == "deepmerge" else loss.mmd.sigmas
        self.reads_target = loss.reads_target()

    def forward(self, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor, grl_coeff: float):
        """Returns (total loss, {term: detached value}, {name: detached outputs for metrics}); the
        logits are the source rows', then the target rows' where a term reads the target."""
        # One pass over source and target together, as the original's adapted runs: BatchNorm sees
        # both domains. Without a term that reads the target (no adaptation, the oracle) the source
        # passes alone, as in the original's baseline: through BatchNorm the target's training
        # images would shape the model (its batch statistics, its running ones) and the baseline
        # every adapted run is measured against would be partly adapted itself.
        feats, logits = self.backbone(torch.cat([xs, xt]) if self.reads_target else xs)
        return self._losses(feats, logits, ys, grl_coeff)

    def keep_losses_eager(self) -> None:
        """Under train.compile the backbone is compiled and the loss terms run eagerly: every term
        switches autocast and reduced-precision matmuls off around itself (losses/precision.py),
        process settings a graph cannot change. Traced, dynamo broke off at the first term after a
        failed attempt and ran the rest of the step eagerly, differently for each loss configuration.
        Applied when compiling, not as a decorator: torch.compiler.disable imports dynamo and
        inductor, about 2 s of the start of every evaluation and prediction, which never compile.
        On the class, once, as the decorator was: a wrapped bound method kept on the instance was
        wrapped again by each TrainStep, did not pickle, and a deepcopy's losses ran on the
        original's discriminator and Fisher centres."""
        cls = DomainAdaptation
        if not cls._losses_kept_eager:
            cls._losses = torch.compiler.disable(cls._losses)
            cls._losses_kept_eager = True

    _losses_kept_eager = False

    def _losses(self, feats: torch.Tensor, logits: torch.Tensor, ys: torch.Tensor, grl_coeff: float):
        n = ys.shape[0]
        fs, ft = feats[:n], feats[n:]
        loss = self.loss_cfg
        terms = {"classifier": F.cross_entropy(logits[:n].float(), ys)}
        total = terms["classifier"]
        outputs = {"logits": logits.detach()}

        if loss.transfer == "mmd":
            terms["transfer"] = mmd(fs, ft, sigmas=self.sigmas, unbiased=loss.mmd.unbiased,
                                    scope=loss.scope, clamp=loss.mmd.clamp, max_samples=loss.mmd.max_samples)
        elif loss.transfer == "coral":
            terms["transfer"] = coral(fs, ft, scope=loss.scope)
        elif loss.transfer == "dann":
            domain_logits = self.discriminator(feats, grl_coeff)
            terms["transfer"] = dann_loss(domain_logits[:n], domain_logits[n:], scope=loss.scope)
            outputs["domain_logits"] = domain_logits.detach()
        if "transfer" in terms:
            total = total + loss.transfer_weight * terms["transfer"]

        if self.fisher is not None:
            terms["fisher"], terms["fisher_intra"], terms["fisher_inter"] = self.fisher(fs, ys)
            total = total + loss.fisher.weight * terms["fisher"]
        if loss.entropy_weight > 0:
            # Over both domains, as the original's entropy minimization.
            terms["entropy"] = entropy(logits, scope=loss.scope)
            total = total + loss.entropy_weight * terms["entropy"]

        penalty = self.backbone.regularization()  # DeepMerge I's dense-layer L2; zero for the others
        total = total + penalty

        terms["total"] = total
        return total, {k: v.detach() for k, v in terms.items()}, outputs
