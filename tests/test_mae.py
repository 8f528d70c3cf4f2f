"""mae.py against independent oracles: patches and their inverse, masking properties, the
loss on masked patches against a naive loop, the sine-cosine positions' closed form; the
script end to end."""
import json
import math
import sys

import pytest
import torch
from hypothesis import given, strategies as st

import common
import mae
from conftest import ROOT, TINY, assert_fp32_under_autocast, run_script

sys.path.insert(0, str(ROOT / "experiments"))
import harness  # noqa: E402

# 8 px patches: 4 per 16 px image, one of them visible. The ViT-Tiny's passes over the 2,000
# test images (kNN, probe, fine-tuning) are most of this test's time, and scale with the tokens.
SMALL = ["--subset", "128", "--patch-size", "8", "--decoder-dim", "32", "--decoder-depth", "1",
         "--finetune-epochs", "1"]


@given(B=st.integers(1, 3), grid=st.integers(1, 5), p=st.integers(1, 4), C=st.sampled_from([1, 3]),
       seed=st.integers(0, 1000))
def test_patchify_round_trip_and_layout(B, grid, p, C, seed):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(B, C, grid * p, grid * p, generator=g)
    patches = mae.patchify(imgs, p)
    assert patches.shape == (B, grid * grid, p * p * C)
    assert torch.equal(mae.unpatchify(patches, p, C), imgs)
    # Patch l is the block at row l // grid, column l % grid, flattened as (p, p, C).
    l = grid * grid - 1
    r, c = divmod(l, grid)
    block = imgs[0, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[0, l], block)


@given(B=st.integers(1, 6), L=st.integers(1, 40), ratio=st.floats(0.0, 0.95), seed=st.integers(0, 10**6))
def test_random_masking_properties(B, L, ratio, seed):
    torch.manual_seed(seed)
    D = 3
    # Token l of sample b carries its own identity: (b, l, b * 1000 + l).
    x = torch.stack(torch.meshgrid(torch.arange(B), torch.arange(L), indexing="ij"), -1).float()
    x = torch.cat([x, (x[..., :1] * 1000 + x[..., 1:])], -1)    # (B, L, 3)
    kept, mask, ids_restore = mae.random_masking(x, ratio)
    keep = int(L * (1 - ratio))
    assert kept.shape == (B, keep, D) and mask.shape == (B, L) and ids_restore.shape == (B, L)
    assert torch.equal(mask.sum(1), torch.full((B,), float(L - keep)))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for b in range(B):
        assert sorted(ids_restore[b].tolist()) == list(range(L))        # a permutation
        visible = kept[b, :, 1].long().tolist()                         # positions that were kept
        assert len(set(visible)) == keep and all(int(v) == b for v in kept[b, :, 0].tolist())
        assert sorted(visible) == [l for l in range(L) if mask[b, l] == 0]
        # ids_restore inverts the shuffle: shuffled[ids_restore] is the original order.
        shuffle = torch.argsort(ids_restore[b])
        assert torch.equal(shuffle[ids_restore[b]], torch.arange(L))
        assert shuffle[:keep].tolist() == visible


def test_samples_are_masked_independently():
    torch.manual_seed(0)
    _, mask, _ = mae.random_masking(torch.zeros(64, 16, 2), 0.75)
    assert len({tuple(m.tolist()) for m in mask}) > 60          # nearly all 64 masks differ


@given(seed=st.integers(0, 1000), ratio=st.sampled_from([0.25, 0.5, 0.75]))
def test_mae_loss_ignores_visible_patches(seed, ratio):
    torch.manual_seed(seed)
    pred, target = torch.randn(3, 16, 12), torch.randn(3, 16, 12)
    _, mask, _ = mae.random_masking(torch.zeros(3, 16, 1), ratio)
    changed = torch.where(mask.bool().unsqueeze(-1), pred, pred + 100 * torch.randn_like(pred))
    assert torch.allclose(mae.mae_loss(pred, target, mask), mae.mae_loss(changed, target, mask))
    naive = sum(float(((pred[b, l] - target[b, l]) ** 2).mean()) for b in range(3) for l in range(16)
                if mask[b, l] == 1) / float(mask.sum())
    assert math.isclose(mae.mae_loss(pred, target, mask).item(), naive, rel_tol=1e-5)


def test_norm_pix_targets_have_zero_mean_unit_variance_per_patch():
    t = mae.patch_targets(torch.rand(2, 3, 8, 8) * 5 + 2, 4, norm_pix=True)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 4), atol=1e-5)
    assert torch.allclose(t.var(-1), torch.ones(2, 4), atol=1e-3)


def test_mae_encoder_sees_only_visible_tokens_and_decoder_restores_order():
    torch.manual_seed(0)
    enc = common.ViT(image_size=16, patch_size=4, dim=32, depth=2, heads=2)
    model = mae.MAE(enc, 16, 1, 2)
    latent, mask, ids_restore = model.forward_encoder(torch.randn(2, 3, 16, 16), 0.75)
    assert latent.shape == (2, 1 + 4, 32)                        # [CLS] + 25% of 16 patches
    pred = model.forward_decoder(latent, ids_restore)
    assert pred.shape == (2, 16, 4 * 4 * 3)


def test_sincos_positions_closed_form():
    """Entry (l, c) for patch l at row r, column q: the first half of the channels encodes q,
    the second r; within a half, sin for the first quarter and cos for the second."""
    dim, grid = 16, 3
    pos = mae.sincos_positions(dim, grid)
    assert pos.shape == (1, 1 + grid * grid, dim) and torch.equal(pos[0, 0], torch.zeros(dim))
    n = dim // 4
    for l in range(grid * grid):
        r, q = divmod(l, grid)
        for c in range(dim):
            coord = q if c < dim // 2 else r
            k = c % (dim // 2)
            w = 1 / 10000 ** ((k % n) / n)
            want = math.sin(coord * w) if k < n else math.cos(coord * w)
            assert abs(pos[0, 1 + l, c].item() - want) < 1e-6


def test_mae_positions_are_fixed_and_tokens_not_decayed():
    torch.manual_seed(0)
    enc = common.ViT(image_size=16, patch_size=4, dim=32, depth=2, heads=2)
    model = mae.MAE(enc, 16, 1, 2)
    assert torch.equal(enc.pos_embed, mae.sincos_positions(32, 4)) and not enc.pos_embed.requires_grad
    assert torch.equal(model.decoder_pos, mae.sincos_positions(16, 4)) and "decoder_pos" in dict(model.named_buffers())
    groups = common.param_groups(model, 0.05, no_decay=("cls_token", "mask_token"))
    decayed = {id(p) for g in groups if g["decay"] for p in g["params"]}
    assert id(enc.cls_token) not in decayed and id(model.mask_token) not in decayed
    assert id(enc.blocks[0].attn.qkv.weight) in decayed
    assert all(id(enc.pos_embed) != id(p) for g in groups for p in g["params"])   # not trained at all
    # xavier-uniform: every Linear's weights within the bound sqrt(6 / (fan_in + fan_out))
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            bound = math.sqrt(6 / sum(m.weight.shape))
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.8 * bound and (m.bias == 0).all()


def test_mae_loss_is_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(4, 16, generator=g) < 0.75).float()
    pred, target = torch.randn(4, 16, 48, generator=g), torch.randn(4, 16, 48, generator=g)
    assert_fp32_under_autocast(lambda: mae.mae_loss(pred, target, mask))


def test_mae_one_epoch_writes_reconstructions_and_finetune_comparison(tmp_path):
    out = tmp_path / "run"
    r = run_script("mae.py", *TINY, *SMALL, "--depth", "2", "--epochs", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    # --depth reaches the exported encoder, and the experiments' loader rebuilds it from summary.json.
    blocks = {k.split(".")[1] for k in torch.load(out / "encoder.pt", weights_only=True) if k.startswith("blocks.")}
    assert blocks == {"0", "1"}
    assert len(harness.load_encoder(out)[0].blocks) == 2
    for name in ["log.jsonl", "checkpoint.pt", "encoder.pt", "reconstructions.png", "summary.json"]:
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text())
    for key in ["knn_top1", "linear_top1", "finetune_top1_pretrained", "finetune_top1_scratch"]:
        assert 0 <= s[key] <= 1, key
    assert "fine-tuned 1 epochs" in r.stderr + r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--mask-ratio", "1.0"], "--mask-ratio"),
    (["--arch", "resnet18"], "--arch"),
    (["--patch-size", "3"], "--patch-size"),
    (["--patch-size", "32"], "--patch-size"),                 # larger than the image: not the mask ratio's fault
])
def test_bad_flags_give_clear_errors(tmp_path, args, needle):
    r = run_script("mae.py", *TINY, "--out", str(tmp_path / "o"), *args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
