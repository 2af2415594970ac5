"""SRA (losses/sra.py): the teacher's early exit, λ = 0 equals the plain step, the head and the loss."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ddaepp_cli.build import build_backbone, build_formulation, build_objective
from ddaepp_cli.losses.sra import SRAHead
from ddaepp_cli.recipe import load_recipe
from ddaepp_cli.training.train import train

RECIPE = """\
name: tiny_sra
data: {dataset: digits, image_size: 8, num_workers: 0}
model: {backbone: dit, width: 32, depth: 4, heads: 2, patch_size: 2, num_classes: 10}
diffusion: {formulation: rf, t_max: 1.0}
sra: {enabled: true, student_layer: "1", teacher_layer: "3", weight: 0.2}
train: {global_batch: 8, optimizer: adamw, lr: 1.0e-3, warmup_epochs: 0, precision: fp32, log_every: 1,
        sample_every: 0, ema: {decay: 0.5}}
"""


@pytest.fixture
def recipe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE)
    return p


def check_teacher_early_exit(rec, teacher_layer: str = "3"):
    """On a digits recipe: the SRA teacher's early-exit output equals the full forward's block output; nothing past the
    block runs; returns (teacher time, student time) for further checks. Shared with test_dit_orig.py."""
    torch.manual_seed(0)
    model = build_backbone(rec)
    for blk in model.blocks:
        torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.05)
    f = build_formulation(rec)
    obj = build_objective(rec, model, f)
    x = torch.randn(4, 1, 8, 8)  # digits recipes: one channel
    d = obj.draw(4, x.shape[1:], generator=torch.Generator().manual_seed(1), device="cpu")
    batch = obj.batch(x, d, torch.tensor([1, 2, 3, 4]))
    target = obj.teacher_outputs(model, None, batch, d)["sra"]
    t_teacher = obj.aux["sra"].teacher_time(f, batch.t, d.sra_u)
    x_t = f.perturb(batch.x0, t_teacher, batch.noise).float()
    _, full = model.forward_with_features(x_t, f.net_time(t_teacher), [teacher_layer], class_labels=batch.class_labels)
    assert torch.equal(target, full[teacher_layer])
    calls = []
    model.blocks[int(teacher_layer)].register_forward_hook(lambda *a: calls.append(1))
    obj.teacher_outputs(model, None, batch, d)
    assert calls == []  # the next block and the final layer never run for the teacher
    return t_teacher, batch.t


def test_teacher_early_exit_equals_the_full_forward_block(recipe):
    t_teacher, t = check_teacher_early_exit(load_recipe(recipe))
    assert ((t_teacher <= t) & (t_teacher >= t - 0.2 - 1e-7) & (t_teacher >= 0)).all()


def test_weight_zero_gives_exactly_the_plain_step(recipe, tmp_path):
    runs = {}
    for name, sets in (("sra0", ["sra.weight=0"]), ("plain", ["sra.enabled=false"])):
        train(load_recipe(recipe, sets), tmp_path / name, max_steps=1)
        runs[name] = load_file(next((tmp_path / name / "checkpoints").iterdir()) / "model.safetensors")
    assert runs["sra0"].keys() == runs["plain"].keys()
    assert all(torch.equal(runs["sra0"][k], runs["plain"][k]) for k in runs["plain"])
    loss = {n: json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[0])["loss"] for n in runs}
    assert loss["sra0"] == loss["plain"]


def test_head_loss_and_schedule():
    head = SRAHead(768, student_layer="3", teacher_layer="8")
    assert sum(p.numel() for p in head.parameters()) == 2_361_600  # vvvvvjdy/SRA `SimpleHead`, D→2D→D (docs/design.md §4)
    h = SRAHead(8, student_layer="1", teacher_layer="2", beta=0.05)
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    z = h.head(s)
    d = (z - t).abs()
    expected = torch.where(d < 0.05, 0.5 * d**2 / 0.05, d - 0.025).mean()
    torch.testing.assert_close(h(s, t), expected)
    c = SRAHead(8, student_layer="1", teacher_layer="2", loss="cosine")
    c.load_state_dict(h.state_dict())
    torch.testing.assert_close(c(s, t), (1 - torch.nn.functional.cosine_similarity(z, t, dim=-1)).mean())
    decay = SRAHead(8, student_layer="1", teacher_layer="2", weight=0.2, schedule="step_decay")
    assert decay.weight_at(100) == 0.2 and decay.weight_at(1149) == pytest.approx(0.02)
    assert h.weight_at(5000) == 0.2  # constant


def test_sra_needs_a_dit_and_valid_layers(recipe):
    from ddaepp_cli.errors import UsageError

    with pytest.raises(UsageError, match="sra.enabled needs model.backbone: dit"):
        load_recipe(recipe, ["model={backbone: ddpm}"])
    rec = load_recipe(recipe, ["sra.teacher_layer=9"])
    with pytest.raises(UsageError, match="valid: 1, 2, 3, 4"):
        build_objective(rec, build_backbone(rec, device="meta"), build_formulation(rec))
