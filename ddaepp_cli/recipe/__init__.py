"""Recipes: YAML → typed, frozen dataclasses. `schema` holds every section and default; `load` reads YAML
(with `base:` chains and `--set` overrides) into it and writes it back."""

from .load import (apply_overrides, build_section, diff_recipes, load_raw, load_recipe, parse_override, read_yaml,
                   recipe_from_dict, recipe_to_dict, recipe_to_yaml, replace, shipped_recipes_dir)
from .schema import (AugmentConfig, ContrastiveConfig, DDPMConfig, DIFFUSION_SCHEMAS, DIT_CONFIGS, DataConfig,
                     DiTConfig, DiTOrigConfig, EDMConfig, EMAConfig, MODEL_SCHEMAS, NAME_RE, PROBE_TIMES, RFConfig,
                     Recipe, SRAConfig, SampleConfig, SelfCondConfig, TAGGED, TrainConfig, UNetConfig,
                     UNetPPConfig, UViTConfig, UViTSelfCondConfig)

__all__ = ["apply_overrides", "build_section", "diff_recipes", "load_raw", "load_recipe", "parse_override",
           "read_yaml", "recipe_from_dict", "recipe_to_dict", "recipe_to_yaml", "replace", "shipped_recipes_dir",
           "AugmentConfig", "ContrastiveConfig", "DDPMConfig", "DIFFUSION_SCHEMAS", "DIT_CONFIGS", "DataConfig",
           "DiTConfig", "DiTOrigConfig", "EDMConfig", "EMAConfig", "MODEL_SCHEMAS", "NAME_RE", "PROBE_TIMES",
           "RFConfig", "Recipe", "SRAConfig", "SampleConfig", "SelfCondConfig", "TAGGED", "TrainConfig",
           "UNetConfig", "UNetPPConfig", "UViTConfig", "UViTSelfCondConfig"]
