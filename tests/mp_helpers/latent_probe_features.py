"""Latent probe features of one DiT checkpoint, for tests/test_latent_eval.py: run as one process
(`python latent_probe_features.py CKPT OUT.pt`) or under torchrun; rank 0 saves everything to OUT.pt.
Batches are sized so that two ranks get unequal shares (and, once, an empty one)."""

import sys

import torch

from ddaepp_cli.build import build_formulation
from ddaepp_cli.distributed import Dist
from ddaepp_cli.eval.features import Subset, load_eval_dataset, parse_times
from ddaepp_cli.eval.probe import PROTOCOLS, CachedFeatures, LiveFeatures, RawLatentFeatures, probe, run_bank
from ddaepp_cli.sample import load_model

try:  # the sibling helper: run as a script (torchrun), this folder is on sys.path
    from probe_features import save_on_main
except ImportError:  # imported by the tests
    from mp_helpers.probe_features import save_on_main


def main(ckpt: str, out: str) -> None:
    torch.set_num_threads(1)
    dist = Dist(torch.device("cpu"))
    recipe, model, _ = load_model(ckpt, "ema", dist.device)
    form = build_formulation(recipe)
    ds = load_eval_dataset(recipe, dataset=None, split="train", root=None, latent=True)
    pairs = torch.stack([ds[i][0] for i in range(8)])  # (8, 2, C, h, w)
    times = parse_times(form, "0.25,0.5", default=())
    live = LiveFeatures(model, form, ["1", "3"], times, device=dist.device, precision="fp32", hflip=True,
                        crop_pad=0, seed=3, dist=dist)
    raw = RawLatentFeatures((ds.channels, ds.image_size, ds.image_size), device=dist.device, precision="fp32",
                            hflip=True, crop_pad=0, seed=3, dist=dist)
    saved = {"world": dist.world, "keys": live.keys}
    saved["live_train"] = live.train_batch(pairs[:3], step=5)  # cached-mirror flips and noise; shares 2/1
    saved["live_eval"] = live.eval_batch(pairs[3:4], stream=7)  # one latent: rank 1's share is empty
    saved["raw_train"] = raw.train_batch(pairs[:5], step=2)
    cached = CachedFeatures(live, Subset(ds, torch.arange(21), "a"), batch_size=8)  # 8, 8, 5
    saved["cache"] = [c.clone() for c in cached.cache]
    keys, acc, losses = run_bank(model, form, ["1", "3"], times, Subset(ds, torch.arange(30), "b"),
                                 Subset(ds, torch.arange(30, 50), "c"), num_classes=ds.num_classes,
                                 protocol=PROTOCOLS["ddae++"], epochs=2, batch_size=11, lr=2e-2, seed=1, hflip=True,
                                 crop_pad=0, cache=False, device=dist.device, precision="fp32", eval_stream=99,
                                 dist=dist)
    saved["bank"] = {"keys": keys, "acc": acc, "losses": losses}
    saved["probe"] = probe(ckpt, layers="1,3", epochs=2, batch_size=101, device="cpu")
    save_on_main(dist, saved, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    from ddaepp_cli.failures import close_launch

    close_launch()  # as the CLI does: no process group left to the interpreter's exit
