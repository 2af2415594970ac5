"""Contrastive self-distillation with the EMA teacher, and the training objective around it
(DDAE++ §4.2, App. A, Tab. 6b–e; facebookresearch/moco-v3 `moco/builder.py`)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from ddaepp_cli.build import build_backbone, build_formulation, build_objective, load_training_data
from ddaepp_cli.data import to_model_range
from ddaepp_cli.training.ema import EMA
from ddaepp_cli.errors import UsageError
from ddaepp_cli.losses.contrastive import ContrastiveHead, info_nce
from ddaepp_cli.recipe import recipe_from_dict

UNET = {"backbone": "ddpm", "channels": 32, "ch_mults": [1, 2], "n_blocks": 1, "attn_resolutions": [4],
        "dropout": 0.0, "augment_dim": 9, "selfcond": {"layer": "out_2"}}
UVIT = {"backbone": "uvit", "width": 32, "depth": 2, "heads": 2, "augment_dim": 9, "selfcond": {"layer": "cls"},
        "cls_tap": "mid"}


def recipe(model: dict, formulation: str = "ddpm", **contrastive):
    return recipe_from_dict({
        "data": {"dataset": "digits", "image_size": 8}, "model": model, "diffusion": {"formulation": formulation},
        "augment": {"enabled": True}, "contrastive": {"enabled": True, "hidden": 64, "dim": 32, **contrastive}})


@functools.cache
def digits(n: int) -> torch.Tensor:
    ds = load_training_data(recipe(UNET))
    return to_model_range(torch.stack([ds[i][0] for i in range(n)]))  # (n, 1, 8, 8) in [-1, 1]


def setup(rec, n: int = 8, seed: int = 0):
    """(model, objective, EMA backbone, EMA aux, images) built the way train.py builds them."""
    torch.manual_seed(seed)
    model = build_backbone(rec)
    obj = build_objective(rec, model, build_formulation(rec))
    return model, obj, EMA(model, decay=0.9), EMA(obj.aux, decay=0.9), digits(n)


def one_batch(obj, ema, aux_ema, x, seed: int = 1):
    d = obj.draw(x.shape[0], x.shape[1:], generator=torch.Generator().manual_seed(seed), device="cpu")
    batch = obj.batch(x, d)
    return batch, obj.teacher_outputs(ema.module, aux_ema.module, batch, d)["contrastive"]


# ------------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------------


def test_info_nce_is_moco_v3s_scaled_cross_entropy():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 8, generator=g), torch.randn(12, 8, generator=g)  # 12 keys from 3 "processes"
    tau = 0.2
    qn, kn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
    logits = qn @ kn.t() / tau
    manual = -(logits[torch.arange(4), torch.arange(4) + 4] - logits.logsumexp(1)).mean() * 2 * tau
    assert torch.allclose(info_nce(q, k, 4, tau), manual)  # this process's positives start at row 4
    aligned = k.clone()
    aligned[4:8] = 10 * q  # the positives equal the queries: near the minimum
    assert info_nce(q, aligned, 4, tau) < info_nce(q, k, 4, tau)


def test_time_dependent_head_sees_the_time_and_moco_head_does_not():
    feat = torch.randn(6, 16, 2, 2)
    head = ContrastiveHead(16, layer="out_1", target_time=11, hidden=32, dim=8).eval()
    assert not torch.allclose(head.project(feat, torch.full((6,), 0.01)), head.project(feat, torch.full((6,), 0.9)))
    plain = ContrastiveHead(16, layer="out_1", target_time=11, hidden=32, dim=8, time_dependent=False).eval()
    assert plain.time_emb is None
    assert torch.equal(plain.project(feat, torch.full((6,), 0.01)), plain.project(feat, torch.full((6,), 0.9)))


def test_target_time_defaults_to_the_probing_time():
    for form, model, expected in [("ddpm", UNET, 11.0), ("edm", UNET, 0.0599), ("rf", UNET, 0.06)]:
        _, obj, *_ = setup(recipe(model, form))
        assert obj.aux["contrastive"].target_time == pytest.approx(expected, abs=1e-4)
    _, obj, *_ = setup(recipe(UNET, "edm", target_t="0.002"))  # Tab. 6c "minimal noise"
    assert obj.aux["contrastive"].target_time == 0.002
    assert obj.aux["contrastive"].layer == "out_2"  # the self-conditioning layer
    _, obj, *_ = setup(recipe(UVIT))
    assert obj.aux["contrastive"].layer == "cls"  # the [CLS] token


# ------------------------------------------------------------------------------------------------
# The teacher: the generation EMA, never trained by the loss
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_cfg", [UNET, UVIT], ids=["unet", "uvit"])
def test_no_gradient_reaches_the_ema_teacher(model_cfg):
    model, obj, ema, aux_ema, x = setup(recipe(model_cfg, weight=1.0))
    before = [p.clone() for p in (*ema.module.parameters(), *aux_ema.module.parameters())]
    batch, keys = one_batch(obj, ema, aux_ema, x)
    assert not keys.k1.requires_grad and keys.k1.shape == (8, 32) and keys.offset == 0
    loss, parts = obj(batch, {"contrastive": keys})
    opt = torch.optim.Adam(obj.parameters(), lr=1e-2)
    loss.backward()
    opt.step()
    teacher = [*ema.module.parameters(), *aux_ema.module.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in teacher)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher))  # only ema.update may move it
    head = obj.aux["contrastive"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.projector.parameters())
    assert parts["loss_moco"] > 0 and torch.isfinite(loss)


@pytest.mark.parametrize("model_cfg", [UNET, UVIT], ids=["unet", "uvit"])
def test_gamma_zero_step_is_the_plain_diffusion_step(model_cfg):
    """With γ = 0 the backbone's gradients and update equal those of the diffusion loss alone (same
    batch): the teacher pass, the heads and the online taps change nothing."""
    model, obj, ema, aux_ema, x = setup(recipe(model_cfg, weight=0.0))
    plain = copy.deepcopy(model)
    batch, keys = one_batch(obj, ema, aux_ema, x)
    loss, parts = obj(batch, {"contrastive": keys})
    assert parts["loss_moco"] > 0  # the contrastive term was computed
    ref = obj.formulation.loss(plain, batch.x0, t=batch.t, noise=batch.noise, aug_label=batch.aug_label)
    ref_loss = ref.loss.float().mean()
    assert torch.equal(loss, ref_loss)
    opt, ref_opt = torch.optim.Adam(model.parameters(), lr=1e-3), torch.optim.Adam(plain.parameters(), lr=1e-3)
    loss.backward()
    ref_loss.backward()
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(a.grad, b.grad), name
    opt.step()
    ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
    # …and with γ > 0 the contrastive gradient does reach the online backbone
    model2, obj2, ema2, aux2, x2 = setup(recipe(model_cfg, weight=1.0))
    b2, k2 = one_batch(obj2, ema2, aux2, x2)
    obj2(b2, {"contrastive": k2})[0].backward()
    grads = {n: p.grad.clone() for n, p in model2.named_parameters() if p.grad is not None}
    model2.zero_grad()
    obj2.formulation.loss(model2, b2.x0, t=b2.t, noise=b2.noise, aug_label=b2.aug_label).loss.mean().backward()
    assert any(not torch.allclose(grads[n], p.grad) for n, p in model2.named_parameters() if n in grads)


def test_diffusion_views_first_trains_only_view_one():
    _, obj, ema, aux_ema, x = setup(recipe(UNET, weight=0.0, diffusion_views="first"))
    batch, keys = one_batch(obj, ema, aux_ema, x)
    assert batch.views == 2 and batch.x0.shape[0] == 16
    loss, parts = obj(batch, {"contrastive": keys})
    per_sample = obj.formulation.loss(obj.net, batch.x0, t=batch.t, noise=batch.noise, aug_label=batch.aug_label).loss
    assert torch.allclose(loss, per_sample[:8].mean()) and not torch.allclose(loss, per_sample.mean())


# ------------------------------------------------------------------------------------------------
# It learns, and the recipe checks
# ------------------------------------------------------------------------------------------------


def test_contrastive_loss_falls_on_a_toy_problem():
    """16 digits, two augmented views each, low-noise times: instance discrimination is learnable, and
    the EMA teacher (decay 0.9) follows the student."""
    model, obj, ema, aux_ema, x = setup(recipe(UVIT, weight=1.0), n=16)
    opt = torch.optim.Adam(obj.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    history = []
    for _ in range(30):
        d = obj.draw(16, x.shape[1:], generator=g, device="cpu")
        d.t, d.t2 = d.t.clamp(max=20), d.t2.clamp(max=20)  # the online views at low noise
        batch = obj.batch(x, d)
        loss, parts = obj(batch, obj.teacher_outputs(ema.module, aux_ema.module, batch, d))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
        aux_ema.update(obj.aux)
        history.append(parts["loss_moco"].item())
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < 0.9 * first, history


def test_plain_recipes_keep_their_random_stream():
    """Without augmentation the draws are t then noise, exactly what a plain diffusion step drew."""
    rec = recipe_from_dict({"data": {"dataset": "digits", "image_size": 8}, "model": UNET | {"augment_dim": 0},
                            "diffusion": {"formulation": "edm"}})
    _, obj, *_ = setup(rec)
    d = obj.draw(5, (1, 8, 8), generator=torch.Generator().manual_seed(3), device="cpu")
    g = torch.Generator().manual_seed(3)
    assert torch.equal(d.t, obj.formulation.sample_time(5, generator=g))
    assert torch.equal(d.noise, torch.randn((5, 1, 8, 8), generator=g))
    assert d.aug is None and d.key_noise is None and len(obj.aux) == 0


@pytest.mark.parametrize("override, fragment", [
    ({"augment": {"enabled": False}, "model": UNET | {"augment_dim": 0}}, "contrastive.enabled needs augment.enabled"),
    ({"augment": {"enabled": False}}, "model.augment_dim 9 needs augment.enabled"),
    ({"model": UNET | {"selfcond": {"layer": None}}}, "contrastive.layer is required without self-conditioning"),
    ({"model": UNET | {"augment_dim": 0}}, "augment.enabled needs model.augment_dim: 9"),
    ({"contrastive": {"enabled": True, "tau": 0.0}}, "contrastive.tau > 0"),
    ({"contrastive": {"enabled": True, "norm": "layernorm"}}, "not one of batchnorm, none"),
])
def test_recipe_checks(override, fragment):
    raw = {"data": {"dataset": "digits", "image_size": 8}, "model": UNET, "augment": {"enabled": True},
           "contrastive": {"enabled": True}} | override
    with pytest.raises(UsageError, match=fragment):
        recipe_from_dict(raw)


def test_unknown_contrastive_layer_lists_the_taps():
    with pytest.raises(UsageError, match="unknown layer 'cls' for ddpm"):
        setup(recipe(UNET, layer="cls"))
