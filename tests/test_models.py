"""Models: architecture, parameter counts, shapes, memory formats, autocast, registry, groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dmhpc.config import GRLConfig
from dmhpc.errors import DmhpcError
from dmhpc.losses import FisherLoss, grl_coefficient
from dmhpc.models import MODELS, DeepMerge, DeepMerge2, DomainDiscriminator, build_model, param_groups


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 75, 75, generator=torch.Generator().manual_seed(seed))


# torchvision's ResNet totals minus its 1000-way fc (the trunk), original 7x7 stem.
TRUNKS = {
    "resnet18": 11_689_512 - 513_000,
    "resnet34": 21_797_672 - 513_000,
    "resnet50": 25_557_032 - 2_049_000,
    "resnet101": 44_549_160 - 2_049_000,
    "resnet152": 60_192_808 - 2_049_000,
}
SMALL_STEM_SAVING = 64 * 3 * 7 * 7 - 64 * 3 * 3 * 3


def test_registry_names():
    assert list(MODELS) == ["deepmerge", "deepmerge2", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


@pytest.mark.parametrize("name", ["deepmerge", "deepmerge2"])
def test_deepmerge_counts_and_shapes(name):
    model = build_model(name).eval()
    assert count(model) == 174_626
    features, logits = model(images(4))
    assert features.shape == (4, 2592) and logits.shape == (4, 2)
    assert model.feature_dim == 2592


def test_deepmerge2_is_section_b1_exactly():
    model = DeepMerge2()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 8, (5, 5), (2, 2)),
        (8, 16, (3, 3), (1, 1)),
        (16, 32, (3, 3), (1, 1)),
    ]
    assert [type(m) for m in model.conv[0]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    dense = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(d.in_features, d.out_features) for d in dense] == [(2592, 64), (64, 32), (32, 2)]
    assert model.regularization().item() == 0.0


def test_deepmerge1_has_dropout_relu_before_bn_and_an_l2_penalty():
    model = DeepMerge()
    assert [type(m) for m in model.conv[0]] == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d, nn.MaxPool2d, nn.Dropout]
    x = images(3)
    model.train()
    torch.manual_seed(0)
    a = model(x)[1]
    b = model(x)[1]
    assert not torch.equal(a, b)  # dropout is active in training
    model.eval()
    assert torch.equal(model(x)[1], model(x)[1])
    w1, w2 = model.classifier[0].weight, model.classifier[2].weight
    penalty = model.regularization()
    assert penalty.item() == pytest.approx(1e-4 * (w1.square().sum() + w2.square().sum()).item())
    penalty.backward()
    torch.testing.assert_close(w1.grad, 2e-4 * w1.detach())
    assert model.classifier[4].weight.grad is None and model.classifier[0].bias.grad is None
    assert DeepMerge(in_channels=2, l2=0.0).regularization().item() == 0.0


@pytest.mark.parametrize("name", list(TRUNKS))
@pytest.mark.parametrize("stem", ["original", "small"])
def test_resnet_parameter_counts(name, stem):
    with torch.device("meta"):  # counts only: skip the initialisation of up to 60 M weights
        model = build_model(name, stem=stem)
    width = 512 if name in ("resnet18", "resnet34") else 2048
    assert model.bottleneck.in_features == width
    expected_trunk = TRUNKS[name] - (SMALL_STEM_SAVING if stem == "small" else 0)
    assert count(model.trunk) == expected_trunk
    assert count(model) == expected_trunk + width * 256 + 256 + 256 * 2 + 2


@pytest.mark.parametrize("name, stem", [("resnet18", "original"), ("resnet18", "small"), ("resnet34", "original"), ("resnet50", "original")])
def test_resnet_output_shapes(name, stem):
    model = build_model(name, stem=stem).eval()
    with torch.no_grad():
        features, logits = model(images(2))
    assert features.shape == (2, 256) and logits.shape == (2, 2)


def test_resnet18_matches_section_b2():
    model = build_model("resnet18")
    assert count(model.trunk) == 11_176_512
    assert count(model.bottleneck) == 131_328 and count(model.classifier) == 514
    assert model.bottleneck.weight.std().item() == pytest.approx(0.005, rel=0.05)
    assert model.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert model.bottleneck.bias.abs().max() == 0 and model.classifier.bias.abs().max() == 0


@pytest.mark.parametrize("name", ["resnet101", "resnet152"])
def test_deep_resnets_run_one_image(name):
    model = build_model(name).eval()
    with torch.no_grad():
        features, logits = model(images(1))
    assert features.shape == (1, 256) and logits.shape == (1, 2)


@pytest.mark.parametrize("name", ["deepmerge", "deepmerge2", "resnet18"])
def test_channels_last_gives_the_same_outputs(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = images(2)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        got = model_cl(x.to(memory_format=torch.channels_last))
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["deepmerge", "deepmerge2", "resnet18"])
def test_models_run_under_bf16_autocast(name):
    model = build_model(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features, logits = model(images(2))
        loss = logits.float().logsumexp(1).mean() + features.float().square().mean()
    assert features.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("in_features, params", [(2592, 3_705_857), (256, 1_313_793)])
def test_discriminator_counts_init_and_logit_output(in_features, params):
    torch.manual_seed(0)
    disc = DomainDiscriminator(in_features)
    assert count(disc) == params
    assert disc.net[0].weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert disc.net[6].weight.std().item() == pytest.approx(0.3, rel=0.2)
    assert all(layer.bias.abs().max() == 0 for layer in (disc.net[0], disc.net[3], disc.net[6]))
    out = disc.eval()(torch.randn(5, in_features), coeff=0.5)
    assert out.shape == (5,)
    assert not isinstance(disc.net[-1], nn.Sigmoid)


def test_discriminator_reverses_the_feature_gradient_by_the_scheduled_coefficient():
    torch.manual_seed(0)
    disc = DomainDiscriminator(6, hidden=16, dropout=0.0)
    feats = torch.randn(4, 6, requires_grad=True)
    disc(feats, coeff=0.0).sum().backward()
    plain = torch.autograd.grad(disc.net(feats).sum(), feats)[0]
    assert feats.grad.abs().max() == 0  # coeff 0 at step 0 of the DANN schedule
    feats.grad = None
    coeff = grl_coefficient(300, 1000, GRLConfig())
    disc(feats, coeff=coeff).sum().backward()
    torch.testing.assert_close(feats.grad, -coeff * plain)


def test_build_model_errors_name_the_problem():
    with pytest.raises(DmhpcError, match="known models: deepmerge, deepmerge2, resnet18"):
        build_model("resnet19")
    with pytest.raises(DmhpcError, match="unknown option.*stem"):
        build_model("deepmerge", stem="small")
    with pytest.raises(DmhpcError, match="stem"):
        build_model("resnet18", stem="tiny")


def test_param_groups_cover_every_parameter_once_with_their_multipliers():
    model, disc, fisher = build_model("resnet18"), DomainDiscriminator(256), FisherLoss(2, 256, intra_weight=0.01, inter_weight=1.0)
    groups = param_groups(model, discriminator=disc, fisher=fisher, head_lr_mult=10.0, discriminator_lr_mult=0.1,
                          fisher_lr_mult=10.0)
    assert [(g["name"], g["lr_mult"]) for g in groups] == [
        ("trunk", 1.0),
        ("head", 10.0),
        ("discriminator", 0.1),
        ("fisher", 10.0),
    ]
    ids = [id(p) for g in groups for p in g["params"]]
    everything = [*model.parameters(), *disc.parameters(), *fisher.parameters()]
    assert len(ids) == len(set(ids)) == len(everything)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in [*model.bottleneck.parameters(), *model.classifier.parameters()]}
    assert groups[3]["params"] == [fisher.centres]
    torch.optim.Adam(groups, lr=1e-3)  # torch accepts the extra keys


def test_param_groups_for_deepmerge_have_no_head_group():
    groups = param_groups(build_model("deepmerge2"), head_lr_mult=10.0, discriminator_lr_mult=10.0,
                          fisher_lr_mult=10.0)
    assert [g["name"] for g in groups] == ["trunk"] and len(groups[0]["params"]) == len(list(DeepMerge2().parameters()))
