"""EDM's non-leaky geometric augmentation (Karras et al. 2022, App. F.2; edm:training/augment.py
`AugmentPipe`, geometric subset; DDAE++ §4.2; settings of NVlabs/edm `train.py` and FutureXiang/ddae `model/EDM.py`).

Each image is x-flipped, y-flipped, isotropically scaled, rotated, anisotropically scaled and
fractionally translated, each transform applied with probability multiplier × p (p = 0.12; x-flip's
multiplier 1e8 makes it "always considered", hence 50 % flipped). The geometric part is one inverse
3×3 matrix per image, executed alias-free: reflect-pad, 2× upsample with the sym6 wavelet low-pass,
bilinear `grid_sample`, 2× downsample with the same filter, crop. The 9-d label conditions the network
(UNet augmentation input, UViT augmentation token); a zero label means "no augmentation", which is what
sampling and probing feed, so the augmentations never leak into generated images.

Label layout (one row per image; a transform that was not applied contributes zeros):

    0 x-flip bit   1 y-flip bit   2 isotropic log2-scale / 0.2   3 cos θ − 1   4 sin θ (rotation θ)
    5 w·cos r   6 w·sin r (anisotropic log2-scale / 0.2 along an axis rotated by r)
    7 tx   8 ty (fractional translation / (0.125 · size))

Randomness: `draw(n, generator=...)` draws every per-image parameter for a whole (global) batch from
the passed generator in one fixed order; `params[lo:hi]` gives a rank its slice, and `pipe(x, params)`
applies them — batched, no per-image Python loop. The reflect-pad margin is computed once from the
whole drawn batch (like EDM, but over the global batch), so an image's result never depends on how
the batch is split over processes. It is the only host sync of the pipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UsageError

LABEL_DIM = 9

# Daubechies symlet-6 low-pass decomposition filter (edm:training/augment.py `wavelets['sym6']`).
SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)  # fmt: skip
_HZ_PAD = len(SYM6) // 4  # EDM: extra border (3 px) kept for the filters


# ------------------------------------------------------------------------------------------------
# 3×3 homogeneous matrices, batched: (N,) parameters → (N, 3, 3)
# ------------------------------------------------------------------------------------------------


def _matrix(rows: list[list[Tensor | float]], like: Tensor) -> Tensor:
    elems = [e if isinstance(e, Tensor) else torch.full_like(like, float(e)) for row in rows for e in row]
    return torch.stack(elems, dim=-1).reshape(*like.shape, 3, 3)


def translate2d(tx, ty, like: Tensor) -> Tensor:
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], like)


def scale2d(sx, sy, like: Tensor) -> Tensor:
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], like)


def rotate2d(theta: Tensor, like: Tensor) -> Tensor:
    c, s = theta.cos(), theta.sin()
    return _matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], like)


# ------------------------------------------------------------------------------------------------
# Parameters and the pipe
# ------------------------------------------------------------------------------------------------


@dataclass
class AugParams:
    """Per-image augmentation parameters of a drawn batch; slice with `params[lo:hi]`."""

    xflip: Tensor  # (N,) bool
    yflip: Tensor  # (N,) bool
    g_inv: Tensor  # (N, 3, 3) output → input pixel coordinates, origin at the image centre
    label: Tensor  # (N, 9) float32, layout in the module docstring
    margin: tuple[int, int, int, int] | None  # reflect pad (x0, y0, x1, y1) for the whole drawn batch

    def __getitem__(self, sl: slice) -> "AugParams":
        return replace(self, xflip=self.xflip[sl], yflip=self.yflip[sl], g_inv=self.g_inv[sl], label=self.label[sl])

    def __len__(self) -> int:
        return self.label.shape[0]


class AugmentPipe:
    """EDM `AugmentPipe(p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)`.

    Multipliers and spreads keep EDM's names and defaults (edm:train.py `--augment=0.12`). A multiplier
    of 0 disables its transform (its label entries stay 0); the label is always 9-d.
    """

    def __init__(self, p: float = 0.12, *, xflip: float = 1e8, yflip: float = 1.0, scale: float = 1.0,
                 rotate_frac: float = 1.0, aniso: float = 1.0, translate_frac: float = 1.0,
                 scale_std: float = 0.2, rotate_frac_max: float = 1.0, aniso_std: float = 0.2,
                 aniso_rotate_prob: float = 0.5, translate_frac_std: float = 0.125):
        values = dict(p=p, xflip=xflip, yflip=yflip, scale=scale, rotate_frac=rotate_frac, aniso=aniso,
                      translate_frac=translate_frac, scale_std=scale_std, rotate_frac_max=rotate_frac_max,
                      aniso_std=aniso_std, aniso_rotate_prob=aniso_rotate_prob,
                      translate_frac_std=translate_frac_std)
        for key, v in values.items():
            if not (math.isfinite(v) and v >= 0):
                raise UsageError(f"augment.{key} must be a finite number >= 0, got {v}")
        self.__dict__.update({k: float(v) for k, v in values.items()})
        self.geometric = any(getattr(self, k) > 0 for k in ("scale", "rotate_frac", "aniso", "translate_frac"))

    def draw(self, n: int, *, size: tuple[int, int], generator: torch.Generator | None = None,
             device: torch.device | str = "cpu") -> AugParams:
        """Parameters for `n` images of `size` (H, W); draws in EDM's order, all from `generator`."""
        H, W = size
        kw = dict(device=device, generator=generator)
        p = self.p
        zero = torch.zeros(n, device=device)

        def gate(mult: float, shape=(n,)) -> Tensor:  # apply with probability mult·p (EDM's gate)
            return torch.rand(shape, **kw) < mult * p

        # Pixel blits: a random bit, kept when the gate opens.
        xflip = (torch.randint(2, (n,), **kw) == 1) & gate(self.xflip)
        yflip = (torch.randint(2, (n,), **kw) == 1) & gate(self.yflip)
        # Isotropic scale 2^(0.2·w), w ~ N(0, 1).
        w = torch.randn(n, **kw)
        w_scale = torch.where(gate(self.scale), w, zero)
        # Rotation θ ~ U(−π, π)·rotate_frac_max.
        w = (torch.rand(n, **kw) * 2 - 1) * (math.pi * self.rotate_frac_max)
        theta = torch.where(gate(self.rotate_frac), w, zero)
        # Anisotropic scale 2^(±0.2·w) along an axis rotated by r (r ≠ 0 with probability 0.5).
        w = torch.randn(n, **kw)
        r = (torch.rand(n, **kw) * 2 - 1) * math.pi
        w_aniso = torch.where(gate(self.aniso), w, zero)
        r = torch.where(torch.rand(n, **kw) < self.aniso_rotate_prob, r, zero)
        # Fractional translation by w·0.125·(W, H) pixels, one gate for both axes.
        w = torch.randn(2, n, **kw)
        w_trans = torch.where(gate(self.translate_frac, (1, n)), w, torch.zeros_like(w))

        like = zero
        s = torch.exp2(w_scale * self.scale_std)
        sa = torch.exp2(w_aniso * self.aniso_std)
        g_inv = scale2d(1 / s, 1 / s, like)  # scale2d_inv(s, s)
        g_inv = g_inv @ rotate2d(theta, like)  # rotate2d_inv(−θ)
        g_inv = g_inv @ rotate2d(-r, like) @ scale2d(1 / sa, sa, like) @ rotate2d(r, like)  # aniso about r
        g_inv = g_inv @ translate2d(-w_trans[0] * (W * self.translate_frac_std),
                                    -w_trans[1] * (H * self.translate_frac_std), like)
        label = torch.stack([xflip.float(), yflip.float(), w_scale, theta.cos() - 1, theta.sin(),
                             w_aniso * r.cos(), w_aniso * r.sin(), w_trans[0], w_trans[1]], dim=1)  # (n, 9)
        margin = self._margin(g_inv, H, W) if self.geometric and n > 0 else None
        return AugParams(xflip=xflip, yflip=yflip, g_inv=g_inv, label=label, margin=margin)

    @staticmethod
    def _margin(g_inv: Tensor, H: int, W: int) -> tuple[int, int, int, int]:
        """Reflect-pad widths that contain every transformed corner plus the filter border (EDM)."""
        cx, cy = (W - 1) / 2, (H - 1) / 2
        corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], dtype=g_inv.dtype,
                               device=g_inv.device)
        cp = g_inv @ corners.t()  # (N, 3, 4)
        xy = cp[:, :2, :].permute(1, 0, 2).flatten(1)  # (2, N·4)
        m = torch.cat([-xy, xy]).amax(dim=1)  # (4,) x0, y0, x1, y1
        m = m + torch.tensor([_HZ_PAD * 2 - cx, _HZ_PAD * 2 - cy] * 2, device=m.device)
        m = m.clamp(min=0).minimum(torch.tensor([W - 1, H - 1] * 2, device=m.device, dtype=m.dtype))
        x0, y0, x1, y1 = (int(v) for v in m.ceil().tolist())  # host sync: pad widths are Python ints
        return x0, y0, x1, y1

    def __call__(self, images: Tensor, params: AugParams) -> Tensor:
        """Augmented images, same shape and dtype; `params` must have one row per image."""
        with torch.autocast(images.device.type, enabled=False):  # resampling stays in float32 under AMP
            return self._apply(images, params)

    def _apply(self, images: Tensor, params: AugParams) -> Tensor:
        N, C, H, W = images.shape
        if len(params) != N:
            raise ValueError(f"{len(params)} parameter rows for {N} images")
        images = torch.where(params.xflip[:, None, None, None], images.flip(3), images)
        images = torch.where(params.yflip[:, None, None, None], images.flip(2), images)
        if params.margin is None:
            return images
        dtype = images.dtype
        x = images.to(torch.promote_types(dtype, torch.float32))  # resample in ≥ float32
        g = params.g_inv.to(x.dtype)
        like = g[:, 0, 0]
        x0, y0, x1, y1 = params.margin
        x = F.pad(x, [x0, x1, y0, y1], mode="reflect")  # (N, C, H + y0 + y1, W + x0 + x1)
        g = translate2d((x0 - x1) / 2, (y0 - y1) / 2, like) @ g  # the padded image's centre moved

        # 2× upsample: zero insertion + separable sym6 (reversed) low-pass.
        hz = torch.tensor(SYM6, dtype=x.dtype, device=x.device)
        up = hz.flip(0)[None, None].tile(C, 1, 1)  # (C, 1, 12)
        pad = (len(SYM6) + 1) // 2
        x = torch.stack([x, torch.zeros_like(x)], dim=4).reshape(N, C, x.shape[2], -1)[:, :, :, :-1]
        x = F.conv2d(x, up.unsqueeze(2), groups=C, padding=[0, pad])  # (N, C, H', 2W')
        x = torch.stack([x, torch.zeros_like(x)], dim=3).reshape(N, C, -1, x.shape[3])[:, :, :-1, :]
        x = F.conv2d(x, up.unsqueeze(3), groups=C, padding=[pad, 0])  # (N, C, 2H', 2W')
        g = scale2d(2, 2, like) @ g @ scale2d(0.5, 0.5, like)
        g = translate2d(-0.5, -0.5, like) @ g @ translate2d(0.5, 0.5, like)

        # Resample at the output grid (normalised coordinates on both sides, align_corners=False).
        out_shape = [N, C, (H + _HZ_PAD * 2) * 2, (W + _HZ_PAD * 2) * 2]
        g = scale2d(2 / x.shape[3], 2 / x.shape[2], like) @ g @ scale2d(out_shape[3] / 2, out_shape[2] / 2, like)
        grid = F.affine_grid(g[:, :2, :], out_shape, align_corners=False)  # (N, H_o, W_o, 2)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

        # 2× downsample with the same filter, then crop the filter border.
        down = hz[None, None].tile(C, 1, 1)  # (C, 1, 12)
        pad = (len(SYM6) - 1) // 2
        x = F.conv2d(x, down.unsqueeze(2), groups=C, stride=[1, 2], padding=[0, pad])[:, :, :, _HZ_PAD:-_HZ_PAD]
        x = F.conv2d(x, down.unsqueeze(3), groups=C, stride=[2, 1], padding=[pad, 0])[:, :, _HZ_PAD:-_HZ_PAD, :]
        return x.to(dtype)  # (N, C, H, W)
