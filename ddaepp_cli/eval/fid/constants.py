"""Names and settings shared by the parts of `ddaepp fid` (recorded with every result)."""

from __future__ import annotations

PRESETS = {"fid10k": 10_000, "fid50k": 50_000}
METRICS = ("fid", "is", "kid", "prc", "sfid")
PROTOCOLS = ("adm", "torch-fidelity")  # how IS is split (the only place where the two evaluators differ)

# torch-fidelity's Inception outputs: pool3 (FID, KID, PRC) and the bias-free logits (IS, as ADM's
# evaluator, whose softmax is pool3 · W of the graph's `softmax/logits/MatMul` without its bias).
FEATURES, LOGITS = "2048", "logits_unbiased"
# sFID (Nash et al. 2021, as ADM's evaluator computes it: guided-diffusion evaluations/evaluator.py,
# FID_SPATIAL_NAME = "mixed_6/conv:0", `spatial[..., :7]`, reshaped from NHWC): the ReLU output of the
# first convolution of the TF graph's block mixed_6 — torch-fidelity's Mixed_6d.branch1x1 — at 17×17,
# first 7 channels, flattened in (h, w, c) order so that ADM's reference `mu_s` / `sigma_s` line up.
SPATIAL = "mixed_6/conv"
SPATIAL_CHANNELS, SPATIAL_GRID = 7, 17
SPATIAL_DIM = SPATIAL_CHANNELS * SPATIAL_GRID * SPATIAL_GRID  # 2023
DIM = 2048

# torch-fidelity names read by ddaepp's own CIFAR reader (same pixels, restricted unpickler, offline).
REGISTERED = {"cifar10-train": ("cifar10", "train"), "cifar10-val": ("cifar10", "test"),
              "cifar100-train": ("cifar100", "train"), "cifar100-val": ("cifar100", "test")}
TORCH_FIDELITY_ONLY = ("stl10-train", "stl10-test", "stl10-unlabeled")  # through torch-fidelity's registry
# torch-fidelity's defaults (defaults.py), recorded with every result.
ISC_SPLITS, KID_SUBSETS, KID_SUBSET_SIZE, PRC_NEIGHBORHOOD, RNG_SEED = 10, 100, 1000, 3, 2020
# ADM's evaluator: Inception score over consecutive splits of 5000 samples, unshuffled
# (guided-diffusion evaluations/evaluator.py, compute_inception_score(split_size=5000)).
ADM_IS_SPLIT_SIZE = 5000
RESIZE_POLICY = "none: native-resolution uint8 into torch-fidelity's TF1-compatible bilinear resize to 299"
CACHE_FORMAT = 1
