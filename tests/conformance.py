"""The conformance matrix: every shipped recipe, through its family's representative, through every command at
its defaults (issue 20).

A *family* is a code path: backbone × formulation × conditioning (uncond / class / cfg) × auxiliary losses
(self-conditioning, augmentation, contrastive, SRA) × data (pixel, latent, latent drawn per step from posterior
moments) — read from a loaded Recipe (`family_of`), never from a file name. `FAMILIES` names one representative
recipe per family and the expected answer of every command on it: "ok" (exit 0 and a finite result in its --json
output) or "refused" (exit 2 and one line on stderr: the command does not apply to that kind of run). A cell may
instead be ("xfail", reason): a known failure at defaults, reported and kept visible in the table.

The tiny version of a representative keeps its code path and shrinks sizes and data only (`tiny_overrides`):
widths and depth, an 8-px RGB image folder of exported digits for pixel recipes, tiny latent caches (random
LDM-layout VAE, `cache-latents` of the same digits at 32 px, labelled train and validation caches) for latent ones.
It trains 2 steps, resumes to 4, then every command runs in this process (Typer's runner) with its default
options plus only what a CPU needs (`family_commands`): sample counts (--n), epochs, batch sizes, the label-map
size, and where the tiny data lie (--ref for pixel runs, --data-root for segprobe). Times, layers, samplers,
steps and guidance are the command's or the recipe's own defaults. Inception has random weights at the default
place ($DDAEPP_CACHE/weights/) and runs in float32 (`FID`; the slow test runs float64, the default); latent runs
find a tiny reference in ADM's layout where fid looks for ADM's batch ($DDAEPP_CACHE/refs/).
profile-layers takes no default candidates: it tries the tiny recipe's self-conditioning layer for 2 steps.

    python tests/conformance.py --print            # run the whole matrix here (~3 CPU-minutes), print it
    python tests/conformance.py --print --from DIR # the table from the cells a pytest run wrote (test_conformance.py)
    python tests/conformance.py --families         # the family of every shipped recipe
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = ROOT / "recipes"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # test helpers (tiny VAE, ADE20K layout)

COMMANDS = ("train", "resume", "info", "sample", "fid", "probe", "cka", "segprobe", "align", "noisy-classifier",
            "profile-layers")
TRAIN_STEPS, RESUME_STEPS = 2, 4


# ------------------------------------------------------------------------------------------------
# Families
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    backbone: str  # ddpm, ddpmpp, uvit, dit, dit_orig
    formulation: str  # ddpm, edm, rf
    conditioning: str  # uncond, class, cfg (class-conditional and guided by default)
    aux: tuple[str, ...]  # of sc, aug, cl, sra
    data: str  # pixel, latent (one cached posterior sample per image), latent-per-step (a new sample per step)

    @property
    def name(self) -> str:
        return f"{self.backbone}/{self.formulation}/{self.conditioning}/{'+'.join(self.aux) or 'none'}/{self.data}"


def family_of(recipe) -> Family:
    """The family of a loaded Recipe: the fields that choose a code path in training and evaluation."""
    m = recipe.model
    classes = getattr(m, "num_classes", 0)
    conditioning = "uncond" if not classes else ("cfg" if recipe.sample.cfg_scale != 1.0 else "class")
    aux = tuple(name for name, on in (("sc", m.selfcond.layer is not None), ("aug", recipe.augment.enabled),
                                      ("cl", recipe.contrastive.enabled), ("sra", recipe.sra.enabled)) if on)
    data = "pixel"
    if recipe.data.dataset == "latents":  # fixed: one cached sample per image; per_step: drawn from the moments
        posterior = recipe.data.latent_posterior
        data = "latent" if posterior == "fixed" else "latent-" + posterior.replace("_", "-")
    return Family(m.backbone, recipe.diffusion.formulation, conditioning, aux, data)


OK, REFUSED = "ok", "refused"
LATENT_ONLY_IMAGES = ("align", "noisy-classifier")  # read images: refused on latent runs (one line, exit 2)


def _row(representative: str, refused: tuple[str, ...] = (), xfail: dict[str, str] | None = None) -> dict:
    cells: dict[str, Any] = {c: (REFUSED if c in refused else OK) for c in COMMANDS}
    cells.update({c: ("xfail", why) for c, why in (xfail or {}).items()})
    return {"representative": representative, "expected": cells}


# Family → its representative and the expected answer of each command; every cell not named is "ok". Refusals:
# UViT has no self-conditioning layer to search (profile-layers); latent runs are not images (align,
# noisy-classifier); a recipe that contrasts its self-conditioning layer (contrastive.layer unset) has no
# contrastive feature in profile-layers' baseline run without self-conditioning (the recipe check says to set
# contrastive.layer).
SC_CONTRASTED = ("profile-layers",)
FAMILIES: dict[str, dict] = {
    "ddpm/ddpm/uncond/none/pixel": _row("cifar10_ddpm_ddpm"),
    "ddpm/ddpm/uncond/sc/pixel": _row("cifar10_ddpm_ddpm_sc"),
    "ddpm/edm/uncond/none/pixel": _row("quickstart"),
    "ddpm/edm/uncond/sc/pixel": _row("cifar10_edm_ddpm_sc"),
    "ddpm/edm/uncond/aug/pixel": _row("cifar10_edm_ddpm_aug"),
    "ddpm/edm/uncond/aug+cl/pixel": _row("cifar10_edm_ddpm_aug_cl"),
    "ddpm/edm/uncond/sc+aug/pixel": _row("cifar10_edm_ddpm_sc_aug"),
    "ddpm/edm/uncond/sc+aug+cl/pixel": _row("cifar10_edm_ddpm_sc_aug_cl", refused=SC_CONTRASTED),
    "ddpm/rf/uncond/none/pixel": _row("cifar10_rf_ddpm"),
    "ddpm/rf/uncond/sc/pixel": _row("cifar10_rf_ddpm_sc"),
    "ddpmpp/ddpm/uncond/none/pixel": _row("cifar10_ddpm_ddpmpp"),
    "ddpmpp/ddpm/uncond/sc/pixel": _row("cifar10_ddpm_ddpmpp_sc"),
    "ddpmpp/edm/uncond/none/pixel": _row("cifar10_edm_ddpmpp"),
    "ddpmpp/edm/uncond/sc/pixel": _row("cifar10_edm_ddpmpp_sc"),
    "ddpmpp/edm/uncond/aug/pixel": _row("cifar10_edm_ddpmpp_aug"),
    "ddpmpp/edm/uncond/aug+cl/pixel": _row("cifar10_edm_ddpmpp_aug_cl"),
    "ddpmpp/edm/uncond/sc+aug/pixel": _row("cifar10_edm_ddpmpp_sc_aug"),
    "ddpmpp/edm/uncond/sc+aug+cl/pixel": _row("cifar10_edm_ddpmpp_sc_aug_cl", refused=SC_CONTRASTED),
    "ddpmpp/rf/uncond/none/pixel": _row("cifar10_rf_ddpmpp"),
    "ddpmpp/rf/uncond/sc/pixel": _row("cifar10_rf_ddpmpp_sc"),
    "uvit/ddpm/uncond/none/pixel": _row("cifar10_ddpm_uvit", refused=("profile-layers",)),
    "uvit/ddpm/uncond/sc/pixel": _row("cifar10_ddpm_uvit_sc", refused=("profile-layers",)),
    "uvit/ddpm/uncond/aug/pixel": _row("cifar10_ddpm_uvit_aug", refused=("profile-layers",)),
    "uvit/ddpm/uncond/aug+cl/pixel": _row("cifar10_ddpm_uvit_aug_cl", refused=("profile-layers",)),
    "uvit/ddpm/uncond/sc+aug/pixel": _row("cifar10_ddpm_uvit_sc_aug", refused=("profile-layers",)),
    "uvit/ddpm/uncond/sc+aug+cl/pixel": _row("cifar10_ddpm_uvit_sc_aug_cl", refused=("profile-layers",)),
    "dit/rf/uncond/none/latent": _row("imagenet256_rf_ditb", refused=LATENT_ONLY_IMAGES),
    "dit/rf/uncond/sc/latent": _row("imagenet256_rf_ditb_sc", refused=LATENT_ONLY_IMAGES),
    "dit/rf/cfg/none/latent": _row("imagenet256_rf_ditb_cond", refused=LATENT_ONLY_IMAGES),
    "dit/rf/cfg/sc/latent": _row("imagenet256_rf_ditb_cond_sc", refused=LATENT_ONLY_IMAGES),
    "dit/rf/class/sra/latent-per-step": _row("imagenet256_sra_lightning_sitb", refused=LATENT_ONLY_IMAGES),
    "dit/ddpm/class/sra/latent-per-step": _row("imagenet256_sra_lightning_ditb", refused=LATENT_ONLY_IMAGES),
    "dit_orig/ddpm/class/sra/latent-per-step": _row("imagenet256_sra_ditb", refused=LATENT_ONLY_IMAGES),
    "dit_orig/rf/class/sra/latent-per-step": _row("imagenet256_sra_sitb", refused=LATENT_ONLY_IMAGES),
    "dit_orig/rf/cfg/sra/latent-per-step": _row("imagenet256_sra_sitxl", refused=LATENT_ONLY_IMAGES),
}


def shipped_recipes() -> list[Path]:
    return sorted(RECIPES_DIR.glob("*.yaml"))


def recipe_families() -> dict[str, str]:
    """{recipe stem: family name} of every shipped recipe."""
    from ddaepp_cli.recipe import load_recipe

    return {p.stem: family_of(load_recipe(p)).name for p in shipped_recipes()}


# ------------------------------------------------------------------------------------------------
# Tiny versions
# ------------------------------------------------------------------------------------------------

# Sizes and bookkeeping only: the formulation, conditioning, auxiliary losses and every option of theirs stay.
COMMON = ["data.num_workers=0", "train.global_batch=8", "train.batch_per_process=null", "train.precision=fp32",
          "train.compile=false", "train.log_every=1", "train.checkpoint_every=1000", "train.milestones=[]",
          "train.sample_every=0"]
# Pixel recipes read a tiny RGB image folder (exported digits, 8 px): CIFAR's three channels, ~160 images.
PIXEL_SIZE = 8


def tiny_overrides(recipe, shared: "Shared") -> list[str]:
    """`--set` overrides that shrink a recipe to CPU size on the same code path."""
    sets = list(COMMON)
    if recipe.data.dataset == "latents":
        root = shared.latents if recipe.data.latent_posterior == "fixed" else shared.moments
        sets += [f"data.root={root}", f"data.latent_channels={shared.latent_channels}"]
    else:
        sets += ["data.dataset=imagefolder", f"data.root={shared.images}", f"data.image_size={PIXEL_SIZE}",
                 "data.download=false"]
    return sets + shrink_model(recipe)


def shrink_model(recipe) -> list[str]:
    """`--set` overrides for a CPU-size network on the recipe's code path: its self-conditioning,
    contrastive and SRA layers kept at the same relative place (tests/test_all_recipes.py shares it)."""
    sets: list[str] = []
    m = recipe.model
    if m.backbone == "uvit":  # in_1, in_2, mid, out_1, out_2: the recipes' out_2 taps exist
        sets += ["model.width=32", "model.depth=4", "model.heads=2"]
    elif m.backbone in ("dit", "dit_orig"):  # blocks 1..4
        sets += ["model.width=32", "model.depth=4", "model.heads=2"]
        if m.selfcond.layer:
            sets.append("model.selfcond.layer=2")
        if recipe.sra.enabled:
            sets += ["sra.student_layer=1", "sra.teacher_layer=3"]
    else:  # UNet decoder blocks out_1..out_4
        sets += ["model.channels=32", "model.ch_mults=[1,2]", "model.n_blocks=1", "model.attn_resolutions=[4]"]
        if m.selfcond.layer:
            sets.append("model.selfcond.layer=out_2")
        if recipe.contrastive.layer:
            sets.append("contrastive.layer=out_2")
    if recipe.contrastive.enabled:
        sets += ["contrastive.hidden=32", "contrastive.dim=16"]
    return sets


def profile_candidate(recipe) -> str:
    """The one candidate layer `profile-layers` tries on a tiny run (it takes no default)."""
    return "2" if recipe.model.backbone in ("dit", "dit_orig") else "out_2"


# ------------------------------------------------------------------------------------------------
# Shared tiny data: Inception weights, FID references, latent caches, an ADE20K-layout folder
# ------------------------------------------------------------------------------------------------

VAE = dict(ch=32, ch_mult=(1, 2, 2, 2), z=8)  # f = 8: 32-px digits → 8×4×4 latents
TRAIN_PER_CLASS, VAL_PER_CLASS = 12, 4  # exported digits kept per class: 120 training and 40 validation images
FID = ("--extractor-dtype", "float32")  # the extractor's precision is one code path for every family (test_fid.py
# checks float64 against torch-fidelity); float64 Inception costs ~2 s per image on one core


@dataclass
class Shared:
    base: Path
    cache: Path  # $DDAEPP_CACHE: Inception weights, ADM-layout reference, FID and segmentation caches
    images: Path  # ImageNet-layout folder (train/<class>/, val/<class>/) of 32-px digits: the pixel runs' data
    pixel_ref: Path  # FID reference of pixel runs (the registered CIFAR sets need a download)
    latents: Path  # labelled training latent cache; <latents>_val is the validation cache
    moments: Path  # the same as posterior moments (`cache-latents --moments`, data.latent_posterior: per_step)
    latent_channels: int
    ade: Path  # ADE20K-layout folder

    @property
    def env(self) -> dict[str, str]:
        return {"DDAEPP_CACHE": str(self.cache)}


def build_shared(base: Path) -> Shared:
    """Everything the families share, built once with the product's own commands where it has them."""
    import numpy as np
    import torch
    from PIL import Image

    from ddaepp_cli.eval import inception
    from ddaepp_cli.eval.fid.reference import ADM_REFERENCE
    from test_latent_eval import ade_layout
    from test_latents import write_tiny_vae

    base.mkdir(parents=True, exist_ok=True)
    cache = base / "ddaepp-cache"
    env = {"DDAEPP_CACHE": str(cache)}
    (cache / "weights").mkdir(parents=True)
    (cache / "refs").mkdir(parents=True)
    # Inception with random weights in torch-fidelity's layout (tests/test_fid.py), where fid looks by default
    torch.save(inception.random_state_dict(0, active=256), cache / "weights" / inception.WEIGHTS_NAME)
    # `ddaepp export-digits`, a few per class
    _invoke(["export-digits", base / "digits", "--image-size", "32"], env, expect=0)
    images = base / "images"
    for split, per in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for d in sorted((base / "digits" / split).iterdir()):
            (images / split / d.name).mkdir(parents=True)
            for f in sorted(d.iterdir())[:per]:
                shutil.copy(f, images / split / d.name / f.name)
    pixel_ref = base / "pixel-ref"
    pixel_ref.mkdir()
    for f in sorted((images / "val").glob("*/*.png"))[::5]:
        shutil.copy(f, pixel_ref / f"{f.parent.name}_{f.name}")
    # ADM's reference-batch layout (images arr_0 + mu, sigma, mu_s, sigma_s) at ADM's file name: latent runs' default
    _invoke(["fid", pixel_ref, "--save-stats", base / "ref-stats.npz", "--no-cache", *FID], env, expect=0)
    with np.load(base / "ref-stats.npz") as z:
        stats = {k: z[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
    arr = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted(pixel_ref.iterdir())])
    np.savez(cache / "refs" / ADM_REFERENCE, arr_0=arr, **stats)
    # a random VAE in the released LDM layout → `ddaepp cache-latents` of both splits (labelled by class folder)
    vae = base / "vae.safetensors"
    write_tiny_vae(vae, **VAE)
    latents = base / "latents"
    common = ["--vae", vae, "--image-size", "32", "--num-workers", "0", "--batch-size", "64"]
    _invoke(["cache-latents", "--data", images / "train", "--out", latents, *common], env, expect=0)
    _invoke(["cache-latents", "--data", images / "val", "--out", f"{latents}_val", *common], env, expect=0)
    moments = base / "latents-moments"  # the validation cache beside it holds samples (README's val command)
    _invoke(["cache-latents", "--data", images / "train", "--out", moments, "--moments", *common], env, expect=0)
    shutil.copytree(f"{latents}_val", f"{moments}_val")
    ade = ade_layout(base / "seg", n_train=4, n_val=2)
    return Shared(base, cache, images, pixel_ref, latents, moments, VAE["z"], ade)


# ------------------------------------------------------------------------------------------------
# Running one family
# ------------------------------------------------------------------------------------------------


class CommandFailed(Exception):
    pass


@dataclass
class Answer:
    code: int
    stdout: str
    stderr: list[str]  # non-empty lines
    seconds: float
    cpu: float  # process CPU seconds (what the command costs on an idle core)
    exception: BaseException | None = None


def _invoke(args, env: dict[str, str], expect: int | None = None) -> Answer:
    """`ddaepp ARGS` in this process (Typer's runner): exit code, stdout, stderr lines."""
    from typer.testing import CliRunner

    from ddaepp_cli.cli import app

    t0, c0 = time.perf_counter(), time.process_time()
    r = CliRunner().invoke(app, [str(a) for a in args], env=env)
    try:
        err = r.stderr
    except ValueError:  # older Click mixes stderr into the output
        err = ""
    a = Answer(r.exit_code, r.stdout, [ln for ln in err.splitlines() if ln.strip()], time.perf_counter() - t0,
               time.process_time() - c0, r.exception if r.exit_code not in (0, 2, 3) else None)
    if expect is not None and a.code != expect:
        raise CommandFailed(f"ddaepp {' '.join(map(str, args))} exited {a.code}, expected {expect}:\n"
                            + "\n".join(a.stderr[-20:]) + (f"\n{a.exception!r}" if a.exception else ""))
    return a


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _all_finite(values) -> bool:
    values = list(values)
    return bool(values) and all(_finite(v) for v in values)


def _check_json(command: str, out: dict, ctx: dict) -> str | None:
    """Why the --json result of an ok command is not a finite result (None: it is)."""
    if command in ("train", "resume"):
        want = TRAIN_STEPS if command == "train" else RESUME_STEPS
        if out.get("step") != want:
            return f"step {out.get('step')}, expected {want}"
        losses = [json.loads(ln)["loss"] for ln in (ctx["run"] / "metrics.jsonl").read_text().splitlines() if ln]
        if len(losses) != want or not _all_finite(losses):
            return f"losses {losses}"
        resumed = json.loads((ctx["run"] / "meta.json").read_text())["resumed_from"]
        if (resumed is None) != (command == "train") or (resumed and not resumed.endswith(f"{TRAIN_STEPS:07d}")):
            return f"resumed from {resumed}"
        return None
    if command == "info":
        steps = [c["step"] for c in out["checkpoints"]]
        if steps != [TRAIN_STEPS, RESUME_STEPS] or not _finite((out.get("last_metrics") or {}).get("loss")):
            return f"checkpoints {steps}, last metrics {out.get('last_metrics')}"
        return None
    if command == "sample":
        import numpy as np

        with np.load(Path(out["out"]) / "samples.npz") as z:
            arr = z["arr_0"]
        if out.get("n") != ctx["n_sample"] or arr.shape[0] != ctx["n_sample"] or arr.dtype != np.uint8:
            return f"n {out.get('n')}, images {arr.shape} {arr.dtype}"
        return None
    if command == "fid":
        return None if _all_finite(out["metrics"].values()) else f"metrics {out['metrics']}"
    if command == "probe":
        acc = out.get("test_accuracy")
        return None if _finite(acc) and 0 <= acc <= 1 else f"test accuracy {acc}"
    if command == "cka":
        flat = [v for row in out["matrix"] for v in row]
        return None if _all_finite(flat) else f"matrix {out['matrix']}"
    if command == "segprobe":
        miou = out.get("miou")
        return None if _finite(miou) and 0 <= miou <= 1 else f"mIoU {miou}"
    if command == "align":
        vals = [v for m in out["metrics"].values() for v in m.values()]
        return None if _all_finite(vals) else f"metrics {out['metrics']}"
    if command == "noisy-classifier":
        return None if _all_finite(c["accuracy"] for c in out["curve"]) else f"curve {out['curve']}"
    if command == "profile-layers":
        return None if _finite(out.get("baseline")) and _all_finite(out["losses"].values()) else f"{out}"
    raise ValueError(command)


def family_commands(rec, recipe_path: Path, sets: list[str], work: Path, shared: Shared,
                    fid_extractor: tuple[str, ...] = FID) -> dict[str, list]:
    """The command line of each command on a family's tiny run: defaults, plus the CPU's sizes and the tiny data."""
    run = work / "run"
    setargs = [a for s in sets for a in ("--set", s)]
    pixel = rec.data.dataset != "latents"
    return {
        "train": ["train", recipe_path, "--run-dir", run, *setargs, "--max-steps", TRAIN_STEPS, "--json"],
        "resume": ["train", recipe_path, "--run-dir", run, *setargs, "--max-steps", RESUME_STEPS, "--json"],
        "info": ["info", run, "--json"],
        "sample": ["sample", run, "--n", 4, "--out", work / "samples", "--json"],
        "fid": ["fid", run, "--n", 4, *(["--ref", shared.pixel_ref] if pixel else []), *fid_extractor, "--json"],
        "probe": ["probe", run, "--epochs", 2, "--batch-size", 64, "--json"],
        "cka": ["cka", run, "--n", 32, "--json"],
        "segprobe": ["segprobe", run, "--data-root", shared.ade, "--epochs", 2, "--batch-size", 4, "--label-size", 32,
                     "--json"],
        "align": ["align", run, "--n", 32, "--json"],
        "noisy-classifier": ["noisy-classifier", run, "--epochs", 1, "--n-test", 16, "--json"],
        "profile-layers": ["profile-layers", recipe_path, "--candidates", profile_candidate(rec), "--steps", 2,
                           "--run-dir", work / "profile", *setargs, "--json"],
    }


class FamilyRun:
    """A family's tiny representative, trained and resumed once; `cell(command)` runs one more command on it."""

    def __init__(self, name: str, shared: Shared, work: Path, *, fid_extractor: tuple[str, ...] = FID,
                 log: Callable[[str], None] = lambda s: None):
        from ddaepp_cli.recipe import load_recipe

        self.name, self.shared, self.log = name, shared, log
        recipe_path = RECIPES_DIR / f"{FAMILIES[name]['representative']}.yaml"
        rec = load_recipe(recipe_path)
        work.mkdir(parents=True, exist_ok=True)
        self.cmds = family_commands(rec, recipe_path, tiny_overrides(rec, shared), work, shared, fid_extractor)
        self.ctx = {"run": work / "run", "n_sample": 4}
        self.cells: dict[str, dict] = {}
        for command in ("train", "resume"):
            self.cell(command)

    @property
    def trained(self) -> bool:
        return all(self.cells[c]["answer"] == OK for c in ("train", "resume"))

    def cell(self, command: str) -> dict:
        """{"answer": ok | refused | FAIL, "detail": ..., "seconds": wall, "cpu": process seconds} of one command."""
        if command in self.cells:
            return self.cells[command]
        if command not in ("train", "resume") and not self.trained:
            cell = {"answer": "FAIL", "detail": "no trained run (train or resume failed)", "seconds": 0, "cpu": 0}
            self.cells[command] = cell
            return cell
        a = _invoke(self.cmds[command], self.shared.env)
        if a.code == 0:
            try:
                detail = _check_json(command, json.loads(a.stdout), self.ctx)
            except Exception as e:  # noqa: BLE001  not one JSON object, or missing keys
                detail = f"unreadable --json output ({type(e).__name__}: {e}): {a.stdout[-300:]!r}"
            cell = {"answer": OK if detail is None else "FAIL", "detail": detail}
        elif a.code == 2 and len(a.stderr) == 1:
            cell = {"answer": REFUSED, "detail": a.stderr[0]}
        else:
            tail = a.stderr[-3:] or [repr(a.exception)]
            cell = {"answer": "FAIL", "detail": f"exit {a.code}: " + " | ".join(tail)}
        cell["seconds"], cell["cpu"] = round(a.seconds, 2), round(a.cpu, 2)
        self.cells[command] = cell
        why = "" if cell["answer"] == OK else f": {cell['detail']}"
        self.log(f"{self.name} {command}: {cell['answer']} ({cell['seconds']} s, cpu {cell['cpu']} s){why}")
        return cell


def run_family(name: str, shared: Shared, work: Path, log: Callable[[str], None] = lambda s: None, *,
               commands: tuple[str, ...] = COMMANDS, fid_extractor: tuple[str, ...] = FID) -> dict:
    """Every command of `commands` on the family's tiny run: {command: cell} (FamilyRun.cell)."""
    run = FamilyRun(name, shared, work, fid_extractor=fid_extractor, log=log)
    return {c: run.cell(c) for c in commands}


def expected_answer(name: str, command: str) -> str:
    """ok or refused; an xfail cell is expected to be ok and known to FAIL."""
    want = FAMILIES[name]["expected"][command]
    return OK if isinstance(want, tuple) else want


def mismatches(name: str, row: dict, commands: tuple[str, ...] = COMMANDS) -> list[str]:
    """Cells whose answer differs from the expected one (an xfail cell is expected to FAIL)."""
    out = []
    for command in commands:
        want = FAMILIES[name]["expected"][command]
        got = row.get(command, {"answer": "not run", "detail": "training failed"})
        expected = "FAIL" if isinstance(want, tuple) else want
        if got["answer"] != expected:
            out.append(f"{command}: expected {expected}, got {got['answer']}: {got.get('detail')}")
    return out


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------

SHORT = {"noisy-classifier": "noisy-clf", "profile-layers": "profile"}


def markdown(rows: dict[str, dict]) -> str:
    """families × commands → ok / refused / FAIL (xfail: a known failure) as a markdown table."""
    head = ["family", "representative", *[SHORT.get(c, c) for c in COMMANDS], "cpu s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in FAMILIES:
        if name not in rows:
            continue
        row = rows[name]
        cells = []
        for c in COMMANDS:
            got = row.get(c, {}).get("answer", "-")
            want = FAMILIES[name]["expected"][c]
            cells.append(f"{got} (xfail)" if isinstance(want, tuple) and got == "FAIL" else got)
        secs = sum(cell.get("cpu", 0) for cell in row.values())
        lines.append(f"| {name} | {FAMILIES[name]['representative']} | " + " | ".join(cells) + f" | {secs:.0f} |")
    notes = [f"- {name} {c}: {FAMILIES[name]['expected'][c][1]}" for name in rows for c in COMMANDS
             if isinstance(FAMILIES[name]["expected"][c], tuple)]
    fails = [f"- {name} {c}: {row[c]['detail']}" for name, row in rows.items() for c in row
             if row[c]["answer"] == "FAIL" and not isinstance(FAMILIES[name]["expected"][c], tuple)]
    out = "\n".join(lines)
    if notes:
        out += "\n\nKnown failures (xfail):\n" + "\n".join(notes)
    if fails:
        out += "\n\nUnexpected failures:\n" + "\n".join(fails)
    return out + "\n"


def cell_file(folder: Path, name: str, command: str) -> Path:
    return folder / f"{name.replace('/', '_')}__{command}.json"


def write_cell(folder: Path, name: str, command: str, cell: dict, *, table: bool = False) -> Path:
    """One cell as JSON in `folder`; with `table`, also matrix.md of every cell there so far."""
    folder.mkdir(parents=True, exist_ok=True)
    path = cell_file(folder, name, command)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"family": name, "command": command, "cell": cell}, indent=1))
    tmp.replace(path)
    if table:
        md = folder / "matrix.md"
        tmp = md.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(markdown(read_rows(folder)))
        tmp.replace(md)
    return path


def read_rows(folder: Path) -> dict[str, dict]:
    """{family: {command: cell}} from the cell files in `folder`."""
    rows: dict[str, dict] = {}
    for p in sorted(folder.glob("*__*.json")):
        d = json.loads(p.read_text())
        rows.setdefault(d["family"], {})[d["command"]] = d["cell"]
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--print", action="store_true", help="print the matrix as markdown")
    ap.add_argument("--from", dest="src", type=Path, help="read the rows a pytest run wrote (no runs here)")
    ap.add_argument("--families", action="store_true", help="list the family of every shipped recipe")
    ap.add_argument("--only", help="comma list of family names to run")
    ap.add_argument("--out", type=Path, help="also write the rows and matrix.md here")
    args = ap.parse_args(argv)
    if args.families:
        for stem, fam in recipe_families().items():
            print(f"{stem:45s} {fam}")
        return 0
    if args.src:
        print(markdown(read_rows(args.src)), end="")
        return 0
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    names = args.only.split(",") if args.only else list(FAMILIES)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="ddaepp-conformance-") as tmp:
        t0 = time.perf_counter()
        shared = build_shared(Path(tmp) / "shared")
        print(f"shared data: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for name in names:
            t0 = time.perf_counter()
            rows[name] = run_family(name, shared, Path(tmp) / name.replace("/", "_"),
                                    log=lambda s: print(s, file=sys.stderr))
            print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            if args.out:
                for c, cell in rows[name].items():
                    write_cell(args.out, name, c, cell, table=c == COMMANDS[-1])
    print(markdown(rows), end="")
    return 0 if all(not mismatches(n, r) for n, r in rows.items()) else 1


if __name__ == "__main__":
    sys.exit(main())
