"""The global batch across data-parallel ranks: the reductions that span a batch, over every rank's samples.

CS2Fusion's training has terms that span the batch: the contrastive losses' B×B similarity matrices, the batch-scope
normalisation of the SSO features and of the compensation map, and the release's Frobenius-norm intensity terms. On
N ranks that each hold a part of the global batch of B samples (:func:`split_batch`: equal parts, or parts one
sample apart when N does not divide B), :class:`BatchSpan` computes them over all B: statistics are all-reduced, the
rows a similarity matrix is compared against are gathered, each with its gradient flowing back to the rank that made
it. One process (the default, :data:`LOCAL`) runs the plain tensor reductions, unchanged.

Losses computed under a span are each rank's **share** of the global value: the shares of all ranks sum to it.
A rank backpropagates ``world × share``: DDP's gradient averaging (÷ world) then gives the gradient of the global
loss (the collectives' backward sums what every rank's share asked of each input).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def split_batch(batch: int, world: int) -> tuple[int, ...]:
    """The samples of each of ``world`` ranks in a global batch of ``batch``: equal, or the first ranks one more."""
    return tuple(batch // world + (rank < batch % world) for rank in range(world))


@dataclasses.dataclass(frozen=True)
class BatchSpan:
    """Where the batch lives: ``sizes[r]`` samples on rank r of the torch.distributed ``group`` (None: the default
    group), in rank order; no sizes, or one rank: this process holds all of it."""

    sizes: tuple[int, ...] = ()
    group: Any = None

    @classmethod
    def of(cls, batch: int, group: Any = None) -> BatchSpan:
        """The span of a global batch of ``batch`` samples over an initialised process group."""
        import torch.distributed as dist

        return cls(split_batch(batch, dist.get_world_size(group)), group)

    @property
    def world(self) -> int:
        return max(len(self.sizes), 1)

    @property
    def local(self) -> bool:
        return self.world == 1

    @property
    def batch(self) -> int:
        """The global batch's sample count."""
        return sum(self.sizes)

    def _group(self) -> Any:
        import torch.distributed as dist

        return dist.group.WORLD if self.group is None else self.group

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``x`` over the ranks (differentiable)."""
        return x if self.local else _SumOverRanks.apply(x, self._group())

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's samples of ``x`` (this rank's ``sizes[rank]`` rows), concatenated in rank order
        (differentiable: each rank's part of the gradient goes back to it)."""
        return x if self.local else _GatherRows.apply(x, self._group(), self.sizes)

    def _each(self, value: torch.Tensor) -> torch.Tensor:
        """One scalar of every rank, (world,)."""
        return _GatherRows.apply(value[None], self._group(), (1,) * self.world)

    def amin(self, x: torch.Tensor) -> torch.Tensor:
        """The least element of ``x`` on any rank (a scalar; the gradient goes to the element that holds it)."""
        return x.amin() if self.local else self._each(x.amin()).amin()

    def amax(self, x: torch.Tensor) -> torch.Tensor:
        """The greatest element of ``x`` on any rank (a scalar)."""
        return x.amax() if self.local else self._each(x.amax()).amax()

    def _count(self, x: torch.Tensor) -> int:
        """Elements of the global tensor of which ``x`` (first dimension: this rank's samples) is this rank's part."""
        return x[0].numel() * self.batch

    def _total(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of all elements of ``x`` on all ranks, accumulated in fp64 (no worse than one process's sum)."""
        return self.sum(x.sum(dtype=torch.float64))

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of all elements of the global tensor (``x``: this rank's samples)."""
        return x.mean() if self.local else (self._total(x) / self._count(x)).to(x.dtype)

    def std(self, x: torch.Tensor) -> torch.Tensor:
        """The unbiased standard deviation of the global tensor's elements (two passes, as torch's)."""
        if self.local:
            return x.std()
        return torch.sqrt(self._total((x - self.mean(x)).square()) / (self._count(x) - 1)).to(x.dtype)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The Frobenius norm of the global tensor of which ``x`` is this rank's part."""
        return torch.linalg.vector_norm(x) if self.local else torch.sqrt(self._total(x.square())).to(x.dtype)

    def mean_share(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the global mean of a per-sample quantity of which ``x`` holds this rank's samples."""
        return x.mean() if self.local else x.sum() / self._count(x)

    def whole_share(self, value: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global value that every rank computed whole (a norm over the global batch)."""
        return value if self.local else value / self.world

    def totals(self, shares: dict[str, torch.Tensor]) -> dict[str, float]:
        """The global values of detached shares (one all-reduce for all of them): what the step logs."""
        keys = sorted(shares)
        values = torch.stack([shares[k].detach().double().reshape(()) for k in keys])
        if not self.local:
            values = _all_reduced(values, self._group())
        return dict(zip(keys, values.tolist()))


def _all_reduced(t: torch.Tensor, group: Any) -> torch.Tensor:
    """A contiguous copy of ``t`` summed over the ranks of ``group`` (``t`` itself is left as it was)."""
    import torch.distributed as dist

    out = t.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


class _SumOverRanks(torch.autograd.Function):
    """all-reduce (sum); its gradient is the sum of every rank's gradient of the result."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _all_reduced(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduced(grad, ctx.group), None


class _GatherRows(torch.autograd.Function):
    """all-gather of ``sizes[r]`` rows from each rank r (padded to the largest on the wire); each rank's gradient is
    the sum over ranks of the gradient of its own rows (reduce-scatter where the backend has it, NCCL; else an
    all-reduce of which each rank keeps its rows)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, sizes: tuple[int, ...]) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group, ctx.sizes, ctx.rank = group, sizes, dist.get_rank(group)
        width = max(sizes)
        padded = torch.zeros((width, *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        import torch.distributed as dist

        sizes, rank = ctx.sizes, ctx.rank
        first, mine = _starts(sizes)[rank], sizes[rank]
        if dist.get_backend(ctx.group) == "nccl":
            width = max(sizes)
            padded = torch.zeros((len(sizes) * width, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            for r, start in enumerate(_starts(sizes)):
                padded[r * width: r * width + sizes[r]] = grad[start:start + sizes[r]]
            out = torch.empty((width, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, padded, group=ctx.group)
            return out[:mine], None, None
        return _all_reduced(grad, ctx.group)[first:first + mine], None, None


def _starts(sizes: tuple[int, ...]) -> list[int]:
    """The first row of each rank's part in the gathered tensor."""
    return [sum(sizes[:r]) for r in range(len(sizes))]


LOCAL = BatchSpan()
