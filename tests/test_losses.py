"""Single-process tests of dmhpc.losses against independent float64 NumPy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmhpc.config import GRLConfig
from dmhpc.errors import DmhpcError
from dmhpc.losses import (
    DEEPMERGE_SIGMAS,
    MEDIAN_SCALES,
    FisherLoss,
    GradientReversal,
    coral,
    dann_loss,
    entropy,
    grl_coefficient,
    mmd,
)

# ---------------------------------------------------------------- references (NumPy, float64, loops)


def ref_mmd(x: np.ndarray, y: np.ndarray, sigmas, unbiased: bool) -> float:
    def sqdist(a, b):
        return np.array([((row - b) ** 2).sum(axis=1) for row in a])

    def kernel(d):
        return sum(np.exp(-d / (2.0 * s)) for s in sigmas)

    kxx, kyy, kxy = kernel(sqdist(x, x)), kernel(sqdist(y, y)), kernel(sqdist(x, y))
    n, m = len(x), len(y)
    if unbiased:
        return (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    return kxx.mean() + kyy.mean() - 2 * kxy.mean()


def ref_median_sigmas(x: np.ndarray, y: np.ndarray) -> list[float]:
    z = np.concatenate([x, y])
    pairs = [((z[i] - z[j]) ** 2).sum() for i in range(len(z)) for j in range(i + 1, len(z))]
    lower_median = np.sort(pairs)[(len(pairs) - 1) // 2]
    return [float(lower_median * s) for s in MEDIAN_SCALES]


def ref_coral(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    return float(((np.cov(x, rowvar=False) - np.cov(y, rowvar=False)) ** 2).sum() / (4 * d * d))


def ref_entropy(logits: np.ndarray) -> float:
    total = 0.0
    for row in logits:
        logp = row - row.max() - math.log(np.exp(row - row.max()).sum())
        total -= (np.exp(logp) * logp).sum()
    return total / len(logits)


def ref_dann(zs: np.ndarray, zt: np.ndarray) -> float:
    # -log sigmoid(z) = softplus(-z); -log(1 - sigmoid(z)) = softplus(z)
    softplus = lambda v: np.logaddexp(0.0, v)  # noqa: E731
    return float((softplus(-zs).sum() + softplus(zt).sum()) / (len(zs) + len(zt)))


def ref_fisher(x, labels, centres, form, wi, we, normalize):
    intra = sum(((x[i] - centres[labels[i]]) ** 2).sum() for i in range(len(x)))
    if normalize == "mean":
        intra /= len(x)
    mean_centre = centres.mean(axis=0)
    inter = sum(((c - mean_centre) ** 2).sum() for c in centres)
    loss = wi * intra / (we * inter) if form == "tr" else wi * intra - we * inter
    return loss, intra, inter


# ---------------------------------------------------------------- inputs


def realistic_features(seed: int = 0, n: int = 128, d: int = 2592) -> tuple[np.ndarray, np.ndarray]:
    """ReLU-like non-negative features, norms ~15-70, a shared mean profile, target shifted."""
    rng = np.random.default_rng(seed)
    profile = rng.uniform(0.0, 1.0, d)
    xs = np.maximum(profile + 0.5 * rng.standard_normal((n, d)), 0) * rng.uniform(0.5, 2.0, (n, 1))
    xt = np.maximum(profile + 0.15 + 0.5 * rng.standard_normal((n, d)), 0) * rng.uniform(0.5, 2.0, (n, 1))
    return xs, xt


@pytest.fixture(scope="module")
def realistic():
    xs, xt = realistic_features()
    norms = np.linalg.norm(xs, axis=1)
    assert 10 < norms.min() and norms.max() < 100
    return xs, xt


def small(seed: int, n: int, d: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, d, generator=g, dtype=torch.float64)).requires_grad_()


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ---------------------------------------------------------------- MMD


@pytest.mark.parametrize("unbiased", [False, True])
def test_mmd_matches_reference_float64_and_float32(realistic, unbiased):
    xs, xt = realistic
    expected = ref_mmd(xs, xt, DEEPMERGE_SIGMAS, unbiased)
    assert expected > 1e-3  # the offset is visible, so a relative tolerance means something
    got64 = mmd(torch.from_numpy(xs), torch.from_numpy(xt), unbiased=unbiased).item()
    got32 = mmd(torch.from_numpy(xs).float(), torch.from_numpy(xt).float(), unbiased=unbiased).item()
    assert rel(got64, expected) < 1e-6
    assert rel(got32, expected) < 1e-3


def test_mmd_textbook_expansion_would_fail_this_test(realistic):
    """The test above can fail: ||x||^2 + ||y||^2 - 2 x.y in float32 misses it by percents."""
    xs, xt = (torch.from_numpy(a).float() for a in realistic)
    z = torch.cat([xs, xt])
    sq = (z * z).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp_min(0).double()
    k = sum(torch.exp(-d / (2 * s)) for s in DEEPMERGE_SIGMAS)
    n = len(xs)
    naive = (k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()).item()
    assert rel(naive, ref_mmd(*realistic, DEEPMERGE_SIGMAS, False)) > 1e-2


@pytest.mark.parametrize("unbiased", [False, True])
def test_mmd_float32_gradient_matches_float64(realistic, unbiased):
    grads = {}
    for dtype in (torch.float64, torch.float32):
        xs, xt = (torch.from_numpy(a).to(dtype).requires_grad_() for a in realistic)
        mmd(xs, xt, unbiased=unbiased).backward()
        grads[dtype] = torch.cat([xs.grad, xt.grad]).double()
    g64, g32 = grads[torch.float64], grads[torch.float32]
    assert g64.norm() > 0
    assert ((g32 - g64).norm() / g64.norm()).item() < 1e-3


def test_the_narrowest_kernel_taken_is_finite_and_a_narrower_one_refused():
    """sigmas=[1e-300] passed: 1 / (2 sigma) is inf in float32, and a self-distance of 0 times it
    NaN, a loss not finite at step 1 whose hint (lower optim.lr) pointed the wrong way."""
    from dmhpc.losses.mmd import MIN_SIGMA

    x = torch.randn(8, 4, requires_grad=True)
    value = mmd(x, torch.randn(8, 4), sigmas=[MIN_SIGMA])
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    with pytest.raises(DmhpcError, match=r"mmd: sigmas must be a non-empty list of numbers from 1e-30 to 1e\+30"):
        mmd(x, x, sigmas=[1e-300])


@pytest.mark.parametrize("chunk", [None, 20])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("sigmas", [DEEPMERGE_SIGMAS, (0.5, 2.0)])
def test_mmd_small_reference_and_gradcheck(unbiased, sigmas, chunk, monkeypatch):
    """chunk: the path of blocks whose pairs x kernels pass `_CHUNK` (from ~470 rows of a domain in
    the global batch: four ranks of 128), kernels a group at a time and recomputed in backward; no
    test took it, and its gradient's sign could be flipped unseen."""
    if chunk is not None:
        import importlib

        monkeypatch.setattr(importlib.import_module("dmhpc.losses.mmd"), "_CHUNK", chunk)  # a kernel at a time
    xs, xt = small(1, 5, 3, scale=2.0), small(2, 4, 3, scale=2.0)
    expected = ref_mmd(xs.detach().numpy(), xt.detach().numpy(), sigmas, unbiased)
    assert rel(mmd(xs, xt, sigmas=sigmas, unbiased=unbiased).item(), expected) < 1e-10
    assert torch.autograd.gradcheck(lambda a, b: mmd(a, b, sigmas=sigmas, unbiased=unbiased), (xs, xt))


def test_mmd_kernels_are_the_documented_ones():
    """The references take these from the module: pinned here, as docs/losses.md states them."""
    assert DEEPMERGE_SIGMAS == (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1, 5, 10, 15, 20, 25, 30, 35, 100, 1e3, 1e4,
                                1e5, 1e6)
    assert MEDIAN_SCALES == (0.25, 0.5, 1.0, 2.0, 4.0)


@pytest.mark.parametrize("unbiased", [False, True])
def test_mmd_median_bandwidth_is_the_detached_lower_median(unbiased):
    xs, xt = small(3, 6, 4), small(4, 5, 4)
    sigmas = ref_median_sigmas(xs.detach().numpy(), xt.detach().numpy())
    median = mmd(xs, xt, sigmas="median", unbiased=unbiased)
    (g_median_s, g_median_t) = torch.autograd.grad(median, (xs, xt))
    fixed = mmd(xs, xt, sigmas=sigmas, unbiased=unbiased)
    (g_fixed_s, g_fixed_t) = torch.autograd.grad(fixed, (xs, xt))
    assert rel(median.item(), fixed.item()) < 1e-12
    torch.testing.assert_close(g_median_s, g_fixed_s, rtol=1e-10, atol=0)
    torch.testing.assert_close(g_median_t, g_fixed_t, rtol=1e-10, atol=0)


# Ops whose result size (or value on the host) depends on the data: on a GPU each waits for the queue.
WAITING_OPS = ("aten.nonzero", "aten.masked_select", "aten._local_scalar_dense", "aten.unique", "aten.item")


def _waiting_ops(fn) -> list[str]:
    """The ops of `fn` (forward and backward) that would wait for the device: boolean-mask indexing
    and the like, which a CPU run does without a cost to see."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.waits = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            masks = name.startswith("aten.index.") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
            if masks or name.startswith(WAITING_OPS):
                self.waits.append(name)
            return func(*args, **(kwargs or {}))

    with Record() as record:
        fn().backward()
    return record.waits


@pytest.mark.parametrize("loss", ["mmd", "mmd-median", "coral", "entropy", "fisher", "dann"])
def test_the_losses_never_wait_for_the_device(loss):
    """MMD's median bandwidth took its distinct pairs with boolean masks: every step waited for the
    GPU to learn their number. Checked on CPU through the ops each loss dispatches."""
    xs, xt = small(3, 8, 5), small(4, 8, 5)
    labels = torch.tensor([0, 1] * 4)
    fisher = FisherLoss(2, 5, intra_weight=1.0, inter_weight=1.0)
    run = {"mmd": lambda: mmd(xs, xt), "mmd-median": lambda: mmd(xs, xt, sigmas="median"),
           "coral": lambda: coral(xs, xt), "entropy": lambda: entropy(xs),
           "fisher": lambda: fisher(xs, labels)[0], "dann": lambda: dann_loss(xs[:, :1], xt[:, :1])}[loss]
    assert _waiting_ops(run) == []


def test_mmd_of_a_sample_with_itself_is_zero_and_not_clamped_by_default():
    x = small(5, 8, 3)
    assert abs(mmd(x, x.detach().clone()).item()) < 1e-12
    y = (x.detach() + 1e-6).requires_grad_()
    value = mmd(x, y)
    assert 0 < value.item() < 1e-4
    (g,) = torch.autograd.grad(value, x)
    assert g.abs().max() > 0  # the original's clamp at 1e-4 would give exactly zero here


def test_mmd_clamp_option_reproduces_the_original_floor():
    x = small(5, 8, 3)
    y = (x.detach() + 1e-6).requires_grad_()
    value = mmd(x, y, clamp=1e-4)
    assert value.item() == pytest.approx(1e-4)
    (g,) = torch.autograd.grad(value, x)
    assert g.abs().max() == 0


def test_mmd_guards_its_memory_with_a_message_that_says_how_to_fix_it():
    x, y = torch.randn(8, 3), torch.randn(8, 3)
    with pytest.raises(DmhpcError, match="scope='local'") as err:
        mmd(x, y, max_samples=15)
    assert "16 rows" in str(err.value)
    mmd(x, y, max_samples=16)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: mmd(torch.randn(4, 3), torch.randn(4, 2)), "same d"),
        (lambda: mmd(torch.randn(4, 3), torch.randn(4, 3), sigmas="mean"), "median"),
        (lambda: mmd(torch.randn(4, 3), torch.randn(4, 3), sigmas=[1.0, -1.0]), r"numbers from 1e-30 to 1e\+30"),
        (lambda: mmd(torch.randn(4, 3), torch.randn(4, 3), sigmas=[1.0, 1e50]), r"numbers from 1e-30 to 1e\+30"),
        (lambda: mmd(torch.randn(1, 3), torch.randn(4, 3), unbiased=True), "at least 2"),
        (lambda: mmd(torch.randn(4, 3), torch.randn(4, 3), scope="world"), "scope"),
        (lambda: coral(torch.randn(1, 3), torch.randn(4, 3)), "at least 2"),
        (lambda: entropy(torch.randn(4)), "logits"),
        (lambda: dann_loss(torch.randn(4, 2), torch.randn(4)), r"\(N,\)"),
        (lambda: FisherLoss(2, 3, form="tr", intra_weight=1.0, inter_weight=0.0), "inter_weight"),
        (lambda: FisherLoss(2, 3, form="ratio", intra_weight=1.0, inter_weight=1.0), "form"),
        (lambda: FisherLoss(2, 3, normalize="max", intra_weight=1.0, inter_weight=1.0), "normalize"),
        (lambda: FisherLoss(2, 3, intra_weight=1.0, inter_weight=1.0)(torch.randn(4, 5), torch.zeros(4, dtype=torch.long)), "feats"),
        (lambda: grl_coefficient(1, 10, GRLConfig(schedule="linear")), "schedule"),
        # Each domain's side checked, not only the source's (surviving mutants of a review).
        (lambda: coral(torch.randn(4, 3), torch.randn(1, 3), scope="local"), "2 source and 2 target rows.*got 4 and 1"),
        (lambda: dann_loss(torch.randn(4), torch.randn(4, 2)), "target domain logits"),
        (lambda: FisherLoss(2, 3, intra_weight=1.0, inter_weight=1.0)(torch.randn(4, 3), torch.tensor([0])),
         r"labels \(N,\); got \(4, 3\) and \(1,\)"),
        (lambda: FisherLoss(2, 3, intra_weight=1.0, inter_weight=1.0)(torch.randn(4, 3), torch.zeros(4, 1).long()),
         r"labels \(N,\); got \(4, 3\) and \(4, 1\)"),
        (lambda: entropy(torch.zeros(0, 2)), "the batch is empty"),
        (lambda: FisherLoss(2, 3, intra_weight=1.0, inter_weight=1.0, normalize="mean", scope="local")(
            torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), "fisher: .* the batch is empty"),  # was NaN
        (lambda: grl_coefficient(0, 0, GRLConfig()), "total_steps > 0"),
    ],
)
def test_bad_input_raises_a_clear_error(call, match):
    with pytest.raises(DmhpcError, match=match):
        call()


# ---------------------------------------------------------------- CORAL, entropy, DANN


def test_coral_matches_reference(realistic):
    xs, xt = realistic
    expected = ref_coral(xs, xt)
    assert rel(coral(torch.from_numpy(xs), torch.from_numpy(xt)).item(), expected) < 1e-6
    assert rel(coral(torch.from_numpy(xs).float(), torch.from_numpy(xt).float()).item(), expected) < 1e-3


def test_coral_gradcheck():
    xs, xt = small(6, 6, 3, scale=3.0), small(7, 5, 3)
    assert rel(coral(xs, xt).item(), ref_coral(xs.detach().numpy(), xt.detach().numpy())) < 1e-12
    assert torch.autograd.gradcheck(coral, (xs, xt))


def test_coral_of_a_global_batch_without_two_rows_is_not_finite():
    """The covariance of 0 rows (a domain no rank holds) was 0 / -1: a finite 0, where fewer than 2
    rows are promised a non-finite loss, which the trainer's finite-loss check catches."""
    from dmhpc.losses.coral import _covariance

    for rows in (0, 1):
        assert torch.isnan(_covariance(torch.ones(rows, 3, dtype=torch.float64), False)).all(), rows
    assert torch.isfinite(_covariance(torch.randn(2, 3, dtype=torch.float64), False)).all()
    # Under the local scope 2 rows a domain are the least it takes, and taken; 1 is refused.
    assert torch.isfinite(coral(torch.randn(2, 3), torch.randn(2, 3), scope="local"))
    with pytest.raises(DmhpcError, match="at least 2 source and 2 target rows"):
        coral(torch.randn(1, 3), torch.randn(2, 3), scope="local")


def test_entropy_matches_reference_and_gradcheck():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((256, 2)) * 5 + 100  # large logits: no overflow, no masking
    expected = ref_entropy(logits)
    assert rel(entropy(torch.from_numpy(logits)).item(), expected) < 1e-10
    assert rel(entropy(torch.from_numpy(logits).float()).item(), expected) < 1e-3
    assert torch.autograd.gradcheck(entropy, (small(8, 6, 3),))


def test_entropy_of_certain_predictions_is_zero_with_finite_gradient():
    logits = torch.tensor([[200.0, -200.0], [-300.0, 300.0]], requires_grad=True)
    value = entropy(logits)
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(logits.grad).all()
    # A logit of -inf (an overflow upstream): probability 0 there, which adds nothing; it gave NaN.
    logits = torch.tensor([[0.0, -math.inf], [1.0, 2.0]], requires_grad=True)
    value = entropy(logits)
    value.backward()
    p = torch.softmax(torch.tensor([1.0, 2.0], dtype=torch.float64), 0)
    assert abs(value.item() - float(-(p * p.log()).sum()) / 2) < 1e-6 and torch.isfinite(logits.grad).all()
    assert entropy(torch.tensor([[math.inf, 0.0]])).item() == 0.0  # certain: +inf gave inf - inf = NaN
    # Both logits at the limits (finite, or infinite): the other class's log-probability is -inf
    # (-6e38 overflows), and 0 * -inf = NaN without the floor on it.
    assert entropy(torch.tensor([[3e38, -3e38], [math.inf, -math.inf]])).item() == 0.0
    assert math.isnan(entropy(torch.tensor([[math.nan, 0.0]])).item())  # a NaN stays one, for the finite-loss check


def test_dann_loss_matches_reference_and_gradcheck():
    rng = np.random.default_rng(1)
    zs, zt = rng.standard_normal(128) * 30, rng.standard_normal(100) * 30 - 5  # saturating logits
    expected = ref_dann(zs, zt)
    assert rel(dann_loss(torch.from_numpy(zs), torch.from_numpy(zt)).item(), expected) < 1e-10
    got32 = dann_loss(torch.from_numpy(zs).float()[:, None], torch.from_numpy(zt).float()).item()
    assert rel(got32, expected) < 1e-3
    zs_small, zt_small = small(9, 5, 1), small(10, 3, 1)
    assert torch.autograd.gradcheck(dann_loss, (zs_small, zt_small))


# ---------------------------------------------------------------- Fisher


@pytest.mark.parametrize("form", ["tr", "td"])
@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_fisher_matches_reference(realistic, form, normalize):
    xs, _ = realistic
    labels = np.random.default_rng(2).integers(0, 2, len(xs))
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-3)):
        loss_fn = FisherLoss(2, xs.shape[1], form=form, intra_weight=0.01, inter_weight=1.0, normalize=normalize).to(dtype)
        expected = ref_fisher(xs, labels, loss_fn.centres.detach().double().numpy(), form, 0.01, 1.0, normalize)
        got = loss_fn(torch.from_numpy(xs).to(dtype), torch.from_numpy(labels))
        for g, e in zip(got, expected):
            assert rel(g.item(), e) < tol


@pytest.mark.parametrize("form", ["tr", "td"])
@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_fisher_gradcheck_features_and_centres(form, normalize):
    loss_fn = FisherLoss(3, 4, form=form, intra_weight=0.5, inter_weight=2.0, normalize=normalize).double()
    labels = torch.tensor([0, 2, 1, 2, 2, 0])
    centres = loss_fn.centres.detach().clone().requires_grad_()

    def loss(x, c):
        return torch.func.functional_call(loss_fn, {"centres": c}, (x, labels))[0]

    assert torch.autograd.gradcheck(loss, (small(11, 6, 4), centres))


def test_fisher_centres_come_from_their_own_seeded_generator():
    state = torch.get_rng_state()
    a, b, c = (FisherLoss(2, 16, intra_weight=1.0, inter_weight=1.0, seed=s) for s in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG (and so the data split) is untouched
    assert torch.equal(a.centres, b.centres) and not torch.equal(a.centres, c.centres)


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([0.0, 1.0, 1.0]), "fisher labels: dtype torch.float32; expected integer class numbers"),
    (torch.tensor([1, 0, 1], dtype=torch.uint8), "fisher labels: dtype torch.uint8"),
    (torch.tensor([0, 2, 1]), "fisher labels: a label outside 0 ... 1"),
    (torch.tensor([0, -1, 1], dtype=torch.int32), "fisher labels: a label outside 0 ... 1"),
])
def test_fisher_refuses_labels_that_are_not_class_numbers_in_one_line(labels, message):
    """Float labels gave an IndexError traceback; out-of-range ones another (or a wrong row)."""
    loss = FisherLoss(2, 4, intra_weight=1.0, inter_weight=1.0)
    with pytest.raises(DmhpcError, match=f"^{message}"):
        loss(torch.randn(3, 4), labels)
    loss(torch.randn(3, 4), torch.tensor([0, 1, 1], dtype=torch.int32))  # int32 is taken


# ---------------------------------------------------------------- gradient reversal


def test_grl_schedule_values_are_a_function_of_the_step():
    assert grl_coefficient(0, 1000, GRLConfig()) == 0.0
    assert grl_coefficient(1000, 1000, GRLConfig()) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert 0.9999 < grl_coefficient(1000, 1000, GRLConfig()) < 1.0
    assert grl_coefficient(500, 1000, GRLConfig()) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert grl_coefficient(500, 1000, GRLConfig(high=0.1)) == pytest.approx(0.1 * (2 / (1 + math.exp(-5)) - 1))
    assert grl_coefficient(250, 1000, GRLConfig(alpha=4.0)) == pytest.approx(2 / (1 + math.exp(-1)) - 1)
    assert grl_coefficient(7, 1000, GRLConfig()) == grl_coefficient(7, 1000, GRLConfig())  # no hidden counter
    values = [grl_coefficient(s, 100, GRLConfig()) for s in range(101)]
    assert values == sorted(values)
    assert grl_coefficient(5, 100, GRLConfig(schedule="constant")) == 1.0
    assert grl_coefficient(5, 100, GRLConfig(schedule="constant", high=0.3)) == 0.3


def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward():
    x = small(12, 4, 3)
    upstream = torch.randn(4, 3, dtype=torch.float64)
    y = GradientReversal()(x, 0.7)
    assert torch.equal(y, x)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, -0.7 * upstream, rtol=0, atol=0)


# ---------------------------------------------------------------- precision and scope


def test_losses_compute_in_float32_under_bf16_autocast_and_restore_matmul_precision():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    xs, xt = torch.randn(12, 16), torch.randn(10, 16) + 0.5
    labels = torch.randint(0, 2, (12,))
    fisher = FisherLoss(2, 8, intra_weight=1.0, inter_weight=1.0)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fs, ft = layer(xs), layer(xt)
            assert fs.dtype == torch.bfloat16
            values = {
                "mmd": mmd(fs, ft),
                "mmd_median": mmd(fs, ft, sigmas="median", unbiased=True),
                "coral": coral(fs, ft),
                "entropy": entropy(fs),
                "dann": dann_loss(fs[:, 0], ft[:, 0]),
                "fisher": fisher(fs, labels)[0],
            }
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    fs32, ft32 = fs.float(), ft.float()  # the same bf16 values, upcast: the results must agree exactly
    expected = {
        "mmd": mmd(fs32, ft32),
        "mmd_median": mmd(fs32, ft32, sigmas="median", unbiased=True),
        "coral": coral(fs32, ft32),
        "entropy": entropy(fs32),
        "dann": dann_loss(fs32[:, 0], ft32[:, 0]),
        "fisher": fisher(fs32, labels)[0],
    }
    for name, value in values.items():
        assert value.dtype == torch.float32, name
        assert value.item() == pytest.approx(expected[name].item(), rel=1e-6), name
    sum(values.values()).backward()
    assert torch.isfinite(layer.weight.grad).all()


def test_global_scope_without_a_process_group_is_the_local_batch():
    xs, xt = small(13, 6, 3), small(14, 5, 3)
    assert mmd(xs, xt, scope="global").item() == mmd(xs, xt, scope="local").item()
    assert coral(xs, xt, scope="global").item() == coral(xs, xt, scope="local").item()
    assert entropy(xs, scope="global").item() == entropy(xs, scope="local").item()


@pytest.mark.gpu
def test_cuda_losses_stay_accurate_with_tf32_matmuls_enabled(realistic):
    xs, xt = realistic
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32, as many trainers set it for speed
    try:
        fs, ft = (torch.from_numpy(a).float().cuda() for a in realistic)
        got_mmd = mmd(fs, ft).item()
        got_coral = coral(fs, ft).item()
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert rel(got_mmd, ref_mmd(xs, xt, DEEPMERGE_SIGMAS, False)) < 1e-3
    assert rel(got_coral, ref_coral(xs, xt)) < 1e-3


def test_mmd_constants_made_under_inference_mode_serve_training_later():
    """The kernel coefficients are made once per device: first asked for under inference_mode
    (an evaluation), they must still be saved for a backward afterwards."""
    x, y = torch.randn(16, 4), torch.randn(16, 4) + 1
    with torch.inference_mode():
        mmd(x, y, sigmas=(0.5, 2.0, 7.0))
    x.requires_grad_(True)
    mmd(x, y, sigmas=(0.5, 2.0, 7.0)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


PRECISION_PROBE = """
import sys, torch
from dmhpc.losses import mmd, coral
api, device = sys.argv[1], sys.argv[2]
n, d = (32, 8) if device == "cpu" else (256, 512)  # on a GPU, large enough for TF32 to show (~1e-3)
x = torch.randn(n, d, generator=torch.Generator().manual_seed(0)).to(device)
y = (torch.randn(n, d, generator=torch.Generator().manual_seed(1)) + 1).to(device)
reference = mmd(x, y).item(), coral(x, y).item()
if api == "legacy":
    torch.set_float32_matmul_precision("high")
elif api == "new":
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
else:  # both, one after the other: restoring through the legacy API gave CUDA matmuls TF32 back
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.fp32_precision = "ieee"
state = lambda: (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
before = state()
from torch.utils._python_dispatch import TorchDispatchMode
class Matmuls(TorchDispatchMode):  # the settings each matmul of the losses ran under
    seen = []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm")):
            self.seen.append(state())
        return func(*args, **(kwargs or {}))
with Matmuls():
    values = mmd(x, y).item(), coral(x, y).item()
# On a CPU without bf16 matmuls the values alone cannot tell that the setting was left as asked.
assert Matmuls.seen and set(Matmuls.seen) == {("ieee", "ieee")}, Matmuls.seen
assert state() == before, (state(), before)  # every backend's setting, as the caller left it
# IEEE float32 inside the losses, whatever was asked outside: the same values on the CPU, within
# float32 rounding on a GPU (whose reductions may differ run to run); TF32 would be off by ~1e-3
tolerance = 0 if device == "cpu" else 1e-6
assert all(abs(v - r) <= tolerance * abs(r) for v, r in zip(values, reference)), (values, reference)
if api == "legacy":
    assert torch.get_float32_matmul_precision() == "high"  # the caller's setting, restored
elif api == "new":
    assert torch.backends.cuda.matmul.fp32_precision == "tf32" and torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    try:
        torch.get_float32_matmul_precision()
    except RuntimeError:
        pass  # still the new API alone: the losses did not mix the two in
    else:
        raise AssertionError("the legacy setting was written")
print("ok")
"""


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("api", ["legacy", "new", "both"])
def test_losses_compute_in_ieee_float32_under_either_tf32_api(api, device):
    """Setting TF32 the current way (fp32_precision) used to make every loss raise 'mix of the
    legacy and new APIs'. A fresh process each: the setting is global. On a GPU, where TF32 is
    real, the values must also stay those of IEEE float32."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", PRECISION_PROBE, api, device], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# ---------------------------------------------------------------- the trainer refuses them at start


@pytest.mark.parametrize("overrides, message", [
    (["loss.transfer=coral", "train.batch_size=1"],
     "loss.transfer: coral needs at least 2 source and 2 target rows per batch; 1 rank x train.batch_size 1 gives 1"),
    (["loss.transfer=mmd", "loss.mmd.unbiased=true", "train.batch_size=1"],
     "loss.transfer: unbiased mmd needs at least 2 source and 2 target rows per batch"),
    (["loss.transfer=mmd", "loss.mmd.max_samples=7"],
     "loss.mmd.max_samples: 1 rank x train.batch_size 4 gives 8 rows (source + target) to the MMD, more than 7"),
])
def test_a_batch_the_transfer_loss_cannot_take_is_refused_before_anything_is_written(
        make_domains, tmp_path, capsys, overrides, message):
    """The losses refused these only at the first step, after the run directory was written."""
    from dmhpc.cli import main
    from tests.conftest import TINY, tiny_overrides

    data, run = make_domains(64), tmp_path / "run"
    argv = [f"{k}={v}" for k, v in tiny_overrides(data, **{"run.dir": str(run)}).items()]
    assert main(["train", "--config", str(TINY), *argv, *overrides]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not run.exists()


def test_the_mmd_sample_cap_counts_every_ranks_rows_under_the_global_scope():
    from dmhpc.config import load_config
    from dmhpc.batch_rows import check_batch_rows
    from tests.conftest import TINY

    cfg = load_config(TINY, ["loss.transfer=mmd", "train.batch_size=64", "loss.mmd.max_samples=1024"])
    check_batch_rows(cfg, world_size=8)  # 8 x (64 + 64) = 1024 rows: at the cap
    with pytest.raises(DmhpcError, match=r"^loss.mmd.max_samples: 16 ranks x train.batch_size 64 gives 2048 rows"):
        check_batch_rows(cfg, world_size=16)
    local = load_config(TINY, ["loss.transfer=mmd", "train.batch_size=64", "loss.mmd.max_samples=1024",
                               "loss.scope=local"])
    check_batch_rows(local, world_size=16)  # each rank's MMD holds its own 128 rows
    check_batch_rows(load_config(TINY, ["loss.transfer=coral", "train.batch_size=1"]), world_size=2)


def test_the_objective_gives_the_mmd_its_configured_sample_cap():
    from dmhpc.config import load_config
    from dmhpc.train.objective import DomainAdaptation
    from tests.conftest import TINY

    cfg = load_config(TINY, ["loss.transfer=mmd", "loss.mmd.max_samples=7"])
    model = DomainAdaptation(cfg, seed=0, in_channels=3)
    x = torch.randn(4, 3, 75, 75)
    with pytest.raises(DmhpcError, match="has 8 rows .* max_samples is 7"):
        model(x, torch.arange(4) % 2, x, 0.0)


def test_fishers_centre_gradient_is_the_same_at_every_backward_on_several_threads():
    """centres[labels]'s backward added the rows into the centres' gradient with atomic adds: on a
    CPU's threads (as on a GPU) each step summed in another order, and two identical training runs
    parted in the 7th digit of their first epoch's loss."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        fisher = FisherLoss(2, 2592, intra_weight=1.0, inter_weight=0.1, form="td", scope="local")
        feats = torch.randn(512, 2592, generator=torch.Generator().manual_seed(1), requires_grad=True)
        labels = torch.arange(512) % 2
        grads = set()
        for _ in range(8):
            fisher.zero_grad()
            fisher(feats, labels)[0].backward()
            grads.add(fisher.centres.grad.numpy().tobytes())
    finally:
        torch.set_num_threads(threads)
    assert len(grads) == 1
    # The product's forward is the indexing's, bit for bit.
    with torch.no_grad():
        diff = feats - fisher.centres[labels]
        assert torch.equal(fisher(feats, labels)[1], diff.square().sum())


@pytest.mark.parametrize("twins", [2, 128])
def test_mmd_of_near_twin_rows_keeps_its_float32_accuracy(realistic, twins):
    """Rows at squared distance ~2e-4 of each other (what adaptation makes of a galaxy's pristine and
    noisy images) among rows of centred norms ~1e3: float32 Gram matrices lost the distances the
    tiny-sigma kernels see, and the backward's two sums cancelled. Two twins left the gradient 27 %
    off; every row a twin left the value 32 % low and the gradient 94 % off."""
    xs, xt = realistic
    xt = xt.copy()
    xt[:twins] = xs[:twins] + (1e-4 if twins == 128 else 3e-4) * np.random.default_rng(5).standard_normal(
        (twins, xs.shape[1]))
    rows = [torch.from_numpy(a).float() for a in (xs, xt)]  # float64 of the same float32 inputs: the reference
    want64 = [r.double().requires_grad_() for r in rows]
    got32 = [r.clone().requires_grad_() for r in rows]
    v64, v32 = mmd(*want64), mmd(*got32)
    g64, g32 = (torch.cat(torch.autograd.grad(v, rows_)).double() for v, rows_ in ((v64, want64), (v32, got32)))
    assert rel(v32.item(), v64.item()) < 1e-3
    assert ((g32 - g64).norm() / g64.norm()).item() < 1e-3


def test_mmd_of_features_far_from_the_origin_keeps_its_float32_accuracy(realistic):
    """Features sharing a large offset: the Gram matrix of uncentred float32 rows lost the distances
    (11% off at an offset of 3000); centred first, float32 stays with float64."""
    xs, xt = (torch.from_numpy(a[:64, :64] + 3000.0) for a in realistic)
    want = mmd(xs, xt).item()
    assert rel(mmd(xs.float(), xt.float()).item(), want) < 1e-4


def test_median_bandwidths_of_a_collapsed_batch_give_zero_not_nan():
    """Every feature equal (all-zero ReLU outputs early in training): a median distance of 0 made
    every bandwidth 0 and the loss NaN, and the run stopped as diverged."""
    xs = torch.zeros(4, 3, requires_grad=True)
    value = mmd(xs, torch.zeros(4, 3), sigmas="median")
    (g,) = torch.autograd.grad(value, xs)
    assert value.item() == 0 and torch.isfinite(g).all()


def test_a_clamp_of_zero_keeps_the_unbiased_mmd_non_negative():
    """loss.mmd.clamp 0 (the config allows it: a non-negative unbiased MMD) was read as no clamp."""
    g = torch.Generator().manual_seed(1)
    xs, xt = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    assert mmd(xs, xt, unbiased=True).item() < 0
    assert mmd(xs, xt, unbiased=True, clamp=0.0).item() == 0


@pytest.mark.parametrize("unbiased", [False, True])
def test_mmd_median_bandwidth_of_an_even_number_of_pairs_is_the_lower_median(unbiased):
    """8 rows, 28 pairs: an interpolated median (torch.quantile, which also fails above 2^24 pairs)
    agreed with the lower one on the odd counts of the other test."""
    xs, xt = small(3, 4, 4), small(4, 4, 4)
    sigmas = ref_median_sigmas(xs.detach().numpy(), xt.detach().numpy())
    assert rel(mmd(xs, xt, sigmas="median", unbiased=unbiased).item(),
               mmd(xs, xt, sigmas=sigmas, unbiased=unbiased).item()) < 1e-12


def test_fisher_td_without_the_inter_class_term_is_the_intra_class_term():
    """Only the trace-ratio form needs an inter-class weight (it divides by it): td with
    inter_weight 0 is a valid config, the intra-class spread alone."""
    fisher = FisherLoss(2, 3, form="td", intra_weight=1.0, inter_weight=0.0)
    total, intra, _ = fisher(torch.randn(6, 3), torch.arange(6) % 2)
    assert torch.equal(total, intra)


def test_the_mmd_memory_figure_grows_with_the_square_of_the_rows():
    """The figure the refusal and preflight state: 2.5 rows^2 float32 elements (bench/mmd.py)."""
    from dmhpc.batch_rows import mmd_memory_gib as memory_gib

    assert memory_gib(16384) == pytest.approx(2.5) and memory_gib(32768) == pytest.approx(10.0)


def test_the_median_bandwidth_of_mostly_identical_rows_keeps_a_gradient():
    """With half the pairs or more at distance 0 (collapsed features: rows of dead ReLUs), the median
    was 0, every kernel an equality test, and the loss positive with a gradient of exactly 0."""
    xs = torch.zeros(8, 4, dtype=torch.float64)
    xt = torch.zeros(8, 4, dtype=torch.float64)
    xs[6:] += 2.0
    xt[6:] -= 2.0
    xs.requires_grad_(True)
    value = mmd(xs, xt, sigmas="median", scope="local")
    (grad,) = torch.autograd.grad(value, xs)
    assert value.item() > 0 and grad.norm().item() > 1e-3


def test_the_unbiased_value_of_a_large_batch_is_summed_to_its_float64_value():
    """Summed in float32, the unbiased MMD of 2 x 2048 rows (~5e-5, a difference of sums near 1)
    was 1-3% off its float64 value; the gradient was always right."""
    rng = np.random.default_rng(3)
    xs, xt = rng.normal(size=(2048, 64)), rng.normal(size=(2048, 64)) + 0.01
    v32 = mmd(torch.tensor(xs, dtype=torch.float32), torch.tensor(xt, dtype=torch.float32), sigmas="median",
              unbiased=True, scope="local")
    v64 = mmd(torch.tensor(xs), torch.tensor(xt), sigmas="median", unbiased=True, scope="local")
    assert v32.dtype == torch.float32 and abs(v32.item() - v64.item()) < 1e-3 * abs(v64.item())


def test_coral_of_large_features_is_finite_where_its_scaled_value_is():
    """The covariance difference was squared before its 1/(4 d^2): features of 1e10 overflowed
    float32 in the square (inf, and NaN from 1e19), where the loss itself was finite (here ~1e37)."""
    rng = np.random.default_rng(0)
    a = torch.tensor(rng.normal(size=(8, 16)) * 3e9, dtype=torch.float32, requires_grad=True)
    b = torch.tensor(rng.normal(size=(8, 16)) * 3e9, dtype=torch.float32)
    value = coral(a, b, scope="local")
    value.backward()
    reference = coral(a.detach().double(), b.double(), scope="local")
    assert torch.isfinite(value) and torch.isfinite(a.grad).all()
    assert abs(value.item() - reference.item()) < 1e-5 * reference.item()
