"""The torch.distributed pieces of multi-process training (`SparseAutoencoder.data_parallel` and
`SparseAutoencoder.shard_features`).

Feature sharding splits the F features into contiguous shards, one per rank of a process group, as
tensor parallelism splits a linear layer's outputs: each rank holds W_enc[:, shard], b_enc[shard] and
W_dec[shard] and its death statistics. A TopK forward encodes each shard (its k largest codes contain
every code of the row's global top k that lies in the shard), gathers the [B, k] candidate values of
every shard, keeps the global top k among them, decodes its own kept codes and sums the partial
reconstructions over the ranks. The two autograd functions below are the collectives' gradients:
a reconstruction summed over the shards passes its gradient through unchanged (every rank computes
the same loss from the same sum), and an input every shard reads (x, b_dec) sums the shards'
gradients, so that every rank holds the full gradient of the replicated parameters.

Data parallel trains under torch's DistributedDataParallel, or (`averaging_gradients`, what
`fastsae.graphs.CapturedStep` uses: DDP's buckets and host-side bookkeeping cannot be captured in a
CUDA graph) with each parameter's gradient all-reduced as soon as the backward has accumulated it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor


def shard_ranges(n_features: int, world: int) -> list[tuple[int, int]]:
    """[start, stop) of each of `world` shards' features: contiguous, in rank order, sizes differing by
    at most one (the first n_features % world shards hold one more), as torch.tensor_split splits."""
    base, extra = divmod(n_features, world)
    starts = [rank * base + min(rank, extra) for rank in range(world + 1)]
    return list(zip(starts[:-1], starts[1:]))


def shard_bounds(n_features: int, group) -> tuple[int, int]:
    """[start, stop) of this rank's features (`shard_ranges`)."""
    return shard_ranges(n_features, dist.get_world_size(group))[dist.get_rank(group)]


class _SumOverShards(torch.autograd.Function):
    """Forward: the sum of `partial` over the group's ranks. Backward: the gradient unchanged (each rank
    computes the same loss from the same sum, so each holds the whole gradient already)."""

    @staticmethod
    def forward(ctx, partial: Tensor, group) -> Tensor:
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _SharedInput(torch.autograd.Function):
    """Forward: `t` unchanged. Backward: the sum of the gradient over the group's ranks (each shard
    contributes the part of the gradient that flows through its features)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_over_shards(partial: Tensor, group) -> Tensor:
    return _SumOverShards.apply(partial, group)


def shared_input(t: Tensor, group) -> Tensor:
    return _SharedInput.apply(t, group)


def merge_topk(vals: Tensor, idx: Tensor, start: int, k: int, group) -> tuple[Tensor, Tensor, Tensor]:
    """Each rank's [B, k] TopK candidates (post-ReLU values, shard-local features from `start`) ->
    (kept [B, k] bool: which of this rank's candidates are among the row's global k largest, and the
    global codes: values [B, k] and global features [B, k] int64, detached). Every rank gathers every
    shard's candidates, so all agree on the selection (torch.topk over the same values)."""
    world = dist.get_world_size(group)
    local = torch.cat([vals.detach().to(torch.float64), (idx.to(torch.int64) + start).to(torch.float64)], dim=1)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local.contiguous(), group=group)
    candidates = torch.stack(gathered, dim=1)  # [B, world, 2k]: values, then global features
    values = candidates[:, :, :k].reshape(vals.shape[0], world * k)
    features = candidates[:, :, k:].reshape(vals.shape[0], world * k)
    top = values.topk(k, dim=1)
    kept = _own_winners(top.indices, dist.get_rank(group), k)
    return kept, top.values.to(vals.dtype), features.gather(1, top.indices).to(torch.int64)


def kept_in_top(vals: Tensor, group) -> Tensor:
    """Which of this rank's candidate values [B, k] are among the row's k largest over every rank's:
    merge_topk's `kept` alone, from a gather of the values in their own dtype (the AuxK codes' merge,
    B x k_aux values per rank: a quarter of merge_topk's bytes in fp32, an eighth in bf16)."""
    world, k = dist.get_world_size(group), vals.shape[1]
    gathered = [torch.empty_like(vals) for _ in range(world)]
    dist.all_gather(gathered, vals.detach().contiguous(), group=group)
    top = torch.cat(gathered, dim=1).topk(k, dim=1)
    return _own_winners(top.indices, dist.get_rank(group), k)


def _own_winners(winners: Tensor, rank: int, k: int) -> Tensor:
    """[B, k] bool: which of rank `rank`'s k candidates are among `winners` [B, k], positions in the
    ranks' candidates laid side by side."""
    mine = (winners >= rank * k) & (winners < (rank + 1) * k)
    # Other shards' winners go to a spare column k, dropped after: no two writes reach a kept slot.
    slots = torch.where(mine, winners - rank * k, k)
    kept = torch.zeros(winners.shape[0], k + 1, dtype=torch.bool, device=winners.device)
    return kept.scatter_(1, slots, True)[:, :k]


def gather_rows(rows: Tensor, group, dim: int = 0) -> Tensor:
    """Every rank's `rows`, concatenated along `dim` in rank order (their sizes along `dim` may differ;
    the other dimensions must agree)."""
    rows = rows.movedim(dim, 0)
    world = dist.get_world_size(group)
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    longest = int(max(counts))
    padded = rows.new_zeros(longest, *rows.shape[1:])
    padded[: rows.shape[0]] = rows
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous(), group=group)
    return torch.cat([part[: int(n)] for part, n in zip(gathered, counts)]).movedim(0, dim)


@contextlib.contextmanager
def averaging_gradients(parameters: list[torch.nn.Parameter], group) -> Iterator[None]:
    """Around a backward: every one of `parameters` has its gradient summed over the group's ranks as
    soon as the backward has accumulated it (an asynchronous all-reduce from a post-accumulate-grad
    hook, so that it overlaps the rest of the backward: W_dec's with the encoder's backward), and on
    exit, once all are done, divided by the group's size: the replicas' mean gradient, as
    DistributedDataParallel leaves it. Every rank runs the same backward, so the hooks fire, and the
    collectives pair up, in the same order. The hooks reduce the accumulated gradient: start from none
    (zero_grad), not from a previous backward's."""
    works = []

    def all_reduce(parameter: torch.nn.Parameter) -> None:
        works.append(dist.all_reduce(parameter.grad, group=group, async_op=True))

    parameters = [parameter for parameter in parameters if parameter.requires_grad]
    hooks = [parameter.register_post_accumulate_grad_hook(all_reduce) for parameter in parameters]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
    world = dist.get_world_size(group)
    for work in works:
        work.wait()
    for parameter in parameters:
        if parameter.grad is not None:
            parameter.grad.div_(world)
