"""Models by name, so a configuration can say `model: resnet18` (plus options)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from torch import nn

from dmhpc.errors import DmhpcError
from dmhpc.names import MODEL_NAMES
from dmhpc.models.deepmerge import DeepMerge, DeepMerge2
from dmhpc.models.resnet import LAYOUTS, resnet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "deepmerge": DeepMerge,
    "deepmerge2": DeepMerge2,
    **{name: functools.partial(resnet, name) for name in LAYOUTS},
}
assert tuple(MODELS) == MODEL_NAMES, "dmhpc/names.py lists the models a configuration may name"


def build_model(name: str, **options) -> nn.Module:
    """Build the model registered as `name` with keyword `options`.

    deepmerge: in_channels=3, num_classes=2, dropout=0.5, l2=1e-4 (DeepMerge I style)
    deepmerge2: in_channels=3, num_classes=2 (DeepMerge II, section B.1)
    resnet18|34|50|101|152: stem="original"|"small", in_channels=3, num_classes=2, bottleneck_dim=256
    Every model's forward returns (features, logits) and it has `feature_dim`,
    `regularization()` and `head_parameters()`. Unknown names and options raise DmhpcError.
    """
    if name not in MODELS:
        raise DmhpcError(f"model: unknown name {name!r}; known models: {', '.join(MODELS)}")
    builder = MODELS[name]
    accepted = list(inspect.signature(builder).parameters)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DmhpcError(f"model {name!r}: unknown option(s) {', '.join(unknown)}; it takes {', '.join(accepted)}")
    return builder(**options)
