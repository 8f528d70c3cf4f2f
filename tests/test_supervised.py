"""supervised.py and what it added to common: label subsets, labelled batches from a pool,
the cross-entropy against a naive loop, a tiny network that must fit its batch, the script
end to end and its errors; SimCLR's --drop-aug switches."""
import json
import math
from collections import Counter

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import common
import simclr
import supervised
from conftest import TINY, NoAutocast, run_script


# --- label_subset -----------------------------------------------------------------------------

@given(st.lists(st.integers(0, 4), min_size=1, max_size=120), st.floats(0.01, 1.0), st.floats(0.01, 1.0),
       st.integers(0, 3))
def test_label_subset_is_balanced_nested_and_deterministic(labels, f1, f2, seed):
    y = torch.tensor(labels)
    small, large = sorted([f1, f2])
    a = common.label_subset(y, small, seed)
    b = common.label_subset(y, large, seed)
    assert torch.equal(a, common.label_subset(y, small, seed))             # same seed, same subset
    assert torch.equal(a, a.sort().values) and len(a.unique()) == len(a)  # sorted, no repeats
    assert 0 <= a.min() and a.max() < len(y)
    counts, want = Counter(y[a].tolist()), Counter(labels)
    for c, n_c in want.items():              # per class: the nearest whole count, but never none
        assert counts[c] >= 1 and (counts[c] == 1 or abs(counts[c] - small * n_c) <= 0.5)
    assert set(a.tolist()) <= set(b.tolist())                              # fewer labels: a subset of more
    assert torch.equal(common.label_subset(y, 1.0, seed), torch.arange(len(y)))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_label_subset_refuses_bad_fractions(fraction):
    with pytest.raises(common.UserError, match="label fraction"):
        common.label_subset(torch.tensor([0, 1, 1]), fraction)


def test_with_train_subset_keeps_the_test_split():
    data = common.make_shapes_dataset(16, n_train=50, n_test=20)
    idx = torch.tensor([3, 7, 11])
    sub = common.with_train_subset(data, idx)
    assert torch.equal(sub.train_x, data.train_x[idx]) and torch.equal(sub.train_y, data.train_y[idx])
    assert sub.test_x is data.test_x and sub.test_y is data.test_y


# --- Run.labeled_batches ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    args = supervised.make_parser().parse_args(TINY + ["--out", str(tmp_path_factory.mktemp("run"))])
    run = common.Run(args, "supervised", supervised.make_parser())
    run.model = nn.Identity()
    # Images that spell their own index (channel 0: i // 256, channel 1: i % 256), labels a
    # function of it, so a batch can be traced back exactly.
    i = torch.arange(run.n_train)
    run.data.train_x = torch.zeros(run.n_train, 3, 16, 16, dtype=torch.uint8)
    run.data.train_x[:, 0], run.data.train_x[:, 1] = (i // 256).view(-1, 1, 1), (i % 256).view(-1, 1, 1)
    run.data.train_y = i * 7 % 10
    return run


@pytest.mark.parametrize("pool_size", [1, 5, 64, 100, 256])
def test_labeled_batches_draw_evenly_from_the_pool(tiny_run, pool_size):
    run = tiny_run
    pool = torch.randperm(run.n_train)[:pool_size]
    seen, steps = Counter(), []
    for step, x, y in run.labeled_batches(2, pool):
        assert x.shape == (run.args.batch_size, 3, 16, 16) and y.shape == (run.args.batch_size,)
        steps.append(step)
        idx = x[:, 0, 0, 0].long() * 256 + x[:, 1, 0, 0].long()
        assert torch.equal(y, idx * 7 % 10)                     # each image comes with its own label
        seen.update(idx.tolist())
    # The epoch's length does not depend on the pool: steps_per_epoch steps, numbered from epoch 2.
    assert steps == list(range(2 * run.steps_per_epoch, 3 * run.steps_per_epoch))
    assert set(seen) <= set(pool.tolist())
    # Whole permutations of the pool, one after another: every image floor(n/P) or ceil(n/P) times.
    n = run.steps_per_epoch * run.args.batch_size
    assert sum(seen.values()) == n
    assert all(n // pool_size <= seen[i] <= -(-n // pool_size) for i in pool.tolist())


def test_batches_without_pool_is_one_permutation(tiny_run):
    run = tiny_run
    idx = torch.cat([i for _, i in run._index_batches(0)])
    assert len(idx) == run.steps_per_epoch * run.args.batch_size and len(idx.unique()) == len(idx)


# --- the loss and the training step -----------------------------------------------------------

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
    x = common.normalize_images(data.train_x.float() / 255, *data.channel_stats())
    losses = [supervised.train_step(model, opt, x, data.train_y, 0.0, NoAutocast())[0].item() for _ in range(60)]
    assert losses[0] > 1.5 and losses[-1] < 0.1 * losses[0]


# --- the script -------------------------------------------------------------------------------

def test_script_smoke_with_a_tenth_of_the_labels(tmp_path):
    out = tmp_path / "run"
    r = run_script("supervised.py", *TINY, "--epochs", "2", "--label-fraction", "0.1", "--out", str(out),
                   "--linear-probe")
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    data = common.load_data("shapes", tmp_path, 16, subset=256)
    assert s["labeled_images"] == len(common.label_subset(data.train_y, 0.1))
    for key in ["test_top1", "knn_top1", "linear_top1", "peak_memory_mib"]:
        assert key in s, key
    assert 0 <= s["test_top1"] <= 1
    assert s["args"]["label_fraction"] == 0.1 and s["image_size"] == 16
    backbone, _ = common.load_encoder(out)                    # the exported encoder loads back
    assert backbone.dim == 64


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


def test_load_encoder_names_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(common.UserError, match=str(tmp_path)):
        common.load_encoder(tmp_path)


# --- SimCLR's augmentation switches -----------------------------------------------------------

def test_drop_every_part_leaves_only_normalisation():
    stats = ([0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    aug = simclr.simclr_augment(stats, 16, drop=simclr.AUGMENT_PARTS)
    want = (x.float() / 255 - torch.tensor(stats[0]).view(1, 3, 1, 1)) / torch.tensor(stats[1]).view(1, 3, 1, 1)
    torch.testing.assert_close(aug(x), want, atol=1e-5, rtol=0)


def test_drop_switches_one_part_each():
    full = simclr.simclr_augment(([0.5] * 3, [0.5] * 3), 32)
    assert full.jitter_p > 0 and full.gray_p > 0 and full.flip_p > 0 and full.scale[0] < 1 and full.blur_p > 0
    assert full.jitter == (0.8, 0.8, 0.8, 0.2)                 # solo-learn's symmetric.yaml
    changed = {part: simclr.simclr_augment(([0.5] * 3, [0.5] * 3), 32, drop=[part]) for part in ("crop", "flip",
                                                                                                  "jitter", "gray")}
    assert changed["crop"].scale == (1.0, 1.0) and changed["crop"].jitter_p == full.jitter_p
    assert changed["flip"].flip_p == 0 and changed["flip"].scale == full.scale
    assert changed["jitter"].jitter_p == 0 and changed["jitter"].gray_p == full.gray_p
    assert changed["gray"].gray_p == 0 and changed["gray"].jitter_p == full.jitter_p


def test_simclr_script_refuses_unknown_part(tmp_path):
    r = run_script("simclr.py", *TINY, "--drop-aug", "sepia", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "--drop-aug" in r.stderr and "sepia" in r.stderr
