"""Several processes for the evaluation commands (`torchrun` / `accelerate launch`): rank, world size,
the device of this rank, and the few collectives `fid`, `probe` and `cache-latents` need.

One process (no `WORLD_SIZE` above 1 in the environment) needs no process group and does not import
accelerate: every collective is then the identity. Training and sampling use accelerate directly.

Sharding rule of a batch of n items (`shares`): contiguous slices in rank order, the first n mod world
ranks one item longer (`torch.tensor_split`); `all_gather_rows` puts the shares back in that order, so
a gathered batch is the batch one process would have computed.

A failure of one process stops every process of the launch with the same message: failures.py.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

from .failures import world_size  # noqa: F401  (the one definition; re-exported)

T = TypeVar("T")


def from_rank0(compute: Callable[[], T]) -> T:
    """`compute()` on rank 0, its result on every rank: a decision read from files (which checkpoint, which
    checkpoints) taken once for the launch. Each rank reading a run folder itself could get another answer
    while a training run writes or prunes checkpoints there, and lists of other lengths mean other numbers
    of collectives. A collective when several processes have a process group (every rank must call it);
    `compute()` itself otherwise. An exception on rank 0 stops the others (failures.py)."""
    import torch.distributed as td

    if world_size() <= 1 or not (td.is_available() and td.is_initialized()):
        return compute()
    box = [compute() if td.get_rank() == 0 else None]
    td.broadcast_object_list(box, src=0)
    return box[0]


class Dist:
    """Rank, world size and device of this process, with gather, broadcast and barrier."""

    def __init__(self, device: torch.device | None = None):
        self.world = world_size()
        self.state = None
        if self.world > 1:
            from accelerate import PartialState

            # on a launch with several processes the device is this rank's (cuda:<local rank>), not `device`
            self.state = PartialState(cpu=not torch.cuda.is_available())
            self.rank, self.device = self.state.process_index, self.state.device
            if self.device.type == "cpu":
                self.device = torch.device("cpu")  # not accelerate's `cpu:0`: records read the same as one process's
        else:
            self.rank = 0
            self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    # --- objects -------------------------------------------------------------------------------
    def gather(self, obj: Any) -> list:
        """[obj of rank 0, obj of rank 1, …] on every rank (pickled; for small or irregular data)."""
        if self.state is None:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def gather_to_main(self, obj: Any) -> list | None:
        """[obj of rank 0, obj of rank 1, …] on rank 0 and None elsewhere: large results (features,
        images) travel to the one rank that uses them, not to every rank."""
        if self.state is None:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world if self.main else None
        td.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    # --- tensors -------------------------------------------------------------------------------
    def shares(self, n: int) -> list[int]:
        """Sizes of the ranks' contiguous shares of n items (tensor_split: the first n mod world get one more)."""
        q, r = divmod(n, self.world)
        return [q + (i < r) for i in range(self.world)]

    def share(self, n: int) -> slice:
        """This rank's slice of n items."""
        sizes = self.shares(n)
        lo = sum(sizes[:self.rank])
        return slice(lo, lo + sizes[self.rank])

    def all_gather_rows(self, x: Tensor, n: int) -> Tensor:
        """Every rank's share (`share(n)` rows of `x`, same trailing shape and dtype on all ranks) put
        back together: (n, …) on every rank, in rank order. Shares of unequal size are padded for the
        collective and trimmed again."""
        if self.state is None:
            return x
        import torch.distributed as td

        sizes = self.shares(n)
        if x.shape[0] != sizes[self.rank]:
            raise ValueError(f"rank {self.rank} holds {x.shape[0]} rows, its share of {n} is {sizes[self.rank]}")
        width = max(sizes)
        src = x.to(self.device).contiguous()
        if src.shape[0] < width:
            src = torch.cat((src, src.new_zeros((width - src.shape[0], *src.shape[1:]))))
        parts = [torch.empty_like(src) for _ in sizes]
        td.all_gather(parts, src)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(x.device)

    def broadcast(self, x: Tensor, src: int = 0) -> Tensor:
        """`x` of rank `src` on every rank (same shape and dtype everywhere)."""
        if self.state is None:
            return x
        import torch.distributed as td

        t = x.to(self.device).contiguous().clone()
        td.broadcast(t, src)
        return t.to(x.device)
