"""Differentiable collectives that make the losses exact under DistributedDataParallel.

The contract (derived in docs/losses.md): with scope="global" every rank computes the *same*
value L of the loss on the global batch. A rank's features x_r reach L through these collectives,
and DDP then *averages* parameter gradients over the W ranks. For the averaged gradient to equal
the single-process gradient  sum_r J_r^T dL/dx_r,  each rank's backward must hand its own
features W * dL/dx_r. Since every rank holds the same dL/d(gathered), summing the incoming
gradient over ranks (an all-reduce) and keeping one's own rows gives exactly that. Returning only
one's own slice (a common snippet) silently divides the loss weight by W.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from dmhpc.errors import DmhpcError

SCOPES = ("global", "local")

# Row counts of every rank, by this rank's counts, while the caller promises they do not change
# (`stable_rows`): exchanging them takes a host synchronisation, once instead of every step.
_stable: dict | None = None


@contextlib.contextmanager
def stable_rows():
    """Within this block each rank passes the same row counts to every gather as it did to the first
    (the trainer's fixed per-rank batches), so the counts are exchanged on the first call only and
    no later call waits for the device. A rank whose counts changed inside the block would wait for
    an exchange the others skip: only promise what holds."""
    global _stable
    previous, _stable = _stable, {}
    try:
        yield
    finally:
        _stable = previous


def is_global(scope: str) -> bool:
    """True when `scope` asks for the global batch and there is more than one rank to gather from.

    scope="global" is the default of every loss; without an initialised process group (or with
    one rank) the global batch is the local batch, so nothing is communicated.
    """
    if scope not in SCOPES:
        raise DmhpcError(f"scope: {scope!r} is not one of {', '.join(SCOPES)}")
    return scope == "global" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGatherRows(torch.autograd.Function):
    """Gather row blocks of several tensors (same dtype and trailing shape) from all ranks."""

    @staticmethod
    def forward(ctx, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        world, rank = dist.get_world_size(), dist.get_rank()
        lead = tensors[0]
        local = tuple(t.shape[0] for t in tensors)
        rows = _stable.get(local) if _stable is not None else None
        if rows is None:
            counts = torch.tensor(local, dtype=torch.int64, device=lead.device)
            all_counts = [torch.empty_like(counts) for _ in range(world)]
            dist.all_gather(all_counts, counts)
            # rows[r][k]: rows of tensor k on rank r; a host sync, needed to size the buffers.
            rows = [c.tolist() for c in all_counts]
            if _stable is not None:
                _stable[local] = rows
        packed = torch.cat([t.contiguous() for t in tensors])
        longest = max(sum(r) for r in rows)
        padded = packed.new_zeros((longest, *lead.shape[1:]))
        padded[: packed.shape[0]] = packed
        pieces = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(pieces, padded)
        outputs = []
        for k in range(len(tensors)):
            blocks = []
            for r in range(world):
                start = sum(rows[r][:k])
                blocks.append(pieces[r][start : start + rows[r][k]])
            outputs.append(torch.cat(blocks))
        ctx.rows, ctx.rank = rows, rank
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows, rank = ctx.rows, ctx.rank
        total = torch.cat([g.contiguous() for g in grads])
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        out = []
        offset = 0
        for k, g in enumerate(grads):
            mine = offset + sum(r[k] for r in rows[:rank])
            out.append(total[mine : mine + rows[rank][k]])
            offset += g.shape[0]
        return tuple(out)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        g = grad.clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g


def all_gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concatenate, in rank order, each tensor's rows from every rank; differentiable.

    Ranks may hold different numbers of rows. All tensors must share dtype, device and trailing
    shape (they travel in one message). Backward sums the gradient over ranks and returns each
    rank its own rows, so after DDP's averaging the gradient equals the single-process one.
    Every rank must call it, and every rank must run the backward through it.
    """
    return _AllGatherRows.apply(*tensors)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over ranks; differentiable (backward is again a sum over ranks, see module doc)."""
    return _AllReduceSum.apply(x)


def per_sample_mean(total: torch.Tensor, count: int, scope: str) -> torch.Tensor:
    """`total / count` for a sum `total` of `count` per-sample terms; over all ranks if global.

    The sum and the count travel in one all-reduce, whose backward sums the gradient over ranks;
    DDP's averaging then gives the exact global-mean gradient, even with unequal per-rank batches.
    A rank may hold no sample; a global batch of none gives NaN (0/0, counted on the device: no
    host wait in the step), where one process raises. The trainer never makes one.
    """
    if not is_global(scope):
        if count == 0:
            raise DmhpcError("a per-sample mean needs at least one sample; the batch is empty")
        return total / count
    stats = all_reduce_sum(torch.stack([total, total.new_full((), float(count))]))  # no copy from the host
    return stats[0] / stats[1]
