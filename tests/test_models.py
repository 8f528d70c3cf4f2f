"""Backbones: output shapes, the ViT on a subset of tokens, attention weights."""
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


def small_vit(image_size=16, patch=4):
    return common.ViT(image_size, patch, dim=32, depth=2, heads=4)


def test_vit_shapes():
    assert common.build_backbone("vit_tiny", 32, patch_size=4).dim == 192
    vit = small_vit()
    x = torch.randn(3, 3, 16, 16)
    assert vit(x).shape == (3, 32)
    assert vit.tokens(x).shape == (3, 1 + 16, 32)
    with pytest.raises(common.UserError, match="patch-size"):
        common.ViT(30, 4)


@given(keep=st.integers(1, 16), seed=st.integers(0, 1000))
def test_vit_encodes_a_subset_of_tokens(keep, seed):
    """tokens(x, ids_keep) equals running the blocks by hand on the gathered patches."""
    torch.manual_seed(seed)
    vit = small_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    ids = torch.stack([torch.randperm(16)[:keep] for _ in range(2)])   # (B, keep)
    out = vit.tokens(x, ids)
    assert out.shape == (2, 1 + keep, 32)
    patches = vit.patch_embed(x).flatten(2).transpose(1, 2) + vit.pos_embed[:, 1:]   # (B, 16, D)
    chosen = torch.stack([patches[b, ids[b]] for b in range(2)])
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(2, -1, -1)
    h = torch.cat([cls, chosen], 1)
    for blk in vit.blocks:
        h = blk(h)
    assert torch.allclose(out, vit.norm(h), atol=1e-5)


def test_vit_with_all_tokens_in_order_equals_full_forward():
    vit = small_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    ids = torch.arange(16).expand(2, -1)
    assert torch.allclose(vit.tokens(x, ids), vit.tokens(x), atol=1e-6)


def test_attention_weights_rows_sum_to_one_and_match_fused_path():
    torch.manual_seed(0)
    vit = small_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    attn = vit.last_attention(x)
    assert attn.shape == (2, 4, 17, 17)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 4, 17), atol=1e-5)
    h = torch.randn(2, 17, 32)
    blk = vit.blocks[0]
    assert torch.allclose(blk(h), blk(h, return_attention=True)[0], atol=1e-5)
    # The weights themselves against softmax(q k^T / sqrt(d)) built from the qkv weights.
    a = blk.attn
    q, k, _ = F.linear(h, a.qkv.weight, a.qkv.bias).chunk(3, -1)
    q, k = q.view(2, 17, 4, 8).transpose(1, 2), k.view(2, 17, 4, 8).transpose(1, 2)
    ref = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)
    assert torch.allclose(a(h, return_attention=True)[1], ref, atol=1e-5)


def test_mlp_head():
    head = common.mlp([16, 32, 8])
    assert head(torch.randn(4, 16)).shape == (4, 8)
    assert isinstance(common.mlp([16, 32, 8], last_bn=True)[-1], torch.nn.BatchNorm1d)
