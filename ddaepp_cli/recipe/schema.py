"""The recipe schema: typed, frozen dataclasses, one per section. Every default lives in this file, and
`Recipe.__post_init__` rejects impossible combinations.

A recipe may start from another (`base: other.yaml`, resolved relative to the file, else a shipped
recipe of that name: `base: cifar10_edm_ddpmpp`) and override
keys; `--set a.b=c` overrides are applied last, their values parsed as YAML (`--set
train.lr=2e-4`, `--set model.selfcond.layer=out_7`, `--set train.betas=[0.9,0.95]`).

Two sections are tagged unions: `model` is typed by `model.backbone` and `diffusion` by
`diffusion.formulation`; each tag selects its own dataclass, so `--set diffusion.p_mean=-1`
on a DDPM recipe is an unknown key, not a silently ignored one.

Errors name the key path and the valid choices and exit 2 (`UsageError`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ..errors import UsageError


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Training data. `digits` ships with scikit-learn and needs no download."""

    dataset: Literal["digits", "cifar10", "cifar100", "imagefolder", "latents"] = "cifar10"
    root: Optional[str] = None  # None: $DDAEPP_DATA, else ./data; latents: the `cache-latents --out` folder
    image_size: Optional[int] = None  # None: the dataset's native size (digits: 16; latents: the manifest's)
    # latents only, when no manifest is at hand (`--dry-run` offline): 32×16×16 VA-VAE f16d32 latents of
    # ImageNet-1k's 1,281,167 training images (DDAE++ §5.2); SD-VAE latents are 4×32×32.
    latent_channels: int = 32
    # latents only: None = normalise each channel by the cache's mean/std (LightningDiT); a number = multiply
    # by it with no shift (DiT/SiT/SRA scale SD-VAE latents by 0.18215: `latents_scale`, bias 0).
    latent_scale: Optional[float] = None
    # latents only: `fixed` trains on the cache's one posterior sample per image (LightningDiT, DDAE++);
    # `per_step` draws a fresh sample mean + std·ε at every step from a `cache-latents --moments` cache
    # (SRA/REPA `sample_posterior`), ε from each image's own generator keyed by (train.seed, step).
    latent_posterior: Literal["fixed", "per_step"] = "fixed"
    # latents only: the VAE weights file used to decode samples (`ddaepp sample`). None: the file recorded
    # in the cache's manifest if it still exists, else $DDAEPP_CACHE/weights/<its file name> (latents.py).
    vae: Optional[str] = None
    hflip: bool = True  # random horizontal flip, batched on the device
    download: bool = False  # fetch CIFAR with torchvision when online
    num_workers: int = 4  # decoding workers for image folders (in-memory sets need none)


@dataclass(frozen=True)
class SelfCondConfig:
    """DDAE++ §4.1: pooled layer feature → Linear → × s(t) → added to later blocks' embedding."""

    layer: Optional[str] = None  # None: no self-conditioning; e.g. out_9 (Tab. 9)
    mode: Literal["adaptive", "addition"] = "adaptive"  # Tab. 6a ablation: "addition" drops s(t)


@dataclass(frozen=True)
class UNetConfig:
    """DDAE UNet (FutureXiang/ddae `model/unet.py`). Defaults are the `ddpm` network (35,746,307 params)."""

    backbone: Literal["ddpm", "ddpmpp"] = "ddpm"
    channels: int = 128
    ch_mults: tuple[int, ...] = (1, 2, 2, 2)
    n_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resample: Literal["conv", "biggan"] = "conv"
    dropout: float = 0.1  # DDAE++ Tab. 7: 0.1 (DDPM, RF), 0.13 (EDM)
    augment_dim: int = 0  # 9 with the non-leaky augmentation pipe (EDM)
    selfcond: SelfCondConfig = field(default_factory=SelfCondConfig)


@dataclass(frozen=True)
class UNetPPConfig(UNetConfig):
    """`ddpmpp`: simplified DDPM++ (56,524,291 params; DDAE++ App. B)."""

    backbone: Literal["ddpm", "ddpmpp"] = "ddpmpp"
    ch_mults: tuple[int, ...] = (2, 2, 2)
    n_blocks: int = 4
    resample: Literal["conv", "biggan"] = "biggan"


@dataclass(frozen=True)
class UViTSelfCondConfig:
    """DDAE++ §4.1, Fig. 2a: UViT self-conditions through one extra learnable [CLS] token that attends
    with every token and travels through the long skips (no pooling, projection or scale)."""

    layer: Optional[Literal["cls"]] = None  # "cls": add the [CLS] token (+512 params); its features are the `cls` tap


@dataclass(frozen=True)
class UViTConfig:
    """UViT-S for CIFAR (baofff/U-ViT `configs/cifar10_uvit_small.py`): 44,255,328 params, 13 blocks."""

    backbone: Literal["uvit"] = "uvit"
    patch_size: int = 2
    width: int = 512
    depth: int = 12  # in- plus out-blocks (U-ViT's `depth`); 13 blocks with the middle one
    heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    # The time token is the raw sinusoid of time_scale × the formulation's network time (no MLP);
    # 1000 × DDPM's t/T = the integer step t (U-ViT itself feeds 999·t; docs/design.md §2).
    time_scale: float = 1000.0
    augment_dim: int = 0  # 9 with the non-leaky augmentation pipe: adds the augmentation token
    cls_tap: str = "out_2"  # block whose output [CLS] the `cls` tap returns (Tab. 9 probes UViT-S at out_2)
    mask_cls_aug: bool = True  # DDAE++ Fig. 2b: no direct attention between [CLS] and the aug token
    selfcond: UViTSelfCondConfig = field(default_factory=UViTSelfCondConfig)


@dataclass(frozen=True)
class DiTConfig:
    """LightningDiT for latents (hustvl/LightningDiT `models/lightningdit.py`; DDAE++ Tab. 8). Sizes are presets (nets/dit.py):
    B 768×12 (12 heads), L 1024×24 (16), XL 1152×28 (16); options are LightningDiT's defaults."""

    backbone: Literal["dit"] = "dit"
    size: Literal["B", "L", "XL"] = "B"
    patch_size: int = 1  # DDAE++ Tab. 8: /1 on 16×16 latents (256 tokens)
    width: Optional[int] = None  # None: the size preset's
    depth: Optional[int] = None
    heads: Optional[int] = None
    mlp_ratio: float = 4.0  # SwiGLU hidden int(2/3·4D)
    qk_norm: bool = False  # LightningDiT `use_qknorm: false`
    rope: bool = True  # LightningDiT `use_rope: true`
    num_classes: int = 0  # 0: unconditional (2-row label table, nets/dit.py); 1000: ImageNet class-conditional
    label_dropout: float = 0.1  # CFG label dropout to the null class (LightningDiT class_dropout_prob); conditional only
    selfcond: SelfCondConfig = field(default_factory=SelfCondConfig)  # layer: a block "1".."depth-1" (Tab. 9: 9 for B)

    @property
    def augment_dim(self) -> int:  # DiT takes no augmentation label
        return 0


@dataclass(frozen=True)
class DiTOrigConfig:
    """The original DiT / SiT network (nets/dit_orig.py; DiT:models.py, SiT:models.py) as the SRA paper trains
    it: timm PatchEmbed/Attention/Mlp (tanh-GELU), affine-free LayerNorm + adaLN-Zero, frozen 2-D sin-cos
    positions. Sizes S 384×12 (6 heads), B 768×12 (12), L 1024×24 (16), XL 1152×28 (16); patch 2/4/8."""

    backbone: Literal["dit_orig"] = "dit_orig"
    size: Literal["S", "B", "L", "XL"] = "B"
    patch_size: int = 2  # DiT/SiT-*/2 on 32×32 SD-VAE latents (256 tokens)
    width: Optional[int] = None  # None: the size preset's
    depth: Optional[int] = None
    heads: Optional[int] = None
    mlp_ratio: float = 4.0
    qk_norm: bool = False  # SRA code `--qk-norm` default off
    # DiT's learned Σ (improved DDPM): 2C output channels, ε and the log-variance interpolation v; the
    # loss adds the VLB term (diffusion/learned_var.py). DDPM only; SiT trains without it.
    learn_sigma: bool = False
    num_classes: int = 0  # 1000: ImageNet class-conditional (+1 null row for CFG)
    label_dropout: float = 0.1  # CFG label dropout (DiT `class_dropout_prob`); conditional only
    selfcond: SelfCondConfig = field(default_factory=SelfCondConfig)
    # Time sinusoid frequencies 10000^(−k/(128 − shift)): 0 = DiT's; 1 = diffusers' DiTTransformer2DModel
    # (`downscale_freq_shift=1`), set by `ddaepp import --from diffusers-dit` (docs/import.md)
    time_freq_shift: int = 0

    @property
    def augment_dim(self) -> int:
        return 0


MODEL_SCHEMAS: dict[str, type] = {"ddpm": UNetConfig, "ddpmpp": UNetPPConfig, "uvit": UViTConfig, "dit": DiTConfig,
                                  "dit_orig": DiTOrigConfig}
DIT_CONFIGS = (DiTConfig, DiTOrigConfig)  # transformer backbones with block taps and class labels


@dataclass(frozen=True)
class DDPMConfig:
    """DDPM (Ho et al.): T = 1000, linear β 1e-4…0.02, ε-prediction (FutureXiang/ddae `model/DDPM.py`)."""

    formulation: Literal["ddpm", "edm", "rf"] = "ddpm"
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # DDAE's DDIM sampler uses its own 1001-point β table without the leading zero
    # (FutureXiang/ddae `model/DDPM.py` `schedules(..., 'DDIM')`); true reproduces that quirk, false samples on the training schedule.
    ddae_ddim_quirk: bool = False
    # Step subset of samplers with fewer than T steps: ddae 1 + ⌊kT/steps⌋ (DDAE); iddpm = improved-DDPM /
    # DiT `space_timesteps` (both ends kept), what DiT and DiT-SRA sample 250 steps with.
    respacing: Literal["ddae", "iddpm"] = "ddae"


@dataclass(frozen=True)
class EDMConfig:
    """EDM (Karras et al.): σ_data 0.5, ln σ ~ N(−1.2, 1.2²), EDM weighting (NVlabs/edm `training/loss.py` `EDMLoss`)."""

    formulation: Literal["ddpm", "edm", "rf"] = "edm"
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002  # Heun schedule (EDM Eq. 5)
    sigma_max: float = 80.0
    rho: float = 7.0
    # EDM2's learned uncertainty weighting λ(σ)/e^u(σ)·‖D − y‖² + u(σ) (NVlabs/edm2 `training/training_loop.py` `EDM2Loss`); DDAE++
    # App. B / Tab. 7 use it for EDM with augmentation ("to accelerate convergence"). +128 trainable
    # parameters outside the network, used only in training.
    uncertainty: bool = False


@dataclass(frozen=True)
class RFConfig:
    """Rectified flow: x_t = (1−t)x0 + tε, velocity ε − x0 (DDAE++ App. A). Defaults: pixel RF as the
    official code; latent RF (DDAE++ Tab. 7, hustvl/LightningDiT `transport/`) sets
    `time_sampling: logit_normal, cosine_loss: true, t_max: 1.0, shift: 3.3`."""

    formulation: Literal["ddpm", "edm", "rf"] = "rf"
    time_sampling: Literal["uniform", "logit_normal"] = "uniform"  # logit_normal: t = sigmoid(N(0, 1))
    cosine_loss: bool = False  # LightningDiT's extra 1 − cos(v̂, v) over channels per position
    t_max: Optional[float] = None  # largest training/sampling t; None: pixel RF's 1 − 1e-3 (official RF)
    shift: float = 1.0  # timestep shift of the euler/ddim/heun grids (paper convention; latent: 3.3)
    # "sit": the network takes 1 − t and predicts x0 − ε (LightningDiT / SiT transport), as weights
    # imported from those code bases do (`ddaepp import`); "ddaepp": paper t and ε − x0 (diffusion/rf.py).
    net_convention: Literal["ddaepp", "sit"] = "ddaepp"


DIFFUSION_SCHEMAS: dict[str, type] = {"ddpm": DDPMConfig, "edm": EDMConfig, "rf": RFConfig}


# DDAE++ Tab. 9: the linear-probing time of each formulation, in `parse_time` syntax; contrastive
# self-distillation extracts its targets there (DDAE++ App. B, end of "Feature extraction protocols").
PROBE_TIMES = {"ddpm": "11", "edm": "idx:4", "rf": "0.06"}


@dataclass(frozen=True)
class AugmentConfig:
    """EDM's non-leaky geometric augmentation (DDAE++ §4.2; NVlabs/edm `training/augment.py` `AugmentPipe`).

    Each transform is applied with probability multiplier × p; the 9-d label of what was done
    conditions the network (`model.augment_dim: 9`), and the zero label is what sampling and probing
    feed. Defaults are EDM's CIFAR-10 settings (`--augment=0.12`); the dataset-level horizontal flip
    (`data.hflip`) stays on top, as in DDAE.
    """

    enabled: bool = False
    p: float = 0.12
    xflip: float = 1e8  # "always considered": half the images are x-flipped (and labelled)
    yflip: float = 1.0
    scale: float = 1.0  # isotropic, 2^(scale_std · N(0, 1))
    rotate_frac: float = 1.0  # arbitrary rotation, U(−π, π) · rotate_frac_max
    aniso: float = 1.0  # anisotropic scale 2^(±aniso_std · N(0, 1)) along a random axis
    translate_frac: float = 1.0  # fractional translation, N(0, 1) · translate_frac_std · size
    scale_std: float = 0.2
    rotate_frac_max: float = 1.0
    aniso_std: float = 0.2
    aniso_rotate_prob: float = 0.5
    translate_frac_std: float = 0.125


@dataclass(frozen=True)
class ContrastiveConfig:
    """Contrastive self-distillation (DDAE++ §4.2, App. A): MoCo v3 with the EMA model as teacher.

    L = L_diff + weight · L_MoCo. Needs `augment.enabled` (the two views come from the pipe). The
    paper fixes the feature, the teacher, the time-dependent head, the target time and γ; the heads'
    sizes, τ, batch-norm and which views get the diffusion loss are our choices (MoCo v3's ViT
    defaults) — see ddaepp_cli/losses/contrastive.py.
    """

    enabled: bool = False
    weight: float = 0.01  # γ (Tab. 6d: 0.1 and 0.001 are worse)
    # Tap whose (pooled) features are contrasted. None: the self-conditioning feature — the UNet's
    # model.selfcond.layer, the UViT's `cls` token. Tab. 6e's "pooling of tokens": out_2 (UViT).
    layer: Optional[str] = None
    # Teacher time in `parse_time` syntax (`11`, `idx:4`, `0.06`). None: the Tab. 9 probing time
    # (PROBE_TIMES). Tab. 6c's "minimal noise" (SD-DiT): ddpm 1, edm 0.002, rf 0.
    target_t: Optional[str] = None
    time_dependent: bool = True  # time embedding added before the projector (Tab. 6b; false = MoCo v3's head)
    tau: float = 0.2  # MoCo v3 ViT temperature
    hidden: int = 4096  # MoCo v3 mlp_dim
    dim: int = 256  # MoCo v3 output dim
    proj_layers: int = 3  # MoCo v3 ViT projector depth
    pred_layers: int = 2  # MoCo v3 predictor depth
    norm: Literal["batchnorm", "none"] = "batchnorm"  # MoCo v3's BN in the heads (SyncBN across processes)
    diffusion_views: Literal["both", "first"] = "both"  # which views also get the diffusion loss


@dataclass(frozen=True)
class SRAConfig:
    """SRA self-representation alignment (SRA paper; vvvvvjdy/SRA `SiT-SRA/loss.py`; losses/sra.py): the student's
    block `student_layer` → head (D → 2D → D, SiLU) is pulled towards the EMA teacher's block
    `teacher_layer` at a lower noise t' = clamp(t − interval·u, 0, 1), u ~ U(0, 1) (dynamic interval),
    same noise and labels. L = L_diff + λ(epoch)·L_SRA."""

    enabled: bool = False
    student_layer: str = "3"  # SiT-B: 3 → 8 (SRA paper §4.1 and its SiT-B script)
    teacher_layer: str = "8"
    weight: float = 0.2  # λ: SRA code for SiT with smooth-L1 (2·0.1¹); DiT code: 0.04; cosine: 0.5
    schedule: Literal["constant", "step_decay"] = "constant"  # step_decay: λ·0.1^((epoch − start)/period) after start
    decay_start_epochs: float = 149.0  # SRA code: λ decays ÷10 per 1000 epochs after epoch 149
    decay_period_epochs: float = 1000.0
    loss: Literal["smooth_l1", "cosine"] = "smooth_l1"  # paper: smooth-L1; the code's later default is cosine
    beta: float = 0.05  # smooth-L1 β (SRA paper)
    interval: float = 0.2  # max teacher time gap Δ (SRA `--t-max 0.2`); DDPM: Δ·T steps
    dynamic: bool = True  # t' = t − Δ·u with u ~ U(0, 1); false: the fixed gap t' = t − Δ


@dataclass(frozen=True)
class EMAConfig:
    """EMA of the weights. `warmup: inverse` reproduces lucidrains/ema-pytorch (used by DDAE's `train.py`):
    decay_k = min(decay, 1 − (1 + k/inv_gamma)^(−power)); `none` is a constant decay."""

    decay: float = 0.9999
    warmup: Literal["none", "inverse"] = "none"
    inv_gamma: float = 1.0
    power: float = 2.0 / 3.0


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation. Global batch is kept constant for any process count (accumulation)."""

    epochs: float = 2000
    global_batch: int = 512
    batch_per_process: Optional[int] = None  # micro-batch per forward; None: global/world (no accumulation)
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_epochs: float = 13.0  # linear per-step warm-up over this many epochs
    grad_clip: Optional[float] = 1.0  # None: no clipping (the norm is still logged)
    ema: EMAConfig = field(default_factory=EMAConfig)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # autocast on GPU; CPU runs fp32 unless bf16 is forced
    compile: bool = False  # torch.compile the backbone (for GPUs: on CPU the UNet step measured slower, benchmarks/)
    channels_last: bool = False
    seed: int = 0
    log_every: int = 100  # steps between metrics.jsonl lines
    checkpoint_every: int = 5000  # steps
    keep_last: int = 3  # checkpoints kept, besides milestones
    milestones: tuple[int, ...] = ()  # steps whose checkpoints are never deleted
    sample_every: int = 5000  # steps between fixed-seed sample grids (0: never)
    sample_grid: int = 64  # images in the grid
    max_nonfinite: int = 10  # consecutive non-finite steps before training stops
    # Experiment tracker through Accelerate (training/tracking.py, docs/tracking.md): metrics.jsonl's fields
    # and the sample grids into <run>/tracker/. Not part of the resume check: a resume may add or drop one.
    log_with: Literal["none", "tensorboard", "wandb", "all-installed"] = "none"


@dataclass(frozen=True)
class SampleConfig:
    """Defaults for `ddaepp sample` and the training grid."""

    sampler: Optional[str] = None  # None: the formulation's default (ddpm: ddim, edm: heun, rf: rk45)
    steps: Optional[int] = None  # None: the sampler's paper default (DDIM 100, Heun 18, …)
    clip_x0: Optional[bool] = None  # clip x̂0 to [−1, 1] in the sampler; None: pixel DDPM/EDM on (DDAE), RF and every latent run off
    batch_size: int = 256
    # Classifier-free guidance (class-conditional models; diffusion/cfg.py): out = u + w·(c − u) for paper
    # t inside cfg_interval, the conditional output alone outside. 1.0 = no guidance (one forward).
    # DDAE++: w 2.0 (DiT-B) / 1.4 (DiT-L) on [0, 0.89] (= LightningDiT cfg_interval_start 0.11).
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    cfg_channels: Literal["all", "first3"] = "all"  # first3: DiT/LightningDiT's guidance of channels [:3] only
    # Class labels of a class-conditional model's samples (`sample`, `fid`), each a function of its seed:
    # random = uniform, torch.randint per seed (DiT/SiT sample_ddp.py, REPA/SRA/LightningDiT generate.py /
    # inference.py draw torch.randint labels); balanced = seed % num_classes (exactly balanced over seeds 0..N-1).
    labels: Literal["random", "balanced"] = "random"
    # EDM's stochastic sampler (Karras et al., 2022, Alg. 2; NVlabs/edm generate.py `edm_sampler`): before the
    # Heun step from t_i, when s_min <= t_i <= s_max, noise raises t_i to t̂ = (1 + γ)·t_i with
    # γ = min(s_churn / N, √2 − 1): x̂ = x + √(t̂² − t_i²)·s_noise·z. s_churn 0 is Alg. 1, the deterministic
    # sampler (every paper recipe). EDM's ImageNet-64 setting (its Table 5): 40, 0.05, 50, 1.003.
    # diffusion.formulation edm with the heun sampler only; z follows the per-sample seeds.
    s_churn: float = 0.0
    s_min: float = 0.0
    s_max: Optional[float] = None  # None: no upper bound (edm_sampler's S_max = inf)
    s_noise: float = 1.0


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Recipe:
    name: str = "unnamed"
    data: DataConfig = field(default_factory=DataConfig)
    model: Union[UNetConfig, UViTConfig, DiTConfig, DiTOrigConfig] = field(default_factory=UNetConfig)
    diffusion: Union[DDPMConfig, EDMConfig, RFConfig] = field(default_factory=DDPMConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    sra: SRAConfig = field(default_factory=SRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        # `name` becomes a folder (`runs/<name>`, `runs/<name>-profile`): it must not escape `runs/`.
        if not NAME_RE.fullmatch(self.name) or self.name in {".", ".."}:
            raise UsageError(f"name {self.name!r} must be a plain folder name: letters, digits, '.', '_' or '-', "
                             "no '/' (it names the default run folder runs/<name>)")
        t = self.train
        if t.global_batch <= 0:
            raise UsageError(f"train.global_batch must be positive, got {t.global_batch}")
        if t.batch_per_process is not None and t.batch_per_process <= 0:
            raise UsageError(f"train.batch_per_process must be positive, got {t.batch_per_process}")
        for key in ("epochs", "lr"):
            if getattr(t, key) <= 0:
                raise UsageError(f"train.{key} must be positive, got {getattr(t, key)}")
        for key in ("log_every", "checkpoint_every", "keep_last", "sample_grid", "max_nonfinite"):
            if getattr(t, key) <= 0:
                raise UsageError(f"train.{key} must be positive, got {getattr(t, key)}")
        if t.sample_every < 0 or t.warmup_epochs < 0 or t.weight_decay < 0:
            raise UsageError("train.sample_every, train.warmup_epochs and train.weight_decay must be >= 0")
        if not 0.0 <= t.ema.decay < 1.0:
            raise UsageError(f"train.ema.decay must be in [0, 1), got {t.ema.decay}")
        if self.sample.steps is not None and self.sample.steps <= 0:
            raise UsageError(f"sample.steps must be positive, got {self.sample.steps}")
        if self.sample.batch_size <= 0:
            raise UsageError(f"sample.batch_size must be positive, got {self.sample.batch_size}")
        if self.data.image_size is not None and self.data.image_size <= 0:
            raise UsageError(f"data.image_size must be positive, got {self.data.image_size}")
        if self.data.num_workers < 0:
            raise UsageError(f"data.num_workers must be >= 0, got {self.data.num_workers}")
        if getattr(self.model, "augment_dim", 0) < 0:
            raise UsageError(f"model.augment_dim must be >= 0, got {self.model.augment_dim}")
        self._check_augment_and_contrastive()
        self._check_latent()

    def _check_latent(self) -> None:
        m, s, r = self.model, self.sample, self.sra
        if self.data.dataset == "latents" and s.clip_x0:
            raise UsageError("sample.clip_x0: true clips x̂0 to [-1, 1], a pixel range; data.dataset latents are "
                             "normalised to unit variance, so latent runs never clip (leave sample.clip_x0 unset)")
        if s.cfg_scale < 0 or not 0.0 <= s.cfg_interval[0] <= s.cfg_interval[1] <= 1.0:
            raise UsageError(f"sample.cfg_scale must be >= 0 and sample.cfg_interval [lo, hi] within [0, 1], "
                             f"got {s.cfg_scale}, {list(s.cfg_interval)}")
        if not (s.s_churn >= 0 and s.s_min >= 0 and s.s_noise > 0 and (s.s_max is None or s.s_max >= s.s_min)):
            raise UsageError(f"sample.s_churn and sample.s_min must be >= 0, sample.s_noise > 0 and sample.s_max "
                             f"(null: none) >= s_min; got {s.s_churn}, {s.s_min}, {s.s_noise}, {s.s_max}")
        if s.s_churn > 0 and (self.diffusion.formulation != "edm" or s.sampler not in (None, "heun")):
            raise UsageError(f"sample.s_churn > 0 (EDM's stochastic sampler) needs diffusion.formulation: edm and "
                             f"sample.sampler: heun; got {self.diffusion.formulation}, {s.sampler or 'the default'} "
                             f"(for another formulation or sampler add --set sample.s_churn=0)")
        if s.cfg_scale != 1.0 and getattr(m, "num_classes", 0) == 0:
            raise UsageError("sample.cfg_scale != 1 needs a class-conditional model (model.backbone: dit or "
                             "dit_orig, model.num_classes > 0)")
        if isinstance(m, DIT_CONFIGS) and not 0.0 <= m.label_dropout < 1.0:
            raise UsageError(f"model.label_dropout must be in [0, 1), got {m.label_dropout}")
        if self.data.latent_channels <= 0:
            raise UsageError(f"data.latent_channels must be positive, got {self.data.latent_channels}")
        if self.data.latent_scale is not None and not self.data.latent_scale > 0:
            raise UsageError(f"data.latent_scale must be positive (or null: the cache's statistics), "
                             f"got {self.data.latent_scale}")
        d = self.diffusion
        if getattr(m, "learn_sigma", False) and d.formulation != "ddpm":
            raise UsageError(f"model.learn_sigma (improved-DDPM learned variance) needs diffusion.formulation: ddpm, "
                             f"got {d.formulation}")
        if isinstance(d, RFConfig) and (d.shift <= 0 or (d.t_max is not None and not 0.0 < d.t_max <= 1.0)):
            raise UsageError(f"diffusion.shift must be > 0 and diffusion.t_max in (0, 1], got {d.shift}, {d.t_max}")
        if not r.enabled:
            return
        if not isinstance(m, DIT_CONFIGS):
            raise UsageError(f"sra.enabled needs model.backbone: dit or dit_orig (block taps), got {m.backbone}")
        if d.formulation not in ("rf", "ddpm"):
            raise UsageError(f"sra.enabled needs diffusion.formulation rf (SiT) or ddpm (DiT), got {d.formulation}")
        if r.weight < 0 or r.beta <= 0 or not 0.0 <= r.interval <= 1.0 or r.decay_period_epochs <= 0:
            raise UsageError("sra.weight must be >= 0, sra.beta > 0, sra.interval in [0, 1] and "
                             "sra.decay_period_epochs > 0")
        if self.contrastive.enabled:
            raise UsageError("sra.enabled and contrastive.enabled are exclusive (both use the EMA teacher)")

    def _check_augment_and_contrastive(self) -> None:
        a, c, m = self.augment, self.contrastive, self.model
        if a.enabled and m.augment_dim != 9:
            raise UsageError(f"augment.enabled needs model.augment_dim: 9 (the label width), got {m.augment_dim}")
        if not a.enabled and m.augment_dim:
            raise UsageError(f"model.augment_dim {m.augment_dim} needs augment.enabled: true (or set it to 0)")
        if not c.enabled:
            return
        if not a.enabled:
            raise UsageError("contrastive.enabled needs augment.enabled: true (its two views come from the pipe)")
        if c.layer is None and m.selfcond.layer is None:
            raise UsageError("contrastive.layer is required without self-conditioning "
                             "(e.g. the baseline's probing layer: out_7; out_2 for uvit)")
        if not (c.weight >= 0 and c.tau > 0):
            raise UsageError(f"contrastive.weight must be >= 0 and contrastive.tau > 0, got {c.weight}, {c.tau}")
        for key in ("hidden", "dim", "proj_layers", "pred_layers"):
            if getattr(c, key) < 1:
                raise UsageError(f"contrastive.{key} must be >= 1, got {getattr(c, key)}")


# Tagged unions: section name → (tag key, {tag value: dataclass}).
TAGGED = {"model": ("backbone", MODEL_SCHEMAS), "diffusion": ("formulation", DIFFUSION_SCHEMAS)}
