"""DINO and MAE pieces against independent oracles: naive loops, formulas, inverses."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import common
from conftest import NoAutocast
import dino
import mae


# --- MAE: patches and masking -------------------------------------------------------------

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


# --- DINO ---------------------------------------------------------------------------------

def naive_dino_loss(student, teacher, center, ts, tt):
    """Loop over teacher crops j, student crops i != j and images b."""
    S, B, K = student.shape
    total, pairs = 0.0, 0
    for j in range(2):
        for i in range(S):
            if i == j:
                continue
            h = 0.0
            for b in range(B):
                t = [(float(teacher[j, b, k]) - float(center[k])) / tt for k in range(K)]
                mt = max(t)
                pt = [math.exp(v - mt) for v in t]
                pt = [v / sum(pt) for v in pt]
                s = [float(student[i, b, k]) / ts for k in range(K)]
                ms = max(s)
                log_z = ms + math.log(sum(math.exp(v - ms) for v in s))
                h += -sum(pt[k] * (s[k] - log_z) for k in range(K))
            total += h / B
            pairs += 1
    return total / pairs


@given(S=st.integers(2, 5), B=st.integers(1, 4), K=st.integers(2, 8), ts=st.floats(0.05, 1.0),
       tt=st.floats(0.02, 1.0), seed=st.integers(0, 10**6))
def test_dino_loss_matches_naive_loop(S, B, K, ts, tt, seed):
    g = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(S, B, K, generator=g), torch.randn(2, B, K, generator=g)
    center = torch.randn(K, generator=g) * 0.1
    got = dino.dino_loss(student, teacher, center, ts, tt).item()
    assert math.isclose(got, naive_dino_loss(student, teacher, center, ts, tt), rel_tol=1e-4, abs_tol=1e-4)


def test_dino_loss_sends_no_gradient_to_teacher_or_center():
    student = torch.randn(4, 3, 6, requires_grad=True)
    teacher = torch.randn(2, 3, 6, requires_grad=True)
    center = torch.zeros(6, requires_grad=True)
    dino.dino_loss(student, teacher, center, 0.1, 0.04).backward()
    assert teacher.grad is None and center.grad is None and student.grad.abs().sum() > 0


@given(m=st.floats(0.0, 0.99), seed=st.integers(0, 1000))
def test_center_update_formula(m, seed):
    torch.manual_seed(seed)
    center, t = torch.randn(5), torch.randn(2, 3, 5)
    expected = [m * float(center[k]) + (1 - m) * sum(float(t[j, b, k]) for j in range(2) for b in range(3)) / 6
                for k in range(5)]
    assert torch.allclose(dino.update_center(center, t, m), torch.tensor(expected), atol=1e-6)


def test_teacher_temperature_schedule():
    assert dino.teacher_temperature(0, 100, 0.04, 0.07) == pytest.approx(0.04)
    assert dino.teacher_temperature(50, 100, 0.04, 0.07) == pytest.approx(0.055)
    assert dino.teacher_temperature(100, 100, 0.04, 0.07) == 0.07
    assert dino.teacher_temperature(5, 0, 0.04, 0.07) == 0.07


def test_dino_teacher_gets_no_gradient_multicrop_shapes_and_ema():
    torch.manual_seed(0)
    vit = common.ViT(image_size=16, patch_size=4, dim=32, depth=2, heads=2, drop_path=0.1)
    model = dino.DINO(vit, 32, 16, 20)
    assert all(b.drop == 0 for b in model.teacher[0].blocks) and model.student[0].blocks[-1].drop == 0.1
    opt = common.make_optimizer(common.param_groups(model, 0.04), "adamw", 1e-3)
    args = dino.make_parser().parse_args([])
    g, loc = torch.randn(2 * 3, 3, 16, 16), torch.randn(4 * 3, 3, 8, 8)    # 2 global + 4 local crops of 3 images
    s, t = model(g, loc)
    assert s.shape == (6 * 3, 20) and t.shape == (2 * 3, 20) and not t.requires_grad

    t_before = [p.detach().clone() for p in model.teacher.parameters()]
    model.teacher.eval()                                       # no drop path: the teacher's output is fixed
    with torch.no_grad():
        t_out = model.teacher(g).view(2, 3, 20)
    model.teacher.train()
    loss, z = dino.train_step(model, opt, g, loc, 0.04, 0.9, args, NoAutocast())
    assert torch.isfinite(loss) and z.shape == (3, 20)
    for p, tb, sp in zip(model.teacher.parameters(), t_before, model.student.parameters()):
        assert p.grad is None and not p.requires_grad
        assert torch.allclose(p, 0.9 * tb + 0.1 * sp.detach(), atol=1e-6)
    assert torch.allclose(model.center, 0.1 * t_out.mean((0, 1)), atol=1e-5)   # c <- 0.9 * 0 + 0.1 * mean
    assert "center" in model.state_dict()                      # checkpoints carry it


def test_dino_head_logits_are_cosines_with_unit_prototypes():
    """Each logit is the cosine between the bottleneck and one prototype: rescaling a
    prototype's row changes nothing, and the values equal cosines computed one by one."""
    torch.manual_seed(0)
    head = dino.DINOHead(8, 16, 4, 10)
    h = torch.randn(5, 8)
    out = head(h)
    with torch.no_grad():
        head.prototypes.mul_(torch.rand(10, 1) * 100 + 0.5)    # lengths change, directions do not
    assert torch.allclose(head(h), out, atol=1e-5)
    b = head.mlp(h)
    for i in range(5):
        for k in range(10):
            p = head.prototypes[k]
            assert abs(out[i, k].item() - (b[i] @ p / (b[i].norm() * p.norm())).item()) < 1e-5


def test_per_tensor_gradient_clipping():
    """Each tensor's gradient is rescaled to norm <= max on its own (DINO's clip_gradients),
    not by one global norm: a small gradient next to a huge one is left as it is."""
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    a.grad, b.grad = torch.tensor([30.0, 40.0, 0.0]), torch.tensor([[0.1, 0.2], [0.2, 0.4]])
    small = b.grad.clone()
    dino.clip_gradients([a, b], 3.0)
    assert torch.allclose(a.grad, torch.tensor([1.8, 2.4, 0.0]), atol=1e-5)   # 50 -> 3
    assert torch.equal(b.grad, small)


def test_vit_positions_resize_for_small_crops_and_attention_rows_sum_to_one():
    vit = common.ViT(image_size=16, patch_size=4, dim=32, depth=2, heads=2)
    assert torch.equal(vit.patch_positions(4), vit.pos_embed[:, 1:])
    assert vit(torch.randn(2, 3, 8, 8)).shape == (2, 32)        # a local crop: 2x2 patches
    attn = dino.last_attention(vit, torch.randn(2, 3, 8, 8))
    assert attn.shape == (2, 2, 5, 5) and torch.allclose(attn.sum(-1), torch.ones(2, 2, 5), atol=1e-5)


def test_dino_crops_follow_the_paper():
    g1, g2, local = dino.dino_augments(([0.5] * 3, [0.5] * 3), 32, 16, local_crops=6)
    assert g1.scale == g2.scale == (0.4, 1.0) and local.scale == (0.05, 0.4) and local.size == 16
    assert (g1.blur_p, g2.blur_p, local.blur_p) == (1.0, 0.1, 0.5) and g2.solarize_p == 0.2 == 0.2 + g1.solarize_p
    assert g1.jitter == (0.4, 0.4, 0.2, 0.1) and g1.interpolation == "bicubic"
    assert dino.dino_augments(([0.5] * 3, [0.5] * 3), 32, 16, local_crops=0)[0].scale == (0.14, 1.0)


# --- MAE: positions, initialisation, what is trained ------------------------------------------

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
