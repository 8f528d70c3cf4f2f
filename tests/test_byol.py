"""byol.py: the loss against its closed form, the target's EMA, the recipe; the script."""
import copy
import json
import math

import pytest
import torch
from hypothesis import given, strategies as st

import byol
import common
from conftest import TINY, assert_fp32_under_autocast, one_epoch, run_script

SMALL = ["--proj-hidden", "64", "--proj-dim", "32", "--pred-hidden", "64"]


def unit(t):
    return t / t.norm(dim=1, keepdim=True)


@given(N=st.integers(1, 8), D=st.integers(1, 12), seed=st.integers(0, 10**6))
def test_byol_loss_closed_form(N, D, seed):
    """Mean over rows of || p/|p| - z/|z| ||^2, written with the squared distance."""
    g = torch.Generator().manual_seed(seed)
    p, z = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    expected = ((unit(p.double()) - unit(z.double())) ** 2).sum(1).mean().item()
    assert math.isclose(byol.byol_loss(p, z).item(), expected, rel_tol=1e-4, abs_tol=1e-5)


def test_byol_loss_ends():
    p = torch.randn(5, 7)
    assert byol.byol_loss(p, 3 * p).item() == pytest.approx(0, abs=1e-6)      # same direction
    assert byol.byol_loss(p, -p).item() == pytest.approx(4, abs=1e-5)        # opposite


def test_byol_loss_sends_no_gradient_into_z():
    p = torch.randn(6, 5, requires_grad=True)
    z = torch.randn(6, 5, requires_grad=True)
    byol.byol_loss(p, z).backward()
    assert z.grad is None and p.grad is not None and p.grad.abs().sum() > 0


def test_byol_target_gets_no_gradient_and_follows_by_ema():
    torch.manual_seed(0)
    model = byol.BYOL(common.build_backbone("resnet18", 16, width=8), 32, 16, 32)
    opt = common.make_optimizer(common.param_groups(model, 0.0), "sgd", 0.1)
    t_before = [p.detach().clone() for p in model.target.parameters()]

    byol.train_step(model, opt, torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), 0.8, common.FP32)
    for p, tb, o in zip(model.target.parameters(), t_before, model.online.parameters()):
        assert p.grad is None and not p.requires_grad
        assert torch.allclose(p, 0.8 * tb + 0.2 * o.detach(), atol=1e-6)   # EMA of the post-step online


def test_byol_loss_is_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(32, 64, generator=g)
    p = z + 0.1 * torch.randn(32, 64, generator=g)
    assert_fp32_under_autocast(lambda: byol.byol_loss(p, z))


def test_byol_views_and_zero_init():
    v1, v2 = byol.byol_augments(([0.5] * 3, [0.5] * 3), 32)
    assert v1.jitter == v2.jitter == (0.4, 0.4, 0.2, 0.1) and (v1.solarize_p, v2.solarize_p) == (0.0, 0.2)
    assert v1.blur_p == v2.blur_p == 0.0                       # solo-learn's asymmetric.yaml at 32 px
    assert byol.byol_augments(([0.5] * 3, [0.5] * 3), 96)[0].blur_p == 1.0


def test_one_epoch_writes_every_output(tmp_path):
    out = one_epoch("byol.py", tmp_path, *SMALL)
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == "byol" and 0 <= s["knn_top1"] <= 1


def test_bad_flags_give_clear_errors(tmp_path):
    r = run_script("byol.py", *TINY, "--out", str(tmp_path / "o"), "--tau-base", "1")
    assert r.returncode == 2 and "--tau-base" in r.stderr and "Traceback" not in r.stderr


def test_each_view_has_its_own_batchnorm_statistics():
    """p1 is what the online network gives view 1 on its own: had the views shared one
    forward pass, BatchNorm would mix the statistics of the (shifted) second view into it."""
    torch.manual_seed(0)
    model = byol.BYOL(common.build_backbone("resnet18", 16, width=8), 32, 16, 32)
    opt = common.make_optimizer(common.param_groups(model, 0.0), "sgd", 0.1)
    x1 = torch.randn(6, 3, 16, 16)
    alone = copy.deepcopy(model)(x1)[0]
    _, p1 = byol.train_step(model, opt, x1, 3 * torch.randn(6, 3, 16, 16) + 2, 0.99, common.FP32)
    assert torch.allclose(p1, alone, atol=1e-5)
