"""Three slides in code: tau's gradient landscape against its closed form, the mask-ratio
sweep's 15% and its interpolation baseline against a naive loop, and `make exp-pretext` end to
end on tiny runs."""
import json
import math
import sys

import pytest
import torch
from hypothesis import given, strategies as st
from PIL import Image

from conftest import ROOT
from conftest import TINY as TINY_COMMON

sys.path.insert(0, str(ROOT / "experiments"))
import common  # noqa: E402
import harness  # noqa: E402
import mask_ratio  # noqa: E402
import pretext  # noqa: E402
import temperature  # noqa: E402

TINY = TINY_COMMON + ["--width", "16"]                         # why 16: tests/test_experiments.py


# --- tau: the weight of each negative in the gradient -----------------------------------------

@given(st.sampled_from(temperature.TAUS + [0.07, 0.3, 2.0]), st.sampled_from([4, 10, 36]))
def test_landscape_weights_are_the_softmax_over_the_anchors_candidates(tau, n):
    """d l_0 / d s_0k = w_0k / tau with w the softmax of s_0j / tau over the anchor's 2n - 1
    candidates (its positive and its 2n - 2 negatives): the weights autograd finds through
    simclr.info_nce are that softmax, computed here in a naive loop."""
    sims, weights = temperature.gradient_landscape(tau, n)
    z1, z2 = temperature.circle_batch(n)
    z = torch.cat([z1, z2])
    logits = [(z[0] @ z[j]).item() / tau for j in range(1, 2 * n)]
    top = max(logits)
    Z = sum(math.exp(v - top) for v in logits)
    want = [math.exp(s / tau - top) / Z for s in sims.tolist()]
    assert len(weights) == 2 * n - 2
    for got, w in zip(weights.tolist(), want):
        assert got == pytest.approx(w, rel=1e-3, abs=1e-12)


def test_circle_batch_is_unit_and_circulant():
    z1, z2 = temperature.circle_batch(6)
    z = torch.cat([z1, z2])
    assert torch.allclose(z.norm(dim=1), torch.ones(12, dtype=z.dtype))
    G = z @ z.T
    for d in range(12):                                        # every row sees the same similarities
        assert torch.allclose(torch.stack([G[i, (i + d) % 12] for i in range(12)]), G[0, d].expand(12))
    assert G[0, 6] == pytest.approx(G.fill_diagonal_(-2).max().item())   # the positive is the nearest


def test_landscape_is_written_without_training(tmp_path):
    r = temperature.main(["--landscape-only", "--results", str(tmp_path), "--runs", str(tmp_path / "runs")])
    assert r is None and not (tmp_path / "runs").exists()
    d = json.loads((tmp_path / "temperature_landscape.json").read_text())
    assert d["taus"] == temperature.TAUS and set(d["weight"]) == {f"{t:g}" for t in temperature.TAUS}
    for t in d["weight"]:                                      # harder negatives weigh more, at every tau
        w, s = d["weight"][t], d["similarity"][t]
        assert s == sorted(s) and all(a < b for a, b in zip(w, w[1:]))
    img = Image.open(tmp_path / "temperature_landscape.png").convert("RGB")
    assert set(common.PALETTE[:5]) <= {c for _, c in img.getcolors(1 << 20)}


# --- why 75%: BERT's 15% and the interpolation baseline ---------------------------------------

def test_mask_ratio_sweep_has_berts_15_percent():
    assert 0.15 in mask_ratio.RATIOS and 0.75 in mask_ratio.RATIOS and mask_ratio.RATIOS == sorted(mask_ratio.RATIOS)


def naive_fills(x, hidden):
    """For one image x (C, H, W) and its hidden pixels (H, W) bool: the nearest visible pixel
    (first in row-major order among equals) and the mean of the visible pixels, in loops."""
    C, H, W = x.shape
    vis = [(i, j) for i in range(H) for j in range(W) if not hidden[i, j]]
    near, flat = x.clone(), x.clone()
    mean = torch.stack([x[:, i, j] for i, j in vis]).mean(0)
    for i in range(H):
        for j in range(W):
            if hidden[i, j]:
                a, b = min(vis, key=lambda v: ((v[0] - i) ** 2 + (v[1] - j) ** 2, v))
                near[:, i, j], flat[:, i, j] = x[:, a, b], mean
    return near, flat


@pytest.mark.parametrize("ratio", [0.15, 0.5, 0.75])
def test_interpolation_mse_against_naive_loops(ratio):
    torch.manual_seed(1)
    x = torch.randn(3, 3, 8, 8)
    got_near, got_flat = mask_ratio.interpolation_mse(x, 2, ratio, seed=5)
    torch.manual_seed(5)                                       # the same masks as inside
    _, mask, _ = mask_ratio.mae.random_masking(mask_ratio.mae.patchify(x, 2), ratio)
    hidden = mask.reshape(3, 4, 4).repeat_interleave(2, 1).repeat_interleave(2, 2).bool()   # (3, 8, 8)
    se_near = se_flat = count = 0.0
    for img, h in zip(x, hidden):
        near, flat = naive_fills(img, h)
        se_near += ((near - img) ** 2)[:, h].sum().item()
        se_flat += ((flat - img) ** 2)[:, h].sum().item()
        count += 3 * h.sum().item()
    assert count == 3 * 3 * 4 * (16 - int(16 * (1 - ratio)))  # images x channels x pixels of the hidden patches
    assert got_near == pytest.approx(se_near / count, rel=1e-5)
    assert got_flat == pytest.approx(se_flat / count, rel=1e-5)


def test_interpolation_is_exact_on_flat_images_and_better_on_smooth_ones():
    flat = torch.ones(2, 3, 8, 8) * 0.3
    assert mask_ratio.interpolation_mse(flat, 2, 0.5) == pytest.approx((0.0, 0.0), abs=1e-12)
    ramp = torch.linspace(-1, 1, 8).expand(2, 3, 8, 8).contiguous()
    near, mean = mask_ratio.interpolation_mse(ramp, 2, 0.25)
    assert near < mean / 4


def test_interpolation_baseline_on_a_runs_test_images(tmp_path):
    args = {"data": "shapes", "data_dir": str(tmp_path), "image_size": 16, "subset": 64, "seed": 0, "patch_size": 4}
    (tmp_path / "summary.json").write_text(json.dumps({"args": args}))
    got = mask_ratio.interpolation_baseline(tmp_path, [0.15, 0.75], n=50)
    assert set(got) == {"nearest visible pixel", "mean of the visible pixels"}
    assert all(len(v) == 2 and all(0 < e < 10 for e in v) for v in got.values())
    mask_ratio.plot([0.15, 0.75], [0.3, 0.4], [0.5, None], 0.45, tmp_path / "m.png", got)
    assert Image.open(tmp_path / "m.png").size == (1040, 320)


# --- early pretext tasks: make exp-pretext ----------------------------------------------------

def test_pretext_end_to_end(tmp_path, monkeypatch):
    """The four objectives on tiny runs (MAE with one block), the random-init bar of each
    backbone, the verdict in the JSON, the table and the plot."""
    rows = [(label, script, flags + (["--depth", "1"] if script == "mae.py" else []))
            for label, script, flags in pretext.ROWS]
    monkeypatch.setattr(pretext, "ROWS", rows)
    pretext.main(["--epochs", "1", "--device", "cpu", "--results", str(tmp_path / "results"),
                  "--runs", str(tmp_path / "runs"), "--", *TINY])
    res = json.loads((tmp_path / "results" / "pretext.json").read_text())
    methods = [r["method"] for r in res["rows"]]
    assert methods[:4] == ["Rotation", "SimCLR", "MAE", "Supervised"]
    assert methods[4:] == ["Random init (untrained)", "Random init, BN refreshed", "Random init (untrained)"]
    assert [r["arch"] for r in res["rows"]] == ["resnet18", "resnet18", "vit_tiny", "resnet18",
                                                "resnet18", "resnet18", "vit_tiny"]
    assert all(0 <= r["linear_top1"] <= 1 for r in res["rows"]) and 0 <= res["rows"][0]["task_top1"] <= 1
    linear = {r["method"]: r["linear_top1"] for r in res["rows"][:4]}
    assert res["claim_holds"] == (linear["Rotation"] < min(linear["Supervised"], max(linear["SimCLR"], linear["MAE"])))
    assert res["rotation_minus_supervised_points"] == pytest.approx(100 * (linear["Rotation"] - linear["Supervised"]))
    assert res["data_rotated_at_random"] is True
    assert (tmp_path / "results" / "pretext.md").read_text().count("\n") == 2 + 7
    assert (tmp_path / "results" / "pretext.png").is_file()
    # The same runs as make compare's: the rotation run's folder is the one compare would use.
    args = harness.parse(harness.make_parser("x"), ["--epochs", "1", "--device", "cpu", "--runs", str(tmp_path / "runs"),
                                                    "--results", str(tmp_path / "results"), "--", *TINY])
    assert harness.run_folder("rotation.py", harness.run_flags("rotation.py", [], args), args.runs).is_dir()
