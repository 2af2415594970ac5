"""VAE loading (vae.py), `ddaepp cache-latents` and latent decoding (latents.py), end to end.

The reference for the key conversion is a small CompVis/LDM autoencoder written here (the layout the
released VA-VAE and SD-VAE files use): random weights saved from it in the LDM key layout must load
strictly into diffusers' AutoencoderKL and give the same posterior and decoder output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from ddaepp_cli.errors import UnavailableError, UsageError

# ------------------------------------------------------------------------------------------------
# A minimal LDM (CompVis taming/ldm `model.py`) KL autoencoder: the reference layout
# ------------------------------------------------------------------------------------------------


def _gn(c):
    return nn.GroupNorm(32, c, eps=1e-6)


class _Res(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = _gn(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _gn(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class _Attn(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = _gn(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q, k, v = (m(h).reshape(b, c, -1) for m in (self.q, self.k, self.v))
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c ** -0.5, dim=2)
        return x + self.proj_out(torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hh, ww))


class _Down(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Up(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class LDMAutoencoderKL(nn.Module):
    """ch_mult levels, `blocks` ResnetBlocks per encoder level (+1 in the decoder), attention at the
    levels in `attn_levels` (VA-VAE: the last, 16×16), mid Res-Attn-Res, quant convs."""

    def __init__(self, ch=32, ch_mult=(1, 2, 2), blocks=2, z=8, attn_levels=(2,)):
        super().__init__()
        n = len(ch_mult)
        enc, dec = nn.Module(), nn.Module()
        enc.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        enc.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(ch_mult):
            lvl = nn.Module()
            lvl.block = nn.ModuleList([_Res(cin if j == 0 else ch * m, ch * m) for j in range(blocks)])
            lvl.attn = nn.ModuleList([_Attn(ch * m) for _ in range(blocks)] if i in attn_levels else [])
            if i != n - 1:
                lvl.downsample = _Down(ch * m)
            enc.down.append(lvl)
            cin = ch * m
        enc.mid = nn.Module()
        enc.mid.block_1, enc.mid.attn_1, enc.mid.block_2 = _Res(cin, cin), _Attn(cin), _Res(cin, cin)
        enc.norm_out, enc.conv_out = _gn(cin), nn.Conv2d(cin, 2 * z, 3, padding=1)
        dec.conv_in = nn.Conv2d(z, cin, 3, padding=1)
        dec.mid = nn.Module()
        dec.mid.block_1, dec.mid.attn_1, dec.mid.block_2 = _Res(cin, cin), _Attn(cin), _Res(cin, cin)
        ups = []
        for i in reversed(range(n)):
            lvl = nn.Module()
            cout = ch * ch_mult[i]
            lvl.block = nn.ModuleList([_Res(cin if j == 0 else cout, cout) for j in range(blocks + 1)])
            lvl.attn = nn.ModuleList([_Attn(cout) for _ in range(blocks + 1)] if i in attn_levels else [])
            if i != 0:
                lvl.upsample = _Up(cout)
            ups.insert(0, lvl)
            cin = cout
        dec.up = nn.ModuleList(ups)
        dec.norm_out, dec.conv_out = _gn(cin), nn.Conv2d(cin, 3, 3, padding=1)
        self.encoder, self.decoder = enc, dec
        self.quant_conv, self.post_quant_conv = nn.Conv2d(2 * z, 2 * z, 1), nn.Conv2d(z, z, 1)
        self.n = n

    def _mid(self, m, h):
        return m.block_2(m.attn_1(m.block_1(h)))

    def encode(self, x):
        e = self.encoder
        h = e.conv_in(x)
        for i, lvl in enumerate(e.down):
            for j, blk in enumerate(lvl.block):
                h = blk(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if i != self.n - 1:
                h = lvl.downsample(h)
        h = e.conv_out(F.silu(e.norm_out(self._mid(e.mid, h))))
        mean, logvar = self.quant_conv(h).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        d = self.decoder
        h = self._mid(d.mid, d.conv_in(self.post_quant_conv(z)))
        for i in reversed(range(self.n)):
            lvl = d.up[i]
            for j, blk in enumerate(lvl.block):
                h = blk(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if i != 0:
                h = lvl.upsample(h)
        return d.conv_out(F.silu(d.norm_out(h)))


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights everywhere (GroupNorm affine included) so a swapped key shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = max(1, p[0].numel()) if p.ndim > 1 else 16
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return model.eval()


def write_tiny_vae(path: Path, *, seed: int = 0, extra_training_keys: bool = True, **kw) -> LDMAutoencoderKL:
    """A random LDM-layout KL autoencoder saved as the released VA-VAE file is (plus training-only keys)."""
    ref = _randomise(LDMAutoencoderKL(**kw), seed)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if extra_training_keys:
        sd["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 3, 3)
        sd["foundation_model.model.cls_token"] = torch.zeros(1, 1, 8)
        sd["linear_proj.weight"] = torch.zeros(8, sd["decoder.conv_in.weight"].shape[1], 1, 1)
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 7}, str(path))
    return ref


# ------------------------------------------------------------------------------------------------
# vae.py
# ------------------------------------------------------------------------------------------------


def test_vavae_and_sdvae_parameter_counts_on_meta():
    from ddaepp_cli.data.vae import KINDS, build_autoencoder

    vavae = build_autoencoder(KINDS["vavae"].config, device="meta")
    assert sum(p.numel() for p in vavae.parameters()) == 69_836_067 == KINDS["vavae"].params
    assert [type(b).__name__ for b in vavae.encoder.down_blocks] == ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"]
    assert [type(b).__name__ for b in vavae.decoder.up_blocks] == ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 4
    sdvae = build_autoencoder(KINDS["sdvae"].config, device="meta")
    assert sum(p.numel() for p in sdvae.parameters()) == KINDS["sdvae"].params == 83_653_863
    # the full-size LDM layout has exactly the 50 in-level attention keys
    # (encoder.down.4.attn.*, decoder.up.4.attn.*) that diffusers' converter misses
    with torch.device("meta"):
        ref = LDMAutoencoderKL(ch=128, ch_mult=(1, 1, 2, 2, 4), z=32, attn_levels=(4,))
    keys = ref.state_dict().keys()
    assert sum(p.numel() for p in ref.parameters()) == 69_836_067
    assert len([k for k in keys if ".attn." in k and ("down.4." in k or "up.4." in k)]) == 50


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_ldm_checkpoint_loads_strictly_and_matches_the_reference(tmp_path, suffix):
    from ddaepp_cli.data.vae import kind_of, load_vae

    path = tmp_path / f"tiny{suffix}"
    ref = write_tiny_vae(path)
    vae = load_vae(path)
    assert vae.kind is None and vae.identity()["kind"] == "custom" and kind_of(vae.config) is None
    assert vae.config["down_block_types"] == ["DownEncoderBlock2D"] * 2 + ["AttnDownEncoderBlock2D"]
    assert vae.config["up_block_types"] == ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 2
    assert vae.identity()["params"] == sum(p.numel() for p in ref.parameters())  # every LDM tensor is used
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mean_ref, logvar_ref = ref.encode(x)
        mean, std = vae.encode_moments(x)
        torch.testing.assert_close(mean, mean_ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(std, torch.exp(0.5 * logvar_ref), atol=1e-4, rtol=1e-4)
        z = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(vae.decode(z), ref.decode(z), atol=1e-4, rtol=1e-4)


def test_vae_load_errors(tmp_path):
    from ddaepp_cli.data.vae import load_vae

    with pytest.raises(UnavailableError, match="vavae-imagenet256-f16d32-dinov2.pt.*hustvl/vavae-imagenet256"):
        load_vae(tmp_path / "nope.pt", kind="vavae")
    good = tmp_path / "tiny.safetensors"
    write_tiny_vae(good, extra_training_keys=False)
    with pytest.raises(UsageError, match="is not a VA-VAE f16d32.*latent_channels 8 \\(expected 32\\)"):
        load_vae(good, kind="vavae")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(UsageError, match="cannot read VAE checkpoint .*truncated.safetensors"):
        load_vae(truncated)
    from safetensors.torch import load_file

    sd = load_file(str(good))
    sd["encoder.down.2.attn.0.q.weight"] = sd["encoder.down.2.attn.0.q.weight"][:-1]  # mismatched shape
    save_file(sd, str(tmp_path / "shape.safetensors"))
    with pytest.raises(UsageError, match="shape.safetensors"):
        load_vae(tmp_path / "shape.safetensors")
    sd = load_file(str(good))
    del sd["decoder.up.1.block.0.conv1.bias"]  # missing key
    save_file(sd, str(tmp_path / "missing.safetensors"))
    with pytest.raises(UsageError, match="missing.safetensors does not match the autoencoder: keys 1 missing"):
        load_vae(tmp_path / "missing.safetensors")
    bad_pickle = tmp_path / "pickle.pt"
    torch.save({"state_dict": {"x": object()}}, str(bad_pickle))
    with pytest.raises(UsageError, match="weights_only"):
        load_vae(bad_pickle)


# ------------------------------------------------------------------------------------------------
# cache-latents
# ------------------------------------------------------------------------------------------------


def make_image_folder(root: Path, per_class: int = 4, classes=("cat", "dog"), size=(40, 36)) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("lat")
    vae = base / "tiny-vae.safetensors"
    ref = write_tiny_vae(vae)
    return base, make_image_folder(base / "images"), vae, ref


def test_cache_latents_shards_stats_and_resume(tiny, tmp_path, monkeypatch):
    from ddaepp_cli.data import latents as L
    from ddaepp_cli.data.imageio import center_crop_resize
    from ddaepp_cli.seeding import per_sample_randn
    from ddaepp_cli.data.vae import VAE

    _, images, vae_path, ref = tiny
    out = tmp_path / "cache"
    calls = []
    real = VAE.encode_moments
    monkeypatch.setattr(VAE, "encode_moments", lambda self, x: (calls.append(x.shape[0]), real(self, x))[1])

    # the first run dies in the second shard (a crash, or a kill): shard 0 is finished
    def dying(self, x, _real=real):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(x.shape[0])
        return _real(self, x)

    monkeypatch.setattr(VAE, "encode_moments", dying)
    with pytest.raises(KeyboardInterrupt):
        L.cache_latents(images, vae_path, out, image_size=32, batch_size=2, shard_size=3, num_workers=0)
    assert calls == [4, 2]  # shard 0: images 0-1 and 2 (each with its mirror)
    m = json.loads((out / L.MANIFEST).read_text())
    assert not m["complete"]
    with pytest.raises(UnavailableError, match="incomplete"):
        L.LatentDataset(out)
    first = (out / "shard-00000.safetensors")
    stamp, digest = first.stat().st_mtime_ns, L.sha256_file(first)

    calls.clear()
    monkeypatch.setattr(VAE, "encode_moments", lambda self, x: (calls.append(x.shape[0]), real(self, x))[1])
    summary = L.cache_latents(images, vae_path, out, image_size=32, batch_size=2, shard_size=3, num_workers=0)
    assert summary["skipped_shards"] == 1 and summary["encoded_shards"] == 2 and summary["num_shards"] == 3
    assert sum(calls) == 2 * 5  # only images 3..7 (and mirrors) were encoded again
    assert first.stat().st_mtime_ns == stamp and L.sha256_file(first) == digest

    m = json.loads((out / L.MANIFEST).read_text())
    assert m["complete"] and m["count"] == 8 and m["latent_shape"] == [8, 8, 8] and m["num_classes"] == 2
    assert m["class_names"] == ["cat", "dog"] and [s["count"] for s in m["shards"]] == [3, 3, 2]
    assert all(L.sha256_file(out / s["file"]) == s["sha256"] for s in m["shards"])
    assert m["vae"]["sha256"] == L.sha256_file(vae_path) and m["vae"]["kind"] == "custom"

    # latents = posterior sample with per-image noise; mirror = encoding of the flipped crop
    shards = [L.mmap_safetensors(out / s["file"]) for s in m["shards"]]
    z = torch.from_numpy(np.concatenate([np.array(s["latents"]) for s in shards]))
    z_flip = torch.from_numpy(np.concatenate([np.array(s["latents_flip"]) for s in shards]))
    labels = np.concatenate([np.array(s["labels"]) for s in shards])
    assert labels.tolist() == [0] * 4 + [1] * 4
    files = sorted((images / "dog").glob("*.png"))
    x = torch.from_numpy(np.array(center_crop_resize(Image.open(files[1]).convert("RGB"), 32))).permute(2, 0, 1)
    x = x[None].float() / 127.5 - 1
    with torch.no_grad():
        mu, logvar = ref.encode(torch.cat((x, x.flip(-1))))
    eps = torch.cat((per_sample_randn([5], (8, 8, 8), stream=0), per_sample_randn([5], (8, 8, 8), stream=1)))
    expect = mu + torch.exp(0.5 * logvar) * eps
    torch.testing.assert_close(z[5], expect[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z_flip[5], expect[1], atol=1e-4, rtol=1e-4)

    # statistics: exact per channel over every unflipped latent
    stats = L.mmap_safetensors(out / L.STATS)
    zd = z.double()
    np.testing.assert_allclose(np.array(stats["mean"]), zd.mean(dim=(0, 2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(stats["std"]), zd.std(dim=(0, 2, 3)).numpy(), rtol=1e-5, atol=1e-6)

    # the dataset reads it back: normalised (latent, mirror) pairs
    ds = L.LatentDataset(out)
    pair, y = ds[5]
    assert pair.shape == (2, 8, 8, 8) and y == 1
    torch.testing.assert_close(ds.denormalise(pair), torch.stack((z[5], z_flip[5])), atol=1e-5, rtol=1e-5)

    # re-running a finished cache encodes nothing; other settings into the same folder are refused
    calls.clear()
    again = L.cache_latents(images, vae_path, out, image_size=32, batch_size=4, shard_size=3, num_workers=0)
    assert again["encoded_shards"] == 0 and calls == []
    with pytest.raises(UsageError, match="other settings.*shard_size"):
        L.cache_latents(images, vae_path, out, image_size=32, batch_size=2, shard_size=4, num_workers=0)


def test_cache_latents_is_independent_of_batch_size(tiny, tmp_path):
    from ddaepp_cli.data import latents as L

    _, images, vae_path, _ = tiny
    a = L.cache_latents(images, vae_path, tmp_path / "a", image_size=32, batch_size=8, shard_size=8, num_workers=0)
    b = L.cache_latents(images, vae_path, tmp_path / "b", image_size=32, batch_size=3, shard_size=8, num_workers=0)
    za = L.mmap_safetensors(Path(a["out"]) / "shard-00000.safetensors")
    zb = L.mmap_safetensors(Path(b["out"]) / "shard-00000.safetensors")
    np.testing.assert_allclose(np.array(za["latents"]), np.array(zb["latents"]), atol=1e-5)
    np.testing.assert_allclose(np.array(za["latents_flip"]), np.array(zb["latents_flip"]), atol=1e-5)


@pytest.mark.parametrize("tamper", ["escape", "absolute", "reorder", "not-json", "missing-key"])
def test_a_tampered_manifest_is_refused(tiny, tmp_path, tamper):
    """A manifest may only name its own shard files: it can never make ddaepp read outside the cache."""
    import json

    from ddaepp_cli.data import latents as L
    from ddaepp_cli.errors import UsageError

    _, images, vae_path, _ = tiny
    out = Path(L.cache_latents(images, vae_path, tmp_path / "c", image_size=32, batch_size=8, shard_size=3,
                               num_workers=0)["out"])
    assert len(L.LatentDataset(out)) > 0  # intact: readable
    mpath = out / L.MANIFEST
    m = json.loads(mpath.read_text())
    if tamper == "escape":
        m["shards"][0]["file"] = "../../secret.safetensors"
    elif tamper == "absolute":
        m["shards"][0]["file"] = "/etc/passwd"
    elif tamper == "reorder":
        m["shards"] = m["shards"][::-1]
    elif tamper == "missing-key":
        del m["latent_shape"]
    mpath.write_text("{not json" if tamper == "not-json" else json.dumps(m))
    with pytest.raises(UsageError, match="manifest|shard files"):
        L.LatentDataset(out)


def test_cache_latents_cli_errors(tiny, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ddaepp_cli.cli import app

    _, images, vae_path, _ = tiny
    runner = CliRunner()
    r = runner.invoke(app, ["cache-latents", "--data", str(images), "--vae", str(tmp_path / "vavae.pt"),
                            "--out", str(tmp_path / "c"), "--vae-kind", "vavae"])
    assert r.exit_code == 3 and "vavae-imagenet256-f16d32-dinov2.pt" in r.output
    monkeypatch.setenv("DDAEPP_CACHE", str(tmp_path / "cache-home"))
    r = runner.invoke(app, ["cache-latents", "--data", str(images), "--out", str(tmp_path / "c")])  # default VAE file
    assert r.exit_code == 3 and str(tmp_path / "cache-home" / "weights" / "vavae-imagenet256-f16d32-dinov2.pt") in r.output
    r = runner.invoke(app, ["cache-latents", "--data", str(tmp_path / "none"), "--vae", str(vae_path),
                            "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["cache-latents", "--data", str(images), "--vae", str(vae_path),
                            "--out", str(tmp_path / "c"), "--image-size", "30"])
    assert r.exit_code == 2 and "multiple of the VAE's downsampling factor 4" in r.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    r = runner.invoke(app, ["cache-latents", "--data", str(images), "--vae", str(vae_path),
                            "--out", str(tmp_path / "other"), "--image-size", "32"])
    assert r.exit_code == 2 and "not a latent cache" in r.output


# ------------------------------------------------------------------------------------------------
# End to end (issue 5 acceptance): VAE → cache-latents → train a tiny DiT → sample decodes
# ------------------------------------------------------------------------------------------------


def test_end_to_end_cache_train_sample(tiny, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ddaepp_cli.cli import app
    from ddaepp_cli.recipe import load_recipe
    from ddaepp_cli.training.train import train

    _, images, vae_path, _ = tiny
    monkeypatch.setenv("DDAEPP_CACHE", str(tmp_path / "ddaepp-cache"))
    cache = tmp_path / "cache"
    runner = CliRunner()
    r = runner.invoke(app, ["cache-latents", "--data", str(images), "--vae", str(vae_path), "--out", str(cache),
                            "--image-size", "32", "--batch-size", "4", "--shard-size", "5", "--num-workers", "0",
                            "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["count"] == 8 and summary["num_shards"] == 2 and summary["latent_shape"] == [8, 8, 8]

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "imagenet256_rf_ditb_cond.yaml"
    sets = [f"data.root={cache}", "data.num_workers=0", "model.width=32", "model.depth=4", "model.heads=2",
            "model.num_classes=2", "train.global_batch=4", "train.batch_per_process=null", "train.precision=fp32",
            "train.compile=false", "train.log_every=1", "train.checkpoint_every=1000", "train.milestones=[]",
            "train.sample_every=0", "sample.steps=2", "sample.batch_size=4"]
    rec = load_recipe(recipe, sets)
    result = train(rec, tmp_path / "run", max_steps=2)
    assert result["step"] == 2

    out = tmp_path / "samples"
    r = runner.invoke(app, ["sample", str(tmp_path / "run"), "--n", "3", "--out", str(out), "--format", "npz"])
    assert r.exit_code == 0, r.output
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape == (3, 32, 32, 3) and arr.dtype == np.uint8

    # the VAE file moved away: exit 3 naming it; a different VAE file: refused (exit 2)
    moved = tmp_path / "elsewhere.safetensors"
    vae_bytes = vae_path.read_bytes()
    os.rename(vae_path, moved)
    try:
        r = runner.invoke(app, ["sample", str(tmp_path / "run"), "--n", "1", "--out", str(tmp_path / "s2")])
        assert r.exit_code == 3 and "tiny-vae.safetensors" in r.output and "data.vae" in r.output
        write_tiny_vae(vae_path, seed=1)  # same architecture, other weights
        r = runner.invoke(app, ["sample", str(tmp_path / "run"), "--n", "1", "--out", str(tmp_path / "s3")])
        assert r.exit_code == 2 and "not the ones the latent cache was made with" in r.output
        vae_path.unlink()
        weights = tmp_path / "ddaepp-cache" / "weights"  # the documented default location
        weights.mkdir(parents=True)
        (weights / vae_path.name).write_bytes(vae_bytes)
        r = runner.invoke(app, ["sample", str(tmp_path / "run"), "--n", "1", "--out", str(tmp_path / "s4")])
        assert r.exit_code == 0, r.output
    finally:
        vae_path.write_bytes(vae_bytes)
        moved.unlink(missing_ok=True)


def test_decoder_vae_path_resolution(tmp_path, monkeypatch):
    from ddaepp_cli.data.latents import resolve_vae_path

    monkeypatch.setenv("DDAEPP_CACHE", str(tmp_path))
    manifest = {"vae": {"kind": "vavae", "file": str(tmp_path / "gone.pt"), "file_name": "gone.pt", "sha256": "ab" * 32}}
    with pytest.raises(UnavailableError, match="data.vae"):
        resolve_vae_path(manifest, vae=tmp_path / "typo.pt")  # the recipe's data.vae wins, and must exist
    with pytest.raises(UnavailableError, match=f"gone.pt.*{tmp_path / 'weights'}"):
        resolve_vae_path(manifest)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "gone.pt").write_bytes(b"x")
    assert resolve_vae_path(manifest) == tmp_path / "weights" / "gone.pt"
    (tmp_path / "mine.pt").write_bytes(b"x")
    assert resolve_vae_path(manifest, vae=tmp_path / "mine.pt") == tmp_path / "mine.pt"


KILLABLE = """
import sys, time
from ddaepp_cli.data.vae import VAE
real = VAE.encode_moments
VAE.encode_moments = lambda self, x: (time.sleep(0.4), real(self, x))[1]  # slow enough to be killed mid-run
from ddaepp_cli.cli import main
sys.argv = ["ddaepp"] + sys.argv[1:]
main()
"""


@pytest.mark.slow
def test_killed_cache_latents_resumes_without_reencoding(tiny, tmp_path, monkeypatch):
    """SIGKILL a real `cache-latents` process after its second shard; the re-run keeps both."""
    import signal
    import time

    from ddaepp_cli.data import latents as L
    from ddaepp_cli.data.vae import VAE

    _, images, vae_path, _ = tiny
    out = tmp_path / "cache"
    args = ["cache-latents", "--data", str(images), "--vae", str(vae_path), "--out", str(out), "--image-size", "32",
            "--batch-size", "1", "--shard-size", "1", "--num-workers", "0"]
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "shard-00001.json").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "cache-latents ended before it was killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    kept = {p.name: (p.stat().st_mtime_ns, L.sha256_file(p)) for p in sorted(out.glob("shard-*.safetensors"))
            if (out / p.name.replace(".safetensors", ".json")).is_file()}
    assert len(kept) >= 2 and not json.loads((out / L.MANIFEST).read_text())["complete"]
    calls = []
    real = VAE.encode_moments
    monkeypatch.setattr(VAE, "encode_moments", lambda self, x: (calls.append(x.shape[0]), real(self, x))[1])
    summary = L.cache_latents(images, vae_path, out, image_size=32, batch_size=1, shard_size=1, num_workers=0)
    assert summary["skipped_shards"] == len(kept) and summary["encoded_shards"] == 8 - len(kept)
    assert sum(calls) == 2 * (8 - len(kept))
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == {n: v[0] for n, v in kept.items()}
    assert not list(out.glob(".*.tmp-*")) and len(L.LatentDataset(out)) == 8
