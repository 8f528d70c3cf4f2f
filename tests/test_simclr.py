"""simclr.py: info_nce against independent oracles (a naive loop, a closed form,
invariances), its augmentation recipe and switches, and the script end to end."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import common
import simclr
from conftest import TINY as TINY_COMMON
from conftest import assert_fp32_under_autocast, run_script
from simclr import info_nce

TINY = TINY_COMMON + ["--proj-hidden", "64", "--proj-dim", "32"]


def naive_info_nce(z1, z2, tau):
    """Loop over the 2N anchors; -log softmax of the positive among the 2N-1 others."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = len(z)
    N = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + N) % n2
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n2) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / tau) / denom)
    return total / n2


@given(N=st.integers(1, 9), D=st.integers(1, 16), tau=st.floats(0.05, 2.0), seed=st.integers(0, 10**6))
def test_info_nce_matches_naive_loop(N, D, tau, seed):
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    assert math.isclose(info_nce(z1, z2, tau).item(), naive_info_nce(z1, z2, tau), rel_tol=1e-4, abs_tol=1e-4)


@given(N=st.integers(1, 9), D=st.integers(2, 16), tau=st.floats(0.05, 2.0), seed=st.integers(0, 10**6))
def test_info_nce_equals_logsumexp_form(N, D, tau, seed):
    """The same loss as -s_pos/tau + logsumexp over the other 2N-1 views, per anchor."""
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(N, D, generator=g).double(), torch.randn(N, D, generator=g).double()
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    s = z @ z.T / tau
    per_anchor = []
    for i in range(2 * N):
        others = torch.cat([s[i, :i], s[i, i + 1:]])
        per_anchor.append(-s[i, (i + N) % (2 * N)] + torch.logsumexp(others, 0))
    expected = torch.stack(per_anchor).mean().item()
    assert math.isclose(info_nce(z1.float(), z2.float(), tau).item(), expected, rel_tol=1e-4, abs_tol=1e-4)


@given(N=st.integers(1, 8), D=st.integers(2, 16), c=st.floats(0.01, 100.0), seed=st.integers(0, 10**6))
def test_info_nce_invariant_to_rescaling(N, D, c, seed):
    """Cosine similarity ignores the length of z, so the loss does too."""
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    scale = torch.rand(N, 1, generator=g) * c + 1e-3          # a different positive scale per row
    assert torch.allclose(info_nce(z1, z2, 0.5), info_nce(z1 * scale, z2 * c, 0.5), atol=1e-5)


@given(N=st.integers(1, 32), D=st.integers(1, 8), tau=st.floats(0.05, 2.0))
def test_info_nce_of_identical_embeddings_is_log_2n_minus_1(N, D, tau):
    """All views equal: every candidate is as likely as the positive, so -log(1/(2N-1))."""
    z = torch.ones(N, D)
    assert math.isclose(info_nce(z, z.clone(), tau).item(), math.log(2 * N - 1), rel_tol=1e-5, abs_tol=1e-6)


def test_info_nce_rewards_matching_views():
    """Views that agree (z2 = z1) give a lower loss than unrelated ones."""
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(64, 32, generator=g)
    assert info_nce(z1, z1, 0.2) < info_nce(z1, torch.randn(64, 32, generator=g), 0.2) - 1.0


def test_drop_every_part_leaves_only_normalisation():
    mean_std = ([0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    aug = simclr.simclr_augment(mean_std, 16, drop=simclr.AUGMENT_PARTS)
    want = (x.float() / 255 - torch.tensor(mean_std[0]).view(1, 3, 1, 1)) / torch.tensor(mean_std[1]).view(1, 3, 1, 1)
    torch.testing.assert_close(aug(x), want, atol=1e-5, rtol=0)


def test_drop_switches_one_part_each():
    full = simclr.simclr_augment(([0.5] * 3, [0.5] * 3), 32)
    assert full.jitter_p > 0 and full.gray_p > 0 and full.flip_p > 0 and full.scale[0] < 1 and full.blur_p == 0
    assert full.jitter == pytest.approx((0.4, 0.4, 0.4, 0.1))  # the paper's CIFAR-10 strength, s = 0.5 (B.9)
    big = simclr.simclr_augment(([0.5] * 3, [0.5] * 3), 96, strength=1.0)
    assert big.jitter == pytest.approx((0.8, 0.8, 0.8, 0.2)) and big.blur_p == 0.5   # ImageNet-sized: blur
    changed = {part: simclr.simclr_augment(([0.5] * 3, [0.5] * 3), 32, drop=[part]) for part in ("crop", "flip",
                                                                                                  "jitter", "gray")}
    assert changed["crop"].scale == (1.0, 1.0) and changed["crop"].jitter_p == full.jitter_p
    assert changed["flip"].flip_p == 0 and changed["flip"].scale == full.scale
    assert changed["jitter"].jitter_p == 0 and changed["jitter"].gray_p == full.gray_p
    assert changed["gray"].gray_p == 0 and changed["gray"].jitter_p == full.jitter_p


def test_simclr_script_refuses_unknown_part(tmp_path):
    r = run_script("simclr.py", *TINY, "--drop-aug", "sepia", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "--drop-aug" in r.stderr and "sepia" in r.stderr


def test_info_nce_is_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(32, 64, generator=g)
    z1 = z + 0.3 * torch.randn(32, 64, generator=g)
    assert_fp32_under_autocast(lambda: info_nce(z1, z, 0.1))


def test_smoke_run_writes_every_output(tmp_path):
    out = tmp_path / "run"
    r = run_script("simclr.py", *TINY, "--epochs", "1", "--out", str(out), "--linear-probe")
    assert r.returncode == 0, r.stderr
    for name in ["log.jsonl", "checkpoint.pt", "encoder.pt", "views.png", "curves.png", "summary.json"]:
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text())
    for key in ["knn_top1", "knn_top1_init", "knn_top1_init_bn", "epochs", "train_seconds", "images_per_s", "device", "linear_top1"]:
        assert key in s, key
    assert 0 <= s["knn_top1"] <= 1 and s["epochs"] == 1 and s["images_per_s"] > 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in log] == [1] and "knn_top1" in log[0] and "emb_std" in log[0]
    encoder = torch.load(out / "encoder.pt", weights_only=True)
    net = common.build_backbone("resnet18", 16, width=8)
    net.load_state_dict(encoder)                               # a plain backbone state_dict
