"""Reference networks for the import tests, written from the families' published code (module names,
nesting and forward semantics), independent of ddaepp's backbones and of its importers. They hold the
weights of the files built from tests/manifests/ (the DDAE UNet and U-ViT load them strictly, so their
key layout is checked against what the official code writes) or compute the forward from them.

* `DDAEUNet` — FutureXiang/ddae model/unet.py + model/block.py (names: image_proj, time_emb.{aug_emb,
  lin1, lin2}, down.i / up.i with res.{norm1, conv1, time_emb.1, norm2, conv2.1, shortcut} and
  attn.{norm, projection, output}, Downsample/Upsample conv, DownsampleRes/UpsampleRes op, middle,
  norm, final), with DDAE's forward.
* `UViT` — baofff/U-ViT libs/uvit.py (patch_embed.proj, pos_embed, in/mid/out blocks with timm Mlp
  fc1/fc2, skip_linear, norm, decoder_pred, final_layer), with its forward.
* `lightningdit_forward` — LightningDiT's forward (models/lightningdit.py) computed from its state dict;
  `eva_rope_tables` — EVA's RoPE tables as VisionRotaryEmbeddingFast computes them.
* `dit_forward` — the original DiT's forward (facebookresearch/DiT models.py; SiT, REPA and SRA the same)
  computed from its state dict; `mae_sincos_pos_embed` — its frozen sin-cos positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------------------------------------
# DDAE UNet
# ------------------------------------------------------------------------------------------------


class DTimeEmbedding(nn.Module):
    def __init__(self, n_channels, augment_dim):
        super().__init__()
        self.n_channels = n_channels
        self.aug_emb = nn.Linear(augment_dim, n_channels // 4, bias=False) if augment_dim > 0 else None
        self.lin1 = nn.Linear(n_channels // 4, n_channels)
        self.lin2 = nn.Linear(n_channels, n_channels)

    def forward(self, t, aug):
        half = self.n_channels // 8
        f = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10_000) / (half - 1)))
        e = t.float()[:, None] * f[None]
        e = torch.cat((e.sin(), e.cos()), dim=1)
        if self.aug_emb is not None and aug is not None:
            e = e + self.aug_emb(aug)
        return self.lin2(F.silu(self.lin1(e)))


class DResidual(nn.Module):
    def __init__(self, cin, cout, tch, up=False, down=False):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(32, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(32, cout)
        self.conv2 = nn.Sequential(nn.Dropout(0.0), nn.Conv2d(cout, cout, 3, padding=1))
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.time_emb = nn.Sequential(nn.SiLU(), nn.Linear(tch, cout))
        self.up, self.down = up, down

    def _upd(self, x):
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.avg_pool2d(x, 2) if self.down else x

    def forward(self, x, t):
        h = self.conv1(self._upd(F.silu(self.norm1(x))))
        x = self._upd(x)
        h = h + self.time_emb(t)[:, :, None, None]
        return self.conv2(F.silu(self.norm2(h))) + self.shortcut(x)


class DAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm, self.projection, self.output = nn.GroupNorm(32, c), nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.scale = 1 / math.sqrt(math.sqrt(c))

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = self.norm(x).reshape(b, c, -1).permute(0, 2, 1)
        q, k, v = self.projection(h).reshape(b, -1, 1, 3 * c).chunk(3, dim=-1)
        a = torch.einsum("bihd,bjhd->bijh", q * self.scale, k * self.scale).softmax(dim=2)
        r = self.output(torch.einsum("bijh,bjhd->bihd", a, v).reshape(b, -1, c))
        return r.permute(0, 2, 1).reshape(b, c, hh, ww) + x


class DResAtt(nn.Module):
    def __init__(self, cin, cout, tch, attn):
        super().__init__()
        self.res = DResidual(cin, cout, tch)
        self.attn = DAttention(cout) if attn else nn.Identity()

    def forward(self, x, t):
        return self.attn(self.res(x, t))


class DConvResample(nn.Module):
    def __init__(self, c, up):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(c, c, 3, stride=1 if up else 2, padding=1)

    def forward(self, x, t):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest")) if self.up else self.conv(x)


class DResResample(nn.Module):
    def __init__(self, c, tch, up):
        super().__init__()
        self.op = DResidual(c, c, tch, up=up, down=not up)

    def forward(self, x, t):
        return self.op(x, t)


class DMiddle(nn.Module):
    def __init__(self, c, tch):
        super().__init__()
        self.res1, self.attn, self.res2 = DResidual(c, c, tch), DAttention(c), DResidual(c, c, tch)

    def forward(self, x, t):
        return self.res2(self.attn(self.res1(x, t)), t)


class DDAEUNet(nn.Module):
    def __init__(self, n_channels=32, ch_mults=(1, 2), is_attn=(False, True), n_blocks=1, biggan=False,
                 augment_dim=0):
        super().__init__()
        tch = 4 * n_channels
        self.image_proj = nn.Conv2d(3, n_channels, 3, padding=1)
        self.time_emb = DTimeEmbedding(tch, augment_dim)
        down, hs, cin = [], [n_channels], n_channels
        for i, m in enumerate(ch_mults):
            cout = n_channels * m
            for j in range(n_blocks):
                down.append(DResAtt(cin if j == 0 else cout, cout, tch, is_attn[i]))
                hs.append(cout)
            if i < len(ch_mults) - 1:
                down.append(DResResample(cout, tch, up=False) if biggan else DConvResample(cout, up=False))
                hs.append(cout)
            cin = cout
        self.down = nn.ModuleList(down)
        self.middle = DMiddle(cout, tch)
        up, cin = [], cout
        for i in reversed(range(len(ch_mults))):
            cout = n_channels * ch_mults[i]
            for _ in range(n_blocks + 1):
                up.append(DResAtt(cin + hs.pop(), cout, tch, is_attn[i]))
                cin = cout
            if i > 0:
                up.append(DResResample(cout, tch, up=True) if biggan else DConvResample(cout, up=True))
        self.up = nn.ModuleList(up)
        self.norm, self.final = nn.GroupNorm(8, cout), nn.Conv2d(cout, 3, 3, padding=1)

    def forward(self, x, t, aug=None):
        t = self.time_emb(t, aug)
        x = self.image_proj(x)
        h = [x]
        for m in self.down:
            x = m(x, t)
            h.append(x)
        x = self.middle(x, t)
        for m in self.up:
            x = m(x, t) if not isinstance(m, DResAtt) else m(torch.cat((x, h.pop()), 1), t)
        return self.final(F.silu(self.norm(x)))


def ddae_edm_denoise(unet, x, sigma, sigma_data=0.5, aug=None):
    """ddae model/EDM.py D_x: c_skip·x + c_out·F(c_in·x, ln σ / 4)."""
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data / (s**2 + sigma_data**2).sqrt()
    c_in = 1 / (s**2 + sigma_data**2).sqrt()
    return c_skip * x + c_out * unet(c_in * x, (s.log() / 4).flatten(), aug)


# ------------------------------------------------------------------------------------------------
# U-ViT
# ------------------------------------------------------------------------------------------------


class UAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))


class UMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class UBlock(nn.Module):
    def __init__(self, dim, heads, skip=False):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), UAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), UMlp(dim, 4 * dim)
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], -1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UPatchEmbed(nn.Module):
    def __init__(self, p, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, p, stride=p)


class UViT(nn.Module):
    def __init__(self, img=32, p=2, dim=64, depth=2, heads=2):
        super().__init__()
        self.p, self.dim = p, dim
        self.patch_embed = UPatchEmbed(p, dim)
        self.time_embed = nn.Identity()
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (img // p) ** 2, dim) * 0.02)
        self.in_blocks = nn.ModuleList(UBlock(dim, heads) for _ in range(depth // 2))
        self.mid_block = UBlock(dim, heads)
        self.out_blocks = nn.ModuleList(UBlock(dim, heads, skip=True) for _ in range(depth // 2))
        self.norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, p * p * 3)
        self.final_layer = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, timesteps):
        b, _, hh, ww = x.shape
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        half = self.dim // 2
        f = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        a = timesteps[:, None].float() * f[None]
        x = torch.cat((torch.cat([a.cos(), a.sin()], -1)[:, None], x), 1) + self.pos_embed
        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())
        x = self.decoder_pred(self.norm(x))[:, 1:]
        p, h, w = self.p, hh // self.p, ww // self.p
        x = x.reshape(b, h, w, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, hh, ww)  # (h p1)(w p2), (p1 p2 C)
        return self.final_layer(x)


# ------------------------------------------------------------------------------------------------
# LightningDiT's EVA RoPE tables
# ------------------------------------------------------------------------------------------------


def eva_rope_tables(head_dim: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA-02 VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=grid): freqs_cos / freqs_sin (N, head_dim)."""
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(grid) / grid * grid
    f = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)  # (grid, dim) "(n r)"
    f = torch.cat((f[:, None, :].expand(grid, grid, dim), f[None, :, :].expand(grid, grid, dim)), dim=-1)
    return f.cos().reshape(-1, head_dim), f.sin().reshape(-1, head_dim)


def mae_sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """MAE util/pos_embed.py `get_2d_sincos_pos_embed` as DiT/SiT use it, (1, grid², dim): the first half of
    the channels encodes the column (meshgrid(w, h), "w goes first"), the second the row; each half is
    [sin, cos] over dim/4 frequencies 1/10000^(k/(dim/4))."""
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def one(pos):
        a = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([a.sin(), a.cos()], dim=1)

    return torch.cat([one(cols), one(rows)], dim=1).float()[None]


def _linear(sd: dict[str, torch.Tensor], h: torch.Tensor, name: str) -> torch.Tensor:
    return F.linear(h, sd[name + ".weight"], sd[name + ".bias"])


def _modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return h * (1 + scale[:, None]) + shift[:, None]


def _dit_embed(sd: dict[str, torch.Tensor], x, t, y, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What DiT and LightningDiT share before their blocks: patch conv + pos_embed tokens, and the
    conditioning c = MLP(256-d [cos, sin] sinusoid of t) + label row."""
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    a = t[:, None].float() * freqs[None]
    temb = torch.cat([a.cos(), a.sin()], -1)
    c = _linear(sd, F.silu(_linear(sd, temb, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    return h + sd["pos_embed"], c + sd["y_embedder.embedding_table.weight"][y]


def dit_forward(sd: dict[str, torch.Tensor], x, t, y, *, heads: int, patch: int = 2) -> torch.Tensor:
    """DiT.forward (DiT models.py; SiT/REPA/SRA the same) computed from its state dict in plain torch:
    patch conv + pos_embed; c = MLP(256-d [cos, sin] sinusoid of t) + label row; adaLN-Zero blocks with
    LayerNorm(no affine, eps 1e-6), softmax attention, tanh-GELU MLP; final adaLN + linear; unpatchify."""
    b, c, hh, ww = x.shape
    width = sd["x_embedder.proj.bias"].shape[0]
    hd = width // heads

    def lin(h, name):
        return F.linear(h, sd[name + ".weight"], sd[name + ".bias"])

    def ln(h):
        return F.layer_norm(h, (width,), eps=1e-6)

    mod = _modulate

    h, cvec = _dit_embed(sd, x, t, y, patch)
    i = 0
    while f"blocks.{i}.attn.qkv.weight" in sd:
        p = f"blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = lin(F.silu(cvec), p + "adaLN_modulation.1").chunk(6, dim=1)
        z = mod(ln(h), sh1, sc1)
        n = z.shape[1]
        q, k, v = lin(z, p + "attn.qkv").reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * hd**-0.5).softmax(-1) @ v
        h = h + g1[:, None] * lin(att.transpose(1, 2).reshape(b, n, width), p + "attn.proj")
        z = mod(ln(h), sh2, sc2)
        h = h + g2[:, None] * lin(F.gelu(lin(z, p + "mlp.fc1"), approximate="tanh"), p + "mlp.fc2")
        i += 1
    shift, scale = lin(F.silu(cvec), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = lin(mod(ln(h), shift, scale), "final_layer.linear")
    co = h.shape[-1] // (patch * patch)
    gh, gw = hh // patch, ww // patch
    h = h.reshape(b, gh, gw, patch, patch, co)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(b, co, gh * patch, gw * patch)


def lightningdit_forward(sd: dict[str, torch.Tensor], x, t, y, *, heads: int, patch: int = 1) -> torch.Tensor:
    """LightningDiT.forward (models/lightningdit.py) computed from its state dict: SwiGLU, RMSNorm, EVA RoPE."""
    b, c, hh, ww = x.shape
    width = sd["x_embedder.proj.bias"].shape[0]
    hd = width // heads

    def lin(h, name):
        return F.linear(h, sd[name + ".weight"], sd[name + ".bias"])

    def rms(h, w):  # models/rmsnorm.py: float32 statistics, eps 1e-6, learnable weight
        hf = h.float()
        return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(h) * w

    def rotate_half(q):  # EVA: "... (d r) -> ... d r", (-x2, x1)
        q = q.reshape(*q.shape[:-1], -1, 2)
        return torch.stack((-q[..., 1], q[..., 0]), -1).flatten(-2)

    mod = _modulate

    h, cvec = _dit_embed(sd, x, t, y, patch)
    cos, sin = sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"]
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = f"blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = lin(F.silu(cvec), p + "adaLN_modulation.1").chunk(6, dim=1)
        z = mod(rms(h, sd[p + "norm1.weight"]), sh1, sc1)
        n = z.shape[1]
        q, k, v = lin(z, p + "attn.qkv").reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        att = ((q @ k.transpose(-2, -1)) * hd**-0.5).softmax(-1) @ v
        h = h + g1[:, None] * lin(att.transpose(1, 2).reshape(b, n, width), p + "attn.proj")
        z = mod(rms(h, sd[p + "norm2.weight"]), sh2, sc2)
        x1, x2 = lin(z, p + "mlp.w12").chunk(2, dim=-1)
        h = h + g2[:, None] * lin(F.silu(x1) * x2, p + "mlp.w3")
        i += 1
    shift, scale = lin(F.silu(cvec), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = lin(mod(rms(h, sd["final_layer.norm_final.weight"]), shift, scale), "final_layer.linear")
    gh, gw = hh // patch, ww // patch
    h = h.reshape(b, gh, gw, patch, patch, c)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(b, c, gh * patch, gw * patch)
