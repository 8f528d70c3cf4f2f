"""Augmentations against independent oracles: pillow for colour jitter, grayscale and
solarisation (torchvision's PIL path, the papers' pipeline), F.interpolate on each cropped
image for the crop, a naive loop for the blur; ranges and per-sample randomness as properties."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from PIL import Image, ImageEnhance, ImageOps

import common


def images(n=16, size=32, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def coordinate_image(n, size):
    """Channel 0 holds the column, channel 1 the row, in [0, 1]: a crop reveals its own box."""
    t = (torch.arange(size).float() + 0.5) / size
    img = torch.stack([t.view(1, -1).expand(size, size), t.view(-1, 1).expand(size, size), torch.zeros(size, size)])
    return img.unsqueeze(0).repeat(n, 1, 1, 1)


def colourful(n=6, size=12, seed=0):
    """Smooth images whose channels have very different means (one dominant colour each), so
    that a per-channel mean and the grey mean are far apart."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) ** 2 * 0.7 + 0.1    # (n, 3): a cast per image
    noise = torch.rand(n, 3, size, size, generator=g) * 0.3
    return ((base + noise).clamp(0, 1) * 255).round().byte()


# --- colour: pillow is the oracle -------------------------------------------------------------

def to_pil(x):
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def from_pil(im):
    return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255


def pil_hue(im, units):
    """Rotate the hue by `units` of pillow's 255-step circle (255 wraps to 0 in its HSV)."""
    h, s, v = im.convert("HSV").split()
    h = Image.fromarray(((np.asarray(h).astype(np.int32) + units) % 255).astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def pil_jitter(im, b, c, s, hue_units, order):
    """ColorJitter as torchvision's PIL path runs it: ImageEnhance.Brightness, .Contrast and
    .Color (saturation), and a hue rotation in pillow's HSV, in the given order."""
    for op in order:
        if op == 0:
            im = ImageEnhance.Brightness(im).enhance(b)
        elif op == 1:
            im = ImageEnhance.Contrast(im).enhance(c)
        elif op == 2:
            im = ImageEnhance.Color(im).enhance(s)
        else:
            im = pil_hue(im, hue_units)
    return im


def ours(x, b, c, s, hue, order):
    n = x.shape[0]
    factors = torch.tensor([b, c, s, hue]).repeat(n, 1)
    return common.adjust_colors(x.float() / 255, factors, torch.tensor(order).repeat(n, 1))


# Tolerances, in grey levels of 255: pillow rounds every blend step down to a whole level and
# its contrast target to a whole grey level (up to ~1 level per step); its HSV keeps hue and
# saturation in 255 steps, so a hue rotation is off by up to ~6 levels in a saturated pixel.
BLEND_TOL, HUE_TOL = 2.5 / 255, 8 / 255


@pytest.mark.parametrize("op,factor", [(0, 0.6), (0, 1.35), (1, 0.5), (1, 1.7), (2, 0.2), (2, 1.8)])
def test_each_blend_step_matches_pillow(op, factor):
    x = colourful()
    b, c, s = [factor if i == op else 1.0 for i in range(3)]
    got = ours(x, b, c, s, 0.0, [op, 0, 1, 2][:1] + [o for o in range(4) if o != op])
    for i in range(len(x)):
        want = from_pil(pil_jitter(to_pil(x[i]), b, c, s, 0, [op]))
        assert (got[i] - want).abs().max() <= BLEND_TOL, (op, factor, i)


@pytest.mark.parametrize("units", [-40, 17, 85])
def test_hue_step_matches_pillow(units):
    x = colourful()
    got = ours(x, 1.0, 1.0, 1.0, units / 255, [3, 0, 1, 2])
    for i in range(len(x)):
        want = from_pil(pil_jitter(to_pil(x[i]), 1, 1, 1, units, [3]))
        diff = (got[i] - want).abs()
        assert diff.max() <= HUE_TOL and diff.mean() <= 1.5 / 255, (units, i)


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_all_four_steps_in_every_order_match_pillow(order):
    x = colourful(n=3, seed=sum(order))
    b, c, s, units = 1.3, 0.6, 1.6, 30
    got = ours(x, b, c, s, units / 255, list(order))
    for i in range(len(x)):
        want = from_pil(pil_jitter(to_pil(x[i]), b, c, s, units, order))
        diff = (got[i] - want).abs()
        assert diff.max() <= HUE_TOL + 3 * BLEND_TOL and diff.mean() <= 2.5 / 255, (order, i)


def test_the_order_matters():
    """Brightness then contrast is not contrast then brightness once pixels clip: the order
    each sample draws is really applied."""
    x = colourful()
    a = ours(x, 1.8, 0.3, 1.0, 0.0, [0, 1, 2, 3])
    b = ours(x, 1.8, 0.3, 1.0, 0.0, [1, 0, 2, 3])
    assert (a - b).abs().max() > 0.05


def test_grayscale_matches_pillow_convert_l():
    x = colourful(seed=3)
    got = common.grayscale(x.float() / 255)
    for i in range(len(x)):
        want = torch.from_numpy(np.array(to_pil(x[i]).convert("L"))).float() / 255
        assert (got[i, 0] - want).abs().max() <= 0.5 / 255 + 1e-6


def test_solarize_matches_pillow_exactly():
    x = images(4, 8)
    got = common.solarize(x.float() / 255, 1.0)
    for i in range(len(x)):
        assert torch.allclose(got[i], from_pil(ImageOps.solarize(to_pil(x[i]), 128)), atol=1e-6)


def test_jitter_draws_factors_in_torchvision_ranges():
    """Brightness alone (p 1): every sample scaled by its own factor in [0.6, 1.4]."""
    torch.manual_seed(4)
    x = torch.rand(64, 3, 6, 6) * 0.5                          # dark enough never to clip
    out = common.color_jitter(x, 0.4, 0.0, 0.0, 0.0, p=1.0)
    ratio = out / x
    f = ratio[:, :1, :1, :1]
    assert torch.allclose(ratio, f.expand_as(ratio), atol=1e-4)
    assert (f >= 0.6 - 1e-5).all() and (f <= 1.4 + 1e-5).all() and f.unique().numel() == 64
    assert f.min() < 0.7 and f.max() > 1.3                     # the whole range is used


# --- the crop: a per-image reference that crops, then resizes ---------------------------------

@given(seed=st.integers(0, 10_000), size=st.sampled_from([5, 8, 16, 24]), mode=st.sampled_from(["bilinear", "bicubic"]))
def test_resized_crop_matches_cropping_then_interpolating(seed, size, mode):
    """Each box cropped out and resized by F.interpolate on its own (torchvision's
    resized_crop on a tensor), mirrored for flipped samples: equal to 1e-5 everywhere, the
    border pixels included, for boxes that touch the image's edges, up- and downscaling."""
    g = torch.Generator().manual_seed(seed)
    N, H, W = 6, 13, 17
    x = torch.rand(N, 3, H, W, generator=g)
    h = torch.randint(1, H + 1, (N,), generator=g)
    w = torch.randint(1, W + 1, (N,), generator=g)
    top = (torch.rand(N, generator=g) * (H - h + 1)).floor().long()
    left = (torch.rand(N, generator=g) * (W - w + 1)).floor().long()
    top[0], left[0], h[0], w[0] = 0, 0, H, W                   # the whole image
    top[1], left[1] = H - h[1], W - w[1]                       # a box in the bottom-right corner
    flip = torch.rand(N, generator=g) < 0.5
    got = common.resized_crop(x, (top.float(), left.float(), h.float(), w.float()), size, flip, mode)
    for i in range(N):
        crop = x[i:i + 1, :, top[i]:top[i] + h[i], left[i]:left[i] + w[i]]
        want = F.interpolate(crop, size=(size, size), mode=mode, align_corners=False)[0]
        want = want.clamp(0, 1) if mode == "bicubic" else want
        want = want.flip(-1) if flip[i] else want
        assert torch.allclose(got[i], want, atol=1e-5), i


def test_crop_never_reads_outside_its_box():
    """An image that is 0 inside the box and 1 outside: the crop is 0 everywhere."""
    x = torch.ones(1, 3, 20, 20)
    x[:, :, 5:12, 3:9] = 0
    box = tuple(torch.tensor([v]) for v in (5.0, 3.0, 7.0, 6.0))
    for mode in ("bilinear", "bicubic"):
        assert common.resized_crop(x, box, 16, torch.tensor([False]), mode).abs().max() < 1e-6


@given(seed=st.integers(0, 1000))
def test_crop_boxes_follow_torchvision_ranges(seed):
    torch.manual_seed(seed)
    H, W = 40, 64
    top, left, h, w = common.sample_crop_boxes(500, H, W, (0.08, 1.0), (3 / 4, 4 / 3), "cpu")
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    found = (h * w >= 0.08 * H * W * 0.9)                     # within scale up to rounding
    assert found.float().mean() > 0.95
    aspect = w / h
    assert ((aspect > 0.75 * 0.9) & (aspect < 4 / 3 / 0.9)).float().mean() > 0.95
    assert torch.equal(top, top.round()) and torch.equal(w, w.round())   # whole pixels


def test_crop_fallback_is_the_central_crop():
    """A scale no box can meet (more than the whole image): the largest central crop whose
    aspect ratio is within `ratio`, as torchvision's fallback."""
    top, left, h, w = common.sample_crop_boxes(3, 10, 30, (2.0, 3.0), (3 / 4, 4 / 3), "cpu")
    assert torch.equal(h, torch.full((3,), 10.0)) and torch.equal(w, torch.full((3,), 13.0))
    assert torch.equal(left, torch.full((3,), 8.0)) and torch.equal(top, torch.zeros(3))


def test_flip_all_mirrors_exactly():
    x = images(4).float() / 255
    for mode in ("bilinear", "bicubic"):
        out = common.random_resized_crop(x, 32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0, mode=mode)
        assert torch.allclose(out, x.flip(-1), atol=1e-5)


# --- blur -----------------------------------------------------------------------------------

def test_blur_matches_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 7, 9, generator=g)
    sigma, r = torch.tensor([0.6, 1.7]), 4
    got = common.blur(x, sigma, r)
    for n in range(2):
        k = [math.exp(-t * t / (2 * sigma[n].item() ** 2)) for t in range(-r, r + 1)]
        k = [v / sum(k) for v in k]
        for i in range(7):
            for j in range(9):
                want = sum(k[a] * k[b] * x[n, 0, min(max(i + a - r, 0), 6), min(max(j + b - r, 0), 8)].item()
                           for a in range(2 * r + 1) for b in range(2 * r + 1))
                assert abs(got[n, 0, i, j].item() - want) < 1e-5


def test_blur_keeps_constant_images_and_smooths_noise():
    c = torch.full((3, 3, 32, 32), 0.3)
    assert torch.allclose(common.gaussian_blur(c, 1.0), c, atol=1e-6)
    noise = torch.rand(16, 3, 32, 32)
    assert common.gaussian_blur(noise, 1.0).std() < noise.std()
    assert common.gaussian_blur(torch.rand(2, 3, 4, 4), 1.0).shape == (2, 3, 4, 4)   # smaller than the kernel


# --- the whole recipe -----------------------------------------------------------------------

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
    for mode in ("bilinear", "bicubic"):
        aug = common.Augment(size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), interpolation=mode, flip_p=0.0,
                             jitter_p=0.0, gray_p=0.0)
        assert torch.allclose(aug(x, normalize=False), x.float() / 255, atol=1e-5)
    xf = x.float() / 255
    assert torch.equal(common.color_jitter(xf, 0.0, 0.0, 0.0, 0.0, p=1.0), xf)
    assert torch.equal(common.color_jitter(xf, 0.4, 0.4, 0.4, 0.1, p=0.0), xf)
    assert torch.equal(common.random_grayscale(xf, 0.0), xf)
    assert torch.equal(common.gaussian_blur(xf, 0.0), xf)
    assert torch.equal(common.solarize(xf, 0.0), xf)


def test_parameters_differ_across_samples():
    torch.manual_seed(0)
    x = images(1).repeat(32, 1, 1, 1)                          # one image, 32 times
    v = common.Augment(32)(x)
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
    flips = common.random_resized_crop(coordinate_image(2000, 16), 16, flip_p=0.5, mode="bilinear")
    frac = (flips[:, 0, 0, 0] > flips[:, 0, 0, -1]).float().mean().item()
    assert 0.45 < frac < 0.55
