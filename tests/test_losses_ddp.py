"""scope="global" losses under real DDP (gloo, 4, 3 and 2 CPU ranks) equal one process on the whole
batch.

One spawn of 4 processes runs every case at world size 4 (one rank with no rows), then 3, then 2
(unequal per-rank batches, which the global scope handles exactly), re-forming the process group
each time: one interpreter start-up for every size. Each rank writes its errors against a
single-process full-batch reference (computed in the same rank process, float64) to a file; the
tests read them.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dmhpc.losses import FisherLoss, coral, dann_loss, entropy, mmd
from dmhpc.models import DomainDiscriminator

N_SOURCE, N_TARGET, IN_DIM, FEAT_DIM, CLASSES = 8, 7, 5, 6, 3
# rows of the source and of the target batch held by each rank; at 4 ranks one holds none (CORAL
# refused it on that rank alone, before its collectives, and the others waited in them forever)
SHARDS = {4: ([3, 0, 3, 2], [2, 0, 3, 2]), 3: ([3, 3, 2], [2, 3, 2]), 2: ([4, 4], [4, 3])}
GRL_COEFF = 0.7
FISHER_FORMS = [(form, normalize) for form in ("tr", "td") for normalize in ("sum", "mean")]


def _fisher(form: str, normalize: str):
    def case(fs, ft, ys, disc, fishers, scope):
        loss, intra, inter = fishers[form, normalize](fs, ys)
        return loss, {"intra": intra, "inter": inter}

    return case


def _dann(fs, ft, ys, disc, fishers, scope):
    logits = disc(torch.cat([fs, ft]), GRL_COEFF)
    return dann_loss(logits[: len(fs)], logits[len(fs) :], scope=scope), {}


def _combined(fs, ft, ys, disc, fishers, scope):
    logits = disc(torch.cat([fs, ft]), GRL_COEFF)
    total = (
        mmd(fs, ft, scope=scope)
        + 0.5 * coral(fs, ft, scope=scope)
        + 0.1 * entropy(torch.cat([fs, ft]), scope=scope)
        + dann_loss(logits[: len(fs)], logits[len(fs) :], scope=scope)
        + 0.01 * fishers["tr", "sum"](fs, ys)[0]
    )
    return total, {}


# name -> loss(source features, target features, source labels, discriminator, fisher losses, scope)
#         -> (loss, {name: other value to compare})
CASES = {
    "mmd_biased_fixed": lambda fs, ft, ys, d, f, scope: (mmd(fs, ft, scope=scope), {}),
    "mmd_unbiased_fixed": lambda fs, ft, ys, d, f, scope: (mmd(fs, ft, unbiased=True, scope=scope), {}),
    "mmd_biased_median": lambda fs, ft, ys, d, f, scope: (mmd(fs, ft, sigmas="median", scope=scope), {}),
    "mmd_unbiased_median": lambda fs, ft, ys, d, f, scope: (mmd(fs, ft, sigmas="median", unbiased=True, scope=scope), {}),
    "coral": lambda fs, ft, ys, d, f, scope: (coral(fs, ft, scope=scope), {}),
    "entropy": lambda fs, ft, ys, d, f, scope: (entropy(torch.cat([fs, ft]), scope=scope), {}),
    "dann": _dann,
    **{f"fisher_{form}_{normalize}": _fisher(form, normalize) for form, normalize in FISHER_FORMS},
    "combined": _combined,
}


def _modules(scope: str):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(IN_DIM, 8), nn.Tanh(), nn.Linear(8, FEAT_DIM)).double()
    disc = DomainDiscriminator(FEAT_DIM, hidden=16, dropout=0.0).double()
    fishers = {
        (form, normalize): FisherLoss(
            CLASSES, FEAT_DIM, form=form, normalize=normalize, intra_weight=0.3, inter_weight=2.0, scope=scope, seed=1
        ).double()
        for form, normalize in FISHER_FORMS
    }
    return net, disc, fishers


def _take_grads(net: nn.Module, disc: nn.Module, fishers: dict) -> dict[str, torch.Tensor]:
    """Each module's gradient as one vector (modules without one left out); resets them to None."""
    modules = {"net": net, "discriminator": disc, **{f"fisher {k}": f for k, f in fishers.items()}}
    out = {}
    for key, module in modules.items():
        grads = [p.grad.flatten() for p in module.parameters() if p.grad is not None]
        if grads:
            out[key] = torch.cat(grads)
        module.zero_grad(set_to_none=True)
    return out


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    # Relative to the whole module's gradient: some entries are exactly zero in theory (the last
    # bias under the translation-invariant MMD), where an entry-wise relative error means nothing.
    return ((got - want).norm() / want.norm()).item()


def _check_world(rank: int, world: int) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(42)
    xs = torch.randn(N_SOURCE, IN_DIM, generator=g, dtype=torch.float64)
    xt = torch.randn(N_TARGET, IN_DIM, generator=g, dtype=torch.float64) + 0.5
    ys = torch.randint(0, CLASSES, (N_SOURCE,), generator=g)
    ns, nt = SHARDS[world]
    s0, t0 = sum(ns[:rank]), sum(nt[:rank])
    mine = torch.cat([xs[s0 : s0 + ns[rank]], xt[t0 : t0 + nt[rank]]])
    my_ys = ys[s0 : s0 + ns[rank]]

    # Reference: one process, the whole batch, no communication. Distributed: every module in
    # DDP, each rank its shard, global scope. No optimiser step, so the weights stay equal.
    net, disc, fishers = _modules(scope="local")
    dnet, ddisc, dfishers = _modules(scope="global")
    ddp_net, ddp_disc = DDP(dnet), DDP(ddisc)
    ddp_fishers = {k: DDP(f) for k, f in dfishers.items()}

    results = {}
    for name, case in CASES.items():
        f = net(torch.cat([xs, xt]))
        ref_loss, ref_extra = case(f[:N_SOURCE], f[N_SOURCE:], ys, disc, fishers, "local")
        ref_loss.backward()
        ref_grads = _take_grads(net, disc, fishers)

        f = ddp_net(mine)
        loss, extra = case(f[: ns[rank]], f[ns[rank] :], my_ys, ddp_disc, ddp_fishers, "global")
        loss.backward()
        grads = _take_grads(dnet, ddisc, dfishers)

        assert grads.keys() == ref_grads.keys(), (name, sorted(grads), sorted(ref_grads))
        errors = {"value": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())}
        errors.update({k: abs(v.item() - ref_extra[k].item()) / abs(ref_extra[k].item()) for k, v in extra.items()})
        errors.update({f"{k} gradient": _relative_error(grads[k], ref_grads[k]) for k in ref_grads})
        results[name] = errors

    # Control: the per-rank (local) MMD is a different estimator, so the comparisons can fail.
    f = net(torch.cat([xs, xt]))
    ref = mmd(f[:N_SOURCE], f[N_SOURCE:], scope="local")
    ref.backward()
    f = ddp_net(mine)
    if not ns[rank] or not nt[rank]:  # no local MMD of an empty batch; the backward DDP waits for all the same
        (f.sum() * 0).backward()
        results["control_local_mmd"] = None
        return results
    local = mmd(f[: ns[rank]], f[ns[rank] :], scope="local")
    local.backward()
    results["control_local_mmd"] = {
        "value": abs(local.item() - ref.item()) / ref.item(),
        "net gradient": _relative_error(_take_grads(dnet, ddisc, {})["net"], _take_grads(net, disc, {})["net"]),
    }
    return results


def _worker(rank: int, worlds: list[int], out_dir: str) -> None:
    """Run the checks at every world size in SHARDS (largest first), ranks beyond it leaving."""
    torch.set_num_threads(1)
    for world in worlds:
        if rank >= world:
            return
        dist.init_process_group(
            "gloo",
            # A file store per world: ports chosen up front could be taken meanwhile by the first
            # world's own connections.
            init_method=f"file://{out_dir}/store{world}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        try:
            torch.save(_check_world(rank, world), f"{out_dir}/world{world}_rank{rank}.pt")
        finally:
            dist.destroy_process_group()




@pytest.fixture(scope="module")
def ddp_errors(tmp_path_factory) -> dict[int, list[dict]]:
    """One spawn of max(SHARDS) gloo ranks; errors per world size, per rank, per case."""
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(list(SHARDS), str(out_dir)), nprocs=max(SHARDS), join=True, start_method="spawn")
    return {w: [torch.load(out_dir / f"world{w}_rank{r}.pt") for r in range(w)] for w in SHARDS}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", sorted(SHARDS))
@pytest.mark.parametrize("case", list(CASES))
def test_global_loss_and_ddp_gradients_equal_the_full_batch(ddp_errors, world, case):
    for rank, results in enumerate(ddp_errors[world]):
        errors = results[case]
        assert "value" in errors and any(k.endswith("gradient") for k in errors)
        bad = {k: v for k, v in errors.items() if not v < 1e-9}
        assert not bad, f"world {world}, rank {rank}, {case}: relative errors {bad}"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", sorted(SHARDS))
def test_local_scope_differs_so_the_comparison_can_fail(ddp_errors, world):
    for results in ddp_errors[world]:
        control = results["control_local_mmd"]
        if control is None:  # a rank without rows
            continue
        assert control["value"] > 1e-3 and control["net gradient"] > 1e-3, control
