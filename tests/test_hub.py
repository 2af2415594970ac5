"""Weights from the Hugging Face Hub, offline first (hub.py): the local Hub cache, `--download`, hashes.

The Hub cache these tests read is written by huggingface_hub's own code: `hf_hub_download` fetches each
file from a Hub endpoint served on 127.0.0.1 by this module (the HEAD/GET answers the Hub gives: the
commit in X-Repo-Commit, the LFS sha256 as X-Linked-Etag), so blobs/, refs/ and snapshots/ are laid out
exactly as huggingface_hub lays them out. tests/manifests/hub/hf_cache_layout.json records that layout
(huggingface_hub version and call); a test checks the installed huggingface_hub still writes it. Then
the network is cut (HF_HUB_OFFLINE=1 and every socket connect refused) and ddaepp resolves, verifies
and loads the files through its real code path.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import manifest_files as M

torch.set_num_threads(1)

LAYOUT_MANIFEST = M.MANIFESTS / "hub" / "hf_cache_layout.json"
COMMIT_A = "0123456789abcdef0123456789abcdef01234567"


# ------------------------------------------------------------------------------------------------
# A Hub endpoint on 127.0.0.1 and a Hub cache written by huggingface_hub's own download code
# ------------------------------------------------------------------------------------------------


class FakeHub:
    """Answers `/{repo}/resolve/{revision}/{file}` as huggingface.co does for an LFS file."""

    def __init__(self):
        self.files: dict[tuple[str, str], tuple[bytes, str]] = {}  # (repo, file) → (content, commit)
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, body: bool):
                hub.requests.append(f"{self.command} {self.path}")
                repo_and_rev, _, filename = self.path.lstrip("/").partition("/resolve/")
                revision, _, filename = filename.partition("/")
                key = (repo_and_rev, filename)
                if key not in hub.files or revision not in ("main", hub.files[key][1]):
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data, commit = hub.files[key]
                sha = hashlib.sha256(data).hexdigest()
                self.send_response(200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("ETag", f'"{sha}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self):  # noqa: N802
                self._answer(body=False)

            def do_GET(self):  # noqa: N802
                self._answer(body=True)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, repo_id: str, filename: str, data: bytes, commit: str = COMMIT_A):
        self.files[(repo_id, filename)] = (data, commit)

    def populate(self, cache: Path, repo_id: str, filename: str, revision: str = "main") -> Path:
        """huggingface_hub downloads the file into `cache` (its own blobs/refs/snapshots layout)."""
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache, endpoint=self.url))


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    server = FakeHub()
    yield server
    server.server.shutdown()


@pytest.fixture
def caches(tmp_path, monkeypatch) -> dict[str, Path]:
    """Empty ddaepp and Hugging Face caches in tmp_path (the user's are never read)."""
    paths = {"ddaepp": tmp_path / "ddaepp-cache", "hf": tmp_path / "hf-home" / "hub"}
    monkeypatch.setenv("DDAEPP_CACHE", str(paths["ddaepp"]))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return paths


def no_network(monkeypatch):
    """HF_HUB_OFFLINE=1 and every socket connect fails: any network access is a test failure."""
    attempts = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError(f"test: network access to {address} refused")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def cli(*args):
    from ddaepp_cli.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, [ln for ln in r.stderr.splitlines() if ln.strip()], r.stdout


def listing(cache: Path) -> list[dict]:
    """Every entry under a Hub cache: path, kind (dir / file / symlink), symlink target, small file content."""
    out = []
    for p in sorted(cache.rglob("*")):
        rel = p.relative_to(cache).as_posix()
        if p.is_symlink():
            out.append({"path": rel, "kind": "symlink", "target": os.readlink(p)})
        elif p.is_dir():
            out.append({"path": rel, "kind": "dir"})
        else:
            entry = {"path": rel, "kind": "file"}
            if "/refs/" in f"/{rel}":
                entry["content"] = p.read_text()
            out.append(entry)
    return out


def placeholders(entries: list[dict], names: dict[str, str]) -> list[dict]:
    def sub(text: str) -> str:
        for value, name in names.items():
            text = text.replace(value, "{" + name + "}")
        return text

    return [{k: sub(v) for k, v in e.items()} for e in entries]


# ------------------------------------------------------------------------------------------------
# The layout huggingface_hub writes (and reads)
# ------------------------------------------------------------------------------------------------


def test_hf_cache_layout_is_the_one_huggingface_hub_writes(hub, tmp_path):
    import huggingface_hub

    m = json.loads(LAYOUT_MANIFEST.read_text(encoding="utf-8"))
    assert m["producer"].startswith("huggingface_hub") and m["call"] and m["version"]
    data = b"weights" * 100
    hub.add("owner/some-repo", "sub/model.safetensors", data)
    path = hub.populate(tmp_path / "hub", "owner/some-repo", "sub/model.safetensors")
    sha = hashlib.sha256(data).hexdigest()
    got = [e for e in placeholders(listing(tmp_path / "hub"), {sha: "sha256", COMMIT_A: "commit"})
           if e["path"].startswith("models--")]  # .locks/ and CACHEDIR.TAG: not read
    assert got == m["entries"], f"huggingface_hub {huggingface_hub.__version__} writes another layout"
    assert path == tmp_path / "hub" / "models--owner--some-repo" / "snapshots" / COMMIT_A / "sub" / "model.safetensors"
    assert path.read_bytes() == data and path.is_symlink()


def test_manifest_records_its_producer():
    m = json.loads(LAYOUT_MANIFEST.read_text(encoding="utf-8"))
    assert set(m) >= {"producer", "version", "call", "reads", "entries"}
    paths = {e["path"] for e in m["entries"]}
    assert {"models--owner--some-repo/refs/main", "models--owner--some-repo/blobs/{sha256}",
            "models--owner--some-repo/snapshots/{commit}/sub/model.safetensors"} <= paths


# ------------------------------------------------------------------------------------------------
# hub.resolve: ddaepp's cache, the Hugging Face cache, --download; hashes
# ------------------------------------------------------------------------------------------------


def _entry(monkeypatch, name: str, data: bytes, **kw):
    from ddaepp_cli import hub as H

    weight = replace(H.WEIGHTS[name], sha256=hashlib.sha256(data).hexdigest(), **kw)
    monkeypatch.setitem(H.WEIGHTS, name, weight)
    return weight


def test_resolve_reads_the_hf_cache_offline_and_checks_the_hash(hub, caches, monkeypatch):
    from ddaepp_cli import hub as H
    from ddaepp_cli.errors import UnavailableError

    data = b"va-vae" * 1000
    w = _entry(monkeypatch, "sdvae", data)
    hub.add(w.repo_id, w.filename, data, commit=w.revision)
    hub.populate(caches["hf"], w.repo_id, w.filename)
    attempts = no_network(monkeypatch)
    path = H.resolve(w)  # pinned revision: snapshots/<revision>/<file>
    assert path == caches["hf"] / "models--stabilityai--sd-vae-ft-ema" / "snapshots" / w.revision / w.filename
    assert H.resolve(replace(w, revision=None)) == path  # unpinned: refs/main → the same snapshot
    assert attempts == [] and hub.requests == [f"HEAD /{w.repo_id}/resolve/main/{w.filename}",
                                                f"GET /{w.repo_id}/resolve/main/{w.filename}"]  # populate only
    with pytest.raises(UnavailableError, match="not found"):  # another revision is not in the cache
        H.resolve(replace(w, revision="f" * 40))
    with pytest.raises(UnavailableError, match=r"its sha256 is .*expected 0{16}… — the file is corrupt"):
        H.resolve(replace(w, sha256="0" * 64))
    assert path.read_bytes() == data  # never deleted


def test_ddaepp_cache_comes_first_and_is_checked(hub, caches, monkeypatch):
    from ddaepp_cli import hub as H
    from ddaepp_cli.errors import UnavailableError

    data = b"mine" * 10
    w = _entry(monkeypatch, "vavae", data)
    own = caches["ddaepp"] / "weights" / "vavae-imagenet256-f16d32-dinov2.pt"
    own.parent.mkdir(parents=True)
    own.write_bytes(data)
    no_network(monkeypatch)
    assert H.resolve(w) == own
    own.write_bytes(b"truncated")
    with pytest.raises(UnavailableError) as e:
        H.resolve(w)
    assert str(own) in str(e.value) and hashlib.sha256(b"truncated").hexdigest()[:16] in str(e.value)
    assert own.read_bytes() == b"truncated"


def test_download_fetches_through_huggingface_hub(hub, caches, monkeypatch):
    from ddaepp_cli import hub as H
    from ddaepp_cli.errors import UnavailableError

    data = b"lightning" * 50
    w = _entry(monkeypatch, "lightningdit-xl-800ep", data)
    hub.add(w.repo_id, w.filename, data, commit=COMMIT_A)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    with pytest.raises(UnavailableError, match="--download"):  # without --download: nothing fetched
        H.resolve(w)
    assert hub.requests == []
    path = H.resolve(w, download=True)
    assert path == caches["hf"] / "models--hustvl--lightningdit-xl-imagenet256-800ep" / "snapshots" / COMMIT_A / w.filename
    assert path.read_bytes() == data and (path.parent.parent.parent / "refs" / "main").read_text() == COMMIT_A
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnavailableError, match="HF_HUB_OFFLINE is set"):
        H.resolve(replace(w, name="x", filename="other.pt"), download=True)
    hub.add(w.repo_id, "bad.pt", b"not the pinned file")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(UnavailableError, match="is not bad.pt .* corrupt"):
        H.resolve(replace(w, filename="bad.pt"), download=True)  # downloaded, then refused by its hash


def test_hf_addresses_and_table_names():
    from ddaepp_cli import hub as H
    from ddaepp_cli.errors import UsageError

    w = H.weight_for("hf://stabilityai/sd-vae-ft-mse-original/vae-ft-mse-840000-ema-pruned.safetensors")
    assert w == H.WEIGHTS["sdvae-mse-original"]  # a table file keeps its pinned revision and hash
    w = H.weight_for("hf://facebook/DiT-XL-2-256/transformer/diffusion_pytorch_model.safetensors")
    assert (w.repo_id, w.filename, w.revision, w.sha256) == ("facebook/DiT-XL-2-256",
                                                             "transformer/diffusion_pytorch_model.safetensors", None, None)
    assert H.weight_for("hf://stabilityai/sd-vae-ft-mse-original/vae-ft-mse-840000-ema-pruned.safetensors",
                        revision="main").sha256 is None  # another revision: the pinned hash does not apply
    for bad in ("hf://owner/repo", "hf://owner//file", "nosuchweight"):
        with pytest.raises(UsageError):
            H.weight_for(bad)
    for w in H.WEIGHTS.values():  # the table: full 64-hex digests (or the Inception's 8-hex name prefix), 40-hex commits
        assert w.sha256 is None or (len(w.sha256) in (8, 64) and int(w.sha256, 16) >= 0)
        assert w.revision is None or (len(w.revision) == 40 and int(w.revision, 16) >= 0)
        assert (w.repo_id is None) == (w.url is not None)


# ------------------------------------------------------------------------------------------------
# Commands: cache-latents --vae sdvae --download, import hf://…
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.fixture
def tiny_sdvae(tmp_path, monkeypatch) -> bytes:
    """A small AutoencoderKL saved by diffusers (manifest vae_diffusers, small), standing in for SD-VAE: the
    `sdvae` kind is narrowed to its architecture (the real one has 83,653,863 parameters)."""
    from ddaepp_cli.data import vae as V

    files = M.write(M.load("vae_diffusers")["sizes"]["small"], tmp_path / "tiny-vae")
    data = files["diffusion_pytorch_model.safetensors"].read_bytes()
    alone = tmp_path / "alone.safetensors"  # as in the Hub cache: the weights file without config.json
    alone.write_bytes(data)
    cfg = V.load_vae(alone).config
    monkeypatch.setitem(V.KINDS, "sdvae", replace(V.KINDS["sdvae"], config={k: cfg[k] for k in V.KINDS["sdvae"].config}))
    return data


def test_cache_latents_vae_sdvae_download_loads_from_the_hf_cache_without_network(hub, caches, images, tiny_sdvae,
                                                                                    tmp_path, monkeypatch):
    """Issue 22 acceptance: with the Hub cache laid out, `cache-latents --vae sdvae --download` loads the VAE
    with the network cut; the same file corrupted exits 3 in one line (and stays)."""
    w = _entry(monkeypatch, "sdvae", tiny_sdvae)
    hub.add(w.repo_id, w.filename, tiny_sdvae, commit=w.revision)
    hub.populate(caches["hf"], w.repo_id, w.filename)
    attempts = no_network(monkeypatch)
    args = ["cache-latents", "--data", images, "--vae", "sdvae", "--download", "--image-size", "16",
            "--num-workers", "0", "--batch-size", "3", "--json"]
    code, err, out = cli(*args, "--out", tmp_path / "lat")
    assert code == 0, err
    res = json.loads(out)
    manifest = json.loads((tmp_path / "lat" / "manifest.json").read_text())
    assert res["count"] == 6 and manifest["vae"]["sha256"] == w.sha256 and manifest["vae"]["kind"] == "sdvae"
    assert attempts == []
    blob = caches["hf"] / "models--stabilityai--sd-vae-ft-ema" / "blobs" / w.sha256
    blob.write_bytes(tiny_sdvae[:-100])  # truncated in the cache
    code, err, _ = cli(*args, "--out", tmp_path / "lat2")
    assert code == 3 and len(err) == 1, err
    assert "diffusion_pytorch_model.safetensors" in err[0] and w.sha256[:16] in err[0] and "corrupt" in err[0]
    assert hashlib.sha256(tiny_sdvae[:-100]).hexdigest()[:16] in err[0] and blob.exists()
    assert attempts == [] and not (tmp_path / "lat2").exists()


def test_cache_latents_missing_named_vae_exits_3_with_the_commands(caches, images, tmp_path, monkeypatch):
    from ddaepp_cli import hub as H

    attempts = no_network(monkeypatch)
    code, err, _ = cli("cache-latents", "--data", images, "--vae", "sdvae", "--out", tmp_path / "lat")
    w = H.WEIGHTS["sdvae"]
    assert code == 3 and len(err) == 1, err
    assert w.filename in err[0] and w.sha256[:16] in err[0] and "--download" in err[0]
    assert f"hf download {w.repo_id} {w.filename} --revision {w.revision}" in err[0]
    assert "huggingface-cli download" in err[0] and str(caches["hf"]) in err[0]
    code, err, _ = cli("cache-latents", "--data", images, "--vae", "sdvae", "--download", "--out", tmp_path / "lat")
    assert code == 3 and len(err) == 1 and "HF_HUB_OFFLINE is set" in err[0], err
    from conftest import run_cli  # the installed command's own argv: the exact command to run again

    r = run_cli("cache-latents", "--data", images, "--vae", "sdvae", "--out", tmp_path / "lat", timeout=120)
    assert r.returncode == 3 and f"`ddaepp cache-latents --data {images} --vae sdvae --out {tmp_path / 'lat'} " \
        "--download`" in r.stderr, r.stderr
    code, err, _ = cli("cache-latents", "--data", images, "--vae", "sdvae", "--vae-kind", "vavae", "--out", tmp_path / "l")
    assert code == 2 and "not --vae-kind vavae" in err[0]
    code, err, _ = cli("cache-latents", "--data", images, "--vae", "inception", "--out", tmp_path / "l")
    assert code == 2 and "not a VAE" in err[0]
    assert attempts == []


def test_import_hf_source_resolves_from_the_hf_cache(hub, caches, tmp_path, monkeypatch):
    from test_import import LDIT_SET, small

    from ddaepp_cli import hub as H

    files = M.write(small("lightningdit", "released"), tmp_path / "src")
    data = next(iter(files.values())).read_bytes()
    w = H.WEIGHTS["lightningdit-xl-800ep"]
    hub.add(w.repo_id, w.filename, data)
    address = f"hf://{w.repo_id}/{w.filename}"
    args = ["--from", "lightningdit", "--recipe", "imagenet256_rf_ditb_cond", *LDIT_SET, "--json"]
    hub.populate(caches["hf"], w.repo_id, w.filename)
    attempts = no_network(monkeypatch)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    code, err, _ = cli("import", address, "--out", tmp_path / "run0", *args)  # not cached, no --download
    assert code == 3 and len(err) == 1 and f"hf download {w.repo_id} {w.filename}" in err[0], err
    monkeypatch.setenv("HF_HOME", str(caches["hf"].parent))
    code, err, out = cli("import", address, "--out", tmp_path / "run", *args)
    assert code == 0, err
    res = json.loads(out)
    assert res["source"]["sha256"] == hashlib.sha256(data).hexdigest() and res["source"]["file"] == w.filename
    code, err, _ = cli("import", next(iter(files.values())), "--revision", "main", "--out", tmp_path / "r2", *args)
    assert code == 2 and "--revision applies to hf://" in err[0]
    assert attempts == []


def test_latent_cache_finds_its_table_vae_in_the_hf_cache(hub, caches, monkeypatch):
    """`sample` / `fid` on a latent run: the VAE recorded in the cache manifest (by sha256), or recipe key
    data.vae naming a table entry, is found in the Hugging Face cache without the network."""
    from ddaepp_cli.data.latentstore import resolve_vae_path
    from ddaepp_cli.errors import UnavailableError

    data = b"sd-vae" * 100
    w = _entry(monkeypatch, "sdvae", data)
    hub.add(w.repo_id, w.filename, data, commit=w.revision)
    path = hub.populate(caches["hf"], w.repo_id, w.filename)
    no_network(monkeypatch)
    manifest = {"vae": {"kind": "sdvae", "file": "/gone/elsewhere.safetensors", "file_name": w.filename,
                        "sha256": w.sha256}}
    assert resolve_vae_path(manifest) == path
    assert resolve_vae_path({"vae": {}}, vae="sdvae") == path
    with pytest.raises(UnavailableError, match="sdvae-mse weights not found"):
        resolve_vae_path(manifest, vae="sdvae-mse")


@pytest.mark.slow
def test_cache_latents_vae_sdvae_download_real_architecture(hub, caches, images, tmp_path, monkeypatch):
    """The same with SD-VAE's real architecture (83,653,863 parameters, 335 MB, diffusers' released layout
    from the manifest, random values): `--vae sdvae` checks the kind against it; only the table's sha256 is
    this file's (the real weights are not fetched in tests)."""
    from ddaepp_cli.data.vae import KINDS

    files = M.write(M.load("vae_diffusers")["sizes"]["released"], tmp_path / "released",
                    only=("diffusion_pytorch_model.safetensors",))
    data = files["diffusion_pytorch_model.safetensors"].read_bytes()
    files["diffusion_pytorch_model.safetensors"].unlink()
    w = _entry(monkeypatch, "sdvae", data)
    hub.add(w.repo_id, w.filename, data, commit=w.revision)
    hub.populate(caches["hf"], w.repo_id, w.filename)
    hub.files.clear()
    del data
    attempts = no_network(monkeypatch)
    code, err, out = cli("cache-latents", "--data", images, "--vae", "sdvae", "--download", "--image-size", "16",
                         "--num-workers", "0", "--batch-size", "6", "--out", tmp_path / "lat", "--json")
    assert code == 0, err
    vae = json.loads((tmp_path / "lat" / "manifest.json").read_text())["vae"]
    assert vae["kind"] == "sdvae" and vae["params"] == KINDS["sdvae"].params == 83_653_863
    assert vae["sha256"] == w.sha256 and json.loads(out)["latent_shape"] == [4, 2, 2] and attempts == []


def test_import_vae_name_resolves_from_the_hf_cache(hub, caches, tiny_sdvae, tmp_path, monkeypatch):
    """`ddaepp import DiT.pt --from dit --vae sdvae`: the named VAE comes from the Hub cache, offline."""
    from test_import import DIT_SET, dit_family_file

    w = _entry(monkeypatch, "sdvae", tiny_sdvae)
    hub.add(w.repo_id, w.filename, tiny_sdvae, commit=w.revision)
    hub.populate(caches["hf"], w.repo_id, w.filename)
    src, _ = dit_family_file(tmp_path, "dit", "released", rename="DiT-B-2.pt")
    attempts = no_network(monkeypatch)
    code, err, out = cli("import", src, "--from", "dit", "--recipe", "imagenet256_sra_ditxl", "--out", tmp_path / "run",
                         *DIT_SET, "--vae", "sdvae", "--json")
    assert code == 0, err
    assert json.loads(out)["latents"]["vae"]["sha256"] == w.sha256 and attempts == []


# ------------------------------------------------------------------------------------------------
# Folders: `ddaepp import hf://OWNER/REPO[/SUBFOLDER] --from diffusers-dit`
# ------------------------------------------------------------------------------------------------


def test_import_diffusers_dit_from_a_hub_repository_in_the_cache_offline(tmp_path, hub, caches, monkeypatch):
    """A diffusers DiT repository (as facebook/DiT-XL-2-256 is published: a folder, not one file) is read from the
    Hugging Face cache without the network, and gives the run the same folder on disk gives; absent, exit 3 in
    one line with the commands that fetch it."""
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import load_file

    cfg = M.load("diffusers_dit")["sizes"]["small"]["DiTTransformer2DModel"]
    torch.manual_seed(0)
    theirs = diffusers.DiTTransformer2DModel(**cfg)
    for block in theirs.transformer_blocks[1:]:  # one DiT embedder, copied into every block as diffusers' DiTs hold it
        block.norm1.emb.load_state_dict(theirs.transformer_blocks[0].norm1.emb.state_dict())
    theirs.save_pretrained(tmp_path / "pipe" / "transformer")  # diffusers' own writer
    files = sorted(p.relative_to(tmp_path / "pipe").as_posix() for p in (tmp_path / "pipe").rglob("*") if p.is_file())
    for name in files:
        hub.add("someone/tiny-dit", name, (tmp_path / "pipe" / name).read_bytes())
        hub.populate(caches["hf"], "someone/tiny-dit", name)
    attempts = no_network(monkeypatch)

    code, err, out = cli("import", "hf://someone/tiny-dit/transformer", "--from", "diffusers-dit",
                         "--out", tmp_path / "from-hub")
    assert code == 0, err
    code, err, _ = cli("import", tmp_path / "pipe" / "transformer", "--from", "diffusers-dit",
                       "--out", tmp_path / "from-disk")
    assert code == 0, err
    a = load_file(str(next((tmp_path / "from-hub" / "checkpoints").iterdir()) / "ema.safetensors"))
    b = load_file(str(next((tmp_path / "from-disk" / "checkpoints").iterdir()) / "ema.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    code, err, _ = cli("import", "hf://someone/absent-dit", "--from", "diffusers-dit", "--out", tmp_path / "x")
    assert code == 3 and len(err) == 1, err
    assert "someone/absent-dit" in err[0] and "hf download someone/absent-dit" in err[0] and "--download" in err[0]
    assert not (tmp_path / "x").exists()
    code, err, _ = cli("import", "hf://someone/absent-dit", "--from", "diffusers-dit", "--out", tmp_path / "x",
                       "--download")  # HF_HUB_OFFLINE: refused in one line, still no network
    assert code == 3 and len(err) == 1 and "HF_HUB_OFFLINE" in err[0], err
    code, err, _ = cli("import", "hf://someone", "--from", "diffusers-dit", "--out", tmp_path / "x")
    assert code == 2 and len(err) == 1 and "hf://OWNER/REPO" in err[0], err
    assert attempts == []
