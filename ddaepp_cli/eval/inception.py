"""Inception-v3 weights for FID / IS / KID: torch-fidelity's `inception-v3-compat` (the TF graph
`inception-2015-12-05` that TTUR, ADM and EDM use), where its weights live, how they are checked.

Weights are never downloaded behind the user's back (no downloads at run time). They are
looked up, in order, at

1. `--inception-weights PATH`;
2. `$DDAEPP_CACHE/weights/weights-inception-2015-12-05-6726825d.pth` (default cache `~/.cache/ddaepp`);
3. `$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth`, where torch-fidelity
   itself downloads them, so a machine that once ran torch-fidelity online already has them.

Missing everywhere → `UnavailableError` (exit 3) naming the file, its hash and where to put it;
`--download` fetches it into (2) when online. The `6726825d` in the name is the start of the file's
sha256 (torch.hub's convention, checked on download); other files load but are flagged as not the
official weights, since FID is only comparable across papers with the official ones.

torch-fidelity loads the file with `torch.load(weights_only=False)` (a pickle): ddaepp first opens
it with `weights_only=True`, so a file holding anything but tensors is refused before that happens
(unless its sha256 is the official one), and checks every key and shape against the extractor.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

import torch

from ..checkpoint import layout_mismatch
from ..errors import UnavailableError, UsageError
from ..hub import WEIGHTS, cache_dir, sha256_file

EXTRACTOR = "inception-v3-compat"  # torch-fidelity's registry name
# hub.py's table: not on the Hugging Face Hub; torch-fidelity's GitHub release, sha256 prefix in the name
WEIGHTS_NAME = WEIGHTS["inception"].filename  # weights-inception-2015-12-05-6726825d.pth
WEIGHTS_URL = WEIGHTS["inception"].url
SHA256_PREFIX = WEIGHTS["inception"].sha256  # 6726825d
WEIGHTS_MB = 95.6  # 23,885,486 float32 values


def default_weights_path() -> Path:
    return cache_dir() / "weights" / WEIGHTS_NAME


def torch_hub_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME


def missing_message(searched: list[Path]) -> str:
    where = ", ".join(str(p) for p in searched)
    return (f"Inception weights not found (looked at {where}). Put {WEIGHTS_NAME} (sha256 {SHA256_PREFIX}…, "
            f"{WEIGHTS_MB} MB, from {WEIGHTS_URL}) at {default_weights_path()}, or pass --inception-weights PATH, "
            "or run once with --download when online")


def find_weights(path: str | os.PathLike | None = None, *, download: bool = False) -> Path:
    """The weights file to use (see the module doc for the search order)."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UnavailableError(f"--inception-weights {p}: no such file. " + missing_message([p]))
        return p
    searched = [default_weights_path(), torch_hub_weights_path()]
    for p in searched:
        if p.is_file():
            return p
    if not download:
        raise UnavailableError(missing_message(searched))
    dest = default_weights_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:  # torch.hub checks the sha256 prefix in the name and writes through a temporary file
        with redirect_stdout(sys.stderr):
            torch.hub.download_url_to_file(WEIGHTS_URL, str(dest), hash_prefix=SHA256_PREFIX, progress=True)
    except Exception as e:  # URLError, timeouts, hash mismatch of a partial download
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UnavailableError(f"downloading {WEIGHTS_URL} failed ({reason}). " + missing_message(searched)) from None
    return dest


def sha256_of(path: Path) -> str:
    """sha256 of a file (hub.sha256_file: memoised on path, size and mtime; hashing 96 MB costs ~0.3 s)."""
    return sha256_file(path)


def is_official(sha256: str) -> bool:
    return sha256.startswith(SHA256_PREFIX)


# ------------------------------------------------------------------------------------------------
# The extractor's state-dict layout (without weights) and checks against it
# ------------------------------------------------------------------------------------------------


def _extractor_class():
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


_LAYOUT: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None


def layout() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{key: (shape, dtype)} of the state dict torch-fidelity's Inception expects (566 entries).

    Built on the meta device from torch-fidelity's own class, with its weight loading bypassed, so
    the layout follows whatever torch-fidelity version is installed and costs no memory.
    """
    global _LAYOUT
    if _LAYOUT is None:
        class _Skeleton(_extractor_class()):
            def load_state_dict(self, state_dict, strict=True, assign=False):  # nothing to load
                return None

        with tempfile.TemporaryDirectory() as tmp:
            empty = Path(tmp) / "empty.pth"
            torch.save({}, empty)
            with torch.device("meta"):
                skeleton = _Skeleton(EXTRACTOR, ["2048"], feature_extractor_weights_path=str(empty))
        _LAYOUT = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
    return _LAYOUT


# The six BasicConv2d outputs that Mixed_7c concatenates into the 2048 pool3 features, in order.
_POOL3_BRANCHES = ("branch1x1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool")


def random_state_dict(seed: int = 0, active: int | None = None) -> dict[str, torch.Tensor]:
    """Random weights in the exact layout (for offline tests of the real FID path, never for numbers).

    He-normal convolutions, identity BatchNorm (running mean 0, variance 1), so activations keep a
    unit scale through the 94 convolutions and features differ between images. With `active`
    (≤ 320), only the first `active` pool3 features are alive; a −1e4 BatchNorm bias before the last
    ReLU makes the others exactly 0. Zero-variance features change nothing in the FID path but let
    LAPACK's balancing isolate them, so torch-fidelity's 2048×2048 `eigvals` takes milliseconds
    instead of a minute on a small CPU (tests compare against it).
    """
    if active is not None and not 0 < active <= 320:
        raise ValueError("active must lie in 1..320 (the width of Mixed_7c.branch1x1)")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, (shape, dtype) in layout().items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros(shape, dtype=dtype)
        elif key.endswith(("running_var", "bn.weight")):
            out[key] = torch.ones(shape, dtype=dtype)
        elif key.endswith(("running_mean", "bias")):
            out[key] = torch.zeros(shape, dtype=dtype)
        else:  # conv (O, I, kh, kw) or fc (O, I) weights
            fan_in = int(torch.tensor(shape[1:]).prod())
            out[key] = torch.randn(shape, generator=g, dtype=dtype) * (2.0 / fan_in) ** 0.5
    if active is not None:
        for branch in _POOL3_BRANCHES:
            out[f"Mixed_7c.{branch}.bn.bias"].fill_(-1e4)
        out["Mixed_7c.branch1x1.bn.bias"][:active] = 0.0
    return out


def check_weights_file(path: Path, sha256: str) -> None:
    """Refuse files that are not a plain state dict in the extractor's layout (one line, exit 2)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        if is_official(sha256):
            return  # the official file, identified by its hash
        # torch's own message is no help here (for a text file it is a bare number such as "(101)")
        raise UsageError(f"{path} is not a plain PyTorch state dict of Inception weights (torch.load with "
                         f"weights_only cannot read it); expected {WEIGHTS_NAME} from {WEIGHTS_URL}") from None
    if not isinstance(state, dict):
        raise UsageError(f"{path} holds a {type(state).__name__}, not a state dict; expected {WEIGHTS_NAME}")
    want = layout()
    found = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}  # a non-tensor value: shape ()
    problem = layout_mismatch(found, {k: s for k, (s, _) in want.items()})
    if problem:
        raise UsageError(f"{path} is not in the layout of torch-fidelity's {EXTRACTOR}: {problem}"
                         f"; expected {WEIGHTS_NAME} from {WEIGHTS_URL}")


def load_extractor(path: Path, features: list[str], *, device: torch.device, dtype: str = "float64"):
    """torch-fidelity's Inception extractor with `features` (e.g. ["2048", "logits_unbiased"]).

    `dtype="float64"` runs the network in double precision, which makes features independent of the
    batch size (torch-fidelity #43). torch-fidelity 0.4.0 accepts
    `feature_extractor_internal_dtype="float64"` but maps it to float32 (`helpers.text_to_dtype`), so
    the cast is done here; the extractor still returns float32 features.
    """
    from torch_fidelity.utils import create_feature_extractor

    if dtype not in ("float32", "float64"):
        raise UsageError(f"--extractor-dtype must be float32 or float64, got {dtype!r}")
    sha = sha256_of(path)
    key = (str(path.resolve()), sha, tuple(features), str(device), dtype)
    if key in _LOADED:  # repeated evaluations in one process (notebooks, tests) load the weights once
        return _LOADED[key]
    check_weights_file(path, sha)
    with redirect_stdout(sys.stderr):
        extractor = create_feature_extractor(EXTRACTOR, list(features), cuda=False,
                                             feature_extractor_weights_path=str(path), verbose=False)
    if dtype == "float64":
        extractor.to(torch.float64)
        extractor.feature_extractor_internal_dtype = torch.float64
    extractor = extractor.to(device).eval().requires_grad_(False)
    _LOADED.clear()  # keep one (~100-200 MB)
    _LOADED[key] = extractor
    return extractor


_LOADED: dict[tuple, torch.nn.Module] = {}


def describe(path: Path, dtype: str) -> dict:
    """The protocol record of the extractor."""
    import torch_fidelity

    sha = sha256_of(path)
    return {"name": EXTRACTOR, "torch_fidelity": torch_fidelity.__version__, "weights": str(path),
            "weights_sha256": sha, "official_weights": is_official(sha), "internal_dtype": dtype}


# ------------------------------------------------------------------------------------------------
# Features of one batch, with the spatial tap of sFID
# ------------------------------------------------------------------------------------------------

# The block that the TF graph calls mixed_6 (the 7th of mixed … mixed_10) is torch-fidelity's Mixed_6d;
# its `conv` (the 1×1 branch: conv, batch norm, ReLU) is Mixed_6d.branch1x1 (torch-fidelity's TF→PyTorch
# key map: 'mixed_6/conv/conv2d_params' → 'Mixed_6d.branch1x1.conv').
SPATIAL_MODULE = "Mixed_6d.branch1x1"


def features(extractor, images: torch.Tensor, names: list[str], *, spatial: str | None = None,
             channels: int = 7) -> dict[str, torch.Tensor]:
    """{name: (b, D) float32} for one uint8 batch (b, 3, H, W): the extractor's own outputs (the names it
    was loaded with) and, when `spatial` names it, the first `channels` channels of Mixed_6d.branch1x1
    flattened in (h, w, c) order — TensorFlow's NHWC layout, the order of ADM's `mu_s` / `sigma_s`.
    A forward hook reads the tap during the one forward pass; it is removed afterwards."""
    grabbed: dict[str, torch.Tensor] = {}
    handle = None
    if spatial is not None:
        module = extractor.get_submodule(SPATIAL_MODULE)

        def hook(_module, _inputs, out):  # (b, 192, 17, 17) → (b, 17·17·channels)
            grabbed[spatial] = out[:, :channels].permute(0, 2, 3, 1).reshape(out.shape[0], -1).to(torch.float32)

        handle = module.register_forward_hook(hook)
    try:
        outs = extractor(images)
    finally:
        if handle is not None:
            handle.remove()
    result = {name: f for name, f in zip(extractor.features_list, outs) if name in names}
    result.update(grabbed)
    return result
