"""Backbones and heads: output shapes, zero-init residuals, stochastic depth, the ViT's
attention weights, and the fine-tuning classifier with its layer-wise learning rates."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import common


@pytest.mark.parametrize("arch,dim", [("resnet18", 64), ("resnet34", 64), ("resnet50", 256)])
def test_resnet_shapes(arch, dim):
    net = common.build_backbone(arch, 32, width=8)             # dim = 8 * width * expansion
    assert net.dim == dim
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, dim)
    big = common.build_backbone(arch, 96, width=8)             # ImageNet-style stem above 64 px
    assert isinstance(big.stem[-1], torch.nn.MaxPool2d)
    assert big(torch.randn(2, 3, 96, 96)).shape == (2, dim)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_zero_init_residual_makes_every_block_its_shortcut(arch):
    """With the last BN of each residual branch at 0, a block computes relu(shortcut(x)):
    the identity for the blocks that keep their shape."""
    net = common.build_backbone(arch, 16, width=8, zero_init_residual=True).eval()
    x = torch.randn(2, 3, 16, 16)
    h = net.stem(x)
    for blk in net.stages:
        out = blk(h)
        assert torch.allclose(out, F.relu(blk.shortcut(h)), atol=1e-6)
        h = out
    plain = common.build_backbone(arch, 16, width=8).eval()
    blk = plain.stages[0]
    h = plain.stem(x)
    assert not torch.allclose(blk(h), F.relu(blk.shortcut(h)), atol=1e-3)


def small_vit(image_size=16, patch=4):
    return common.ViT(image_size, patch, dim=32, depth=2, heads=4)


def test_vit_shapes():
    assert common.build_backbone("vit_tiny", 32, patch_size=4).dim == 192
    vit = small_vit()
    x = torch.randn(3, 3, 16, 16)
    assert vit(x).shape == (3, 32)
    assert vit.features(x).shape == (3, 1 + 16, 32)
    assert torch.allclose(vit(x), vit.norm(vit.features(x)[:, 0]))
    with pytest.raises(common.UserError, match="patch-size"):
        common.ViT(30, 4)


def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 5)
    y = common.drop_path(x, 0.25, training=True)
    per_sample = y[:, 0, 0]
    assert torch.allclose(per_sample.unique(), torch.tensor([0.0, 1 / 0.75]))   # all or nothing, rescaled
    assert torch.equal(y, per_sample.view(-1, 1, 1).expand_as(y))
    assert abs((per_sample == 0).float().mean().item() - 0.25) < 0.03
    assert torch.equal(common.drop_path(x, 0.25, training=False), x)


def test_vit_drop_path_rises_linearly_and_is_off_in_eval():
    vit = common.ViT(16, 4, dim=32, depth=5, heads=4, drop_path=0.2)
    assert [round(b.drop, 6) for b in vit.blocks] == [0.0, 0.05, 0.1, 0.15, 0.2]
    x = torch.randn(2, 3, 16, 16)
    vit.eval()
    assert torch.equal(vit(x), vit(x))
    vit.set_drop_path(0.0)
    assert all(b.drop == 0 for b in vit.blocks)


def test_attention_weights_rows_sum_to_one_and_match_fused_path():
    torch.manual_seed(0)
    h = torch.randn(2, 17, 32)
    blk = small_vit().blocks[0]
    out, attn = blk(h, return_attention=True)
    assert attn.shape == (2, 4, 17, 17)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 4, 17), atol=1e-5)
    assert torch.allclose(blk(h), out, atol=1e-5)
    # The weights themselves against softmax(q k^T / sqrt(d)) built from the qkv weights.
    a = blk.attn
    x = blk.norm1(h)
    q, k, _ = F.linear(x, a.qkv.weight, a.qkv.bias).chunk(3, -1)
    q, k = q.view(2, 17, 4, 8).transpose(1, 2), k.view(2, 17, 4, 8).transpose(1, 2)
    ref = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)
    assert torch.allclose(a(x, return_attention=True)[1], ref, atol=1e-5)


def test_mlp_head():
    head = common.mlp([16, 32, 8])
    assert head(torch.randn(4, 16)).shape == (4, 8)
    assert [type(m) for m in head] == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear]


# --- fine-tuning: the classifier and its learning rates ---------------------------------------

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
    stats = data.channel_stats()
    vit = common.ViT(8, 4, dim=16, depth=2, heads=2)
    assert common.fine_tune(vit, data, stats, epochs=6, batch_size=32, lr=4e-3) >= 0.9
