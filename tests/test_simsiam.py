"""simsiam.py: the loss against its closed form, the stop-gradient, the script."""
import copy
import json
import math

import pytest
import torch
from hypothesis import given, strategies as st

import common
import simsiam
from conftest import TINY, assert_fp32_under_autocast, one_epoch, run_script

SMALL = ["--proj-hidden", "64", "--proj-dim", "64", "--pred-hidden", "16"]


@given(N=st.integers(1, 8), D=st.integers(1, 12), seed=st.integers(0, 10**6))
def test_simsiam_loss_closed_form(N, D, seed):
    g = torch.Generator().manual_seed(seed)
    p, z = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    cos = [float(p[i].double() @ z[i].double() / (p[i].double().norm() * z[i].double().norm())) for i in range(N)]
    assert math.isclose(simsiam.simsiam_loss(p, z).item(), -sum(cos) / N, rel_tol=1e-4, abs_tol=1e-5)
    assert math.isclose(simsiam.simsiam_loss(p, z, stop_grad=False).item(), -sum(cos) / N, rel_tol=1e-4, abs_tol=1e-5)


def test_simsiam_loss_sends_no_gradient_into_z_unless_asked():
    p = torch.randn(6, 5, requires_grad=True)
    z = torch.randn(6, 5, requires_grad=True)
    simsiam.simsiam_loss(p, z).backward()
    assert z.grad is None and p.grad is not None and p.grad.abs().sum() > 0
    z = torch.randn(6, 5, requires_grad=True)
    simsiam.simsiam_loss(p, z, stop_grad=False).backward()   # the ablation: now z gets one
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_simsiam_loss_is_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(32, 64, generator=g)
    p = z + 0.1 * torch.randn(32, 64, generator=g)
    assert_fp32_under_autocast(lambda: simsiam.simsiam_loss(p, z))


def test_projector_ends_in_batchnorm_without_affine():
    last = simsiam.projector(16, 32, 8)[-1]
    assert isinstance(last, torch.nn.BatchNorm1d) and not last.affine


def test_one_epoch_writes_every_output(tmp_path):
    out = one_epoch("simsiam.py", tmp_path, *SMALL)
    assert json.loads((out / "summary.json").read_text())["method"] == "simsiam"


def test_bad_flags_give_clear_errors(tmp_path):
    r = run_script("simsiam.py", *TINY, "--out", str(tmp_path / "o"), "--pred-hidden", "-3")
    assert r.returncode == 2 and "--pred-hidden" in r.stderr and "Traceback" not in r.stderr


def test_each_view_has_its_own_batchnorm_statistics():
    """z1 is what the encoder gives view 1 on its own (the paper's code: one pass per view)."""
    torch.manual_seed(0)
    model = simsiam.SimSiam(common.build_backbone("resnet18", 16, width=8), 32, 16, 8)
    opt = common.make_optimizer(common.param_groups(model, 0.0), "sgd", 0.1)
    x1 = torch.randn(6, 3, 16, 16)
    alone = copy.deepcopy(model)(x1)[1]
    _, z1 = simsiam.train_step(model, opt, x1, 3 * torch.randn(6, 3, 16, 16) + 2, True, common.FP32)
    assert torch.allclose(z1, alone, atol=1e-5)
