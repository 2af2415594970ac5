"""Every weight file ddaepp knows, where it lives on the Hugging Face Hub, and how one is found offline.

One table (`WEIGHTS`): for each file its Hub repository, file name, pinned revision (the commit) and
sha256, what it is and where those facts come from. A value that could not be confirmed is `None` —
never guessed: without a pinned revision the repository's `main` is used, without a sha256 the file is
loaded unchecked (the docs' table, docs/offline.md, lists which). The Inception of torch-fidelity is not
on the Hub under its author (torch-fidelity itself downloads it from its GitHub release): its row has
no repository, its URL, and the sha256 prefix its file name carries (torch.hub's convention).

A weight is looked up, in order (`resolve`):

1. an explicit path (`--vae PATH`, …), used as it is;
2. ddaepp's own cache, `$DDAEPP_CACHE/weights/<name>` (default `~/.cache/ddaepp/weights/`);
3. the Hugging Face cache — `huggingface_hub.hf_hub_download(..., local_files_only=True)`, which reads
   `$HF_HUB_CACHE` (default `$HF_HOME/hub`, `~/.cache/huggingface/hub`) and never the network;
4. only with `--download`: `hf_hub_download` from the Hub (or `$HF_ENDPOINT`, a mirror) at the pinned
   revision, into that cache (refused in one line while `HF_HUB_OFFLINE` is set).

A file found in (2)-(4) must have the table's sha256 where it is known; another file is refused (exit
3, naming the file and both hashes) and left where it is — ddaepp never deletes a user's file. Missing
without `--download`: exit 3 naming the file, its hash and the exact commands that fetch it.

`hf://OWNER/REPO/PATH/IN/REPO` names any Hub file the same way (`ddaepp import hf://…`, `--vae hf://…`);
a file in the table keeps the table's revision and sha256.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from .errors import UnavailableError, UsageError

HF_PREFIX = "hf://"


@dataclass(frozen=True)
class Weight:
    """One weight file: where it is on the Hub (or elsewhere), its pinned revision and hash."""

    name: str  # ddaepp's name for it (`--vae sdvae`)
    repo_id: Optional[str]  # Hub repository; None: not on the Hub (`url`)
    filename: str  # path of the file inside the repository
    revision: Optional[str]  # pinned commit; None: not confirmed (the repository's main is used)
    sha256: Optional[str]  # hex digest, or a prefix of it (Inception); None: not confirmed (unchecked)
    what: str
    source: str  # where repository, file, revision and hash were read
    cache_name: Optional[str] = None  # file name in $DDAEPP_CACHE/weights/ (default: the file's name)
    url: Optional[str] = None  # download URL of a file that is not on the Hub
    vae_kind: Optional[str] = None  # data/vae.py KINDS: the architecture of a VAE

    @property
    def local_name(self) -> str:
        return self.cache_name or Path(self.filename).name

    @property
    def hash_text(self) -> str:
        if self.sha256 is None:
            return "sha256 not pinned"
        return f"sha256 {self.sha256[:16]}…" if len(self.sha256) > 16 else f"sha256 {self.sha256}…"


_SDVAE_HUB_API = ("stabilityai/sd-vae-ft-{} model card; revision and sha256 (the file's Git LFS oid) as pinned "
                  "independently by several projects' download manifests")
WEIGHTS: dict[str, Weight] = {w.name: w for w in (
    Weight("vavae", "hustvl/vavae-imagenet256-f16d32-dinov2", "vavae-imagenet256-f16d32-dinov2.pt", None, None,
           "VA-VAE f16d32 (LightningDiT's tokenizer), LDM layout, Lightning checkpoint",
           "hustvl/LightningDiT README (Inference with Pre-trained Models)", vae_kind="vavae"),
    Weight("vavae-stats", "hustvl/vavae-imagenet256-f16d32-dinov2", "latents_stats.pt", None, None,
           "VA-VAE latent statistics (per-channel mean/std, `ddaepp import --from lightningdit --latent-stats`)",
           "hustvl/LightningDiT README (Download latent statistics)"),
    Weight("sdvae", "stabilityai/sd-vae-ft-ema", "diffusion_pytorch_model.safetensors",
           "f04b2c4b98319346dad8c65879f680b1997b204a",
           "32db726da04f06c1b6b14c0043ce115cc87a501482945c5add89a40d838fcb46",
           "SD-VAE ft-EMA (kl-f8), diffusers layout (334,643,276 bytes); DiT/SiT/REPA/SRA's VAE",
           _SDVAE_HUB_API.format("ema"), cache_name="sd-vae-ft-ema.safetensors", vae_kind="sdvae"),
    Weight("sdvae-mse", "stabilityai/sd-vae-ft-mse", "diffusion_pytorch_model.safetensors",
           "31f26fdeee1355a5c34592e401dd41e45d25a493",
           "a1d993488569e928462932c8c38a0760b874d166399b14414135bd9c42df5815",
           "SD-VAE ft-MSE (kl-f8), diffusers layout (334,643,276 bytes)",
           _SDVAE_HUB_API.format("mse"), cache_name="sd-vae-ft-mse.safetensors", vae_kind="sdvae"),
    Weight("sdvae-original", "stabilityai/sd-vae-ft-ema-original", "vae-ft-ema-560000-ema-pruned.safetensors",
           None, None, "SD-VAE ft-EMA (kl-f8), LDM layout",
           "stabilityai/sd-vae-ft-ema-original model card", vae_kind="sdvae"),
    Weight("sdvae-mse-original", "stabilityai/sd-vae-ft-mse-original", "vae-ft-mse-840000-ema-pruned.safetensors",
           "629b3ad3030ce36e15e70c5db7d91df0d60c627f",
           "735e4c3a447a3255760d7f86845f09f937809baa529c17370d83e4c3758f3c75",
           "SD-VAE ft-MSE (kl-f8), LDM layout (334,641,190 bytes)",
           _SDVAE_HUB_API.format("mse-original"), vae_kind="sdvae"),
    Weight("inception", None, "weights-inception-2015-12-05-6726825d.pth", None, "6726825d",
           "torch-fidelity's Inception-v3 (TF inception-2015-12-05) for FID / IS / KID (95.6 MB)",
           "torch-fidelity feature_extractor_inceptionv3.py URL_INCEPTION_V3 (a GitHub release, not the Hub)",
           url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth"),
    Weight("lightningdit-xl-800ep", "hustvl/lightningdit-xl-imagenet256-800ep", "lightningdit-xl-imagenet256-800ep.pt",
           None, None, "LightningDiT-XL/1, 800 epochs (`ddaepp import --from lightningdit`)",
           "hustvl/LightningDiT README (Download pre-trained models)"),
    Weight("lightningdit-xl-64ep", "hustvl/lightningdit-xl-imagenet256-64ep", "lightningdit-xl-imagenet256-64ep.pt",
           None, None, "LightningDiT-XL/1, 64 epochs (`ddaepp import --from lightningdit`)",
           "hustvl/LightningDiT README (Download pre-trained models)"),
    Weight("sra-sitxl-256", "DyJiang/SRA", "sitxl-sra-res256-ep800.pt", None, None,
           "SiT-XL/2 + SRA, 256², 800 epochs (`ddaepp import --from sra`)",
           "vvvvvjdy/SRA README (Sampling with SiT + SRA)"),
)}


# ------------------------------------------------------------------------------------------------
# Names, hf:// addresses, caches
# ------------------------------------------------------------------------------------------------


def is_reference(spec) -> bool:
    """`spec` names a table entry or an hf:// file (not a path on disk)."""
    if spec is None:
        return False
    text = str(spec)
    return text.startswith(HF_PREFIX) or (text in WEIGHTS and not Path(text).exists())


def parse_hf(spec: str) -> tuple[str, str]:
    """hf://OWNER/REPO/PATH → (OWNER/REPO, PATH)."""
    parts = spec[len(HF_PREFIX):].strip("/").split("/")
    if len(parts) < 3 or not all(parts):
        raise UsageError(f"{spec!r} is not a Hub file address: expected hf://OWNER/REPO/FILE "
                         "(e.g. hf://hustvl/lightningdit-xl-imagenet256-800ep/lightningdit-xl-imagenet256-800ep.pt)")
    return "/".join(parts[:2]), "/".join(parts[2:])


def weight_for(spec: str, revision: Optional[str] = None) -> Weight:
    """The table entry a name or hf:// address stands for (an hf:// file outside the table: no hash known)."""
    if not spec.startswith(HF_PREFIX):
        if spec not in WEIGHTS:
            from .errors import choices

            raise UsageError(f"unknown weight name {spec!r}; valid: {choices(WEIGHTS)}, hf://OWNER/REPO/FILE or a path")
        weight = WEIGHTS[spec]
    else:
        repo_id, filename = parse_hf(spec)
        known = [w for w in WEIGHTS.values() if (w.repo_id, w.filename) == (repo_id, filename)]
        weight = known[0] if known else Weight(spec, repo_id, filename, None, None, f"{filename} of {repo_id}",
                                               "named on the command line")
    if revision is not None and revision != weight.revision:
        # another revision is another file: the pinned hash belongs to the pinned revision only
        weight = replace(weight, revision=revision, sha256=None if weight.revision else weight.sha256)
    return weight


def cache_dir() -> Path:
    """ddaepp's cache: `$DDAEPP_CACHE`, else `~/.cache/ddaepp`."""
    return Path(os.environ.get("DDAEPP_CACHE") or Path.home() / ".cache" / "ddaepp").expanduser()


def ddaepp_path(weight: Weight) -> Path:
    return cache_dir() / "weights" / weight.local_name


def hf_cache_dir() -> Path:
    """The Hugging Face cache huggingface_hub reads: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else its default."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hf_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE)


# ------------------------------------------------------------------------------------------------
# Hashes
# ------------------------------------------------------------------------------------------------

_SHA: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, memoised on (real path, size, mtime): a 335 MB VAE is hashed once per process."""
    real = Path(path).resolve()
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key not in _SHA:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        _SHA[key] = h.hexdigest()
    return _SHA[key]


def verify(path: Path, weight: Weight) -> Path:
    """`path` if its sha256 is the table's (or none is pinned); else exit 3 — the file is left as it is."""
    if weight.sha256 is None:
        return path
    actual = sha256_file(path)
    if not actual.startswith(weight.sha256.lower()):
        raise UnavailableError(
            f"{path} is not {weight.filename} ({weight.what}): its sha256 is {actual[:16]}…, expected "
            f"{weight.sha256[:16]}… — the file is corrupt, truncated or a different file. ddaepp leaves it in "
            f"place: delete or replace it, then run again (with --download to fetch it)")
    return path


# ------------------------------------------------------------------------------------------------
# Resolution
# ------------------------------------------------------------------------------------------------


def _from_hf_cache(weight: Weight) -> Optional[Path]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(weight.repo_id, weight.filename, revision=weight.revision,
                                    cache_dir=hf_cache_dir(), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None


def _rerun() -> str:
    """ddaepp's own way to fetch: the current command with --download (or again, where that failed)."""
    argv = sys.argv[1:]
    if "--download" in argv:  # it was asked for and failed (offline, no network)
        return "it again where the Hub can be reached (HF_HUB_OFFLINE unset)"
    if Path(sys.argv[0]).name in ("ddaepp", "__main__.py") and argv:
        return f"`{shlex.join(['ddaepp', *argv, '--download'])}`"
    return "the same ddaepp command with --download"


def download_commands(weight: Weight) -> str:
    """The commands that fetch `weight`: ddaepp's own (the current command with --download) and the Hub CLI's."""
    rerun = _rerun()
    if weight.repo_id is None:
        return f"run {rerun} (fetches {weight.url})"
    rev = f" --revision {weight.revision}" if weight.revision else ""
    hub = f"hf download {weight.repo_id} {weight.filename}{rev}"
    return f"run {rerun}, or `{hub}` (older huggingface_hub: `huggingface-cli download {weight.repo_id} " \
           f"{weight.filename}{rev}`)"


def missing_message(weight: Weight, option: str) -> str:
    where = [str(ddaepp_path(weight))]
    if weight.repo_id is not None:
        rev = weight.revision or "main"
        where.append(f"the Hugging Face cache {hf_cache_dir()} ({weight.repo_id} at {rev})")
    return (f"{weight.name} weights not found: {weight.filename} ({weight.hash_text}) is neither at "
            f"{' nor in '.join(where)}. To fetch it, {download_commands(weight)}; or pass {option}")


def resolve(weight: Weight, *, download: bool = False, option: str = "--vae PATH") -> Path:
    """The verified local file of `weight` (module doc: ddaepp's cache, the HF cache, then --download)."""
    own = ddaepp_path(weight)
    if own.is_file():
        return verify(own, weight)
    if weight.repo_id is not None:
        found = _from_hf_cache(weight)
        if found is not None:
            return verify(found, weight)
    if not download:
        raise UnavailableError(missing_message(weight, option))
    if weight.repo_id is None:
        raise UsageError(f"{weight.name} is not on the Hugging Face Hub; its own --download fetches it from {weight.url}")
    if hf_offline():
        raise UnavailableError(f"--download: HF_HUB_OFFLINE is set, so {weight.filename} cannot be fetched from "
                               f"{weight.repo_id}. " + missing_message(weight, option))
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(weight.repo_id, weight.filename, revision=weight.revision,
                                    cache_dir=hf_cache_dir(), endpoint=os.environ.get("HF_ENDPOINT") or None))
    except Exception as e:  # no network, unknown repository / file / revision, gated repository
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise UnavailableError(f"--download: fetching {weight.filename} from {weight.repo_id} failed ({reason}). "
                               + missing_message(weight, option)) from None
    return verify(path, weight)


def resolve_spec(spec, *, download: bool = False, revision: Optional[str] = None, option: str = "--vae PATH") -> Path:
    """A name, an hf:// address or a path → the local file (a path is used as it is)."""
    if is_reference(spec):
        return resolve(weight_for(str(spec), revision), download=download, option=option)
    if revision is not None:
        raise UsageError("--revision applies to hf://OWNER/REPO/FILE sources only")
    return Path(spec).expanduser()


# ------------------------------------------------------------------------------------------------
# Folders: a diffusers model repository (`import hf://OWNER/REPO --from diffusers-dit`)
# ------------------------------------------------------------------------------------------------

# what a diffusers pipeline or model folder needs: configs and weights (safetensors first; .bin only where
# a folder has no safetensors, as diffusers' own loader prefers them)
FOLDER_PATTERNS = ("*.json", "*.safetensors", "*.safetensors.index.json")


def parse_hf_folder(spec: str) -> tuple[str, Optional[str]]:
    """hf://OWNER/REPO[/SUBFOLDER] → (OWNER/REPO, SUBFOLDER or None)."""
    parts = spec[len(HF_PREFIX):].strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise UsageError(f"{spec!r} is not a Hub repository address: expected hf://OWNER/REPO[/SUBFOLDER] "
                         "(e.g. hf://facebook/DiT-XL-2-256)")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def folder_commands(repo_id: str, revision: Optional[str]) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (f"run {_rerun()}, or `hf download {repo_id}{rev}` (older huggingface_hub: "
            f"`huggingface-cli download {repo_id}{rev}`)")


def resolve_folder(spec: str, *, download: bool = False, revision: Optional[str] = None) -> Path:
    """The local snapshot folder of hf://OWNER/REPO[/SUBFOLDER]: the Hugging Face cache
    (`snapshot_download(local_files_only=True)`, never the network), or with `--download` the Hub.
    A folder has no pinned hash: diffusers' loaders check what they read."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, sub = parse_hf_folder(spec)
    patterns = [f"{sub}/{p}" for p in FOLDER_PATTERNS] if sub else list(FOLDER_PATTERNS)
    missing = (f"{spec} is not in the Hugging Face cache {hf_cache_dir()} ({repo_id} at {revision or 'main'}). "
               f"To fetch it, {folder_commands(repo_id, revision)}")
    try:
        root = Path(snapshot_download(repo_id, revision=revision, cache_dir=hf_cache_dir(), local_files_only=True,
                                      allow_patterns=patterns))
    except (LocalEntryNotFoundError, FileNotFoundError):
        root = None
    if root is None or not (root / sub if sub else root).is_dir():
        if not download:
            raise UnavailableError(missing)
        if hf_offline():
            raise UnavailableError(f"--download: HF_HUB_OFFLINE is set, so {repo_id} cannot be fetched. " + missing)
        try:
            root = Path(snapshot_download(repo_id, revision=revision, cache_dir=hf_cache_dir(),
                                          allow_patterns=patterns, endpoint=os.environ.get("HF_ENDPOINT") or None))
        except Exception as e:  # no network, unknown repository / revision, gated repository
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            raise UnavailableError(f"--download: fetching {repo_id} failed ({reason}). " + missing) from None
    return root / sub if sub else root
