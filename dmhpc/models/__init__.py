"""Models for galaxy images; every forward returns (features, logits). See `build_model`."""

from dmhpc.models.deepmerge import DeepMerge, DeepMerge2
from dmhpc.models.groups import param_groups
from dmhpc.models.heads import DomainDiscriminator
from dmhpc.models.registry import MODELS, build_model
from dmhpc.models.resnet import ResNet

__all__ = ["MODELS", "DeepMerge", "DeepMerge2", "DomainDiscriminator", "ResNet", "build_model", "param_groups"]
