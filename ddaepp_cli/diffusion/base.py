"""The shared shape of every formulation (DDAE++ App. A): x_t = α(t)·x0 + σ(t)·ε, t = 0 is data.

All times are in the paper's convention (DDAE++ App. A; docs/design.md §1): DDPM's integer step t ∈ {0..T},
EDM's noise level σ, RF's t ∈ [0, 1]; larger t is noisier. What the network embeds is
`net_time(t)`, never t itself. Samplers (samplers.py) see only `alpha`, `sigma`, their time
derivatives, `time_grid` and a denoiser that returns a `Prediction`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..errors import UsageError, choices


@dataclass
class Prediction:
    """What every sampler consumes; `x_t = alpha(t)·x0 + sigma(t)·eps` holds for the x_t it came from."""

    x0: Tensor  # x̂0, the denoised estimate (clipped to [-1, 1] when asked)
    eps: Tensor  # ε̂, consistent with x0
    # Learned variance (improved DDPM / DiT, learned_var.py): frac = (v + 1)/2 of the network's variance
    # channels; the ancestral sampler sets log σ² = frac·log β + (1 − frac)·log β̃ of its step. None: fixed.
    var_frac: Tensor | None = None


@dataclass
class LossOutput:
    """One training step's diffusion loss, per sample, with the taps an auxiliary loss may need."""

    loss: Tensor  # (B,) per-sample loss, averaged over the elements of each sample
    t: Tensor  # (B,) paper time of each sample
    features: dict[str, Tensor] = field(default_factory=dict)  # filled only when feature_layers given


Denoiser = Callable[[Tensor, Tensor], Prediction]  # (x_t (B, ...), t (B,)) -> Prediction


def expand_like(v: Tensor | float, x: Tensor) -> Tensor:
    """A per-sample value (B,) or a scalar → (B, 1, 1, ...) in x's dtype and device, to broadcast against x."""
    v = torch.as_tensor(v, device=x.device)
    if v.ndim == 0:
        return v.to(x.dtype)
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class Formulation:
    """Noise schedule, preconditioning, training target and sampling grids of one formulation.

    Subclasses set the class attributes and implement the methods that raise NotImplementedError.
    """

    name: str
    samplers: tuple[str, ...]  # valid sampler names, first = default
    default_steps: dict[str, int | None]  # per sampler; None = adaptive (rk45)
    clip_x0: bool  # samplers clip x̂0 to [-1, 1] by default (DDAE does for pixel DDPM and EDM)

    # ------------------------------------------------------------------ the forward process

    def alpha(self, t: Tensor | float) -> Tensor:
        """Data coefficient α(t) of x_t = α·x0 + σ·ε."""
        raise NotImplementedError

    def sigma(self, t: Tensor | float) -> Tensor:
        """Noise coefficient σ(t) of x_t = α·x0 + σ·ε."""
        raise NotImplementedError

    def alpha_dot(self, t: Tensor | float) -> Tensor | float:
        """dα/dt, for the probability-flow ODE; discrete formulations have none."""
        raise UsageError(f"{self.name} has discrete time: ODE samplers do not apply")

    def sigma_dot(self, t: Tensor | float) -> Tensor | float:
        """dσ/dt, for the probability-flow ODE; discrete formulations have none."""
        raise UsageError(f"{self.name} has discrete time: ODE samplers do not apply")

    def sample_time(self, n: int, *, device: torch.device | str = "cpu", generator=None) -> Tensor:
        """(n,) training times drawn from the formulation's time distribution."""
        raise NotImplementedError

    def perturb(self, x0: Tensor, t: Tensor | float, noise: Tensor) -> Tensor:
        """x_t = α(t)·x0 + σ(t)·ε."""
        t = self._time(t, x0)
        return expand_like(self.alpha(t), x0) * x0 + expand_like(self.sigma(t), x0) * noise

    def net_time(self, t: Tensor) -> Tensor:
        """The value the network's time embedding receives (docs/design.md §1)."""
        raise NotImplementedError

    def net_input_scale(self, t: Tensor) -> Tensor | float:
        """Factor applied to x_t before it enters the network (EDM's c_in; 1 elsewhere)."""
        return 1.0

    # ------------------------------------------------------------------ training

    def loss(
        self,
        net,
        x0: Tensor,
        *,
        aug_label: Tensor | None = None,
        class_labels: Tensor | None = None,
        feature_layers: Sequence[str] = (),
        t: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> LossOutput:
        """Per-sample diffusion loss; t and noise come from the global torch RNG unless given."""
        t = self.sample_time(x0.shape[0], device=x0.device) if t is None else self._time(t, x0)
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.perturb(x0, t, noise)
        out, features = self._forward(net, x_t, t, feature_layers, aug_label, class_labels)
        per_element = self._loss_elements(out.to(x_t.dtype), x0, x_t, noise, t)  # (B, C, H, W)
        return LossOutput(per_element.flatten(1).mean(1), t, features)

    def _loss_elements(self, out: Tensor, x0: Tensor, x_t: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Element-wise weighted squared error between the network output and its target."""
        raise NotImplementedError

    # ------------------------------------------------------------------ inference

    def predict(
        self,
        net,
        x_t: Tensor,
        t: Tensor | float,
        *,
        clip: bool = False,
        aug_label: Tensor | None = None,
        class_labels: Tensor | None = None,
    ) -> Prediction:
        """Run the network once and express its output as (x̂0, ε̂)."""
        t = self._time(t, x_t)
        out, _ = self._forward(net, x_t, t, (), aug_label, class_labels)
        pred = self._prediction(out.to(x_t.dtype), x_t, t)
        return self.clip_prediction(pred, x_t, t) if clip else pred

    def _prediction(self, out: Tensor, x_t: Tensor, t: Tensor) -> Prediction:
        """Raw network output → (x̂0, ε̂)."""
        raise NotImplementedError

    def clip_prediction(self, pred: Prediction, x_t: Tensor, t: Tensor | float) -> Prediction:
        """Clip x̂0 to [-1, 1] and recompute ε̂ from it (ddae:model/DDPM.py, EDM.py `pred_eps_`)."""
        t = self._time(t, x_t)
        x0 = pred.x0.clamp(-1.0, 1.0)
        a, s = expand_like(self.alpha(t), x_t), expand_like(self.sigma(t), x_t)
        # at σ = 0 (RF's last ODE evaluation) x_t is x0 and ε̂ cannot be recomputed: keep it
        eps = torch.where(s > 0, (x_t - a * x0) / torch.where(s > 0, s, torch.ones_like(s)), pred.eps)
        return Prediction(x0=x0, eps=eps, var_frac=pred.var_frac)

    def denoiser(self, net, *, clip: bool = False, **cond) -> Denoiser:
        """The closure samplers take: (x_t, t) -> Prediction, with conditioning bound."""

        def denoise(x_t: Tensor, t: Tensor) -> Prediction:
            return self.predict(net, x_t, t, clip=clip, **cond)

        return denoise

    def drift(self, pred: Prediction, t: Tensor | float) -> Tensor:
        """Probability-flow ODE velocity dx/dt = α'(t)·x̂0 + σ'(t)·ε̂ (EDM: (x − D)/σ; RF: v)."""
        x = pred.x0
        return expand_like(self.alpha_dot(t), x) * pred.x0 + expand_like(self.sigma_dot(t), x) * pred.eps

    def prior_scale(self) -> float:
        """x_T = prior_scale · N(0, I)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ grids and CLI times

    def check_sampler(self, sampler: str) -> None:
        if sampler not in self.samplers:
            raise UsageError(f"sampler '{sampler}' does not apply to {self.name}; valid: {choices(self.samplers)}")

    def time_grid(self, sampler: str, steps: int | None = None, *, shift: float | None = None) -> Tensor:
        """Descending float64 paper-time grid ending at data; len(grid) − 1 solver steps.

        For rk45 the grid is (start, stop) or (start, stop, 0): integrate start→stop, then one
        Euler step to 0 when stop > 0.
        """
        self.check_sampler(sampler)
        steps = self.default_steps[sampler] if steps is None else steps
        if sampler == "rk45":
            if steps is not None:
                raise UsageError("rk45 is adaptive: it takes no step count (leave --steps out)")
        elif isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise UsageError(f"steps must be a positive integer, got {steps}")
        if shift is not None and shift != 1.0 and not self._takes_shift:
            raise UsageError(f"timestep shift applies to rf only, not {self.name}")
        return self._grid(sampler, None if steps is None else int(steps), shift)

    _takes_shift = False

    def _grid(self, sampler: str, steps: int | None, shift: float | None) -> Tensor:
        raise NotImplementedError

    def parse_time(self, text: str) -> float:
        """A time value from the command line → paper time; UsageError outside the schedule."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers

    def _time(self, t: Tensor | float, x: Tensor) -> Tensor:
        """t as a (B,) tensor on x's device (a scalar is repeated over the batch)."""
        t = torch.as_tensor(t, device=x.device)
        return t.expand(x.shape[0]) if t.ndim == 0 else t

    def _forward(self, net, x_t, t, feature_layers, aug_label, class_labels) -> tuple[Tensor, dict]:
        """One network call on the scaled input; the taps only when feature layers are asked for."""
        scale = self.net_input_scale(t)
        x_in = x_t if isinstance(scale, float) and scale == 1.0 else expand_like(scale, x_t) * x_t
        if x_in.dtype == torch.float64:  # samplers may keep a float64 state; networks run in float32
            x_in = x_in.float()
        t_net = self.net_time(t)
        if feature_layers:
            return net.forward_with_features(
                x_in, t_net, tuple(feature_layers), aug_label=aug_label, class_labels=class_labels
            )
        return net(x_in, t_net, aug_label=aug_label, class_labels=class_labels), {}
