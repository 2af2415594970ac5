"""The deterministic, resumable, multi-process batch stream that feeds training (`BatchStream`)."""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DdaeppError, UsageError
from .images import ImageDataset

Tensor = torch.Tensor


class _Failure:
    """A user-facing error raised inside a DataLoader worker, carried to the main process intact
    (DataLoader would re-raise it with a multi-line traceback as its message)."""

    def __init__(self, error: DdaeppError):
        self.error = error


class _CatchErrors(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.dataset[i]
        except DdaeppError as e:
            return _Failure(e)


def _collate(samples: list) -> Union[tuple[Tensor, Tensor], _Failure]:
    for s in samples:
        if isinstance(s, _Failure):
            return s
    images = torch.stack([s[0] for s in samples])  # (b, C, H, W) uint8
    return images, torch.tensor([s[1] for s in samples], dtype=torch.int64)


class _StepBatches:
    """batch_sampler for DataLoader: this rank's indices for steps start, start+1, … (forever); with
    `keyed`, (index, step) pairs for a dataset that draws per step (`_PerStepDraws`)."""

    def __init__(self, indices: Callable[[int], Tensor], start: int, keyed: bool = False):
        self.indices, self.start, self.keyed = indices, start, keyed

    def __iter__(self) -> Iterator[list]:
        step = self.start
        while True:
            idx = self.indices(step).tolist()
            yield [(i, step) for i in idx] if self.keyed else idx
            step += 1


class _PerStepDraws(Dataset):
    """(index, global step) → the dataset's draw of that image for that step (LatentDataset.draw: a fresh
    posterior sample from the image's own generator keyed by (seed, step)), in the DataLoader workers."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        i, step = item
        return self.dataset.draw(i, self.seed, step)


def check_resumable(state: dict, *, num_samples: int, global_batch: int) -> None:
    """A saved stream position can continue only on the same data-set size and global batch: they define
    which images each step takes (the order rule of `BatchStream`) and how long an epoch is. The world
    size may change."""
    saved_n, saved_g = state.get("num_samples"), state.get("global_batch")
    if saved_n is not None and saved_n != num_samples:
        raise UsageError(f"cannot resume: the checkpoint was trained on a data set of {saved_n} images and the data "
                         f"now holds {num_samples}; the data order depends on it (use the same data, or a new --run-dir)")
    if saved_g is not None and saved_g != global_batch:
        raise UsageError(f"cannot resume: the checkpoint was trained with global batch {saved_g} and "
                         f"train.global_batch is now {global_batch}; the data order and epoch length depend on it "
                         f"(keep {saved_g}, or use a new --run-dir)")


class BatchStream:
    """Deterministic, resumable, multi-process batches: an infinite iterator of this rank's
    `(images uint8 (b, C, H, W), labels int64 (b,))`, b = global_batch / world_size.

    Order rule: epoch e is `torch.randperm(N)` under a CPU generator seeded with
    `(seed * 1_000_003 + e) mod 2**63`; steps_per_epoch = N // global_batch (drop_last; the tail
    of each permutation is skipped); global step s takes slice `[(s % spe) * G, +G)` of epoch
    `s // spe`'s permutation, and rank r its r-th contiguous share. The union over ranks is thus
    the same for any world size, and a stream started at `start_step` (or restored with
    `load_state_dict`) yields exactly the batches an uninterrupted run would — also after a
    change of world size. Gradient accumulation splits the rank's share; that is the caller's job.

    In-memory datasets are indexed as tensors (optionally kept on `device` so each step is one
    `index_select` there); other datasets go through a DataLoader driven by the same rule. A dataset
    with `draws_per_step` (a latent cache of posterior moments, `data.latent_posterior: per_step`) is
    read as `dataset.draw(i, seed, step)`: image i's sample for global step `step`, from its own
    generator, so it too is independent of the world size and resumes exactly.
    With `drop_last=False` the last, partial batch of each epoch is kept (ranks' shares may
    then differ by one sample).
    """

    def __init__(self, dataset: ImageDataset, *, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start_step: int = 0, num_workers: int = 0, pin_memory: bool = False,
                 drop_last: bool = True, device: Optional[Union[str, torch.device]] = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is not in 0..{world_size - 1} (world size {world_size})")
        if global_batch < 1 or global_batch % world_size:
            raise UsageError(f"global batch {global_batch} must be a positive multiple of the number of "
                             f"processes ({world_size})")
        if start_step < 0 or num_workers < 0:
            raise UsageError(f"start_step and num_workers must be >= 0, got {start_step} and {num_workers}")
        n = len(dataset)
        if n == 0 or (drop_last and n < global_batch):
            raise UsageError(f"dataset {getattr(dataset, 'name', '?')} has {n} images, fewer than one global "
                             f"batch of {global_batch}; lower the batch size")
        self.dataset, self.num_samples = dataset, n
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.local_batch = global_batch // world_size
        self.seed, self.step = seed, start_step
        self.num_workers, self.drop_last = num_workers, drop_last
        self.pin_memory = pin_memory and torch.cuda.is_available()  # pinning needs an accelerator
        self.device = torch.device(device) if device is not None else None
        self.steps_per_epoch = n // global_batch if drop_last else math.ceil(n / global_batch)
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)
        self._loader_iter = None
        self.in_memory = bool(getattr(dataset, "in_memory", False))
        if self.in_memory:
            self._images, self._labels = dataset.images, dataset.labels
            if self.device is not None:  # whole dataset on the device once (CIFAR: 150 MB)
                self._images, self._labels = self._images.to(self.device), self._labels.to(self.device)

    # --- the order rule ---------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self.step // self.steps_per_epoch

    def permutation(self, epoch: int) -> Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (1 << 63))
            self._perm, self._perm_epoch = torch.randperm(self.num_samples, generator=g), epoch
        return self._perm

    def global_indices(self, step: int) -> Tensor:
        """Dataset indices of global step `step`, all ranks together: (global_batch,) int64."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[pos * self.global_batch:(pos + 1) * self.global_batch]

    def indices(self, step: int) -> Tensor:
        """This rank's contiguous share of `global_indices(step)`."""
        return torch.tensor_split(self.global_indices(step), self.world_size)[self.rank]

    # --- iteration --------------------------------------------------------------------------
    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self.in_memory:
            idx = self.indices(self.step)
            if self.device is not None:
                idx = idx.to(self.device)
            images, labels = self._images.index_select(0, idx), self._labels.index_select(0, idx)  # (b, C, H, W), (b,)
            if self.pin_memory and images.device.type == "cpu":
                images, labels = images.pin_memory(), labels.pin_memory()
        else:
            if self._loader_iter is None:
                keyed = bool(getattr(self.dataset, "draws_per_step", False))
                source = _PerStepDraws(self.dataset, self.seed) if keyed else self.dataset
                loader = DataLoader(_CatchErrors(source), batch_sampler=_StepBatches(self.indices, self.step, keyed),
                                    num_workers=self.num_workers, collate_fn=_collate, pin_memory=self.pin_memory,
                                    persistent_workers=self.num_workers > 0)
                self._loader_iter = iter(loader)
            batch = next(self._loader_iter)
            if isinstance(batch, _Failure):
                self.close()
                raise batch.error
            images, labels = batch
            if self.device is not None:
                images = images.to(self.device, non_blocking=self.pin_memory)
                labels = labels.to(self.device, non_blocking=self.pin_memory)
        self.step += 1
        return images, labels

    def close(self) -> None:
        """Stop DataLoader workers (they also stop when the stream is garbage-collected)."""
        it, self._loader_iter = self._loader_iter, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    # --- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step, "global_batch": self.global_batch,
                "world_size": self.world_size, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position. The world size may differ (the global order does not
        depend on it); the global batch and dataset size may not (they define the order)."""
        check_resumable(state, num_samples=self.num_samples, global_batch=self.global_batch)
        self.close()
        self.seed, self.step = int(state["seed"]), int(state["step"])
