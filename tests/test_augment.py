"""Augmentations: ranges, identities, per-sample randomness, and oracles for each step."""
import colorsys
import math

import torch
from hypothesis import given, strategies as st

import common


def images(n=16, size=32, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def coordinate_image(n, size):
    """Channel 0 holds the column, channel 1 the row, in [0, 1]: a crop reveals its own box."""
    t = (torch.arange(size).float() + 0.5) / size
    img = torch.stack([t.view(1, -1).expand(size, size), t.view(-1, 1).expand(size, size), torch.zeros(size, size)])
    return img.unsqueeze(0).repeat(n, 1, 1, 1)


@given(n=st.integers(1, 12), size=st.sampled_from([8, 16, 32]), out=st.sampled_from([8, 16, 32]),
       seed=st.integers(0, 1000))
def test_full_recipe_shape_dtype_range(n, size, out, seed):
    torch.manual_seed(seed)
    aug = common.Augment(size=out, blur_p=0.5, solarize_p=0.5)
    v = aug(images(n, size, seed), normalize=False)
    assert v.shape == (n, 3, out, out) and v.dtype == torch.float32
    assert v.min() >= 0 and v.max() <= 1
    vn = aug(images(n, size, seed))                            # normalised with mean/std 0.5
    assert vn.min() >= -1 - 1e-6 and vn.max() <= 1 + 1e-6


def test_degenerate_parameters_give_identity():
    x = images(8)
    aug = common.Augment(size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0)
    assert torch.allclose(aug(x, normalize=False), x.float() / 255, atol=1e-5)
    xf = x.float() / 255
    assert torch.equal(common.color_jitter(xf, 0.0, 0.0, 0.0, 0.0, p=1.0), xf)
    assert torch.equal(common.color_jitter(xf, 0.4, 0.4, 0.4, 0.1, p=0.0), xf)
    assert torch.equal(common.random_grayscale(xf, 0.0), xf)
    assert torch.equal(common.gaussian_blur(xf, 0.0), xf)
    assert torch.equal(common.solarize(xf, 0.0), xf)


def test_flip_all_mirrors_exactly():
    x = images(4).float() / 255
    out = common.random_resized_crop(x, 32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    assert torch.allclose(out, x.flip(-1), atol=1e-5)


def test_grayscale_gives_equal_channels_with_luma():
    x = images(6).float() / 255
    g = common.random_grayscale(x, 1.0)
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    assert torch.allclose(g[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])


def test_hsv_matches_colorsys():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 7, 9, generator=g)
    x[0, :, 0, 0] = 0.5                                        # a grey pixel: hue undefined -> 0
    hsv = common.rgb_to_hsv(x)
    for i in range(7):
        for j in range(9):
            ref = colorsys.rgb_to_hsv(*x[0, :, i, j].tolist())
            assert torch.allclose(hsv[0, :, i, j], torch.tensor(ref), atol=1e-5)
    assert torch.allclose(common.hsv_to_rgb(hsv), x, atol=1e-5)


def test_hue_shift_matches_colorsys():
    """Only hue on, p=1: each pixel's hue moves by the sample's shift, S and V stay."""
    torch.manual_seed(3)
    x = torch.rand(5, 3, 4, 4)
    out = common.color_jitter(x, 0.0, 0.0, 0.0, 0.3, p=1.0)
    h_in, h_out = common.rgb_to_hsv(x), common.rgb_to_hsv(out)
    assert torch.allclose(h_in[:, 1:], h_out[:, 1:], atol=1e-4)
    shift = (h_out[:, 0] - h_in[:, 0]) % 1.0                    # (N, 4, 4): one value per sample
    shift = torch.where(shift > 0.5, shift - 1, shift)
    assert (shift.abs() <= 0.3 + 1e-4).all()
    assert torch.allclose(shift, shift[:, :1, :1].expand_as(shift), atol=1e-3)
    assert shift[:, 0, 0].unique().numel() == 5                # a different shift per sample


def test_brightness_scales_each_sample_by_one_factor():
    torch.manual_seed(4)
    x = torch.rand(8, 3, 6, 6) * 0.5                           # dark enough never to clip
    out = common.color_jitter(x, 0.4, 0.0, 0.0, 0.0, p=1.0)
    ratio = out / x
    f = ratio[:, :1, :1, :1]
    assert torch.allclose(ratio, f.expand_as(ratio), atol=1e-4)
    assert (f >= 0.6 - 1e-5).all() and (f <= 1.4 + 1e-5).all() and f.unique().numel() == 8


def test_contrast_keeps_mean_grey_level():
    """Blending with the mean grey level keeps that mean (when nothing clips)."""
    torch.manual_seed(5)
    x = torch.rand(8, 3, 6, 6) * 0.5 + 0.25
    out = common.color_jitter(x, 0.0, 0.4, 0.0, 0.0, p=1.0)
    assert torch.allclose(common.grayscale(out).mean((1, 2, 3)), common.grayscale(x).mean((1, 2, 3)), atol=1e-5)
    assert not torch.allclose(out, x)


def test_solarize_closed_form():
    x = torch.rand(4, 3, 5, 5)
    assert torch.equal(common.solarize(x, 1.0), torch.where(x >= 0.5, 1 - x, x))


def test_blur_keeps_constant_images_and_smooths_noise():
    c = torch.full((3, 3, 32, 32), 0.3)
    assert torch.allclose(common.gaussian_blur(c, 1.0), c, atol=1e-6)
    noise = torch.rand(16, 3, 32, 32)
    assert common.gaussian_blur(noise, 1.0).std() < noise.std()


@given(seed=st.integers(0, 1000))
def test_crop_boxes_follow_torchvision_ranges(seed):
    """Read each crop's box off a coordinate image: area fraction within `scale`, aspect
    within `ratio` (up to one pixel of rounding), flipped crops run right to left."""
    torch.manual_seed(seed)
    size = 64
    out = common.random_resized_crop(coordinate_image(64, size), 16, scale=(0.08, 1.0), flip_p=0.5)
    cols, rows = out[:, 0], out[:, 1]
    w = (cols.amax((1, 2)) - cols.amin((1, 2))) * size * 16 / 15    # centres span (15/16) of the box
    h = (rows.amax((1, 2)) - rows.amin((1, 2))) * size * 16 / 15
    area = w * h / size ** 2
    assert (area > 0.08 * 0.8).all() and (area <= 1.0 + 1e-4).all()
    aspect = w / h
    assert (aspect > 0.75 * 0.85).all() and (aspect < 4 / 3 / 0.85).all()
    flipped = cols[:, 0, 0] > cols[:, 0, -1]
    assert 0 < flipped.sum() < 64


def test_parameters_differ_across_samples():
    torch.manual_seed(0)
    x = images(1).repeat(32, 1, 1, 1)                          # one image, 32 times
    v = common.simclr_augment(([0.5] * 3, [0.5] * 3), 32)(x)
    flat = v.flatten(1)
    assert torch.cdist(flat, flat).fill_diagonal_(1.0).min() > 1e-3   # no two views alike


def test_statistics_on_cpu_are_sane():
    """Over many samples: about 20% grey, about half flipped, mean colour roughly kept."""
    torch.manual_seed(0)
    x = images(2000, 16, seed=1)
    aug = common.Augment(size=16, jitter_p=0.0, gray_p=0.2)
    v = aug(x, normalize=False)
    grey = ((v[:, 0] - v[:, 1]).abs().amax((1, 2)) < 1e-6).float().mean().item()
    assert 0.16 < grey < 0.24                                  # 0.2 +- 4 binomial sigmas
    assert abs(v.mean().item() - (x.float() / 255).mean().item()) < 0.02
    flips = common.random_resized_crop(coordinate_image(2000, 16), 16, flip_p=0.5)
    frac = (flips[:, 0, 0, 0] > flips[:, 0, 0, -1]).float().mean().item()
    assert 0.45 < frac < 0.55


def test_recipes():
    stats = ([0.5] * 3, [0.5] * 3)
    a1, a2 = common.byol_augments(stats, 32)
    assert a2.solarize_p > 0 and a1.solarize_p == 0
    g1, g2, local = common.multicrop_augments(stats, 32, 16)
    assert local.size == 16 and local.scale[1] <= g1.scale[0]
    mae = common.mae_augment(stats, 32)
    assert mae.jitter_p == 0 and mae.gray_p == 0
    x = images(4)
    assert local(x).shape == (4, 3, 16, 16) and mae(x).shape == (4, 3, 32, 32)
