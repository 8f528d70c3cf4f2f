"""rotation.py: the rotations against numpy's and against index arithmetic, the labels they
carry, the loss against a naive loop, a tiny network that must fit its batch, the script end
to end."""
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import common
import rotation
from conftest import assert_fp32_under_autocast, one_epoch


def numpy_rotated(x, y):
    """The oracle: numpy's rot90 on each image (C, H, W), turning the (H, W) plane y[i] times."""
    return np.stack([np.rot90(img, k, axes=(1, 2)) for img, k in zip(x.numpy(), y.tolist())])


@given(st.integers(1, 9), st.integers(1, 6), st.integers(0, 1000))
def test_rotate_matches_numpy_rot90(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 4, (n,), generator=g)
    assert np.array_equal(rotation.rotate(x, y).numpy(), numpy_rotated(x, y))
    assert torch.equal(x, x.clone())                           # the input is left as it was


def test_a_quarter_turn_moves_the_top_row_to_the_left_column():
    """Index arithmetic, without any rot90: turned by 90 degrees counter-clockwise, pixel
    (i, j) of the result is pixel (j, W - 1 - i) of the image; two turns, (H-1-i, W-1-j)."""
    H = W = 5
    x = torch.arange(3 * H * W).reshape(1, 3, H, W)
    for k, source in [(0, lambda i, j: (i, j)), (1, lambda i, j: (j, W - 1 - i)),
                      (2, lambda i, j: (H - 1 - i, W - 1 - j)), (3, lambda i, j: (H - 1 - j, i))]:
        out = rotation.rotate(x, torch.tensor([k]))[0]
        for i in range(H):
            for j in range(W):
                assert torch.equal(out[:, i, j], x[0][(slice(None), *source(i, j))]), (k, i, j)


def test_random_rotations_carry_the_labels_of_the_turn_they_made():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (400, 3, 4, 4), dtype=torch.uint8)
    rotated, y = rotation.random_rotations(x)
    assert y.dtype == torch.int64 and set(y.tolist()) == {0, 1, 2, 3}
    assert np.array_equal(rotated.numpy(), numpy_rotated(x, y))
    counts = torch.bincount(y, minlength=4).float()
    assert (counts - 100).abs().max() < 40                     # uniform: 100 each, give or take 4 sd


@given(st.integers(0, 100))
def test_rotation_loss_against_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    N = 6
    logits = torch.randn(N, 4, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 4, (N,), generator=g)
    total = 0.0
    for i in range(N):
        log_z = math.log(sum(math.exp(logits[i, r].item()) for r in range(4)))
        total += log_z - logits[i, y[i]].item()
    assert rotation.rotation_loss(logits, y).item() == pytest.approx(total / N, rel=1e-6)


def test_rotation_loss_is_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    logits = 20 * torch.randn(32, 4, generator=g)
    assert_fp32_under_autocast(lambda: rotation.rotation_loss(logits, torch.arange(32) % 4))


def test_train_step_fits_one_batch():
    """A network that cannot tell the turns of 32 fixed images apart has a broken training step."""
    torch.manual_seed(0)
    data = common.make_shapes_dataset(16, n_train=32, n_test=8)
    x, y = rotation.random_rotations(data.train_x)
    model = rotation.Rotation(common.build_backbone("resnet18", 16, 8))
    opt = common.make_optimizer(common.param_groups(model, 0.0), "sgd", 0.05)
    x = common.normalize_images(x.float() / 255, *data.mean_std())
    losses = [rotation.train_step(model, opt, x, y, common.FP32)[0].item() for _ in range(60)]
    assert losses[0] > 1.0 and losses[-1] < 0.1 * losses[0]


def test_script_smoke(tmp_path):
    out = one_epoch("rotation.py", tmp_path)
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == "rotation" and 0 <= s["knn_top1"] <= 1 and 0 <= s["test_rotation_top1"] <= 1
    assert s["args"]["lr"] == 0.1 and s["args"]["weight_decay"] == 5e-4   # the authors' recipe
    common.build_backbone("resnet18", 16, width=8).load_state_dict(torch.load(out / "encoder.pt", weights_only=True))
