"""The dense probe's head, its training and evaluation, and where features are kept (`ddaepp segprobe`,
segprobe.py): LayerNorm + Linear at every location, logits upsampled to the label map, cross-entropy with
ignore index 255, Adam with cosine decay per step; mIoU from the confusion matrix (DDAE++ App. B, Tab. 10)."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..atomic import atomic_path
from ..console import progress
from ..errors import DdaeppError, UsageError, choices
from .segdata import IGNORE, SegmentationSet, voc_palette

STORE_DTYPE = torch.bfloat16  # cached features; the head always sees bf16-rounded features
CACHE_MODES = ("auto", "on", "off")
LOGIT_BUDGET = 1 << 29  # bytes of upsampled logits (+ their gradient) per micro-batch

if TYPE_CHECKING:
    from .segprobe import DenseFeatures


class _Indexed(torch.utils.data.Dataset):
    """(image, label, index); a user-fixable error travels to the main process as a value."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        try:
            x, y = self.ds[i]
        except DdaeppError as e:
            return e
        return x, y, i


def _collate(items):
    for it in items:
        if isinstance(it, DdaeppError):
            return it
    return torch.utils.data.default_collate(items)


def batches(ds, order: Sequence[int], batch_size: int, workers: int):
    """(images, labels, indices) in `order`, decoded by `workers` processes."""
    sampler = [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    loader = torch.utils.data.DataLoader(_Indexed(ds), batch_sampler=sampler, num_workers=workers,
                                         collate_fn=_collate)
    for batch in loader:
        if isinstance(batch, DdaeppError):
            raise batch
        yield batch


# ------------------------------------------------------------------------------------------------
# Head, loss, metrics
# ------------------------------------------------------------------------------------------------


class SegHead(nn.Module):
    """LayerNorm + Linear at every grid location (DDAE++ App. B)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, f: Tensor) -> Tensor:
        x = self.norm(f.float().permute(0, 2, 3, 1))  # (B, g, g, C)
        return self.linear(x).permute(0, 3, 1, 2)  # (B, K, g, g)


def upsample(logits: Tensor, size: int) -> Tensor:
    """Bilinear upsampling of (B, K, g, g) logits to the label map (B, K, L, L) (16× for 16 → 256)."""
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE) -> Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; ignored pixels are not counted."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(cm: Tensor) -> dict[str, Any]:
    """Per-class IoU = TP / (TP + FP + FN); mIoU over classes present in prediction or ground truth."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    valid = union > 0
    total = cm.sum()
    return {"miou": float(iou[valid].mean()) if valid.any() else float("nan"),
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
            "per_class_iou": [None if math.isnan(v) else v for v in iou.tolist()],
            "classes_evaluated": int(valid.sum()), "pixels": int(total)}


def _micro(num_classes: int, label_size: int) -> int:
    return max(1, LOGIT_BUDGET // (3 * 4 * num_classes * label_size * label_size))


# ------------------------------------------------------------------------------------------------
# Caching decision
# ------------------------------------------------------------------------------------------------


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def cache_plan(mode: str, need: int, device: torch.device) -> tuple[bool, torch.device | None, str]:
    """(cache?, where, why) for `need` bytes of features; half of the free memory is the limit."""
    if mode not in CACHE_MODES:
        raise UsageError(f"--cache-features {mode!r} is not valid; choose from {choices(CACHE_MODES)}")
    if mode == "off":
        return False, None, "off (recomputed every epoch)"
    if device.type == "cuda" and need <= _available_bytes(device) // 2:
        return True, device, f"{need / 2**30:.2f} GiB on {device}"
    if mode == "on" or need <= _available_bytes(torch.device("cpu")) // 2:
        return True, torch.device("cpu"), f"{need / 2**30:.2f} GiB in CPU memory"
    return False, None, f"off: {need / 2**30:.1f} GiB of features do not fit in half the free memory"


# ------------------------------------------------------------------------------------------------
# Training and evaluation
# ------------------------------------------------------------------------------------------------


class FeatureSource:
    """Features + labels of one split, from the in-memory cache or recomputed per batch."""

    def __init__(self, ds, split: str, dense: DenseFeatures, *, cached: bool, store: torch.device | None,
                 batch_size: int, workers: int):
        self.ds, self.split, self.dense, self.workers = ds, split, dense, workers
        self.feats = self.labels = None
        if cached:
            feats, labels = [], []
            with progress(len(ds), f"segprobe: {split} features", "img") as bar:
                for images, y, idx in batches(ds, range(len(ds)), batch_size, workers):
                    feats.append(dense(images, idx, split).to(store))
                    labels.append(y.to(store))
                    bar.update(len(idx))
            self.feats, self.labels = torch.cat(feats), torch.cat(labels)  # (N, C, g, g), (N, L, L)

    def __len__(self) -> int:
        return len(self.ds)

    def iterate(self, order: Sequence[int], batch_size: int):
        """(features, labels) on the probe's device, in `order`."""
        dev = self.dense.device
        if self.feats is not None:
            for i in range(0, len(order), batch_size):
                idx = torch.as_tensor(order[i:i + batch_size], device=self.feats.device)
                yield self.feats[idx].to(dev), self.labels[idx].to(dev)
            return
        for images, y, idx in batches(self.ds, order, batch_size, self.workers):
            yield self.dense(images, idx, self.split), y.to(dev)


def train_head(head: SegHead, train: FeatureSource, *, epochs: int, batch_size: int, lr: float, seed: int,
               label_size: int, num_classes: int) -> list[float]:
    """Adam + per-step cosine decay; returns the mean loss of every epoch."""
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total, step, losses = epochs * steps_per_epoch, 0, []
    micro = _micro(num_classes, label_size)
    with progress(total, "segprobe: train", "step") as bar:
        for epoch in range(epochs):
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
            running, count = 0.0, 0
            for feats, labels in train.iterate(order, batch_size):
                for group in opt.param_groups:
                    group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))
                valid = int((labels != IGNORE).sum())
                step += 1
                if valid == 0:  # nothing to learn from this batch (all pixels ignored)
                    bar.update(1)
                    continue
                opt.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for f, y in zip(feats.split(micro), labels.split(micro)):  # same gradient as one pass
                    logits = upsample(head(f), label_size)  # (b, K, L, L)
                    loss = F.cross_entropy(logits, y.long(), ignore_index=IGNORE, reduction="sum") / valid
                    loss.backward()
                    loss_sum += float(loss.detach())
                opt.step()
                running, count = running + loss_sum, count + 1
                bar.update(1, f"loss {loss_sum:.3f}")
            losses.append(running / max(count, 1))
    return losses


@torch.no_grad()
def evaluate(head: SegHead, val: FeatureSource, *, batch_size: int, label_size: int, num_classes: int) -> Tensor:
    head.eval()
    cm = None
    micro = _micro(num_classes, label_size)
    for feats, labels in val.iterate(list(range(len(val))), batch_size):
        for f, y in zip(feats.split(micro), labels.split(micro)):
            pred = upsample(head(f), label_size).argmax(1)  # (b, L, L)
            c = confusion_matrix(pred, y, num_classes)
            cm = c if cm is None else cm + c
    head.train()
    return cm.cpu()


@torch.no_grad()
def predictions_png(head: SegHead, val: FeatureSource, ds: SegmentationSet, path, *, count: int = 4) -> str:
    """A grid: one row per validation image — image | ground truth | prediction (VOC colour map)."""
    from PIL import Image

    head.eval()
    idx = list(range(min(count, len(ds))))
    feats, labels = next(val.iterate(idx, len(idx)))
    pred = upsample(head(feats), ds.label_size).argmax(1).cpu().numpy().astype(np.uint8)  # (n, L, L)
    head.train()
    pal = voc_palette()
    L, rows = ds.label_size, []
    for k, i in enumerate(idx):
        image, _ = ds[i]
        arr = image.permute(1, 2, 0).numpy()
        img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).convert("RGB").resize((L, L), Image.BILINEAR)
        gt = pal[labels[k].cpu().numpy()]
        rows.append(np.concatenate([np.array(img), gt, pal[pred[k]]], axis=1))  # (L, 3L, 3)
    grid = np.concatenate(rows, axis=0)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_path(path, durable=False) as tmp:
        Image.fromarray(grid).save(tmp)
    return path
