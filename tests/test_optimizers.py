"""Optimizers and schedules (common.py, section 4) against closed forms and the papers' formulas."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import common


@given(total=st.integers(10, 1000), warm=st.integers(1, 9), base=st.floats(0.01, 10.0))
def test_cosine_lr_ends(total, warm, base):
    assert math.isclose(common.cosine_lr(0, total, warm, base), base / warm)
    assert math.isclose(common.cosine_lr(warm - 1, total, warm, base), base)
    assert math.isclose(common.cosine_lr(warm, total, warm, base), base)
    assert common.cosine_lr(total, total, warm, base, final=0.1 * base) == pytest.approx(0.1 * base)
    mid = warm + (total - warm) / 2
    assert common.cosine_lr(mid, total, warm, base) == pytest.approx(base / 2)
    frac = warm + 0.5                                          # a warmup that ends between two steps
    lrs = [common.cosine_lr(s, total, frac, base) for s in range(total + 1)]
    assert max(lrs) <= base * (1 + 1e-12) and lrs[warm] == pytest.approx(base)


@given(value=st.floats(0.0, 50.0), recipe=st.integers(1, 2000), epochs=st.integers(1, 4000))
def test_scaled_epochs_keeps_the_recipe_or_its_fraction(value, recipe, epochs):
    got = common.scaled_epochs(None, value, recipe, epochs)
    assert common.scaled_epochs(3.5, value, recipe, epochs) == 3.5     # a flag given wins
    if epochs >= recipe:
        assert got == value                                    # a long run: the recipe's own length
    else:
        assert got / epochs == pytest.approx(value / recipe)   # a short one: the same fraction of it
        assert got <= value


@given(total=st.integers(1, 10_000), base=st.floats(0.0, 0.999), final=st.sampled_from([0.999, 1.0]))
def test_cosine_schedule_ends_and_rises(total, base, final):
    assert common.cosine_schedule(0, total, base, final) == pytest.approx(base)
    assert common.cosine_schedule(total, total, base, final) == pytest.approx(final)
    values = [common.cosine_schedule(s, total, base, final) for s in range(0, total + 1, max(1, total // 7))]
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:])) or base > final
    if total % 2 == 0:
        assert common.cosine_schedule(total // 2, total, base, final) == pytest.approx((final + base) / 2)


def paper_lars(w, g, v, lr, wd, m, eta, decay):
    """One step for one tensor, from You et al.'s eq. (6) and solo-learn's text, in float64:
    the local rate eta ||w|| / (||g|| + wd ||w||), capped at the global lr (clip mode),
    applied to g + wd w; biases, norms and tensors with a zero norm take the plain gradient,
    with no weight decay."""
    wn, gn = w.norm().item(), g.norm().item()
    if decay and wn > 0 and gn > 0:
        local = eta * wn / (gn + wd * wn + 1e-8)
        rate = local if local < lr else lr
        step = (g + wd * w) * (rate / lr)
    else:
        step = g
    v = m * v + step
    return w - lr * v, v


@given(seed=st.integers(0, 1000), wd=st.floats(0.0, 0.1), lr=st.floats(0.001, 2.0))
def test_lars_against_the_papers_formula(seed, wd, lr):
    torch.manual_seed(seed)
    # The third tensor is zero and the fourth gets a zero gradient: neither is adapted nor decayed.
    w = [torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 2, 2, dtype=torch.float64),
         torch.zeros(2, 3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)]
    b = [torch.randn(5, dtype=torch.float64)]
    params = [torch.nn.Parameter(t.clone()) for t in w + b]
    opt = common.LARS([dict(params=params[:4], weight_decay=wd, decay=True),
                       dict(params=params[4:], weight_decay=0.0, decay=False)], lr=lr, momentum=0.9, eta=0.02)
    state = [(t.clone(), torch.zeros_like(t)) for t in w + b]
    for _ in range(3):
        grads = [torch.randn_like(t) * (i != 3) for i, (t, _) in enumerate(state)]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        state = [paper_lars(t, g, v, lr, wd if i < 4 else 0.0, 0.9, 0.02, i < 4)
                 for i, ((t, v), g) in enumerate(zip(state, grads))]
        for p, (s, _) in zip(params, state):
            assert torch.allclose(p.detach(), s, atol=1e-10)


def test_param_groups_exclude_biases_norms_and_named_tokens_from_decay():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)
            self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
            self.frozen = torch.nn.Parameter(torch.zeros(3, 3), requires_grad=False)
    net = Net()
    groups = common.param_groups(net, 1e-4, no_decay=("cls_token",))
    decay = [g for g in groups if g["decay"]]
    assert len(decay) == 1 and decay[0]["params"] == [net.fc.weight] and decay[0]["weight_decay"] == 1e-4
    no_decay = [p for g in groups if not g["decay"] for p in g["params"]]
    assert {id(p) for p in no_decay} == {id(net.fc.bias), id(net.bn.weight), id(net.bn.bias), id(net.cls_token)}
    assert all(g["weight_decay"] == 0 for g in groups if not g["decay"])
    opt = common.make_optimizer(common.param_groups(net, 1e-4, lr_scale=lambda n: 0.5 if n.startswith("bn") else 1.0),
                                "lars", 0.1)
    common.set_lr(opt, 0.4)
    assert sorted(g["lr"] for g in opt.param_groups) == [0.2, 0.4, 0.4]
    assert common.make_optimizer(groups, "adamw", 1e-3).defaults["betas"] == (0.9, 0.999)


@given(m=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_ema_update_averages_parameters_and_leaves_buffers_alone(m, seed):
    """The teacher keeps its own BatchNorm statistics (MoCo's, BYOL's and DINO's code): only
    parameters are averaged, running statistics are neither averaged nor copied."""
    torch.manual_seed(seed)
    online, target = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    bn_o, bn_t = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    bn_o.running_mean.fill_(2.0)
    bn_t.running_mean.fill_(-1.0)
    expected = [m * t.detach().clone() + (1 - m) * o.detach() for t, o in zip(target.parameters(), online.parameters())]
    common.ema_update(torch.nn.Sequential(target, bn_t), torch.nn.Sequential(online, bn_o), m)
    for p, e in zip(target.parameters(), expected):
        assert torch.allclose(p, e, atol=1e-6)
    assert torch.equal(bn_t.running_mean, torch.full((3,), -1.0))
