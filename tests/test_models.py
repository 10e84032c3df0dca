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


@pytest.mark.parametrize("name", ["deepmerge", "deepmerge2"])
def test_param_groups_for_deepmerge_have_no_head_group(name):
    """DeepMerge I and II trained every layer at one rate: a classifier handed to the head group
    would train at 10x the rate."""
    groups = param_groups(build_model(name), head_lr_mult=10.0, discriminator_lr_mult=10.0, fisher_lr_mult=10.0)
    assert [g["name"] for g in groups] == ["trunk"] and len(groups[0]["params"]) == len(list(build_model(name).parameters()))


def test_every_deepmerge_block_has_its_papers_layer_order_and_dropout():
    """Only the first conv block's layer order was checked: BatchNorm before ReLU in block 2 or 3 of
    DeepMerge I, a dropout lost from block 2 or added to block 3, an average pool or a sigmoid in the
    dense head kept every count and shape and passed."""
    def layers(seq):
        return [(type(m).__name__, m.p if isinstance(m, nn.Dropout) else
                 m.kernel_size if isinstance(m, (nn.Conv2d, nn.MaxPool2d)) else None) for m in seq]

    one, two = DeepMerge(), DeepMerge2()
    assert [layers(block) for block in one.conv] == [
        [("Conv2d", (5, 5)), ("ReLU", None), ("BatchNorm2d", None), ("MaxPool2d", 2), ("Dropout", 0.5)],
        [("Conv2d", (3, 3)), ("ReLU", None), ("BatchNorm2d", None), ("MaxPool2d", 2), ("Dropout", 0.5)],
        [("Conv2d", (3, 3)), ("ReLU", None), ("BatchNorm2d", None), ("MaxPool2d", 2)],
    ]
    assert [layers(block) for block in two.conv] == [
        [("Conv2d", (5, 5)), ("BatchNorm2d", None), ("ReLU", None), ("MaxPool2d", 2)],
        [("Conv2d", (3, 3)), ("BatchNorm2d", None), ("ReLU", None), ("MaxPool2d", 2)],
        [("Conv2d", (3, 3)), ("BatchNorm2d", None), ("ReLU", None), ("MaxPool2d", 2)],
    ]
    for model in (one, two):
        assert [type(m).__name__ for m in model.classifier] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert one.dropout.p == 0.5


def test_deepmerge1_features_are_before_the_last_dropout_and_its_head_sees_them_dropped_out():
    """The features the DA losses act on are the flattened conv output; only the dense head sees the
    dropped-out copy. A forward that dropped the features out too (or not at all) passed."""
    model = DeepMerge().train()
    seen = []
    model.classifier[0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    torch.manual_seed(0)
    features, _ = model(images(4))
    head_input = seen[0]
    kept = head_input != 0
    assert 0.3 < kept[features != 0].float().mean().item() < 0.7  # about half dropped, p = 0.5
    torch.testing.assert_close(head_input[kept], 2 * features.detach()[kept])  # survivors scaled by 1/(1-p)
    assert (features != 0).float().mean().item() > 0.3  # the features themselves are not dropped out
    model.eval()
    seen.clear()
    features, _ = model(images(4))
    torch.testing.assert_close(seen[0], features.detach())


def _resnet_block_reference(block, x):
    """What a torchvision ResNet v1.5 block computes, written out from its own layers."""
    relu = torch.relu
    if hasattr(block, "conv3"):
        out = relu(block.bn1(block.conv1(x)))
        out = relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = relu(block.bn1(block.conv1(x)))
        out = block.bn2(block.conv2(out))
    return relu(out + block.downsample(x))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_blocks_compute_torchvisions_v1_5_blocks(name):
    """A ReLU lost after a block's sum or inside a bottleneck, or the stride moved from the 3x3 conv
    (v1.5) to a 1x1 or second conv, kept every parameter count and output shape."""
    from dmhpc.models.resnet import BasicBlock, Bottleneck

    torch.manual_seed(0)
    model = build_model(name).eval()
    blocks = [m for m in model.trunk if isinstance(m, (BasicBlock, Bottleneck))]
    strides = []
    for block in blocks:
        if isinstance(block, Bottleneck):
            assert block.conv1.stride == block.conv3.stride == (1, 1) and block.conv1.kernel_size == (1, 1)
            strides.append(block.conv2.stride[0])
        else:
            assert block.conv2.stride == (1, 1)
            strides.append(block.conv1.stride[0])
    layers = (2, 2, 2, 2) if name == "resnet18" else (3, 4, 6, 3)
    expected = [2 if stage > 0 and j == 0 else 1 for stage, n in enumerate(layers) for j in range(n)]
    assert strides == expected
    with torch.no_grad():
        for block in (blocks[0], blocks[sum(layers[:1])]):  # the first block, and one with a stride-2 shortcut
            x_in = torch.randn(2, block.conv1.in_channels, 10, 10, generator=torch.Generator().manual_seed(2))
            torch.testing.assert_close(block(x_in), _resnet_block_reference(block, x_in))


@pytest.mark.parametrize("stem, side", [("original", 3), ("small", 10)])
def test_resnet_maps_before_pooling_are_as_the_stems_say(stem, side):
    """75 -> 38 -> 19 -> 19 -> 10 -> 5 -> 3 with ImageNet's stem, 75 -> ... -> 10 with the small one: a
    stem without its max-pool or stride, or a stage without its stride, ran the same weights on 4-16x
    the positions (and Grad-CAM drew another map) without changing a count or an output shape."""
    model = build_model("resnet18", stem=stem).eval()
    with torch.no_grad():
        x = images(1)
        for layer in model.trunk[:-2]:
            x = layer(x)
        pooled = model.trunk[-2:](x)
    assert x.shape == (1, 512, side, side)
    torch.testing.assert_close(pooled, x.mean(dim=(2, 3)))  # the global average pool, not a max


def test_resnet_convolutions_are_initialised_by_their_fan_out():
    """torchvision's init: Kaiming normal over fan_out. The 7x7 stem conv (3 -> 64) has std
    sqrt(2 / (64 * 49)) = 0.025; fan_in would give 0.12."""
    torch.manual_seed(0)
    stem = build_model("resnet18").trunk[0][0]
    assert stem.weight.std().item() == pytest.approx((2 / (64 * 7 * 7)) ** 0.5, rel=0.05)


def test_the_discriminators_hidden_layers_are_relu_and_dropout_with_their_init():
    """Only the parameter counts, the first and last layers' init and the output were checked: a
    dropout lost between the hidden layers, a sigmoid in place of a ReLU, or the second hidden
    layer drawn with the output's N(0, 0.3) passed."""
    torch.manual_seed(0)
    disc = DomainDiscriminator(256)
    assert [(type(m).__name__, getattr(m, "p", None)) for m in disc.net] == [
        ("Linear", None), ("ReLU", None), ("Dropout", 0.5), ("Linear", None), ("ReLU", None), ("Dropout", 0.5),
        ("Linear", None)]
    assert disc.net[3].weight.std().item() == pytest.approx(0.01, rel=0.05)


def test_the_discriminator_gives_one_logit_per_image_for_a_batch_of_one():
    """A last batch of one image gave a 0-d logit: squeezed of its batch dimension, unlike its labels."""
    disc = DomainDiscriminator(8, hidden=4).eval()
    assert disc(torch.randn(1, 8), coeff=1.0).shape == (1,)


def test_frozen_parameters_are_left_out_of_the_optimisers_groups():
    """A parameter with requires_grad False (frozen by the user) would be handed to the optimiser,
    whose weight decay then changed it."""
    model = build_model("deepmerge2")
    model.conv[0][0].weight.requires_grad_(False)
    groups = param_groups(model, head_lr_mult=10.0, discriminator_lr_mult=10.0, fisher_lr_mult=10.0)
    ids = {id(p) for g in groups for p in g["params"]}
    assert id(model.conv[0][0].weight) not in ids and len(ids) == len(list(model.parameters())) - 1
    disc = DomainDiscriminator(4, hidden=2)
    disc.requires_grad_(False)
    assert [g["name"] for g in param_groups(model, disc, head_lr_mult=1.0, discriminator_lr_mult=1.0,
                                            fisher_lr_mult=1.0)] == ["trunk"]


@pytest.mark.parametrize("name", ["deepmerge", "deepmerge2", "resnet18", "resnet50"])
def test_grad_cam_weighs_the_last_convolutional_block(name):
    """`dmhpc explain` draws Grad-CAM on `last_conv_block()`: a block before the last (a finer map of
    other features) was drawn for the last without a word."""
    from dmhpc.models.resnet import BasicBlock, Bottleneck

    model = build_model(name)
    if name.startswith("resnet"):
        assert model.last_conv_block() is [m for m in model.trunk if isinstance(m, (BasicBlock, Bottleneck))][-1]
    else:
        assert model.last_conv_block() is model.conv[2] and model.last_conv_block()[0].out_channels == 32


@pytest.mark.parametrize("name, options", [("deepmerge", {}), ("deepmerge2", {}), ("resnet18", {}),
                                           ("resnet18", {"stem": "small"}), ("resnet50", {})])
def test_the_grad_cam_block_is_the_last_map_of_more_than_one_pixel(name, options):
    """explain weighs last_conv_block()'s output: a block before it (ResNet's is picked by its place
    in the trunk) would draw a coarser or earlier map than the one the features are pooled from."""
    net = build_model(name, **options).eval()
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append((m, o))) for m in net.modules()]
    with torch.no_grad():
        net(torch.randn(2, 3, 75, 75))
    for hook in hooks:
        hook.remove()
    maps = [o for m, o in outputs if isinstance(o, torch.Tensor) and o.ndim == 4 and o.shape[-1] * o.shape[-2] > 1]
    block = [o for m, o in outputs if m is net.last_conv_block()]
    assert len(block) == 1 and torch.equal(block[0], maps[-1])
