"""Backbones and heads (common.py, section 3): output shapes, zero-init residuals,
stochastic depth, the ViT's attention weights."""
import pytest
import torch
import torch.nn.functional as F

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
    assert len(common.build_backbone("vit_tiny", 32, patch_size=4).blocks) == 12
    assert len(common.build_backbone("vit_small", 32, patch_size=4, depth=6).blocks) == 6
    mini = common.build_backbone("vit_mini", 32, patch_size=4, depth=3)
    assert mini.dim == 96 and len(mini.blocks) == 3 and mini.blocks[0].attn.heads == 3
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


def test_mlp_head():
    head = common.mlp([16, 32, 8])
    assert head(torch.randn(4, 16)).shape == (4, 8)
    assert [type(m) for m in head] == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear]
