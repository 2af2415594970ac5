"""`ddaepp fid`: FID, sFID, IS, KID and precision/recall with torch-fidelity's Inception, as ADM's
evaluator reports them.

What goes in: a folder of images, an `.npz` with `arr_0` (uint8 N×H×W×C, the ADM format), or a
run / checkpoint(s), whose samples are generated on the fly with per-sample seeds, class labels and
CFG as `ddaepp sample` draws them, decoded through the run's VAE for latent runs, converted exactly
as `ddaepp sample` writes PNGs (`((x+1)·127.5).round().clamp(0, 255)`) and never written unless
`--save-samples`. What it is compared with (`--ref`): a registered name (`cifar10-train`, …), a
folder, an `.npz` of images, or statistics `{mu, sigma[, mu_s, sigma_s]}` (ADM's reference batches
such as `VIRTUAL_imagenet256_labeled.npz`, EDM's, or ddaepp's own `--save-stats` files).

How (the usual pitfalls, each handled):
- Images enter torch-fidelity's `inception-v3-compat` extractor as uint8 at their native size; the
  extractor does the TF1-compatible bilinear resize to 299 itself. ddaepp never resizes, and a
  folder whose images differ in size is refused (torch-fidelity would crash or need a resize).
- The extractor runs in float64 by default (`--extractor-dtype`), so features do not depend on the
  batch size; mean and covariance are computed in float64 from the features (stats.py).
- sFID reads the TF graph's mixed_6/conv (torch-fidelity's Mixed_6d.branch1x1) through a forward
  hook during the same forward pass (inception.features).
- Several processes (`accelerate launch` / `torchrun`): seeds or files are sharded over ranks,
  features are gathered on rank 0 only (extract.py), rank 0 computes and writes.

Parts: sources.py (images by index), extract.py (sharded features), stats.py (statistics, Fréchet
distance, files), reference.py (references and their cache), metrics.py, command.py (plan → extract
→ compute → record), report.py (records and the table).
"""

from .command import Plan, compute, fid, plan
from .constants import (DIM, FEATURES, LOGITS, METRICS, PRESETS, REGISTERED, SPATIAL, SPATIAL_DIM,
                        TORCH_FIDELITY_ONLY)
from .extract import extract
from .metrics import compute_metrics, inception_score_adm, parse_metrics
from .reference import (ADM_REFERENCE, ADM_REFERENCE_URL, Reference, cache_key, default_adm_reference,
                        fid_cache_dir, reference_data, resolve_reference)
from .report import print_fid
from .sources import DatasetSource, FolderSource, ImageSource, ModelSource, NpzSource
from .stats import Stats, frechet_distance, load_stats, npz_keys, stats_from_features, trace_sqrt_product, write_stats

__all__ = ["ADM_REFERENCE", "ADM_REFERENCE_URL", "DIM", "DatasetSource", "FEATURES", "FolderSource", "ImageSource",
           "LOGITS", "METRICS", "ModelSource", "NpzSource", "PRESETS", "Plan", "REGISTERED", "Reference", "SPATIAL",
           "SPATIAL_DIM", "Stats", "TORCH_FIDELITY_ONLY", "cache_key", "compute", "compute_metrics",
           "default_adm_reference", "extract", "fid", "fid_cache_dir", "frechet_distance", "inception_score_adm",
           "load_stats", "npz_keys", "parse_metrics", "plan", "print_fid", "reference_data", "resolve_reference",
           "stats_from_features", "trace_sqrt_product", "write_stats"]
