"""supervised.py: the cross-entropy against a naive loop, a tiny network that must fit its
batch, the labelled order of an epoch, the script end to end and its errors."""
import json
import math
from collections import Counter

import pytest
import torch
from hypothesis import given, strategies as st

import common
import supervised
from conftest import TINY, assert_fp32_under_autocast, run_script


@given(st.integers(0, 100), st.sampled_from([0.0, 0.1, 0.3]))
def test_supervised_loss_against_naive_loop(seed, eps):
    g = torch.Generator().manual_seed(seed)
    N, C = 5, 4
    logits = torch.randn(N, C, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, C, (N,), generator=g)
    total = 0.0
    for i in range(N):
        log_z = math.log(sum(math.exp(logits[i, c].item()) for c in range(C)))
        log_p = [logits[i, c].item() - log_z for c in range(C)]
        total += -(1 - eps) * log_p[y[i]] - eps / C * sum(log_p)
    got = supervised.supervised_loss(logits, y, eps).item()
    assert got == pytest.approx(total / N, rel=1e-5)


def test_train_step_fits_one_batch():
    """A network that cannot memorise 32 labelled images has a broken training step."""
    torch.manual_seed(0)
    data = common.make_shapes_dataset(16, n_train=32, n_test=8)
    model = supervised.Supervised(common.build_backbone("resnet18", 16, 8), 10)
    opt = common.make_optimizer(common.param_groups(model, 0.0), "sgd", 0.05)
    x = common.normalize_images(data.train_x.float() / 255, *data.mean_std())
    losses = [supervised.train_step(model, opt, x, data.train_y, 0.0, common.FP32)[0].item() for _ in range(60)]
    assert losses[0] > 1.5 and losses[-1] < 0.1 * losses[0]


def test_supervised_loss_is_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    logits = 20 * torch.randn(32, 10, generator=g)
    assert_fp32_under_autocast(lambda: supervised.supervised_loss(logits, torch.arange(32) % 10))


@pytest.mark.parametrize("pool_size", [1, 5, 64, 100, 256])
def test_labeled_order_visits_the_pool_evenly(pool_size):
    """Whole permutations of the pool, one after another: n indices, each pool image
    floor(n/P) or ceil(n/P) times, and nothing outside the pool."""
    pool = torch.randperm(1000)[:pool_size]
    n = 4 * 64
    order = supervised.labeled_order(pool, n)
    seen = Counter(order.tolist())
    assert len(order) == n and set(seen) <= set(pool.tolist())
    assert all(n // pool_size <= seen[i] <= -(-n // pool_size) for i in pool.tolist())


def test_script_smoke_with_a_tenth_of_the_labels(tmp_path):
    out = tmp_path / "run"
    r = run_script("supervised.py", *TINY, "--epochs", "2", "--label-fraction", "0.1", "--out", str(out),
                   "--linear-probe")
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    data = common.load_data("shapes", tmp_path, 16, subset=256)
    assert s["labeled_images"] == len(supervised.label_subset(data.train_y, 0.1))
    for key in ["test_top1", "knn_top1", "linear_top1", "peak_memory_mib"]:
        assert key in s, key
    assert 0 <= s["test_top1"] <= 1
    assert s["args"]["label_fraction"] == 0.1 and s["image_size"] == 16
    common.build_backbone("resnet18", 16, width=8).load_state_dict(torch.load(out / "encoder.pt", weights_only=True))


@pytest.mark.parametrize("bad", ["0", "1.5", "-1"])
def test_script_refuses_bad_label_fraction(tmp_path, bad):
    r = run_script("supervised.py", *TINY, "--label-fraction", bad, "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "--label-fraction" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_script_refuses_unlabeled_data(tmp_path):
    from PIL import Image
    for i in range(8):
        (tmp_path / "imgs").mkdir(exist_ok=True)
        Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
    r = run_script("supervised.py", "--data", str(tmp_path / "imgs"), "--data-dir", str(tmp_path / "d"),
                   "--image-size", "16", "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path / "run"))
    assert r.returncode != 0 and "needs labels" in r.stderr and "Traceback" not in r.stderr


def test_script_refuses_bad_label_smoothing(tmp_path):
    r = run_script("supervised.py", *TINY, "--label-smoothing", "5", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "--label-smoothing" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


@given(st.lists(st.integers(0, 4), min_size=1, max_size=120), st.floats(0.01, 1.0), st.floats(0.01, 1.0),
       st.integers(0, 3))
def test_label_subset_is_balanced_nested_and_deterministic(labels, f1, f2, seed):
    y = torch.tensor(labels)
    small, large = sorted([f1, f2])
    a = supervised.label_subset(y, small, seed)
    b = supervised.label_subset(y, large, seed)
    assert torch.equal(a, supervised.label_subset(y, small, seed))             # same seed, same subset
    assert torch.equal(a, a.sort().values) and len(a.unique()) == len(a)  # sorted, no repeats
    assert 0 <= a.min() and a.max() < len(y)
    counts, want = Counter(y[a].tolist()), Counter(labels)
    for c, n_c in want.items():              # per class: the nearest whole count, but never none
        assert counts[c] >= 1 and (counts[c] == 1 or abs(counts[c] - small * n_c) <= 0.5)
    assert set(a.tolist()) <= set(b.tolist())                              # fewer labels: a subset of more
    assert torch.equal(supervised.label_subset(y, 1.0, seed), torch.arange(len(y)))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_label_subset_refuses_bad_fractions(fraction):
    with pytest.raises(common.UserError, match="label fraction"):
        supervised.label_subset(torch.tensor([0, 1, 1]), fraction)
