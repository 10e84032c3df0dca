"""The domain-adaptation objective (dmhpc/train/objective.py) and the training step (step.py) on
their own: the total is the weighted sum of every term, computed independently here, and the step
really runs under the AMP and compile settings it is given."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from dmhpc.config import load_config
from dmhpc.distributed import DistInfo
from dmhpc.errors import DmhpcError
from dmhpc.losses import DEEPMERGE_SIGMAS, coral, dann_loss, entropy, mmd
from dmhpc.train.objective import DomainAdaptation
from dmhpc.train.state import TrainState
from dmhpc.train.step import TrainStep
from tests.conftest import TINY

CPU = DistInfo(0, 0, 1, torch.device("cpu"), None)


def config(**loss):
    cfg = load_config(TINY)
    fisher = dict(weight=loss.pop("fisher_weight", 0.0), intra_weight=0.01, inter_weight=1.0)
    return dataclasses.replace(cfg, loss=dataclasses.replace(
        cfg.loss, fisher=dataclasses.replace(cfg.loss.fisher, **fisher), **loss))


def batch(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 75, 75, generator=g), torch.arange(n) % 2,
            torch.randn(n, 3, 75, 75, generator=g) * 1.5 + 0.3, torch.arange(n) % 2)


@pytest.mark.parametrize("transfer, options", [("mmd", False), ("coral", False), ("dann", False), ("mmd", True)])
def test_the_total_is_the_weighted_sum_of_independently_computed_terms(transfer, options):
    """A transfer term multiplied by zero in the total used to pass every test; `options`: the
    loss's own settings (unbiased clamped MMD, the Fisher difference form over the batch's mean)
    reach the terms, which the default settings alone would not show."""
    cfg = config(transfer=transfer, transfer_weight=0.7, entropy_weight=0.3, fisher_weight=0.002)
    if options:
        cfg = _with(cfg, loss={"mmd": dataclasses.replace(cfg.loss.mmd, unbiased=True, clamp=1e-4),
                               "fisher": dataclasses.replace(cfg.loss.fisher, form="td", normalize="mean")})
    torch.manual_seed(0)
    model = DomainAdaptation(cfg, seed=0, in_channels=3).eval()  # eval: the same BatchNorm statistics in both passes
    xs, ys, xt, _ = batch()
    grl = 0.4
    total, terms, _ = model(xs, ys, xt, grl)

    feats, logits = model.backbone(torch.cat([xs, xt]))
    fs, ft = feats[:6], feats[6:]
    expected = {"classifier": F.cross_entropy(logits[:6], ys)}
    if transfer == "mmd":
        expected["transfer"] = mmd(fs, ft, sigmas=DEEPMERGE_SIGMAS, unbiased=options, clamp=1e-4 if options else None)
    elif transfer == "coral":
        expected["transfer"] = coral(fs, ft)
    else:
        d = model.discriminator(feats, grl)
        expected["transfer"] = dann_loss(d[:6], d[6:])
    centres = model.fisher.centres
    intra = (fs - centres[ys]).square().sum()
    inter = (centres - centres.mean(0)).square().sum()
    expected["fisher"] = 0.01 * intra / 6 - 1.0 * inter if options else 0.01 * intra / (1.0 * inter)
    expected["entropy"] = entropy(logits)
    want = (expected["classifier"] + 0.7 * expected["transfer"] + 0.002 * expected["fisher"]
            + 0.3 * expected["entropy"])
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value.detach(), rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-6)
    # and the gradient reaches the backbone through every term
    total.backward()
    grad = torch.cat([p.grad.flatten() for p in model.backbone.parameters() if p.grad is not None])
    model.zero_grad()
    want.backward()
    expected_grad = torch.cat([p.grad.flatten() for p in model.backbone.parameters() if p.grad is not None])
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("transfer", ["mmd", "coral", "dann"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_every_term_is_computed_at_the_configured_scope(transfer, scope, monkeypatch):
    """loss.scope decides whether a term is the whole global batch's or each rank's; in one process
    both give the same numbers, and a term computed at the other scope passed the trainer's
    two-rank tests too. Each term must be handed the configured scope."""
    from dmhpc.train import objective

    scopes = []

    def recorded(fn):
        def call(*args, **kwargs):
            scopes.append((fn.__name__, kwargs.get("scope")))
            return fn(*args, **kwargs)
        return call

    for name in ("mmd", "coral", "dann_loss", "entropy"):
        monkeypatch.setattr(objective, name, recorded(getattr(objective, name)))
    cfg = config(transfer=transfer, scope=scope, entropy_weight=0.1, fisher_weight=0.01)
    model = DomainAdaptation(cfg, seed=0, in_channels=3)
    xs, ys, xt, _ = batch()
    model(xs, ys, xt, 0.5)
    assert sorted(scopes) == sorted([(transfer if transfer != "dann" else "dann_loss", scope), ("entropy", scope)])
    assert model.fisher.scope == scope


def test_a_zero_weight_leaves_a_term_out_of_the_total():
    cfg = config(transfer="mmd", transfer_weight=0.0, entropy_weight=0.0)
    model = DomainAdaptation(cfg, seed=0, in_channels=3).eval()
    xs, ys, xt, _ = batch()
    total, terms, _ = model(xs, ys, xt, 0.0)
    assert terms["transfer"] > 0 and "entropy" not in terms and "fisher" not in terms
    torch.testing.assert_close(total, terms["classifier"])


def _matmul_dtypes(cfg) -> set:
    """The dtypes the backbone's convolutions and linear layers computed in during one step."""
    torch.manual_seed(0)
    state = TrainState.build(cfg, torch.device("cpu"), 3)
    seen = set()
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.add(out.dtype))
             for m in state.model.backbone.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    step = TrainStep(cfg, state, CPU, total_steps=10, steps_per_epoch=5)
    step(0, batch())
    for h in hooks:
        h.remove()
    return seen


def test_the_step_runs_under_the_amp_it_is_given():
    """train.amp ignored by the step used to pass every test."""
    cfg = config(transfer="mmd")
    assert _matmul_dtypes(cfg) == {torch.float32}
    bf16 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, amp="bf16"))
    assert _matmul_dtypes(bf16) == {torch.bfloat16}


@pytest.mark.parametrize("schedule", ["warmup-cosine", "inv"])
def test_each_step_trains_each_group_at_its_rate_and_reverses_by_the_scheduled_coefficient(schedule, monkeypatch):
    """The rate schedule, the groups' multipliers (heads 10x, the discriminator its own) and the
    gradient-reversal coefficient reached no checked optimizer or forward pass: the trainer logs
    them recomputed from the same functions, so a step that ignored them passed every test."""
    from dmhpc.losses import grl_coefficient
    from dmhpc.train.schedule import lr_factor

    cfg = config(transfer="dann", fisher_weight=0.01)  # Fisher's centres: a group at head_lr_mult
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, schedule=schedule, warmup_steps=2,
                                                             head_lr_mult=10.0, discriminator_lr_mult=0.5))
    state = TrainState.build(cfg, torch.device("cpu"), 3)
    coefficients = []
    forward = DomainAdaptation.forward

    def seen(self, xs, ys, xt, grl):
        coefficients.append(grl)
        return forward(self, xs, ys, xt, grl)

    monkeypatch.setattr(DomainAdaptation, "forward", seen)
    step = TrainStep(cfg, state, CPU, total_steps=10, steps_per_epoch=5)
    groups = state.optimizer.param_groups
    assert {g["lr_mult"] for g in groups} == {1.0, 10.0, 0.5}
    # The rates the optimizer steps with, read as it steps: set after its step, the groups read
    # right afterwards hold them, though each step trained at the previous one's (step 0 at the base).
    stepped_at, optimizer_step = [], state.optimizer.step

    def step_recording_rates(*args, **kwargs):
        stepped_at.append([g["lr"] for g in groups])
        return optimizer_step(*args, **kwargs)

    monkeypatch.setattr(state.optimizer, "step", step_recording_rates)
    rates = []
    for k in range(4):
        step(k, batch(k))
        factor = lr_factor(k, cfg.optim, total_steps=10, steps_per_epoch=5)
        assert len(stepped_at) == k + 1
        for g, lr in zip(groups, stepped_at[k]):
            assert lr == pytest.approx(cfg.optim.lr * g["lr_mult"] * factor, rel=1e-12), (k, g["lr_mult"])
        rates.append(factor)
        assert coefficients[-1] == grl_coefficient(k, 10, cfg.loss.grl)
    assert len(set(rates)) >= 3 and len(set(coefficients)) == 4  # both change along the steps


def test_an_eager_step_runs_the_plain_module():
    """What is compiled with train.compile is checked by the trainer's test of it (test_train)."""
    cfg = config(transfer="mmd")
    eager = TrainStep(cfg, TrainState.build(cfg, torch.device("cpu"), 3), CPU, total_steps=10, steps_per_epoch=5)
    assert eager.forward is eager.state.model


@pytest.mark.parametrize("loss, reads", [({"transfer": "none"}, False), ({"transfer": "none", "fisher_weight": 0.1}, False),
                                         ({"transfer": "none", "entropy_weight": 0.1}, True),
                                         ({"transfer": "mmd"}, True)])
def test_a_run_without_adaptation_learns_nothing_from_the_target_batch(loss, reads):
    """The source and target batches went through the backbone together in every run, so in one
    without adaptation (the baseline, the oracle) BatchNorm normalized source images with target
    ones, and its running statistics took in the target: the baseline was partly adapted (the
    original's baseline passed the source alone). Trained in train mode on one source batch with
    two different target batches: the same loss, gradients and BatchNorm statistics, unless a term
    reads the target."""
    cfg = config(**{"entropy_weight": 0.0, **loss})
    xs, ys, xt, _ = batch()
    seen = []
    for target in (xt, torch.flip(xt, dims=[0]) * 3.0 - 1.0):
        torch.manual_seed(0)
        model = DomainAdaptation(cfg, seed=0, in_channels=3).train()
        torch.manual_seed(1)  # (dropout's masks)
        total, _, outputs = model(xs, ys, target, 0.0)
        total.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        stats = torch.cat([b.flatten() for n, b in model.named_buffers() if "running" in n])
        seen.append((total.detach(), grads, stats, outputs["logits"].shape[0]))
    (t1, g1, s1, rows), (t2, g2, s2, _) = seen
    assert rows == (12 if reads else 6)
    same = torch.equal(t1, t2) and torch.equal(g1, g2) and torch.equal(s1, s2)
    assert same is not reads


SHIPPED = sorted(p.name for p in TINY.parent.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_objective_computes_the_same_gradient_at_every_backward_on_several_threads(name):
    """Two identical runs on a CPU's threads end with equal weights only if each backward sums in one
    order: Fisher's indexed centres (atomic adds) once made them part in the 7th digit of the first
    epoch's loss, hidden by the resume tests' single thread (at 8 rows the adds ran on one thread:
    32 catch them). Every shipped model and loss, dropout drawn alike at each pass."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        torch.manual_seed(0)
        model = DomainAdaptation(load_config(TINY.parent / name), seed=0, in_channels=3).train()
        xs, ys, xt, _ = batch(n=32)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        grads = []
        for _ in range(3):
            model.load_state_dict(start)  # BatchNorm's running statistics as at the first pass
            model.zero_grad()
            torch.manual_seed(5)
            model(xs, ys, xt, 0.5)[0].backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    finally:
        torch.set_num_threads(threads)
    assert grads[0] and all(g.keys() == grads[0].keys() for g in grads)
    varying = [n for n in grads[0] if not all(torch.equal(g[n], grads[0][n]) for g in grads[1:])]
    assert not varying, f"{name}: gradients differ between identical backward passes: {varying[:5]}"


def _with(cfg, **sections):
    """`cfg` with fields of its sections replaced: _with(cfg, train={"amp": "fp16"})."""
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)
                                       for name, values in sections.items()})


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_each_amp_setting_autocasts_to_its_own_dtype(amp, dtype):
    """train.amp=fp16 run in bfloat16 (or bf16 in float16) would train at another precision than
    asked, with fp16's loss scaling around bf16's numbers, and no error."""
    from dmhpc.train.step import autocast

    with autocast(amp, torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype


def _grad_norm(params) -> float:
    return float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None])))


def _clipped_norm(cfg, monkeypatch, after: list | None = None) -> float:
    """The gradient norm clip_grad_norm_ was handed in one step of a fresh state on one batch;
    `after` gets the norm of the gradient the optimizer stepped with (what the step left)."""
    seen = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        seen.append(_grad_norm(params))
        return clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    torch.manual_seed(0)
    state = TrainState.build(cfg, torch.device("cpu"), 3)
    TrainStep(cfg, state, CPU, total_steps=10, steps_per_epoch=5)(0, batch())
    assert len(seen) == 1
    if after is not None:
        after.append(_grad_norm(state.model.parameters()))
    return seen[0]


def test_the_gradient_the_optimizer_steps_with_is_clipped_to_grad_clip(monkeypatch):
    """optim.grad_clip was checked only for the norm handed to the clipping: a step that clipped
    nothing (max_norm infinite, or the clip dropped) passed every test."""
    cfg = _with(config(transfer="mmd"), optim={"grad_clip": 0.01})
    after = []
    handed = _clipped_norm(cfg, monkeypatch, after)
    assert handed > 0.1 and after[0] == pytest.approx(0.01, rel=1e-4), (handed, after)


def test_under_fp16_the_gradient_is_clipped_at_its_unscaled_norm(monkeypatch):
    """Clipped before the scaler unscales it, an fp16 gradient is 65536 times its norm: every step
    is clipped to optim.grad_clip in the scaled units, i.e. training all but stops."""
    cfg = _with(config(transfer="mmd"), optim={"grad_clip": 1.0})
    try:  # probed apart: an error of the step itself is a failure, not a skip
        with torch.autocast("cpu", torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except RuntimeError as exc:  # a torch without CPU float16 kernels
        pytest.skip(f"fp16 autocast does not run on this CPU: {exc}")
    fp16 = _clipped_norm(_with(cfg, train={"amp": "fp16"}), monkeypatch)
    plain = _clipped_norm(cfg, monkeypatch)
    assert math.isfinite(fp16) and plain > 0
    assert fp16 == pytest.approx(plain, rel=0.1)


def test_an_fp16_step_the_scaler_skips_leaves_the_running_statistics_finite():
    """The scaler skips a step whose fp16 loss overflowed, but its forward pass had already updated
    the BatchNorm running statistics (and the Fisher centres) with Inf and NaN: the next check of
    the weights stopped, as diverged, the run the scaler had kept going."""
    try:  # probed apart: an error of the step itself is a failure, not a skip
        with torch.autocast("cpu", torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except RuntimeError as exc:  # a torch without CPU float16 kernels
        pytest.skip(f"fp16 autocast does not run on this CPU: {exc}")
    cfg = _with(config(transfer="mmd", fisher_weight=1.0), train={"amp": "fp16"})
    torch.manual_seed(0)
    state = TrainState.build(cfg, torch.device("cpu"), 3)
    step = TrainStep(cfg, state, CPU, total_steps=10, steps_per_epoch=5)
    step(0, batch(0))
    weights = {k: v.clone() for k, v in state.model.state_dict().items()}
    xs, ys, xt, yt = batch(1)
    xs[0, 0, 10, 10] = 7e4  # one pixel past fp16's range once convolved
    terms, _ = step(1, (xs, ys, xt, yt))
    assert not math.isfinite(float(terms["total"])) and state.scaler.get_scale() < 65536.0  # skipped
    assert state.nonfinite_tensors() == []
    after = state.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items() if v.is_floating_point()), \
        [k for k, v in weights.items() if v.is_floating_point() and not torch.equal(after[k], v)]
    step(2, batch(2))  # and training goes on
    assert state.nonfinite_tensors() == []


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                       ("sgd", torch.optim.SGD)])
def test_the_state_holds_the_optimizer_the_config_names(name, cls):
    """optim.name=adamw trained with Adam's coupled weight decay, or sgd without Nesterov momentum,
    would be another optimizer than the config (and the run's leaderboard entry) says."""
    cfg = _with(config(transfer="mmd"), optim={"name": name, "momentum": 0.9, "weight_decay": 0.01,
                                               "betas": (0.6, 0.75)})
    optimizer = TrainState.build(cfg, torch.device("cpu"), 3).optimizer
    assert type(optimizer) is cls
    assert all(g["weight_decay"] == 0.01 for g in optimizer.param_groups)
    if name == "sgd":
        assert all(g["nesterov"] and g["momentum"] == 0.9 for g in optimizer.param_groups)
    else:
        assert all(g["betas"] == (0.6, 0.75) for g in optimizer.param_groups)


def test_a_resumed_fp16_run_keeps_its_loss_scale():
    """The gradient scaler's scale not restored on resume restarts at 65536: the resumed run's
    first steps overflow and are skipped, and it is no longer the run never stopped."""
    cfg = _with(config(transfer="mmd"), train={"amp": "fp16"})
    state = TrainState.build(cfg, torch.device("cpu"), 3)
    # (skipped before when off: fp16 without loss scaling passed every test)
    assert state.scaler.is_enabled()
    assert not TrainState.build(_with(cfg, train={"amp": "bf16"}), torch.device("cpu"), 3).scaler.is_enabled()
    state.scaler.scale(torch.ones(()))  # (the scale tensor is made at the first use)
    state.scaler.update(new_scale=1024.0)
    fresh = TrainState.build(cfg, torch.device("cpu"), 3)
    assert fresh.scaler.get_scale() != 1024.0
    fresh.load_state_dict(state.state_dict(), 0)
    assert fresh.scaler.get_scale() == 1024.0


def test_a_checkpoint_whose_progress_holds_a_key_of_an_older_dmhpc_still_loads():
    """Checkpoints of an older dmhpc kept best_epoch in their progress: failing on it as an
    unexpected keyword, their runs could no longer be resumed."""
    cfg = config(transfer="mmd")
    state = TrainState.build(cfg, torch.device("cpu"), 3)
    state.progress.epoch, state.progress.step, state.progress.best_score = 2, 14, 0.75
    saved = state.state_dict()
    saved["progress"] = {**saved["progress"], "best_epoch": 1}
    fresh = TrainState.build(cfg, torch.device("cpu"), 3)
    fresh.load_state_dict(saved, 0)
    assert (fresh.progress.epoch, fresh.progress.step, fresh.progress.best_score) == (2, 14, 0.75)


def test_the_start_up_forward_pass_changes_no_statistics_and_draws_no_random_numbers():
    """check_model_input's zero batch run in train mode would put zeros into BatchNorm's running
    statistics and draw dropout masks: a run would not start from its seed's weights and RNG."""
    from dmhpc.train.preflight import check_model_input

    cfg = config(transfer="mmd")
    torch.manual_seed(0)
    backbone = DomainAdaptation(cfg, seed=0, in_channels=3).backbone.train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    rng = torch.get_rng_state()
    check_model_input(cfg, backbone, [3, 75, 75], torch.device("cpu"), rows=2 * cfg.train.batch_size)
    assert backbone.training
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])]
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_batch_norm_layer_a_training_pass_gives_one_value_per_channel_is_refused_at_the_start():
    """A ResNet's last maps are 1x1 on 16x16 images: at train.batch_size 1 with the source passing
    alone its batch norm has one value per channel, and the first step ended in a ValueError traceback
    (after the run directory was claimed)."""
    from dmhpc.train.preflight import check_model_input

    base = config(transfer="none", entropy_weight=0.0)
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, name="resnet18"),
                              train=dataclasses.replace(base.train, batch_size=1))
    backbone = DomainAdaptation(cfg, seed=0, in_channels=3).backbone
    with pytest.raises(DmhpcError, match=r"^train.batch_size 1: a training forward pass of 1 row gives batch-norm "
                                         r"layer \S+ of model.name resnet18 one value per channel on images 3x16x16"):
        check_model_input(cfg, backbone, [3, 16, 16], torch.device("cpu"), rows=1)
    check_model_input(cfg, backbone, [3, 16, 16], torch.device("cpu"), rows=2)  # source and target together
    check_model_input(cfg, backbone, [3, 75, 75], torch.device("cpu"), rows=1)  # maps of more than one value
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):  # what it spares
        backbone.train()(torch.zeros(1, 3, 16, 16))


def test_a_model_whose_losses_are_kept_eager_copies_and_pickles_as_itself():
    """keep_losses_eager stored the bound method, wrapped, on the instance: a deepcopy's loss terms
    ran on the original's discriminator, and the model no longer pickled (torch.save of the module)."""
    import copy
    import io
    import pickle

    cfg = config(transfer="dann")
    model = DomainAdaptation(cfg, seed=0, in_channels=3).eval()
    model.keep_losses_eager()
    model.keep_losses_eager()  # a second TrainStep on the same model
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.discriminator.parameters():
            p.zero_()
        xs, ys, xt, _ = batch()
        assert clone(xs, ys, xt, 0.0)[1]["transfer"].item() == pytest.approx(math.log(2))  # logits all 0
    pickle.loads(pickle.dumps(model))
    torch.save(model, io.BytesIO())


def test_a_summed_fisher_term_over_several_ranks_is_noted():
    """The original's summed intra-class term over the global batch grows with the ranks: the shipped
    Fisher configs on 4 GPUs weighed it 4 times their laptop runs, without a word."""
    from dmhpc.train.objective import fisher_scale_note

    cfg = load_config(TINY)
    assert "weighs 4x" in fisher_scale_note(cfg.loss, 4)
    assert fisher_scale_note(cfg.loss, 1) is None
    for changed in ({"normalize": "mean"}, {"weight": 0.0}):
        loss = dataclasses.replace(cfg.loss, fisher=dataclasses.replace(cfg.loss.fisher, **changed))
        assert fisher_scale_note(loss, 4) is None
    assert fisher_scale_note(dataclasses.replace(cfg.loss, scope="local"), 4) is None
