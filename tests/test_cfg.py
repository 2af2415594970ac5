"""Classifier-free guidance with an interval (diffusion/cfg.py) and the latent-RF objective options."""

import pytest
import torch

from ddaepp_cli.diffusion import RF, sample
from ddaepp_cli.diffusion.cfg import guided_denoiser
from ddaepp_cli.nets import build_backbone


class Counting(torch.nn.Module):
    """Wraps a net and records the labels of every call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []
        self.num_classes = net.num_classes

    def forward(self, x, t, class_labels=None, aug_label=None):
        self.calls.append(class_labels.clone())
        return self.net(x, t, class_labels=class_labels)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    net = build_backbone("dit", width=32, depth=2, heads=2, in_channels=4, image_size=4, num_classes=5)
    for p in net.parameters():  # leave adaLN-Zero / zero head: the output must depend on the label
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    return RF(t_max=1.0, shift=3.3), Counting(net.eval())


def test_scale_one_is_the_conditional_prediction(setup):
    f, net = setup
    x, t, y = torch.randn(3, 4, 4, 4), torch.full((3,), 0.5), torch.tensor([0, 1, 4])
    plain = f.predict(net, x, t, class_labels=y)
    guided = guided_denoiser(f, net, y, null_label=5, scale=1.0, interval=(0.0, 0.89))(x, t)
    assert torch.equal(plain.x0, guided.x0) and torch.equal(plain.eps, guided.eps)


def test_outside_the_interval_only_the_conditional_branch_runs(setup):
    f, net = setup
    x, y = torch.randn(3, 4, 4, 4), torch.tensor([0, 1, 4])
    d = guided_denoiser(f, net, y, null_label=5, scale=2.0, interval=(0.0, 0.89))
    net.calls.clear()
    out = d(x, torch.full((3,), 0.95))
    assert len(net.calls) == 1 and torch.equal(net.calls[0], y)
    assert torch.equal(out.x0, f.predict(net, x, 0.95, class_labels=y).x0)
    net.calls.clear()
    d(x, torch.full((3,), 0.5))  # inside: one stacked forward with [y; null]
    assert len(net.calls) == 1 and net.calls[0].tolist() == [0, 1, 4, 5, 5, 5]


def test_guidance_formula_and_three_channel_switch(setup):
    f, net = setup
    x, t, y = torch.randn(2, 4, 4, 4), torch.full((2,), 0.5), torch.tensor([2, 3])
    c = net(x, t, class_labels=y)
    u = net(x, t, class_labels=torch.tensor([5, 5]))
    v_all = 1.5 * (c - u) + u
    got = guided_denoiser(f, net, y, null_label=5, scale=1.5)(x, t)
    torch.testing.assert_close(got.x0, x - 0.5 * v_all)
    v3 = torch.cat((v_all[:, :3], c[:, 3:]), 1)
    got3 = guided_denoiser(f, net, y, null_label=5, scale=1.5, channels="first3")(x, t)
    torch.testing.assert_close(got3.x0, x - 0.5 * v3)


def test_euler_with_shift_and_cfg_samples(setup):
    f, net = setup
    grid = f.time_grid("euler", 250)
    assert len(grid) == 251 and grid[0] == 1.0 and grid[-1] == 0.0
    assert float(grid[1]) == pytest.approx(3.3 * (249 / 250) / (1 + 2.3 * (249 / 250)))  # SD3 shift, paper time
    d = guided_denoiser(f, net, torch.tensor([1, 2]), null_label=5, scale=2.0, interval=(0.0, 0.89))
    out = sample(f, d, torch.randn(2, 4, 4, 4), sampler="euler", steps=5)
    assert out.shape == (2, 4, 4, 4) and torch.isfinite(out).all()


def test_logit_normal_time_and_cosine_term():
    f = RF(t_max=1.0, time_sampling="logit_normal", cosine_loss=True)
    g = torch.Generator().manual_seed(0)
    t = f.sample_time(4096, generator=g)
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(t, torch.sigmoid(torch.randn(4096, generator=g2)))
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    out = torch.randn(2, 4, 3, 3)
    el = f._loss_elements(out, x0, None, noise, None)
    target = noise - x0
    cos = torch.nn.functional.cosine_similarity(out, target, dim=1)
    expected = ((out - target) ** 2).flatten(1).mean(1) + (1 - cos).flatten(1).mean(1)
    torch.testing.assert_close(el.flatten(1).mean(1), expected)
    assert torch.equal(RF(t_max=1.0)._loss_elements(out, x0, None, noise, None), (out - target) ** 2)
