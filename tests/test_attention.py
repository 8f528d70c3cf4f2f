"""make exp-attention: the paper's 60%-of-the-mass thresholding and the Jaccard index against
naive oracles, the shapes' true masks, and the experiment end to end on tiny runs."""
import json
import sys

import torch
from hypothesis import given, strategies as st

from conftest import ROOT

sys.path.insert(0, str(ROOT / "experiments"))
import attention  # noqa: E402
import common  # noqa: E402


def naive_mass_mask(weights, mass):
    """Take the largest weights one by one until they add up to `mass` of the total."""
    total = sum(weights)
    order = sorted(range(len(weights)), key=lambda i: -weights[i])
    kept, acc = set(), 0.0
    for i in order:
        if acc >= mass * total:
            break
        kept.add(i)
        acc += weights[i]
    return kept


@given(w=st.lists(st.floats(0.001, 1.0), min_size=1, max_size=30), mass=st.floats(0.05, 0.95))
def test_mass_mask_keeps_the_fewest_largest_weights_reaching_the_mass(w, mass):
    w = [round(v, 3) + i * 1e-6 for i, v in enumerate(w)]      # no ties: the order is unambiguous
    got = attention.mass_masks(torch.tensor(w, dtype=torch.float64), mass)
    assert {i for i, k in enumerate(got.tolist()) if k} == naive_mass_mask(w, mass)


@given(seed=st.integers(0, 10**6))
def test_jaccard_matches_sets(seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(3, 5, 5, generator=g) < 0.4, torch.rand(3, 5, 5, generator=g) < 0.4
    for i in range(3):
        sa = {(y, x) for y in range(5) for x in range(5) if a[i, y, x]}
        sb = {(y, x) for y in range(5) for x in range(5) if b[i, y, x]}
        expected = len(sa & sb) / len(sa | sb) if sa | sb else 1.0
        assert abs(attention.jaccard(a, b)[i].item() - expected) < 1e-6


def test_score_a_head_on_the_object_and_one_off_it():
    """The object is one 4x4 patch of a 16 px image: a head that puts its mass there scores 1,
    one that looks at the opposite corner 0, a near-uniform one 1 / (patches kept)."""
    masks = torch.zeros(2, 16, 16)
    masks[0, :4, :4] = 1.0                                     # patch (0, 0)
    masks[1, 12:, 12:] = 1.0                                   # patch (3, 3)
    maps = torch.full((2, 3, 4, 4), 1e-4)
    maps[0, 0, 0, 0] = maps[1, 0, 3, 3] = 1.0                  # head 0: on the object
    maps[0, 1, 3, 3] = maps[1, 1, 0, 0] = 1.0                  # head 1: off it
    maps[:, 2] = 1.0                                           # head 2: nearly uniform, keeps 10 of 16 patches,
    maps[0, 2, 0, 0] = maps[1, 2, 3, 3] = 1.01                 # the object's first: 1 / 10
    got = attention.score(maps, masks)
    assert torch.allclose(got, torch.tensor([1.0, 0.0, 0.1]), atol=1e-6)


def test_shape_masks_are_the_shapes_coverage():
    """make_shapes(masks=True): the same images and labels as without, and a mask that is 1 deep
    inside the shape and 0 far from it: the pixels under a full mask have the fill colour,
    nearly constant, where the background varies."""
    x, y = common.make_shapes(40, seed=5, size=32)
    x2, y2, m = common.make_shapes(40, seed=5, size=32, masks=True)
    assert torch.equal(x, x2) and torch.equal(y, y2) and m.shape == (40, 32, 32)
    assert 0 <= m.min() and m.max() <= 1 and 0.05 < (m > 0.5).float().mean() < 0.6
    img = x.float()
    inside = [img[i][:, m[i] == 1].std(1).mean() for i in range(40)]   # film grain only (std ~ 0.1 * 255)
    outside = [img[i][:, m[i] == 0].std(1).mean() for i in range(40)]  # texture and grain
    assert sum(inside) / 40 < 35 and sum(inside) < sum(outside)
    fill = torch.stack([img[i][:, m[i] == 1].mean(1) for i in range(40)])
    bg = torch.stack([img[i][:, m[i] == 0].mean(1) for i in range(40)])
    assert ((fill - bg).abs().sum(1) > 60).float().mean() > 0.9     # the fill is far from the background


def test_attention_experiment_end_to_end(tmp_path, monkeypatch):
    tiny = ["--subset", "64", "--depth", "1", "--eval-every", "0"]
    monkeypatch.setattr(attention, "RUNS", [
        ("dino", "DINO", "dino.py", attention.VIT + tiny + ["--head-hidden", "32", "--out-dim", "32",
                                                             "--local-crops", "0"]),
        ("supervised", "supervised", "supervised.py", attention.VIT + tiny)])
    monkeypatch.setattr(attention, "N_SCORED", 16)
    attention.main(["--epochs", "1", "--batch-size", "32", "--device", "cpu", "--results", str(tmp_path / "res"),
                    "--runs", str(tmp_path / "runs")])
    res = json.loads((tmp_path / "res" / "attention.json").read_text())
    assert set(res["jaccard"]) == {"dino", "supervised", "random"}
    assert all(0 <= v <= 1 for v in res["jaccard"].values())
    for k in res["jaccard"]:                                   # the best head is the best of the heads
        assert res["jaccard"][k] == max(res["jaccard_per_head"][k]) >= res["jaccard_mean_over_heads"][k]
        assert len(res["jaccard_per_head"][k]) == 3            # ViT-Tiny's heads
    assert set(res["train_seconds"]) == {"dino", "supervised"} and all(v > 0 for v in res["train_seconds"].values())
    assert (tmp_path / "res" / "attention.png").is_file()
