"""The metrics of `ddaepp fid` from Inception features, as ADM's evaluator reports them.

* FID: Fréchet distance of pool3 statistics (stats.py); sFID: the same on the spatial features of
  mixed_6/conv (first 7 channels, 7·17·17 = 2023 dimensions; Nash et al. 2021, ADM's evaluator).
* IS from the bias-free logits (pool3 · W, as ADM's `softmax/logits/MatMul`). `protocol="adm"`:
  consecutive splits of 5000 samples, unshuffled, the mean over splits (ADM's
  `compute_inception_score`, here in float64 where ADM uses float32); `"torch-fidelity"`:
  torch-fidelity's 10 shuffled splits. For 50k samples both use splits of 5000, but different ones.
* KID and precision/recall: torch-fidelity's functions on the pool features. Precision/recall is the
  k-NN manifold method with k = 3 on Inception pool features, as ADM's evaluator (and the DiT/SiT
  papers): a sample is "precise" when it lies within the k-th-neighbour radius of some reference
  feature, a reference feature is "recalled" likewise. ADM computes the pairwise distances in float16
  (float32 when float16 overflows); ddaepp in float32 — a boundary case may flip, nothing else.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import inception
from ...errors import UsageError, choices
from .constants import (ADM_IS_SPLIT_SIZE, FEATURES, ISC_SPLITS, KID_SUBSET_SIZE, KID_SUBSETS, LOGITS, METRICS,
                        PRC_NEIGHBORHOOD, RNG_SEED, SPATIAL, SPATIAL_DIM)
from .stats import Stats, frechet_distance


def parse_metrics(text: str) -> list[str]:
    items = [m.strip().lower() for m in text.split(",") if m.strip()]
    items = ["is" if m == "isc" else m for m in items]
    bad = [m for m in items if m not in METRICS]
    if bad or not items:
        raise UsageError(f"--metrics: {', '.join(bad) or 'empty'} not valid; choose from {choices(METRICS)}")
    return list(dict.fromkeys(items))


def inception_score_adm(logits: torch.Tensor, split_size: int = ADM_IS_SPLIT_SIZE) -> tuple[float, float, int]:
    """(mean, std over splits, number of splits): exp(E_x KL(p(y|x) ‖ p(y))) on consecutive splits of
    `split_size` samples (the last one may be shorter), in float64."""
    p = torch.softmax(logits.double(), dim=1)  # (n, 1008)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        kl = (part * (torch.log(part) - torch.log(part.mean(0, keepdim=True)))).sum(1).mean()
        scores.append(torch.exp(kl))
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False)), len(scores)


def compute_metrics(metrics: Sequence[str], feats: dict[str, torch.Tensor], stats: Stats, ref_stats: Stats | None,
                    ref_feats: torch.Tensor | None, protocol: str = "torch-fidelity") -> tuple[dict, dict]:
    """(values, settings) of the requested metrics (module doc)."""
    values, settings = {}, {}
    n = len(feats[FEATURES])
    if "fid" in metrics:
        values["fid"] = frechet_distance(stats, ref_stats)
        settings["fid"] = {"feature_layer": FEATURES, "statistics": "float64 mean, covariance (n − 1)",
                           "trace_sqrt": "eigh of F·Σ2·Fᵀ (exact; see ddaepp_cli/fid/stats.py)"}
    if "sfid" in metrics:
        values["sfid"] = frechet_distance(stats.spatial, ref_stats.spatial)
        settings["sfid"] = {"feature_layer": f"{SPATIAL} ({inception.SPATIAL_MODULE}), channels [:7], "
                                             "flattened (h, w, c)", "dim": SPATIAL_DIM,
                            "statistics": "float64 mean, covariance (n − 1)"}
    if "is" in metrics:
        if protocol == "adm":
            mean, std, k = inception_score_adm(feats[LOGITS])
            values["is_mean"], values["is_std"] = mean, std
            settings["is"] = {"feature_layer": LOGITS, "protocol": "adm", "split_size": ADM_IS_SPLIT_SIZE,
                              "splits": k, "shuffle": False, "precision": "float64"}
        else:
            from torch_fidelity.metric_isc import isc_features_to_metric

            splits = min(ISC_SPLITS, n)
            r = isc_features_to_metric(feats[LOGITS], splits=splits, shuffle=True, rng_seed=RNG_SEED)
            values["is_mean"], values["is_std"] = r["inception_score_mean"], r["inception_score_std"]
            settings["is"] = {"feature_layer": LOGITS, "protocol": "torch-fidelity", "splits": splits,
                              "shuffle": True, "rng_seed": RNG_SEED}
    if "kid" in metrics:
        from torch_fidelity.metric_kid import kid_features_to_metric

        size = min(KID_SUBSET_SIZE, n, len(ref_feats))
        r = kid_features_to_metric(feats[FEATURES], ref_feats, kid_subsets=KID_SUBSETS, kid_subset_size=size,
                                   rng_seed=RNG_SEED, verbose=False)
        values["kid_mean"], values["kid_std"] = r["kernel_inception_distance_mean"], r["kernel_inception_distance_std"]
        settings["kid"] = {"feature_layer": FEATURES, "subsets": KID_SUBSETS, "subset_size": size,
                           "kernel": "poly degree 3, gamma 1/D, coef0 1", "rng_seed": RNG_SEED}
    if "prc" in metrics:
        from torch_fidelity.metric_prc import prc_features_to_metric

        if min(n, len(ref_feats)) <= PRC_NEIGHBORHOOD:
            raise UsageError(f"precision/recall needs more than {PRC_NEIGHBORHOOD} images on each side")
        r = prc_features_to_metric(feats[FEATURES], ref_feats, prc_neighborhood=PRC_NEIGHBORHOOD,
                                   prc_batch_size=10000, save_cpu_ram=False, verbose=False)
        values.update(precision=r["precision"], recall=r["recall"], f_score=r["f_score"])
        settings["prc"] = {"feature_layer": f"{inception.EXTRACTOR}/{FEATURES} (ADM evaluator convention)",
                           "neighborhood": PRC_NEIGHBORHOOD, "distances": "float32 Euclidean (ADM: float16)"}
    return values, settings
