"""dino.py against independent oracles: a naive loop for the loss, the centre's formula, the
head's cosines, per-tensor clipping; the paper's crops; the script end to end."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from PIL import Image

import common
import dino
from conftest import TINY, assert_fp32_under_autocast, one_epoch, run_script

SMALL = ["--subset", "128", "--head-hidden", "64", "--head-bottleneck", "16", "--out-dim", "64",
         "--local-crops", "2", "--local-size", "8"]


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
    args = dino.resolve_recipe(dino.make_parser().parse_args([]))
    g, loc = torch.randn(2 * 3, 3, 16, 16), torch.randn(4 * 3, 3, 8, 8)    # 2 global + 4 local crops of 3 images
    s, t = model(g, loc)
    assert s.shape == (6 * 3, 20) and t.shape == (2 * 3, 20) and not t.requires_grad

    t_before = [p.detach().clone() for p in model.teacher.parameters()]
    model.teacher.eval()                                       # no drop path: the teacher's output is fixed
    with torch.no_grad():
        t_out = model.teacher(g).view(2, 3, 20)
    model.teacher.train()
    loss, z = dino.train_step(model, opt, g, loc, 0.04, 0.9, args, common.FP32)
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


def test_without_norm_last_layer_each_prototype_has_a_trained_length():
    """--no-norm-last-layer: logit k is g_k times the cosine, g_k trained from 1; with the
    default, g stays frozen at 1. Either way an optimizer step with the last layer frozen
    leaves the prototypes and their lengths as they were."""
    torch.manual_seed(0)
    free, fixed = dino.DINOHead(8, 16, 4, 10, norm_last_layer=False), dino.DINOHead(8, 16, 4, 10)
    assert free.gain.requires_grad and not fixed.gain.requires_grad
    h = torch.randn(5, 8)
    cos = fixed(h)
    free.load_state_dict(fixed.state_dict())
    assert torch.allclose(free(h), cos)                        # g = 1 at the start: the same cosines
    with torch.no_grad():
        free.gain[3] = 2.5
    assert torch.allclose(free(h)[:, 3], 2.5 * cos[:, 3]) and torch.allclose(free(h)[:, :3], cos[:, :3])
    vit = common.ViT(image_size=8, patch_size=4, dim=8, depth=1, heads=2)
    model = dino.DINO(vit, 16, 4, 10, norm_last_layer=False)
    opt = torch.optim.AdamW(model.student.parameters(), lr=0.1)
    before = [model.student[1].prototypes.clone(), model.student[1].gain.clone()]
    args = dino.resolve_recipe(dino.make_parser().parse_args([]))
    dino.train_step(model, opt, torch.randn(4, 3, 8, 8), None, 0.04, 0.9, args, common.FP32, freeze_last_layer=True)
    assert torch.equal(model.student[1].prototypes, before[0]) and torch.equal(model.student[1].gain, before[1])
    assert not torch.equal(model.student[1].mlp[0].weight, model.teacher[1].mlp[0].weight)   # the rest moved


def test_prototypes_start_at_pytorch_linear_default():
    """The official head builds its last layer after the MLP's 0.02 init, so the prototypes get
    nn.Linear's default: uniform in +-1/sqrt(fan_in), standard deviation 1/sqrt(3 fan_in)."""
    torch.manual_seed(0)
    w = dino.DINOHead(8, 16, 64, 2000).prototypes.detach()     # fan_in 64: bound 0.125
    assert w.abs().max() <= 0.125 and w.abs().max() > 0.124    # 128,000 draws reach the bound
    assert abs(w.std().item() - 0.125 / math.sqrt(3)) < 0.001
    assert abs(w.mean().item()) < 0.001


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


def test_attention_maps_are_the_weights_the_last_block_uses():
    """Weights times values, through the output projection, must give what the block's fused
    attention computes: an oracle that does not rebuild the weights the same way."""
    torch.manual_seed(0)
    vit = common.ViT(image_size=16, patch_size=4, dim=32, depth=2, heads=4).eval()
    x = torch.randn(2, 3, 16, 16)
    attn = dino.last_attention(vit, x)                         # (2, 4, 17, 17)
    h = vit.blocks[0](vit.embed(x))
    blk = vit.blocks[-1]
    y = blk.norm1(h)
    v = F.linear(y, blk.attn.qkv.weight[64:], blk.attn.qkv.bias[64:]).view(2, 17, 4, 8).transpose(1, 2)
    out = blk.attn.proj((attn @ v).transpose(1, 2).reshape(2, 17, 32))
    assert torch.allclose(out, blk.attn(y), atol=1e-5)


def test_dino_crops_follow_the_paper():
    g1, g2, local = dino.dino_augments(([0.5] * 3, [0.5] * 3), 64, 32, min_scale=0.4)
    assert g1.scale == g2.scale == (0.4, 1.0) and local.scale == (0.05, 0.4) and local.size == 32
    assert (g1.blur_p, g2.blur_p, local.blur_p) == (1.0, 0.1, 0.5) and g2.solarize_p == 0.2 == 0.2 + g1.solarize_p
    assert g1.jitter == (0.4, 0.4, 0.2, 0.1) and g1.interpolation == "bicubic"
    small = dino.dino_augments(([0.5] * 3, [0.5] * 3), 32, 16, min_scale=0.6)   # CIFAR-sized: no blur
    assert [a.blur_p for a in small] == [0.0] * 3 and small[0].scale == (0.6, 1.0) and small[1].solarize_p == 0.2


# The two recipes as their sources give them, written out by hand: the paper's main_dino.py
# with its README's ViT-S command, and lightly's benchmarks/cifar10_benchmark.py (DINOModel).
VIT_RECIPE = dict(optimizer="adamw", lr=5e-4, weight_decay=0.04, weight_decay_end=0.4, momentum=0.996,
                  momentum_end=1.0, teacher_temp=0.07, warmup_teacher_temp=0.04, local_crops=6, clip_grad=3.0,
                  head_layers=3, head_bn=False, out_dim=4096, min_scale=0.4)
RESNET_RECIPE = dict(optimizer="sgd", lr=0.12, weight_decay=5e-4, weight_decay_end=5e-4, momentum=0.99,
                     momentum_end=0.99, teacher_temp=0.04, warmup_teacher_temp=0.04, local_crops=0, clip_grad=0.0,
                     head_layers=2, head_bn=True, out_dim=2048, min_scale=0.4)


@pytest.mark.parametrize("arch,recipe", [("vit_tiny", VIT_RECIPE), ("vit_small", VIT_RECIPE),
                                         ("resnet18", RESNET_RECIPE), ("resnet50", RESNET_RECIPE)])
def test_each_backbone_gets_its_recipe(arch, recipe):
    args = dino.resolve_recipe(dino.make_parser().parse_args(["--arch", arch]))
    assert {k: getattr(args, k) for k in recipe} == recipe


def test_a_flag_given_wins_over_the_recipe():
    args = dino.resolve_recipe(dino.make_parser().parse_args(
        ["--arch", "resnet18", "--optimizer", "adamw", "--lr", "0.001", "--local-crops", "2", "--no-head-bn",
         "--teacher-temp", "0.07"]))
    assert (args.optimizer, args.lr, args.local_crops, args.head_bn, args.teacher_temp) == ("adamw", 0.001, 2, False, 0.07)
    assert (args.momentum, args.out_dim, args.head_layers) == (0.99, 2048, 2)   # the rest: still the ResNet's
    vit = dino.resolve_recipe(dino.make_parser().parse_args(["--local-crops", "0"]))
    assert vit.min_scale == 0.14                               # the official README: a ViT without local crops
    assert dino.resolve_recipe(dino.make_parser().parse_args(["--local-crops", "0", "--min-scale", "0.3"])).min_scale == 0.3


def test_resnet_head_is_lightlys_two_layers_with_batchnorm():
    mlp = dino.DINOHead(8, 16, 4, 10, layers=2, batch_norm=True).mlp
    assert [type(m).__name__ for m in mlp] == ["Linear", "BatchNorm1d", "GELU", "Linear"]
    assert (mlp[0].in_features, mlp[0].out_features, mlp[3].out_features) == (8, 16, 4)
    vit_mlp = dino.DINOHead(8, 16, 4, 10).mlp
    assert [type(m).__name__ for m in vit_mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]


def test_dino_loss_is_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    s, t, c = torch.randn(4, 16, 512, generator=g), torch.randn(2, 16, 512, generator=g), torch.randn(512, generator=g)
    assert_fp32_under_autocast(lambda: dino.dino_loss(s, t, 0.1 * c, 0.1, 0.04))


def test_dino_one_epoch_writes_attention_maps(tmp_path):
    out = one_epoch("dino.py", tmp_path, *SMALL, "--patch-size", "8")   # 2x2 patches: half the time of 4 px
    assert (out / "attention.png").is_file()
    w, h = Image.open(out / "attention.png").size
    assert h > w > 0                                           # 8 rows, 1 + 3 heads columns
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == "dino" and 0 <= s["knn_top1"] <= 1


def test_dino_with_a_resnet(tmp_path):
    out = one_epoch("dino.py", tmp_path, *SMALL, "--arch", "resnet18")
    assert not (out / "attention.png").exists()
    saved = json.loads((out / "summary.json").read_text())["args"]     # the ResNet recipe, but the flags given
    assert (saved["optimizer"], saved["momentum"], saved["head_bn"], saved["local_crops"]) == ("sgd", 0.99, True, 2)
    common.build_backbone("resnet18", 16, width=8).load_state_dict(torch.load(out / "encoder.pt", weights_only=True))


@pytest.mark.parametrize("args,needle", [
    (["--momentum", "1"], "--momentum"),
    (["--local-size", "6"], "--local-size"),
    (["--local-size", "32"], "--local-size"),                 # larger than the image
    (["--clip-grad", "-1"], "--clip-grad"),
])
def test_bad_flags_give_clear_errors(tmp_path, args, needle):
    r = run_script("dino.py", *TINY, "--out", str(tmp_path / "o"), *args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
