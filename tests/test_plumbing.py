"""Training plumbing and evaluation against closed forms and naive loops."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import common


@given(total=st.integers(10, 1000), warm=st.integers(1, 9), base=st.floats(0.01, 10.0))
def test_cosine_schedule_ends(total, warm, base):
    assert math.isclose(common.cosine_lr(0, total, warm, base), base / warm)
    assert math.isclose(common.cosine_lr(warm - 1, total, warm, base), base)
    assert math.isclose(common.cosine_lr(warm, total, warm, base), base)
    assert common.cosine_lr(total, total, warm, base, final=0.1 * base) == pytest.approx(0.1 * base)
    mid = warm + (total - warm) / 2
    assert common.cosine_lr(mid, total, warm, base) == pytest.approx(base / 2)


@given(m=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_ema_update_formula(m, seed):
    torch.manual_seed(seed)
    online, target = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    bn_o, bn_t = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    bn_o.running_mean.fill_(2.0)
    expected = [m * t.detach().clone() + (1 - m) * o.detach() for t, o in zip(target.parameters(), online.parameters())]
    common.ema_update(torch.nn.Sequential(target, bn_t), torch.nn.Sequential(online, bn_o), m)
    for p, e in zip(target.parameters(), expected):
        assert torch.allclose(p, e, atol=1e-6)
    assert torch.equal(bn_t.running_mean, bn_o.running_mean)


def naive_lars(params, grads, bufs, lr, wd, m, eta, lars, clip):
    """One LARS step, one tensor at a time, in float64. With clip, the layer's rate is
    min(trust, lr): written here as a branch, not as a clamp of a ratio."""
    out = []
    for p, g, v in zip(params, grads, bufs):
        d = g + wd * p
        if lars and p.norm() > 0 and d.norm() > 0:
            trust = float(eta * p.norm() / d.norm())
            layer_lr = (trust if trust < lr else lr) if clip else lr * trust
            d = d * (layer_lr / lr)
        v = m * v + d
        out.append((p - lr * v, v))
    return out


@given(seed=st.integers(0, 1000), wd=st.floats(0.0, 0.1), lr=st.floats(0.001, 2.0), clip=st.booleans())
def test_lars_against_naive_loop(seed, wd, lr, clip):
    torch.manual_seed(seed)
    w = [torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 2, 2, dtype=torch.float64)]
    b = [torch.randn(5, dtype=torch.float64)]
    params = [torch.nn.Parameter(t.clone()) for t in w + b]
    opt = common.LARS([dict(params=params[:2], weight_decay=wd, lars=True),
                       dict(params=params[2:], weight_decay=0.0, lars=False)], lr=lr, momentum=0.9, eta=0.02, clip=clip)
    bufs = [torch.zeros_like(t) for t in w + b]
    state = [t.clone() for t in w + b]
    for _ in range(3):
        grads = [torch.randn_like(t) for t in state]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref = naive_lars(state[:2], grads[:2], bufs[:2], lr, wd, 0.9, 0.02, True, clip) + \
            naive_lars(state[2:], grads[2:], bufs[2:], lr, 0.0, 0.9, 0.02, False, clip)
        state, bufs = [r[0] for r in ref], [r[1] for r in ref]
        for p, s in zip(params, state):
            assert torch.allclose(p.detach(), s, atol=1e-10)


def test_optimizer_groups_exclude_biases_and_norms_from_decay():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = common.make_optimizer(net, "lars", 0.1, 1e-4)
    decay, no_decay = opt.param_groups
    assert [p.ndim for p in decay["params"]] == [2] and decay["weight_decay"] == 1e-4
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0
    common.set_lr(opt, 0.5)
    assert all(g["lr"] == 0.5 for g in opt.param_groups)


def test_embedding_std_closed_forms():
    z = torch.randn(1, 64).repeat(100, 1)                      # collapsed: all rows equal
    assert common.embedding_std(z).item() < 1e-6
    d = 128
    spread = torch.randn(20000, d)                             # isotropic: 1/sqrt(d)
    assert common.embedding_std(spread).item() == pytest.approx(1 / math.sqrt(d), rel=0.02)


def naive_knn(train_f, train_y, test_f, C, k, t):
    preds = []
    for q in test_f:
        sims = [(float(q @ f / (q.norm() * f.norm())), int(y)) for f, y in zip(train_f, train_y)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * C
        for s, y in sims[:k]:
            votes[y] += math.exp(s / t)
        preds.append(max(range(C), key=lambda c: votes[c]))
    return preds


@given(seed=st.integers(0, 1000), k=st.integers(1, 40), C=st.integers(2, 5))
def test_knn_against_naive_loop(seed, k, C):
    g = torch.Generator().manual_seed(seed)
    train_f, test_f = torch.randn(40, 6, generator=g).double(), torch.randn(15, 6, generator=g).double()
    train_y = torch.randint(0, C, (40,), generator=g)
    got = common.knn_predict(train_f, train_y, test_f, C, k=k, t=0.1, chunk=4)
    assert got.tolist() == naive_knn(train_f, train_y, test_f, C, k, 0.1)


class Oracle(torch.nn.Module):
    """A 'backbone' whose features are the label itself: kNN and the linear probe must be perfect."""
    dim = 2

    def forward(self, x):
        return torch.stack([x[:, 0].mean((1, 2)), x[:, 1].mean((1, 2))], 1)


def test_knn_and_linear_probe_on_separable_features():
    y = torch.arange(200) % 2
    x = torch.zeros(200, 3, 4, 4, dtype=torch.uint8)
    x[y == 0, 0], x[y == 1, 1] = 200, 200
    data = common.Dataset(x, y, x[::5], y[::5], ["a", "b"], "toy")
    stats = ([0.0] * 3, [1.0] * 3)
    assert common.knn_top1(Oracle(), data, stats) == 1.0
    assert common.linear_probe(Oracle(), data, stats, epochs=30) == 1.0
    # Training labels flipped for 70% of each group: the neighbours' majority is now the
    # wrong class for every test image, so kNN must score exactly 0.
    flipped = torch.where((torch.arange(200) // 2) % 10 < 7, 1 - y, y)
    wrong_labels = common.Dataset(x, flipped, x[::5], y[::5], ["a", "b"], "toy")
    assert common.knn_top1(Oracle(), wrong_labels, stats) == 0.0


@given(lo=st.floats(-1e4, 1e4), span=st.floats(1e-3, 1e4))
def test_nice_ticks_cover_range_with_round_steps(lo, span):
    ticks = common.nice_ticks(lo, lo + span)
    assert ticks[0] <= lo + 1e-9 * abs(lo) and ticks[-1] >= lo + span - 1e-9 * abs(lo + span)
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-6
    assert 3 <= len(ticks) <= 13


def test_line_plot_and_grid_write_pngs(tmp_path):
    from PIL import Image
    common.line_plot([dict(title="t", xlabel="x", ylabel="y", series={"a": ([0, 1, 2], [1.0, 0.5, 0.2]),
                                                                     "b": ([0, 2], [0.1, float("nan")])}),
                      dict(title="empty", xlabel="x", ylabel="y", series={})], tmp_path / "p.png")
    img = Image.open(tmp_path / "p.png")
    assert img.size == (840, 300)
    assert len(img.getcolors(10000)) > 3                         # something was drawn
    common.save_grid(torch.randint(0, 255, (2, 3, 3, 8, 8), dtype=torch.uint8), tmp_path / "g.png", scale=2)
    assert Image.open(tmp_path / "g.png").size == ((3 * 10 + 2) * 2, (2 * 10 + 2) * 2)
