"""Probe features and results of one checkpoint, for tests/test_multiprocess.py: run it as one process
(`python probe_features.py CKPT OUT.pt`) or under torchrun; rank 0 saves everything to OUT.pt.

Batch sizes are chosen so that two ranks get unequal shares and a share may be empty."""

import sys

import torch

from ddaepp_cli.build import build_formulation
from ddaepp_cli.data import load_dataset
from ddaepp_cli.distributed import Dist
from ddaepp_cli.eval.features import Subset, parse_times
from ddaepp_cli.eval.probe import PROTOCOLS, CachedFeatures, LiveFeatures, probe, run_bank
from ddaepp_cli.sample import load_model


def main(ckpt: str, out: str) -> None:
    torch.set_num_threads(1)
    dist = Dist(torch.device("cpu"))
    recipe, model, _ = load_model(ckpt, "ema", dist.device)
    form = build_formulation(recipe)
    ds = load_dataset("digits", split="train", image_size=8)
    times = parse_times(form, "11,101", default=())
    layers = ["out_1", "out_3"]
    live = LiveFeatures(model, form, layers, times, device=dist.device, precision="fp32", hflip=True, crop_pad=1,
                        seed=3, dist=dist)
    saved = {"world": dist.world, "keys": live.keys}
    # cached features: batches of 16, 16 and 13 images (shares 8/8, 8/8, 7/6), both flips
    cached = CachedFeatures(live, Subset(ds, torch.arange(45), "a"), batch_size=16)
    saved["cache"] = [c.clone() for c in cached.cache]
    saved["cached_train"] = cached.train_batch(torch.arange(40, 3, -3), step=2)
    saved["live_train"] = live.train_batch(ds.images[:3], step=5)  # flips, crops and noise of 3 images: shares 2/1
    saved["live_eval"] = live.eval_batch(ds.images[3:4], stream=7)  # one image: rank 1's share is empty
    # live features end to end (the `ddae` protocol: crop and flip): 62 images in batches of 25, 25, 12
    keys, acc, losses = run_bank(model, form, layers, times, Subset(ds, torch.arange(62), "b"),
                                 Subset(ds, torch.arange(62, 102), "c"), num_classes=10, protocol=PROTOCOLS["ddae"],
                                 epochs=2, batch_size=25, lr=2e-2, seed=1, hflip=True, crop_pad=1, cache=False,
                                 device=dist.device, precision="fp32", eval_stream=99, dist=dist)
    saved["bank"] = {"keys": keys, "acc": acc, "losses": losses}
    # the library command (cached features on digits, validation split, final probe); batch 101 is odd
    saved["probe"] = probe(ckpt, layers="out_1,out_3", timesteps="11,101", epochs=2, batch_size=101, hflip=False,
                           device="cpu")
    save_on_main(dist, saved, out)


def save_on_main(dist, saved: dict, out: str) -> None:
    """Rank 0 saves what every rank computed; the others must have got an empty `probe` result."""
    if dist.main:
        torch.save(saved, out)
    else:
        assert saved["probe"] == {}, "ranks other than 0 return an empty result"


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    from ddaepp_cli.failures import close_launch

    close_launch()  # as the CLI does: no process group left to the interpreter's exit
