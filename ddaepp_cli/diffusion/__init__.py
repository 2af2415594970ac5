"""Diffusion formulations (DDAE++ App. A) and their samplers; every time is in paper convention, t = 0 is data."""

from __future__ import annotations

from ..errors import UsageError, choices
from .base import Denoiser, Formulation, LossOutput, Prediction
from .ddpm import DDPM
from .edm import EDM
from .rf import RF, shift_time
from .samplers import SAMPLERS, prior_sample, sample

FORMULATIONS: dict[str, type[Formulation]] = {"ddpm": DDPM, "edm": EDM, "rf": RF}


def build_formulation(name: str, **kwargs) -> Formulation:
    """`build_formulation("rf", shift=3.3)`; an unknown name is a UsageError listing the valid ones."""
    if name not in FORMULATIONS:
        raise UsageError(f"unknown formulation '{name}'; valid: {choices(FORMULATIONS)}")
    return FORMULATIONS[name](**kwargs)


__all__ = [
    "DDPM",
    "EDM",
    "FORMULATIONS",
    "RF",
    "SAMPLERS",
    "Denoiser",
    "Formulation",
    "LossOutput",
    "Prediction",
    "build_formulation",
    "prior_sample",
    "sample",
    "shift_time",
]
