"""The benchmarked backbones at paper size, each as its recipe (the source of truth for sizes, layers,
formulation and optimiser), plus the `--quick` shrink applied as recipe overrides.

    ddpm      DDAE UNet, 35.7M, CIFAR 32×32×3          recipes/cifar10_edm_ddpm[_sc].yaml     self-cond out_7
    ddpmpp    simplified DDPM++, 56.5M, 32×32×3        recipes/cifar10_edm_ddpmpp[_sc].yaml   self-cond out_9
    uvit      UViT-S, 44.3M, 32×32×3                   recipes/cifar10_ddpm_uvit[_sc].yaml    self-cond [CLS]
    dit-B/1   LightningDiT-B/1, 129.8M, 16×16×32 latents recipes/imagenet256_rf_ditb[_sc].yaml self-cond block 9
    dit-L/1   LightningDiT-L/1, 457.1M (opt-in on CPU)  recipes/imagenet256_rf_ditl[_sc].yaml self-cond block 17
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

_QUICK_UNET = ["model.channels=32", "model.ch_mults=[1,2]", "model.n_blocks=1", "model.attn_resolutions=[16]"]
_QUICK_UVIT = ["model.width=64", "model.depth=2", "model.heads=2", "model.patch_size=4", "model.cls_tap=out_1"]
_QUICK_DIT = ["model.width=64", "model.depth=4", "model.heads=2", "data.image_size=8"]


@dataclass(frozen=True)
class Spec:
    key: str  # row label
    recipe: str  # baseline recipe (recipes/<name>.yaml)
    sc_recipe: str  # the same with DDAE++ self-conditioning
    tap: str  # the self-conditioning layer: the feature-tap variant reads it from the baseline
    quick: tuple[str, ...]  # --quick: recipe overrides that shrink the network
    quick_tap: str
    quick_sc: tuple[str, ...]  # --quick: overrides of the self-conditioned recipe (its layer must exist)

    def overrides(self, quick: bool, selfcond: bool = False) -> list[str]:
        if not quick:
            return []
        return [*self.quick, *(self.quick_sc if selfcond else ())]

    def tap_layer(self, quick: bool) -> str:
        return self.quick_tap if quick else self.tap


SPECS: dict[str, Spec] = {s.key: s for s in (
    Spec("ddpm", "cifar10_edm_ddpm", "cifar10_edm_ddpm_sc", "out_7", tuple(_QUICK_UNET), "out_2",
         ("model.selfcond.layer=out_2",)),
    Spec("ddpmpp", "cifar10_edm_ddpmpp", "cifar10_edm_ddpmpp_sc", "out_9", tuple(_QUICK_UNET), "out_2",
         ("model.selfcond.layer=out_2",)),
    # UViT self-conditions through a [CLS] token; the baseline has no `cls` tap, so the tap variant reads
    # the block whose [CLS] the paper probes (out_2, DDAE++ Tab. 9).
    Spec("uvit", "cifar10_ddpm_uvit", "cifar10_ddpm_uvit_sc", "out_2", tuple(_QUICK_UVIT), "out_1", ()),
    Spec("dit-B/1", "imagenet256_rf_ditb", "imagenet256_rf_ditb_sc", "9", tuple(_QUICK_DIT), "2",
         ("model.selfcond.layer=2",)),
    Spec("dit-L/1", "imagenet256_rf_ditl", "imagenet256_rf_ditl_sc", "17", tuple(_QUICK_DIT), "2",
         ("model.selfcond.layer=2",)),
)}
UNETS = ("ddpm", "ddpmpp")


def load(name: str, overrides: list[str] | tuple[str, ...] = ()):
    """recipes/<name>.yaml with `--set`-style overrides."""
    from ddaepp_cli.recipe import load_recipe

    return load_recipe(RECIPES / f"{name}.yaml", list(overrides))
