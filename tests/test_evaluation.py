"""Evaluation (common.py, section 5): kNN against a naive loop, the linear probe and kNN on
features that answer by construction, the random-init bars' refreshed BatchNorm statistics
against their closed form, the fine-tuning classifier and its learning rates."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import common


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
    mean_std = ([0.0] * 3, [1.0] * 3)
    assert common.knn_top1(Oracle(), data, mean_std) == 1.0
    assert common.linear_probe(Oracle(), data, mean_std, epochs=30) == 1.0
    # Training labels flipped for 70% of each group: the neighbours' majority is now the
    # wrong class for every test image, so kNN must score exactly 0.
    flipped = torch.where((torch.arange(200) // 2) % 10 < 7, 1 - y, y)
    wrong_labels = common.Dataset(x, flipped, x[::5], y[::5], ["a", "b"], "toy")
    assert common.knn_top1(Oracle(), wrong_labels, mean_std) == 0.0


def test_refresh_batchnorm_recomputes_the_statistics_of_a_copy():
    """The stem's BatchNorm ends with the mean of its input over the images used (equal batches,
    so the average of the batch means) and, from one batch, their unbiased variance; the
    original network and the global random stream are untouched; a ViT has nothing to refresh."""
    torch.manual_seed(0)
    net = common.build_backbone("resnet18", 8, width=4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randint(0, 256, (24, 3, 8, 8), dtype=torch.uint8)
    mean_std = ([0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    rng = torch.get_rng_state()
    fresh = common.refresh_batchnorm(net, x, mean_std, batches=3, batch_size=8)
    assert torch.equal(torch.get_rng_state(), rng) and not fresh.training
    with torch.no_grad():
        h = net.stem[0](common.normalize_images(x.float() / 255, *mean_std))   # (24, 4, 8, 8): the stem BN's input
    assert torch.allclose(fresh.stem[1].running_mean, h.mean((0, 2, 3)), atol=1e-5)
    one = common.refresh_batchnorm(net, x, mean_std, batches=1, batch_size=24)
    assert torch.allclose(one.stem[1].running_var, h.transpose(0, 1).reshape(4, -1).var(1), rtol=1e-4)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    # In training mode BatchNorm normalises with the batch's own statistics, so a second
    # refresh finds the same ones: the bar does not depend on the statistics it started from.
    again = common.refresh_batchnorm(fresh, x, mean_std, batches=3, batch_size=8)
    for (k, v), w in zip(fresh.state_dict().items(), again.state_dict().values()):
        assert torch.allclose(v.float(), w.float(), atol=1e-5), k
    # Only whole batches: 24 images in batches of 10 use 20 of them, a batch of 4 would not count.
    two = common.refresh_batchnorm(net, x, mean_std, batches=3, batch_size=10)
    assert two.stem[1].num_batches_tracked.item() == 2
    assert common.refresh_batchnorm(small_vit(), x, mean_std) is None


def test_random_init_bars():
    torch.manual_seed(0)
    y = torch.arange(64) % 2
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    data = common.Dataset(x, y, x[:16], y[:16], ["a", "b"], "toy")
    net, mean_std = common.build_backbone("resnet18", 8, width=4), data.mean_std()
    rng = torch.get_rng_state()
    bars = common.random_init_bars(net, data, mean_std)
    assert torch.equal(torch.get_rng_state(), rng)
    assert bars["knn_top1_init"] == common.knn_top1(net, data, mean_std)
    fresh = common.refresh_batchnorm(net, x, mean_std)
    assert bars["knn_top1_init_bn"] == common.knn_top1(fresh, data, mean_std)
    assert common.random_init_bars(small_vit(8), data, mean_std)["knn_top1_init_bn"] is None
    unlabeled = common.Dataset(x, None, None, None, [], "toy")
    assert common.random_init_bars(net, unlabeled, mean_std) == {"knn_top1_init": None, "knn_top1_init_bn": None}


def small_vit(image_size=16, patch=4):
    return common.ViT(image_size, patch, dim=32, depth=2, heads=4)


def test_classifier_pools_the_patch_tokens_of_a_vit():
    torch.manual_seed(0)
    vit = small_vit().eval()
    clf = common.Classifier(vit, 5).eval()
    x = torch.randn(3, 3, 16, 16)
    tokens = vit.features(x)                                   # (3, 17, 32)
    want = clf.head(F.layer_norm(tokens[:, 1:].mean(1), (32,), clf.fc_norm.weight, clf.fc_norm.bias, 1e-6))
    assert torch.allclose(clf(x), want, atol=1e-5)
    assert clf.head.weight.abs().max() < 1e-4                  # starts near 0 (MAE: std 2e-5)
    resnet = common.build_backbone("resnet18", 16, width=8).eval()
    clf = common.Classifier(resnet, 5).eval()
    assert torch.allclose(clf(x), clf.head(resnet(x)), atol=1e-6)   # a ResNet's own pooled feature


def test_layer_decay_scales_closed_form():
    """rate^(n + 1 - layer): the head 1, block i rate^(n - i), the embeddings rate^(n + 1)."""
    clf = common.Classifier(common.ViT(16, 4, dim=32, depth=3, heads=4), 5)
    scale = common.layer_decay(clf, 0.5)
    assert scale("head.weight") == 1 and scale("fc_norm.bias") == 1
    assert scale("backbone.blocks.2.mlp.0.weight") == 0.5
    assert scale("backbone.blocks.0.attn.qkv.weight") == 0.125
    for name in ("backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.weight"):
        assert scale(name) == 0.0625
    groups = common.param_groups(clf, 0.05, no_decay=("cls_token", "pos_embed"), lr_scale=scale)
    assert sorted({g["lr_scale"] for g in groups}) == [0.0625, 0.125, 0.25, 0.5, 1.0]
    assert sum(len(g["params"]) for g in groups) == len(list(clf.parameters()))


@given(seed=st.integers(0, 100))
def test_fine_tune_learns_separable_colours(seed):
    """Two classes told apart by colour alone: a few epochs of fine-tuning must beat chance
    by far, ResNet and ViT alike (layer decay and drop path on)."""
    torch.manual_seed(seed)
    y = torch.arange(128) % 2
    x = torch.zeros(128, 3, 8, 8, dtype=torch.uint8)
    x[y == 0, 0], x[y == 1, 2] = 220, 220
    x = (x.int() + torch.randint(0, 30, x.shape)).clamp(0, 255).byte()
    data = common.Dataset(x, y, x[:32], y[:32], ["r", "b"], "toy")
    mean_std = data.mean_std()
    vit = common.ViT(8, 4, dim=16, depth=2, heads=2)
    assert common.fine_tune(vit, data, mean_std, epochs=6, batch_size=32, lr=4e-3) >= 0.9
