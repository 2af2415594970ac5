"""Segmentation images for `ddaepp segprobe` on latent (DiT) runs (DDAE++ Tab. 5): the 256² ADE20K / VOC
images are encoded by the run's VAE into a latent cache (latents.py: sharded, checksummed, resumable —
an interrupted segprobe re-uses every finished shard), then read as the DiT read its training data.

- The VAE is the one the run's training cache was made with (found as for `ddaepp sample`:
  latentstore.resolve_vae_path; missing → exit 3) and must match the manifest's sha256.
- Images: the central square, resized to the training cache's image size (256 for the paper's VA-VAE
  runs) with ADM's centre crop, as `cache-latents` does; the label maps take the same central square
  (nearest neighbour, segdata.py). One posterior sample per image, seeded by its index.
- Normalisation: the training cache's per-channel statistics (the model's input space).
- Where: `$DDAEPP_CACHE/seg-latents/<dataset>-<split>-<size>px-<vae sha256[:12]>-<root hash>/`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from torch.utils.data import Dataset

from ..errors import UsageError
from .segdata import SegmentationSet


class LatentSegmentationSet(Dataset):
    """`ds[i] -> (latent pair (2, C, h, w) normalised, label uint8 (L, L))` of one split."""

    def __init__(self, latents, seg: SegmentationSet):
        self.latents, self.seg = latents, seg
        self.name, self.split = seg.name, seg.split
        self.num_classes, self.class_names = seg.num_classes, seg.class_names
        self.label_size, self.image_size = seg.label_size, seg.image_size

    def __len__(self) -> int:
        return len(self.seg)

    def __getitem__(self, i: int):
        pair, _ = self.latents[i]
        return pair, self.seg.label(i)

    def info(self) -> dict:
        return {**self.seg.info(), "latent_cache": str(self.latents.root),
                "latent_shape": [self.latents.channels, self.latents.image_size, self.latents.image_size],
                "normalised_with": str(self.latents.stats_root)}


def cache_folder(dataset: str, split: str, seg_root: Path, image_size: int, vae_sha: str) -> Path:
    from ..data.vae import cache_dir

    where = hashlib.sha256(str(seg_root.resolve()).encode()).hexdigest()[:8]
    return cache_dir() / "seg-latents" / f"{dataset}-{split}-{image_size}px-{vae_sha[:12]}-{where}"


def latent_split(recipe, dataset: str, split: str, data_root, *, label_size: int, image_size: int | None,
                 batch_size: int = 32, workers: int = 0) -> tuple[LatentSegmentationSet, SegmentationSet]:
    """(latent segmentation set, the same split's RGB set for pictures) of a latent run."""
    from ..console import info
    from ..data.latents import write_cache
    from ..data.latentstore import LatentDataset, read_manifest, resolve_vae_path, sha256_file

    train_root = recipe.data.root
    if train_root is None:
        raise UsageError("this latent run's recipe names no data.root (its training latent cache)")
    manifest = read_manifest(train_root)  # missing → exit 3 with the command that makes it
    size = int(manifest.get("image_size") or 0)
    if not size:
        raise UsageError(f"the latent cache {train_root} does not record its image size; re-create it")
    if image_size not in (None, size):
        raise UsageError(f"--image-size {image_size}: this latent run reads {size}×{size} images encoded by its "
                         f"VAE; leave --image-size unset or give {size}")
    vae = resolve_vae_path(manifest, getattr(recipe.data, "vae", None))  # missing → exit 3
    want = (manifest.get("vae") or {}).get("sha256")
    if want and sha256_file(vae) != want:
        raise UsageError(f"{vae} is not the VAE the latent cache {train_root} was made with (sha256 {want[:16]}…)")
    seg = SegmentationSet(dataset, split, data_root, image_size=size, label_size=label_size, channels=3)
    out = cache_folder(dataset, split, seg.root, size, want or sha256_file(vae))
    files = [str(img) for img, _ in seg.pairs]
    summary = write_cache(files, [0] * len(files), None, seg.root, vae, out, image_size=size, batch_size=batch_size,
                          shard_size=1000, num_workers=workers,
                          labels_source={"layout": f"{dataset} {split} images (labels: the segmentation maps)"})
    if summary["encoded_shards"]:
        info(f"segprobe: encoded {dataset} {split} with the run's VAE into {out}")
    latents = LatentDataset(out, split=split, stats_root=train_root, scale=recipe.data.latent_scale)
    if latents.channels != manifest["latent_shape"][0]:
        raise UsageError(f"{out} holds {latents.channels}-channel latents, the run's cache {manifest['latent_shape'][0]}")
    return LatentSegmentationSet(latents, seg), seg


