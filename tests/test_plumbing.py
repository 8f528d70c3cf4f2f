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


def paper_lars(w, g, v, lr, wd, m, eta, decay, clip):
    """One step for one tensor, from You et al.'s eq. (6) and solo-learn's text, in float64:
    the local rate eta ||w|| / (||g|| + wd ||w||), capped at the global lr in clip mode
    (multiplied by it otherwise), applied to g + wd w; biases, norms and tensors with a zero
    norm take the plain gradient, with no weight decay."""
    wn, gn = w.norm().item(), g.norm().item()
    if decay and wn > 0 and gn > 0:
        local = eta * wn / (gn + wd * wn + 1e-8)
        rate = min(local, lr) if clip else lr * local
        step = (g + wd * w) * (rate / lr)
    else:
        step = g
    v = m * v + step
    return w - lr * v, v


@given(seed=st.integers(0, 1000), wd=st.floats(0.0, 0.1), lr=st.floats(0.001, 2.0), clip=st.booleans())
def test_lars_against_the_papers_formula(seed, wd, lr, clip):
    torch.manual_seed(seed)
    # The third tensor is zero and the fourth gets a zero gradient: neither is adapted nor decayed.
    w = [torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 2, 2, dtype=torch.float64),
         torch.zeros(2, 3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)]
    b = [torch.randn(5, dtype=torch.float64)]
    params = [torch.nn.Parameter(t.clone()) for t in w + b]
    opt = common.LARS([dict(params=params[:4], weight_decay=wd, decay=True),
                       dict(params=params[4:], weight_decay=0.0, decay=False)], lr=lr, momentum=0.9, eta=0.02, clip=clip)
    state = [(t.clone(), torch.zeros_like(t)) for t in w + b]
    for _ in range(3):
        grads = [torch.randn_like(t) * (i != 3) for i, (t, _) in enumerate(state)]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        state = [paper_lars(t, g, v, lr, wd if i < 4 else 0.0, 0.9, 0.02, i < 4, clip)
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


@given(value=st.floats(0.0, 50.0), recipe=st.integers(1, 2000), epochs=st.integers(1, 4000))
def test_scaled_epochs_keeps_the_recipe_or_its_fraction(value, recipe, epochs):
    got = common.scaled_epochs(value, recipe, epochs)
    if epochs >= recipe:
        assert got == value                                    # a long run: the recipe's own length
    else:
        assert got / epochs == pytest.approx(value / recipe)   # a short one: the same fraction of it
        assert got <= value


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
