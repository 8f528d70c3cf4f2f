"""common.py: what every self-supervised method here shares, in six sections.

    1. data            CIFAR-10, the built-in `shapes` set, image folders and tarballs
    2. augmentations   batched, on the tensor's device, per-sample random parameters
    3. backbones       ResNet-18/34/50 (small-image stem) and ViT-Tiny/Small, MLP heads
    4. plumbing        flags, device, optimizers, schedules, EMA, progress, log, checkpoints
    5. evaluation      kNN and linear probe on frozen features
    6. pictures        augmented views and training curves, drawn with pillow

The method files (simclr.py, ...) read top to bottom and call into this file; nothing in
here is specific to one method. The design choice that shapes the rest: the whole training
set lives on the training device as one uint8 tensor and batches are augmented there, so
no worker processes feed the GPU and an epoch runs close to the speed of the model itself.
"""

import argparse
import functools
import hashlib
import io
import json
import math
import os
import pickle
import sys
import tarfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont


class UserError(Exception):
    """A problem with what the user gave us (a path, a file, a flag). Printed as one
    paragraph by `run_main`, never as a traceback."""


def run_main(main):
    """Run a script's main(): user errors become a one-paragraph message and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted. Checkpoints written so far are kept; continue with "
              "--resume OUT/checkpoint.pt.", file=sys.stderr)
        sys.exit(130)


# ============================================================================================
# 1. Data
# Every data set ends up as uint8 tensors (N, 3, H, W) plus integer labels, held in memory
# and moved whole to the training device; a batch is an index slice, not a DataLoader.
# ============================================================================================

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
SHAPE_CLASSES = ["circle", "square", "triangle", "star", "plus",
                 "ring", "crescent", "bar", "half-disk", "frame"]


@dataclass
class Dataset:
    train_x: torch.Tensor            # (N, 3, H, W) uint8
    train_y: torch.Tensor | None     # (N,) int64, None when the data has no labels
    test_x: torch.Tensor | None      # (M, 3, H, W) uint8, None when there is no test split
    test_y: torch.Tensor | None      # (M,) int64
    classes: list
    name: str

    @property
    def image_size(self):
        return self.train_x.shape[-1]

    @property
    def labeled(self):
        """kNN and linear probes need labels on both splits."""
        return self.train_y is not None and self.test_x is not None and self.test_y is not None

    def to(self, device):
        move = lambda t: None if t is None else t.to(device)
        return Dataset(move(self.train_x), move(self.train_y), move(self.test_x),
                       move(self.test_y), self.classes, self.name)

    def channel_stats(self):
        """Per-channel mean and std of the training images in [0, 1], used to normalise."""
        step = max(1, len(self.train_x) // 10000)              # strided: folders are sorted by class
        x = self.train_x[::step].float() / 255                 # (n, 3, H, W)
        return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).tolist()


def load_data(spec, data_dir, image_size=32, subset=0, seed=0):
    """`spec` is 'cifar10', 'shapes', or a path to an image folder / .tar(.gz) of one."""
    data_dir = Path(data_dir)
    if spec == "cifar10":
        data = load_cifar10(data_dir)
    elif spec == "shapes":
        data = make_shapes_dataset(image_size)
    else:
        data = load_image_tree(Path(spec), image_size, data_dir / "cache")
    if subset:
        # A random (seeded) subset, not the first N: folders are sorted by class.
        keep = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(seed))[:subset]
        data.train_x = data.train_x[keep]
        data.train_y = None if data.train_y is None else data.train_y[keep]
    return data


def label_subset(labels, fraction, seed=0):
    """Indices of a class-balanced `fraction` of the labelled images: from each class, the
    first max(1, round(fraction * n_c)) of a seeded permutation of that class. Prefixes of one
    permutation, so the 1% subset lies inside the 10% one: a smaller budget only removes labels."""
    if not 0 < fraction <= 1:
        raise UserError(f"label fraction {fraction}: must be in (0, 1].")
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    keep = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()            # (n_c,)
        members = members[torch.randperm(len(members), generator=g)]
        keep.append(members[:max(1, round(fraction * len(members)))])
    return torch.cat(keep).sort().values


def with_train_subset(data, idx):
    """The same data set with only the training images `idx` (indices on any device)."""
    idx = idx.to(data.train_x.device)
    return Dataset(data.train_x[idx], None if data.train_y is None else data.train_y[idx],
                   data.test_x, data.test_y, data.classes, data.name)


# --- CIFAR-10, the official python archive -------------------------------------------------

class _CifarUnpickler(pickle.Unpickler):
    """The archive is a pickle of numpy arrays. Allow only what it needs, so that a
    tampered file cannot run code when we read it."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}   # bytes, protocol 2

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(fileobj, where):
    try:
        d = _CifarUnpickler(fileobj, encoding="bytes").load()
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)   # (n, 3, 32, 32)
        y = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:
        raise UserError(f"{where} is not a CIFAR-10 batch in the official python format ({e}). "
                        f"Delete it and run again to download a fresh copy.") from None
    return x, y


def load_cifar10(data_dir):
    """Look for cifar-10-python.tar.gz (or its extracted folder) in data_dir; download it
    there when missing, unless $SSL_OFFLINE is set."""
    folder = data_dir / "cifar-10-batches-py"
    archive = data_dir / "cifar-10-python.tar.gz"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if folder.is_dir():
        parts = []
        for n in names:
            if not (folder / n).exists():
                raise UserError(f"{folder} is missing {n}. Delete the folder to fall back to the archive.")
            with open(folder / n, "rb") as f:
                parts.append(_read_cifar_batch(f, folder / n))
    else:
        if not archive.exists():
            download(CIFAR10_URL, archive, CIFAR10_MD5)
        try:
            with tarfile.open(archive, "r:gz") as tar:
                parts = []
                for n in names:
                    member = tar.extractfile(f"cifar-10-batches-py/{n}")
                    parts.append(_read_cifar_batch(member, f"{archive}:{n}"))
        except (tarfile.TarError, KeyError, OSError, EOFError) as e:
            raise UserError(f"{archive} is not a readable CIFAR-10 archive ({e}). Delete it and run "
                            f"again to download a fresh copy.") from None
    train_x = np.concatenate([p[0] for p in parts[:5]])
    train_y = np.concatenate([p[1] for p in parts[:5]])
    return Dataset(torch.from_numpy(train_x), torch.from_numpy(train_y),
                   torch.from_numpy(parts[5][0]), torch.from_numpy(parts[5][1]),
                   CIFAR10_CLASSES, "cifar10")


def download(url, dest, md5):
    """Download to dest with a progress line and an MD5 check; the file appears only when whole."""
    hint = (f"Without network, put {dest.name} (from {url}) in {dest.parent} (or point --data-dir "
            f"or $SSL_DATA at a folder that holds it), or train offline with --data shapes or "
            f"--data PATH (an image folder or a .tar.gz of one).")
    if os.environ.get("SSL_OFFLINE"):
        raise UserError(f"{dest} not found and $SSL_OFFLINE is set, so nothing is downloaded. {hint}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(part, "wb") as f:
            total, done, t0 = int(r.headers.get("Content-Length") or 0), 0, time.time()
            while chunk := r.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                rate = done / max(time.time() - t0, 1e-9) / 1e6
                pct = f"{100 * done / total:5.1f}%" if total else ""
                print(f"\rdownloading {dest.name}: {done / 1e6:6.1f} MB {pct} {rate:5.1f} MB/s",
                      end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        raise UserError(f"could not download {url} ({e}). {hint}") from None
    if digest.hexdigest() != md5:
        part.unlink(missing_ok=True)
        raise UserError(f"the download of {url} is corrupt (MD5 {digest.hexdigest()}, expected {md5}). "
                        f"Run again, or {hint[0].lower()}{hint[1:]}")
    os.replace(part, dest)


# --- image folders and tarballs ------------------------------------------------------------

def _list_images(path):
    """Return ({relative posix name: zero-argument reader of bytes}, fingerprint for the cache)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        readers = {p.relative_to(path).as_posix(): p.read_bytes for p in files}
        stamp = [(k, p.stat().st_size, p.stat().st_mtime_ns) for k, p in zip(readers, files)]
        return readers, stamp
    if path.is_file():
        try:
            with tarfile.open(path, "r:*") as tar:
                blobs = {m.name.lstrip("./"): tar.extractfile(m).read() for m in tar.getmembers()
                         if m.isfile() and Path(m.name).suffix.lower() in IMAGE_EXTENSIONS}
        except (tarfile.TarError, OSError, EOFError) as e:
            raise UserError(f"--data {path}: not a folder and not a readable .tar/.tar.gz ({e}).") from None
        st = path.stat()
        return {k: (lambda b=b: b) for k, b in sorted(blobs.items())}, [(str(path), st.st_size, st.st_mtime_ns)]
    raise UserError(f"--data {path}: no such file or folder. Give 'cifar10', 'shapes', or a path to an "
                    f"image folder (train/ and test/ with one subfolder per class) or a .tar.gz of one.")


def _split_layout(names):
    """Map relative names to (split, class or None, name). Layout: an optional single top
    folder, then train/ and test/, each with one subfolder per class (or flat images, unlabeled);
    with no train/ at all, every image is unlabeled training data."""
    parts = [n.split("/") for n in names]
    while parts and all(len(p) > 1 for p in parts) and len({p[0] for p in parts}) == 1 \
            and parts[0][0] not in ("train", "test"):
        parts = [p[1:] for p in parts]                         # strip the single top-level folder
    if not any(p[0] == "train" and len(p) > 1 for p in parts):
        parts = [["train"] + p for p in parts]                  # a plain folder: all training data
    splits = {"train": [], "test": []}
    for name, p in zip(names, parts):
        if p[0] in splits and len(p) > 1:
            splits[p[0]].append((name, p[1:]))
    out = {}
    for split, items in splits.items():
        if not items:
            continue
        nested = [len(p) > 1 for _, p in items]
        if any(nested) and not all(nested):
            loose = next(n for (n, p) in items if len(p) == 1)
            raise UserError(f"{split}/ mixes images in class subfolders with loose images such as "
                            f"{loose}: put every image in a class subfolder, or none.")
        out[split] = [(n, p[0] if len(p) > 1 else None) for n, p in items]
    return out


def _decode(name, blob, size):
    try:
        im = Image.open(io.BytesIO(blob))
        im = im.convert("RGB")
    except Exception as e:
        raise UserError(f"cannot read image {name} ({type(e).__name__}: {e}). Remove or replace that "
                        f"file and run again.") from None
    if im.size != (size, size):
        # Scale the shorter side to `size`, then take the central square.
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)     # (3, H, W)


def load_image_tree(path, image_size, cache_dir):
    """Decode a folder or tarball of images once, cache the arrays, reuse them afterwards."""
    readers, stamp = _list_images(path)
    if not readers:
        raise UserError(f"--data {path}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}).")
    key = hashlib.sha1(json.dumps([str(path.resolve()), image_size, stamp]).encode()).hexdigest()[:16]
    cache = cache_dir / f"{path.name.split('.')[0]}-{image_size}px-{key}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            arr = {k: torch.from_numpy(z[k]) for k in z.files if k != "classes"}
            classes = z["classes"].tolist()
        return Dataset(arr["train_x"], arr.get("train_y"), arr.get("test_x"), arr.get("test_y"),
                       classes, path.name)

    layout = _split_layout(list(readers))
    if "train" not in layout:
        raise UserError(f"--data {path}: found test/ but no train/ images.")
    train_classes = {c for _, c in layout["train"]}
    classes = sorted(train_classes) if None not in train_classes else []
    arrays = {}
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        for split, items in layout.items():
            if split == "test" and not classes:
                print(f"note: {path} train/ has no class folders, so test/ is not used (no kNN).",
                      file=sys.stderr)
                continue
            unknown = {c for _, c in items} - set(classes)
            if split == "test" and unknown:
                raise UserError(f"--data {path}: test/ has classes that train/ lacks: {sorted(map(str, unknown))}.")
            imgs = list(pool.map(lambda item: _decode(f"{path}/{item[0]}", readers[item[0]](), image_size), items))
            arrays[f"{split}_x"] = np.stack(imgs)                                  # (n, 3, S, S)
            if classes:
                arrays[f"{split}_y"] = np.array([classes.index(c) for _, c in items], dtype=np.int64)
    n = sum(len(v) for k, v in arrays.items() if k.endswith("_x"))
    print(f"decoded {n} images from {path} in {time.time() - t0:.1f}s", file=sys.stderr)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npz")
        np.savez(tmp, classes=np.array(classes, dtype=str), **arrays)
        os.replace(tmp, cache)
    except OSError as e:
        print(f"note: could not cache decoded images in {cache_dir} ({e}); decoding again next time.",
              file=sys.stderr)
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    return Dataset(t["train_x"], t.get("train_y"), t.get("test_x"), t.get("test_y"), classes, path.name)


# --- shapes: a built-in offline data set ---------------------------------------------------

def _shape_mask(cls, u, v):
    """Inside-test for shape `cls` in its own frame, coordinates u, v roughly in [-1, 1]."""
    r = np.hypot(u, v)
    if cls == 0:                                               # circle
        return r <= 0.9
    if cls == 1:                                               # square
        return np.maximum(abs(u), abs(v)) <= 0.75
    if cls == 2:                                               # equilateral triangle
        return (v >= -0.5) & (v <= 1.0 - 1.732 * abs(u))
    if cls == 3:                                               # five-pointed star
        spoke = (np.arctan2(v, u) % (2 * np.pi / 5)) - np.pi / 5
        return r <= 0.45 + 0.55 * (abs(spoke) / (np.pi / 5)) ** 2.5
    if cls == 4:                                               # plus sign
        return ((abs(u) <= 0.28) & (abs(v) <= 0.95)) | ((abs(v) <= 0.28) & (abs(u) <= 0.95))
    if cls == 5:                                               # ring
        return (r <= 0.95) & (r >= 0.55)
    if cls == 6:                                               # crescent
        return (r <= 0.95) & (np.hypot(u - 0.45, v) >= 0.75)
    if cls == 7:                                               # bar
        return (abs(u) <= 1.0) & (abs(v) <= 0.3)
    if cls == 8:                                               # half-disk
        return (r <= 0.95) & (v >= 0.0)
    return (np.maximum(abs(u), abs(v)) <= 0.9) & (np.maximum(abs(u), abs(v)) >= 0.55)   # frame


def make_shapes(n, seed, size=32):
    """n images (n, 3, size, size) uint8 and labels (n,), deterministic in `seed`.

    Each image is one of ten shapes with random colour, size, position and rotation, over a
    random textured background (stripes, checks, blobs or a gradient). Colour and texture
    carry no class information, so a network must look at the outline to tell classes
    apart: random-init features do poorly, self-supervised ones learn to do well."""
    rng = np.random.default_rng(seed)
    f32 = lambda a: np.asarray(a, dtype=np.float32)
    grid = lambda s: np.meshgrid(*[f32((np.arange(s) + 0.5) / s * 2 - 1)] * 2, indexing="ij")
    gy, gx = grid(size)                                        # (S, S) pixel centres in [-1, 1]
    ss = 2                                                     # supersample the outline, 2x2 per pixel
    hy, hx = grid(size * ss)
    y = rng.integers(0, 10, n)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i0 in range(0, n, 500):
        i1 = min(n, i0 + 500)
        m = i1 - i0
        # Background: two nearby random colours mixed by a random texture. Low contrast on
        # purpose: both crops of an image share its background, and a bold texture would be
        # an easier cue than the shape for telling images apart (a shortcut).
        c0 = f32(rng.random((m, 1, 1, 3)))
        c1 = (c0 + f32(rng.uniform(-0.25, 0.25, (m, 1, 1, 3)))).clip(0, 1)
        kind = rng.integers(0, 4, m)
        ang = f32(rng.random((m, 1, 1)) * np.pi)
        freq = f32(rng.uniform(2, 7, (m, 1, 1)))
        proj = gx * np.cos(ang) + gy * np.sin(ang)             # (m, S, S)
        ortho = -gx * np.sin(ang) + gy * np.cos(ang)
        mix = 0.5 + 0.5 * proj                                 # kind 3: a ramp
        for k, tex in enumerate([
                lambda s: 0.5 + 0.5 * np.sin(proj[s] * freq[s] * np.pi),                     # stripes
                lambda s: (np.floor(proj[s] * freq[s]) + np.floor(ortho[s] * freq[s])) % 2,  # checks
                lambda s: 0.5 + 0.25 * (np.sin(gx * freq[s] * 1.7 + ang[s])                  # blobs
                                        + np.cos(gy * freq[s] * 1.3 - ang[s]))]):
            sel = np.nonzero(kind == k)[0]
            mix[sel] = tex(sel)
        img = c0 * (1 - mix[..., None]) + c1 * mix[..., None]  # (m, S, S, 3)
        # Foreground: the shape in its own rotated, scaled, shifted frame, at 2x resolution.
        scale = f32(rng.uniform(0.5, 0.9, (m, 1, 1)))
        cx, cy = f32(rng.uniform(-1, 1, (2, m, 1, 1)) * (1 - scale) * 0.9)
        th = f32(rng.random((m, 1, 1)) * 2 * np.pi)
        du, dv = (hx - cx) / scale, (hy - cy) / scale
        u, v = du * np.cos(th) + dv * np.sin(th), -du * np.sin(th) + dv * np.cos(th)
        mask = np.zeros((m, size * ss, size * ss), dtype=np.float32)
        for c in range(10):
            idx = np.nonzero(y[i0:i1] == c)[0]
            if len(idx):
                mask[idx] = _shape_mask(c, u[idx], v[idx])
        alpha = mask.reshape(m, size, ss, size, ss).mean((2, 4))[..., None]   # (m, S, S, 1) coverage
        shade = 0.85 + 0.15 * (u * 0.5 + 0.5).clip(0, 1).reshape(m, size, ss, size, ss).mean((2, 4))[..., None]
        # A fill colour far from the background's mean keeps the outline visible.
        fill = f32(rng.random((m, 1, 1, 3)))
        bg_mean = (c0 + c1) / 2
        far = np.abs(fill - bg_mean).sum(-1, keepdims=True) < 0.6
        fill = np.where(far, 1 - bg_mean, fill)
        img = img * (1 - alpha) + fill * shade * alpha         # (m, S, S, 3)
        img += f32(rng.normal(0, 0.03, img.shape))             # sensor noise
        out[i0:i1] = (img.clip(0, 1) * 255 + 0.5).astype(np.uint8)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)


def make_shapes_dataset(image_size=32, n_train=10000, n_test=2000):
    train_x, train_y = make_shapes(n_train, seed=0, size=image_size)
    test_x, test_y = make_shapes(n_test, seed=1, size=image_size)
    return Dataset(train_x, train_y, test_x, test_y, SHAPE_CLASSES, "shapes")


# ============================================================================================
# 2. Augmentations
# Batched and on the batch's device: every sample draws its own parameters, but the work is
# a handful of tensor ops for the whole batch. Semantics follow torchvision's transforms
# (the same parameter ranges and order), in fp32 on CPU and CUDA alike; tests check each
# step against pillow or a per-image reference.
# ============================================================================================

def _uniform(n, lo, hi, device):
    return torch.rand(n, device=device) * (hi - lo) + lo


def sample_crop_boxes(n, height, width, scale, ratio, device):
    """torchvision's RandomResizedCrop boxes for n images: (top, left, h, w), each (n,) float
    holding whole pixels. A box covers `scale` of the area with aspect ratio in `ratio`
    (log-uniform); 10 tries per image, then the largest central crop within `ratio`."""
    area = height * width * _uniform(n * 10, *scale, device).view(n, 10)
    logr = _uniform(n * 10, math.log(ratio[0]), math.log(ratio[1]), device).view(n, 10)
    w = torch.sqrt(area * torch.exp(logr)).round()            # (n, 10) candidate widths
    h = torch.sqrt(area / torch.exp(logr)).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.int().argmax(1, keepdim=True)                   # first valid try per image
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], ok.any(1)
    in_ratio = width / height
    fw = width if in_ratio <= ratio[1] else round(height * ratio[1])
    fh = height if in_ratio >= ratio[0] else round(width / ratio[0])
    fw, fh = min(fw, width), min(fh, height)
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    left = torch.where(found, (torch.rand(n, device=device) * (width - w + 1)).floor(),
                       torch.full_like(w, (width - fw) // 2))
    top = torch.where(found, (torch.rand(n, device=device) * (height - h + 1)).floor(),
                      torch.full_like(h, (height - fh) // 2))
    return top, left, h, w


def _cubic(d, a=-0.75):
    """The cubic convolution kernel of F.interpolate(mode='bicubic') at distance d."""
    d = d.abs()
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return torch.where(d <= 1, near, torch.where(d < 2, far, torch.zeros_like(d)))


def _resize_matrix(start, length, size, in_size, mode):
    """(n, size, in_size): row o holds the weights with which output pixel o mixes the input
    pixels, for the segment [start, start + length) of each image resized to `size` pixels.
    The same arithmetic as F.interpolate(align_corners=False) on the cropped image: source
    coordinate (o + 0.5) * length / size - 0.5, taps clamped to the segment, so no pixel
    outside the crop ever leaks in at its border."""
    o = torch.arange(size, device=start.device, dtype=torch.float32)
    src = (o[None] + 0.5) * (length / size)[:, None] - 0.5    # (n, size) in crop coordinates
    base = src.floor()
    taps = base[..., None] + torch.arange(-1, 3, device=start.device)   # (n, size, 4): 4 neighbours
    if mode == "bicubic":
        weights = _cubic(src[..., None] - taps)
    else:                                                      # bilinear: the triangle kernel
        weights = (1 - (src[..., None] - taps).abs()).clamp(min=0)
    idx = start[:, None, None] + torch.minimum(taps.clamp(min=0), length[:, None, None] - 1)
    m = torch.zeros(len(start), size, in_size, device=start.device)
    return m.scatter_add_(2, idx.long(), weights)


def resized_crop(x, boxes, size, flip, mode="bicubic"):
    """Crop each image of x (N, C, H, W) to its box (top, left, h, w) and resize the crop to
    size x size, mirrored where flip (N,) is true: torchvision's resized_crop, for the whole
    batch in two matrix products (rows, then columns) instead of N calls."""
    top, left, h, w = boxes
    N, C, H, W = x.shape
    rows = _resize_matrix(top, h, size, H, mode)               # (N, size, H)
    cols = _resize_matrix(left, w, size, W, mode)              # (N, size, W)
    cols = torch.where(flip.view(N, 1, 1), cols.flip(1), cols)   # a mirror reverses the output columns
    out = rows.unsqueeze(1) @ x @ cols.transpose(1, 2).unsqueeze(1)   # (N, C, size, size)
    return out.clamp(0, 1) if mode == "bicubic" else out      # bicubic overshoots at edges


def random_resized_crop(x, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5, mode="bicubic"):
    """x (N, C, H, W) float -> (N, C, size, size): RandomResizedCrop, then a horizontal flip
    with probability flip_p, each sample with its own box."""
    boxes = sample_crop_boxes(x.shape[0], x.shape[2], x.shape[3], scale, ratio, x.device)
    flip = torch.rand(x.shape[0], device=x.device) < flip_p
    return resized_crop(x, boxes, size, flip, mode)


def grayscale(x):
    """(N, 3, H, W) -> (N, 1, H, W): ITU-R 601-2 luma, pillow's convert('L') and torchvision's."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def rgb_to_hsv(x):
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    v = maxc
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / d,
        torch.where(maxc == g, 2 + (b - r) / d, 4 + (r - g) / d))
    h = torch.where(delta > 0, (h / 6) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, v], 1)


def hsv_to_rgb(x):
    h, s, v = x.unbind(1)
    k = lambda n: (n + h * 6) % 6                              # the standard closed form
    f = lambda n: v - v * s * (torch.minimum(k(n), 4 - k(n)).clamp(0, 1))
    return torch.stack([f(5), f(3), f(1)], 1)


def adjust_colors(x, factors, order, hue=True):
    """The four steps of ColorJitter with given parameters. x (N, 3, H, W) in [0, 1];
    factors (N, 4): brightness, contrast and saturation factors (1 = unchanged) and a hue
    shift (a fraction of the colour circle, 0 = unchanged); order (N, 4): which step comes
    when (0 brightness, 1 contrast, 2 saturation, 3 hue), a permutation per sample.

    Brightness, contrast and saturation are blends x*f + target*(1-f) with target black, the
    image's mean grey level, and its grey image, clamped to [0, 1] after each step, as in
    torchvision; hue rotates H in HSV space. Each step is one blend for the whole batch.
    hue=False skips the HSV round trip when every shift is 0."""
    N = x.shape[0]
    shift = factors[:, 3].view(N, 1, 1)
    for step in range(4):
        op = order[:, step].view(N, 1, 1, 1)
        gray = grayscale(x)
        target = torch.where(op == 0, torch.zeros_like(gray),
                 torch.where(op == 1, gray.mean((2, 3), keepdim=True), gray))
        f = factors.gather(1, order[:, step:step + 1]).view(N, 1, 1, 1)
        f = torch.where(op == 3, 1.0, f)                       # the hue step is no blend
        x_new = (x * f + target * (1 - f)).clamp(0, 1)
        if hue:
            hsv = rgb_to_hsv(x)
            shifted = hsv_to_rgb(torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], 1)).clamp(0, 1)
            x_new = torch.where(op == 3, shifted, x_new)
        x = x_new
    return x


def color_jitter(x, brightness, contrast, saturation, hue, p=0.8):
    """torchvision's RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p):
    per sample, with probability p, factors drawn uniformly from [1 - s, 1 + s] (the shift
    from [-hue, hue]) and the four steps in a random order."""
    N, dev = x.shape[0], x.device
    lo_hi = [(max(0, 1 - s), 1 + s) for s in (brightness, contrast, saturation)] + [(-hue, hue)]
    factors = torch.stack([_uniform(N, lo, hi, dev) for lo, hi in lo_hi], 1)   # (N, 4)
    order = torch.rand(N, 4, device=dev).argsort(1)            # (N, 4) a random permutation each
    on = (torch.rand(N, device=dev) < p).view(N, 1, 1, 1)
    # Samples that skip the jitter keep x exactly, not x after an HSV round trip.
    return torch.where(on, adjust_colors(x, factors, order, hue=hue > 0), x)


def random_grayscale(x, p):
    on = (torch.rand(x.shape[0], device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(on, grayscale(x).expand_as(x), x)


def blur(x, sigma, radius):
    """Gaussian blur of each image of x (N, C, H, W) with its own sigma (N,), in pixels; the
    kernel reaches `radius` pixels each way and edges repeat the border pixel. Separable:
    one depthwise convolution along each axis for the whole batch."""
    N, C, H, W = x.shape
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kern = torch.exp(-t[None] ** 2 / (2 * sigma[:, None] ** 2))   # (N, 2r+1)
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(C, 0)   # (N*C, 2r+1)
    y = F.pad(x.reshape(1, N * C, H, W), (radius,) * 4, mode="replicate")
    y = F.conv2d(y, kern.view(N * C, 1, 1, -1), groups=N * C)  # along width
    y = F.conv2d(y, kern.view(N * C, 1, -1, 1), groups=N * C)  # along height
    return y.view(N, C, H, W).clamp(0, 1)                      # the clamp: rounding can pass 1


def gaussian_blur(x, p, sigma=(0.1, 2.0)):
    """With probability p per sample, a blur with sigma drawn uniformly from `sigma`, in
    pixels: pillow's GaussianBlur(radius=sigma) as the papers' code and solo-learn apply it,
    whatever the image size. The kernel reaches 3 sigma."""
    s = _uniform(x.shape[0], *sigma, x.device)
    on = (torch.rand(x.shape[0], device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(on, blur(x, s, math.ceil(3 * sigma[1])), x)


def solarize(x, p, threshold=0.5):
    """Invert the pixels at or above threshold: pillow's ImageOps.solarize(img, 128)."""
    on = (torch.rand(x.shape[0], device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(on & (x >= threshold), 1 - x, x)


@dataclass
class Augment:
    """One augmentation recipe, torchvision's pipeline in its usual order: RandomResizedCrop,
    horizontal flip, colour jitter, grayscale, blur, solarisation, normalisation. Call it on a
    uint8 batch (N, 3, H, W); get normalised fp32 views (N, 3, size, size). A probability of
    0 switches that step off. Every method file writes its recipe out in full."""
    size: int
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"          # the papers' code and solo-learn resize crops bicubically
    flip_p: float = 0.5
    jitter: tuple = (0.4, 0.4, 0.4, 0.1)    # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)

    def __call__(self, x, normalize=True):
        x = x.float() / 255                                    # fp32 even under autocast
        x = random_resized_crop(x, self.size, self.scale, self.ratio, self.flip_p, self.interpolation)
        if self.jitter_p > 0:
            x = color_jitter(x, *self.jitter, p=self.jitter_p)
        if self.gray_p > 0:
            x = random_grayscale(x, self.gray_p)
        if self.blur_p > 0:
            x = gaussian_blur(x, self.blur_p)
        if self.solarize_p > 0:
            x = solarize(x, self.solarize_p)
        x = normalize_images(x, self.mean, self.std) if normalize else x
        return x.contiguous(memory_format=torch.channels_last)   # the layout the convolutions want


@functools.lru_cache(maxsize=32)
def _channel_tensor(values, device):
    return torch.tensor(values, device=device).view(1, -1, 1, 1)


def normalize_images(x, mean, std):
    """x (N, 3, H, W) in [0, 1] -> zero mean, unit variance per channel. The statistics are
    made into device tensors once: a copy from host memory every step would stall the host."""
    return (x - _channel_tensor(tuple(mean), x.device)) / _channel_tensor(tuple(std), x.device)


# ============================================================================================
# 3. Backbones
# ResNets with the small-image stem (3x3 conv, stride 1, no max-pool: a 7x7/2 conv and a
# pool would shrink a 32 px image to 8 px before the first block) and ViTs, with the MLP
# heads the methods put on top. `.dim` is the feature size.
# ============================================================================================

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, c, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.last_bn = self.bn2                                # the BN that zero_init_residual zeroes
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != c:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, c, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, 4 * c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * c)
        self.last_bn = self.bn3
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != 4 * c:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, 4 * c, 1, stride, bias=False), nn.BatchNorm2d(4 * c))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block, layers, width=64, small_input=True, zero_init_residual=False):
        super().__init__()
        if small_input:
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        stages, cin = [], width
        for i, n in enumerate(layers):
            c = width * 2 ** i
            for k in range(n):
                stages.append(block(cin, c, 2 if (k == 0 and i > 0) else 1))
                cin = c * block.expansion
        self.stages = nn.Sequential(*stages)
        self.dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            # Each residual branch starts at 0, so every block starts as the identity (Goyal
            # et al. 2017); torchvision's zero_init_residual, used by SimSiam's and BYOL's code.
            for blk in self.stages:
                nn.init.zeros_(blk.last_bn.weight)

    def forward(self, x):                                      # (N, 3, H, W)
        x = self.stages(self.stem(x))                          # (N, dim, H/8, W/8)
        return x.mean((2, 3))                                  # (N, dim)


def drop_path(x, p, training):
    """Stochastic depth: in training, drop a residual branch for a random fraction p of the
    samples (the rest scaled by 1/(1-p) so the expectation is unchanged). x (B, L, D)."""
    if p == 0 or not training:
        return x
    keep = (torch.rand(x.shape[0], 1, 1, device=x.device) >= p).to(x.dtype)   # (B, 1, 1)
    return x * keep / (1 - p)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_attention=False):
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, h, L, D/h)
        q, k, v = qkv.unbind(0)
        if return_attention:
            attn = (q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)).softmax(-1)     # (B, h, L, L)
            out = attn @ v
        else:
            attn, out = None, F.scaled_dot_product_attention(q, k, v)                     # fused kernel
        out = out.transpose(1, 2).reshape(B, L, D)             # (B, L, D)
        return self.proj(out), attn


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)); each branch dropped
    for a fraction `drop` of the samples in training (stochastic depth, 0 = off)."""

    def __init__(self, dim, heads, mlp_ratio=4, drop=0.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.drop = drop

    def forward(self, x, return_attention=False):
        a, attn = self.attn(self.norm1(x), return_attention)
        x = x + drop_path(a, self.drop, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop, self.training)
        return (x, attn) if return_attention else x


class ViT(nn.Module):
    """A Vision Transformer: patches -> tokens with learned positions, [CLS] first, pre-norm
    blocks, a final LayerNorm. forward() returns the [CLS] feature (B, dim). Initialised as
    DINO's and timm's ViTs (truncated normal, std 0.02); mae.py re-initialises its own."""

    def __init__(self, image_size=32, patch_size=4, dim=192, depth=12, heads=3, drop_path=0.0):
        super().__init__()
        if image_size % patch_size:
            raise UserError(f"--patch-size {patch_size} does not divide the image size {image_size}.")
        self.patch_size, self.dim = patch_size, dim
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.set_drop_path(drop_path)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def set_drop_path(self, rate):
        """Stochastic depth rising linearly from 0 in the first block to `rate` in the last (timm)."""
        for i, blk in enumerate(self.blocks):
            blk.drop = rate * i / max(1, len(self.blocks) - 1)

    def embed(self, x):
        """Images (B, 3, H, W) -> tokens (B, 1 + L, D) with positions added, [CLS] first."""
        x = self.patch_embed(x)                                # (B, D, h, w) patch grid
        x = x.flatten(2).transpose(1, 2) + self.patch_positions(x.shape[2])   # (B, L, D), L = h*w
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)      # (B, 1, D)
        return torch.cat([cls, x], 1)

    def patch_positions(self, grid):
        """Positional embeddings of a grid x grid patch image (1, grid*grid, D). Smaller images
        (DINO's local crops) get the trained grid resized, so a patch keeps its relative place."""
        pos = self.pos_embed[:, 1:]                            # (1, L, D) for the training size
        n = math.isqrt(pos.shape[1])
        if grid == n:
            return pos
        pos = pos.reshape(1, n, n, -1).permute(0, 3, 1, 2)     # (1, D, n, n)
        pos = F.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)   # (1, grid*grid, D)

    def features(self, x):
        """Every token after the last block, before the final norm: (B, 1 + L, D)."""
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward(self, x):
        return self.norm(self.features(x)[:, 0])               # (B, D): the [CLS] feature


ARCHS = ["resnet18", "resnet34", "resnet50", "vit_tiny", "vit_small"]


def build_backbone(arch, image_size=32, width=64, patch_size=4, zero_init_residual=False, drop_path=0.0):
    """Small inputs (<= 64 px) get the small-image stem. zero_init_residual applies to
    ResNets, drop_path (stochastic depth) to ViTs."""
    small = image_size <= 64
    if arch == "resnet18":
        return ResNet(BasicBlock, [2, 2, 2, 2], width, small, zero_init_residual)
    if arch == "resnet34":
        return ResNet(BasicBlock, [3, 4, 6, 3], width, small, zero_init_residual)
    if arch == "resnet50":
        return ResNet(Bottleneck, [3, 4, 6, 3], width, small, zero_init_residual)
    if arch == "vit_tiny":
        return ViT(image_size, patch_size, 192, 12, 3, drop_path)
    if arch == "vit_small":
        return ViT(image_size, patch_size, 384, 12, 6, drop_path)
    raise UserError(f"--arch {arch}: unknown; choose one of {', '.join(ARCHS)}.")


def mlp(dims):
    """Projection/prediction head: Linear-BN-ReLU for every hidden layer, then a Linear.
    dims = [in, ..., out]. SimCLR's projector, BYOL's projector and predictor."""
    layers = []
    for i in range(len(dims) - 2):
        layers += [nn.Linear(dims[i], dims[i + 1], bias=False), nn.BatchNorm1d(dims[i + 1]), nn.ReLU()]
    layers.append(nn.Linear(dims[-2], dims[-1]))
    return nn.Sequential(*layers)


# ============================================================================================
# 4. Training plumbing
# Flags every method shares, the device, optimizers and schedules, and `Run`: one object
# that owns the output folder, the log, checkpoints, progress and evaluation, so that each
# method's file keeps only its model, its loss and an explicit training loop.
# ============================================================================================

def positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def nonneg_int(s):
    v = int(s) if s.lstrip("-").isdigit() else None
    if v is None or v < 0:
        raise argparse.ArgumentTypeError(f"{s!r} must be a whole number >= 0")
    return v


def positive_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{v} must be a positive number")
    return v


def nonneg_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{v} must be a number >= 0")
    return v


def ema_momentum(s):
    """An EMA momentum: a number in [0, 1)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be in [0, 1)")
    return v


def fraction(s):
    """A number in (0, 1]: a share of an image's area, of the labels, ..."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"{v} must be in (0, 1]")
    return v


def add_common_args(p, arch="resnet18"):
    """Flags every method takes: data, backbone, device, output, evaluation."""
    g = p.add_argument_group("data")
    g.add_argument("--data", default="cifar10",
                   help="'cifar10' (downloaded once into --data-dir), 'shapes' (built in, offline), or a "
                        "path to an image folder or .tar/.tar.gz with train/ and test/ class subfolders")
    g.add_argument("--data-dir", default=os.environ.get("SSL_DATA", "data"),
                   help="where CIFAR-10 and decoded-image caches live (default ./data or $SSL_DATA)")
    g.add_argument("--image-size", type=positive_int, default=32,
                   help="side in pixels; folder images of another size are resized and centre-cropped")
    g.add_argument("--subset", type=nonneg_int, default=0,
                   help="train on a random N training images (0 = all); for quick runs")
    g = p.add_argument_group("backbone")
    g.add_argument("--arch", default=arch, choices=ARCHS, help="backbone network")
    g.add_argument("--width", type=positive_int, default=64,
                   help="ResNet base channels (64 is standard; 16 trains ~12x faster on a CPU)")
    g.add_argument("--patch-size", type=positive_int, default=4, help="ViT patch side in pixels (4 at 32 px)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto picks cuda, then mps, then cpu")
    g.add_argument("--fp32", action="store_true", help="disable bf16 autocast on CUDA")
    g.add_argument("--compile", action="store_true", help="torch.compile the training forward (CUDA)")
    g.add_argument("--seed", type=int, default=0, help="seeds weights, batches and augmentations")
    g.add_argument("--out", default=None, help="output folder (default runs/<method>-<time>)")
    g.add_argument("--resume", default=None, metavar="PATH",
                   help="continue from a checkpoint.pt up to --epochs, writing into its folder")
    g.add_argument("--eval-every", type=nonneg_int, default=10,
                   help="kNN every N epochs (0 = only at the end); it always runs at the end")
    g.add_argument("--linear-probe", action=argparse.BooleanOptionalAction, default=False,
                   help="also fit a linear probe on frozen features at the end")
    g.add_argument("--bench", action="store_true",
                   help="at the end, time the model alone (no data, no augmentation) and print the speed table")
    return p


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch. Use --device cpu or auto.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps: Apple's MPS backend is not available here. Use --device cpu or auto.")
    return torch.device(name)


def scaled_epochs(value, recipe_epochs, epochs):
    """A schedule that lasts `value` epochs in a recipe of `recipe_epochs` epochs, fitted to a
    run of `epochs`: the recipe's own length when the run is at least as long, the same
    fraction of the run when it is shorter. A 5-epoch run then follows a compressed recipe
    (warmups included) instead of stopping inside the first few epochs of a long one."""
    return value if epochs >= recipe_epochs else value * epochs / recipe_epochs


def cosine_lr(step, total, warmup, base, final=0.0):
    """Linear warmup from 0 to `base` over `warmup` steps, then a cosine from `base` to `final`."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step for each weight tensor is rescaled by the trust ratio
    (You et al., arXiv 1708.03888, eq. 6):

        trust = eta * ||w|| / (||g|| + wd * ||w||),   d = trust * (g + wd * w)

    so that each layer moves by a set fraction of its own size, which keeps large-batch
    training stable. Groups with decay=False (biases, norms) take plain SGD steps and no
    weight decay; a tensor whose weight or gradient norm is 0 does too. With clip=True (the
    "clip" mode of NVIDIA's LARC, which solo-learn's CIFAR recipes use), the layer's rate is
    min(lr * trust, lr) instead of lr * trust: the global lr is a ceiling and eta sets the
    step. solo-learn's implementation, written with multi-tensor ops."""

    def __init__(self, params, lr, momentum=0.9, eta=0.02, clip=True, eps=1e-8):
        super().__init__(params, dict(lr=lr, weight_decay=0.0, momentum=momentum, eta=eta, decay=True,
                                      clip=clip, eps=eps))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            wd = g["weight_decay"]
            if g["decay"]:
                # Norms of all tensors at once: a few kernels, not a Python loop of them.
                w_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                trust = g["eta"] * w_norm / (g_norm + wd * w_norm + g["eps"])
                if g["clip"]:
                    trust = torch.clamp(trust / g["lr"], max=1.0)    # lr * trust = min(lr * ratio, lr)
                adapt = (w_norm > 0) & (g_norm > 0)
                grads = torch._foreach_add(grads, params, alpha=wd)   # g + wd * w
                grads = [torch.where(a, d, p.grad) for a, d, p in zip(adapt.unbind(), grads, params)]
                grads = torch._foreach_mul(grads, list(torch.where(adapt, trust, 1.0).unbind()))
            bufs = []
            for p, d in zip(params, grads):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, g["momentum"])
            torch._foreach_add_(bufs, grads)                   # v <- m v + d
            torch._foreach_add_(params, bufs, alpha=-g["lr"])  # w <- w - lr v


def param_groups(model, weight_decay, no_decay=(), lr_scale=None):
    """The trainable parameters of `model` as optimizer groups. Weight matrices and kernels get
    weight decay (and LARS's trust ratio); biases, norm parameters and the parameters whose
    last name is in `no_decay` (MAE's tokens) get neither, as in SimCLR, BYOL and MAE.
    lr_scale(name), when given, multiplies a parameter's learning rate (layer-wise decay)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and name.split(".")[-1] not in no_decay
        scale = lr_scale(name) if lr_scale else 1.0
        group = groups.setdefault((decay, scale), dict(params=[], weight_decay=weight_decay if decay else 0.0,
                                                       decay=decay, lr_scale=scale))
        group["params"].append(p)
    return list(groups.values())


def make_optimizer(groups, name, lr, momentum=0.9, betas=(0.9, 0.999), nesterov=False):
    """groups: from param_groups. AdamW's betas default to PyTorch's (0.9, 0.999), which DINO
    and MAE's fine-tuning use; MAE's pretraining passes (0.9, 0.95)."""
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    raise UserError(f"--optimizer {name}: unknown; choose lars, sgd or adamw.")


@torch.no_grad()
def ema_update(target, online, momentum):
    """target <- m * target + (1 - m) * online, parameter by parameter: the slow teacher of
    MoCo, BYOL and DINO. Buffers (BatchNorm's running statistics) are not averaged or copied:
    as in MoCo's, BYOL's and DINO's code, the teacher keeps the statistics of its own inputs."""
    t_params, o_params = list(target.parameters()), list(online.parameters())
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, o_params, alpha=1 - momentum)


def cosine_momentum(step, total, base, final=1.0):
    """BYOL's EMA schedule: tau = final - (final - base) (cos(pi k / K) + 1) / 2, from `base`
    at step 0 to `final` at the last step, so the teacher slows down as training settles."""
    return final - (final - base) * (math.cos(math.pi * min(step / max(1, total), 1.0)) + 1) / 2


def embedding_std(z):
    """Collapse monitor: mean per-dimension std of L2-normalised embeddings z (N, D). Healthy
    embeddings spread over the sphere give about 1/sqrt(D); a collapsed encoder gives 0."""
    return F.normalize(z.detach().float(), dim=1).std(0).mean()


def save_checkpoint(obj, path):
    """Write to a temporary file, then rename: a crash never leaves half a file."""
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


class Run:
    """Plumbing for one training run. The method file builds its model and optimizer, then:

        run.start(model, optimizer, backbone)     # resume, or measure the random-init kNN
        for epoch in range(run.start_epoch, args.epochs):
            for step, x in run.batches(epoch):     # x: (B, 3, H, W) uint8 on the device
                ... augment, forward, loss, backward, step ...
                run.log_step(loss, z)              # no host sync here
            run.end_epoch(epoch, extra)           # kNN, log, checkpoint
        run.finish()                              # encoder.pt, pictures, summary.json
    """

    def __init__(self, args, method, parser):
        self.args, self.method = args, method
        self.device = pick_device(args.device)
        self.ckpt = None
        if args.resume:
            self.ckpt = self._load_checkpoint(Path(args.resume), parser)
        if args.out is None:
            args.out = str(Path(args.resume).parent) if args.resume else \
                f"runs/{method}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.out = Path(args.out)
        if not args.resume and (self.out / "checkpoint.pt").exists():
            raise UserError(f"--out {self.out} already holds a run (checkpoint.pt). Continue it with "
                            f"--resume {self.out / 'checkpoint.pt'}, or choose another --out.")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {self.out}: cannot create the output folder ({e}).") from None
        torch.manual_seed(args.seed)

        t0 = time.time()
        data = load_data(args.data, args.data_dir, args.image_size, args.subset, args.seed)
        self.stats = data.channel_stats()
        self.data = data.to(self.device)
        self.n_train = len(self.data.train_x)
        self.steps_per_epoch = self.n_train // args.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"--batch-size {args.batch_size} is larger than the {self.n_train} training "
                            f"images; lower it.")
        self.total_steps = self.steps_per_epoch * args.epochs
        print(f"{method}: {self.n_train} training images from {data.name} "
              f"({'labeled' if data.labeled else 'unlabeled, no kNN'}), loaded in {time.time() - t0:.1f}s, "
              f"device {self.device}, output {self.out}", file=sys.stderr)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.history, self.knn_init, self.train_seconds, self.epoch_seconds = [], None, 0.0, []
        self.start_epoch = 0
        self.log_path = self.out / "log.jsonl"

    # --- setup -------------------------------------------------------------------------

    def _load_checkpoint(self, path, parser):
        if not path.is_file():
            raise UserError(f"--resume {path}: no such checkpoint file.")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            saved = ckpt["args"]
        except Exception as e:
            raise UserError(f"--resume {path}: not a readable checkpoint ({type(e).__name__}: {e}).") from None
        if ckpt.get("method") != self.method:
            raise UserError(f"--resume {path} is a {ckpt.get('method')} checkpoint, not {self.method}.")
        # Hyperparameters come from the checkpoint, so the run continues as it started;
        # only these may change on resume.
        free = {"epochs", "out", "resume", "device", "compile", "eval_every", "linear_probe", "bench", "data_dir"}
        for k, v in saved.items():
            now = getattr(self.args, k, v)
            if k not in free and now != v:
                if now != parser.get_default(k):
                    print(f"note: --{k.replace('_', '-')} {now} ignored; the checkpoint's value {v} is kept.",
                          file=sys.stderr)
                setattr(self.args, k, v)
        if self.args.epochs <= ckpt["epoch"]:
            raise UserError(f"--resume {path}: the checkpoint already has {ckpt['epoch']} epochs; pass "
                            f"--epochs larger than that to continue.")
        return ckpt

    def autocast(self):
        """bf16 autocast on CUDA (the matrix units' fast type, fp32's range); off elsewhere."""
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda and not self.args.fp32)

    def prepare(self, model):
        """Move to the device. channels_last (NHWC) is the layout the fast convolution kernels
        want, on CUDA (tensor cores) and on CPU (oneDNN, 1.45x faster on our test machine)."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.device.type in ("cuda", "cpu") else model

    def start(self, model, optimizer, backbone):
        """Restore a checkpoint, or measure the random-init kNN baseline. Returns the method's
        extra state from the checkpoint (queue, centre, ...) or {}."""
        self.model, self.optimizer, self.backbone = model, optimizer, backbone
        if self.ckpt is not None:
            c = self.ckpt
            model.load_state_dict(c["model"])
            optimizer.load_state_dict(c["optimizer"])
            set_rng_state(c["rng"])
            self.start_epoch, self.history = c["epoch"], c["history"]
            self.knn_init, self.train_seconds = c["knn_init"], c["train_seconds"]
            self.epoch_seconds = c.get("epoch_seconds", [])
            print(f"resumed from {self.args.resume} at epoch {self.start_epoch}", file=sys.stderr)
            return c.get("extra", {})
        if self.data.labeled:
            self.knn_init = knn_top1(backbone, self.data, self.stats)
            print(f"kNN top-1 of the random-init encoder: {100 * self.knn_init:.2f}%", file=sys.stderr)
        self.log_path.write_text("")
        return {}

    def compiled(self, model):
        return torch.compile(model) if self.args.compile else model

    # --- the loop ----------------------------------------------------------------------

    def batches(self, epoch):
        """Yield (global step, uint8 batch) for one epoch: a fresh permutation, drop_last."""
        for step, idx in self._index_batches(epoch):
            yield step, self.data.train_x[idx]

    def labeled_batches(self, epoch, pool=None):
        """Yield (global step, uint8 batch, labels) drawn from the training indices `pool`
        (default: all). The epoch is steps_per_epoch steps whatever the pool's size (fresh
        permutations of the pool, one after another), so training on 1% of the labels costs
        the same compute as on all of them."""
        for step, idx in self._index_batches(epoch, pool):
            yield step, self.data.train_x[idx], self.data.train_y[idx]

    def _index_batches(self, epoch, pool=None):
        self._epoch, self._t_epoch = epoch, time.time()
        self._loss_sum = torch.zeros((), device=self.device)
        self._std_sum = torch.zeros((), device=self.device)
        self._n, self._t_print = 0, time.time()
        self._emb_dim = None
        self.model.train()
        B, n = self.args.batch_size, self.steps_per_epoch * self.args.batch_size
        if pool is None:
            perm = torch.randperm(self.n_train, device=self.device)
        else:                                                  # ceil(n / P) permutations of the pool, one row each
            rounds = -(-n // len(pool))
            perm = pool[torch.rand(rounds, len(pool), device=pool.device).argsort(1)].flatten()   # (rounds * P,)
        for i in range(self.steps_per_epoch):
            yield epoch * self.steps_per_epoch + i, perm[i * B:(i + 1) * B]

    def log_step(self, loss, z):
        """Accumulate on the device; read back (one sync) only when printing progress."""
        self._loss_sum += loss.detach().float()
        self._std_sum += embedding_std(z)
        self._emb_dim = z.shape[1]
        self._n += 1
        now = time.time()
        if now - self._t_print >= (1.0 if sys.stderr.isatty() else 30.0):
            self._t_print = now
            self._progress(now)

    def _progress(self, now, end="\r"):
        done = self._n / self.steps_per_epoch
        elapsed = now - self._t_epoch
        left = (self.args.epochs - self._epoch - done) * elapsed / max(done, 1e-9)
        ips = self._n * self.args.batch_size / max(elapsed, 1e-9)
        loss = (self._loss_sum / self._n).item()
        line = (f"epoch {self._epoch + 1}/{self.args.epochs} {100 * done:3.0f}% loss {loss:.4f} "
                f"{ips:7.0f} img/s ETA {_hms(left)}")
        print(line.ljust(72), end=end if sys.stderr.isatty() else "\n", file=sys.stderr, flush=True)

    def end_epoch(self, epoch, extra=None):
        """Close an epoch: check the loss, evaluate, log, checkpoint. `extra` is the method's
        own state (tensors) to save, such as MoCo's queue."""
        _sync(self.device)
        seconds = time.time() - self._t_epoch
        self.train_seconds += seconds
        self.epoch_seconds.append(seconds)
        loss = (self._loss_sum / self._n).item()
        ckpt_path = self.out / "checkpoint.pt"
        if not math.isfinite(loss):
            kept = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written yet"
            raise UserError(f"the loss became {loss} during epoch {epoch + 1}; training stopped and {kept}. "
                            f"Try a lower --lr, a longer warmup, or --fp32.")
        std = (self._std_sum / self._n).item()
        rec = {"epoch": epoch + 1, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
               "emb_std": std, "emb_std_ref": 1 / math.sqrt(self._emb_dim),
               "seconds": seconds, "images_per_s": self.steps_per_epoch * self.args.batch_size / seconds}
        last = epoch + 1 == self.args.epochs
        if self.data.labeled and (last or (self.args.eval_every and (epoch + 1) % self.args.eval_every == 0)):
            rec["knn_top1"] = knn_top1(self.backbone, self.data, self.stats)
        self.history.append(rec)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        save_checkpoint({
            "method": self.method, "args": vars(self.args), "epoch": epoch + 1,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "extra": extra or {}, "rng": rng_state(), "history": self.history,
            "knn_init": self.knn_init, "train_seconds": self.train_seconds,
            "epoch_seconds": self.epoch_seconds}, ckpt_path)
        knn = f" kNN {100 * rec['knn_top1']:.2f}%" if "knn_top1" in rec else ""
        print(f"epoch {epoch + 1}/{self.args.epochs} loss {loss:.4f} std*sqrt(d) "
              f"{std * math.sqrt(self._emb_dim):.2f}{knn} {seconds:.1f}s {rec['images_per_s']:.0f} img/s".ljust(72),
              file=sys.stderr)
        if std * math.sqrt(self._emb_dim) < 0.2:
            print(f"warning: embedding std {std:.4f} is far below 1/sqrt(d) = {1 / math.sqrt(self._emb_dim):.4f}: "
                  f"the embeddings are collapsing toward one point.", file=sys.stderr)

    def finish(self, bench_step=None):
        """Export the encoder, draw the curves, write summary.json; with --bench, time
        `bench_step` (the method's training step on fixed tensors) and print the speed table."""
        save_checkpoint(self.backbone.state_dict(), self.out / "encoder.pt")
        steady = self.epoch_seconds[1:] or self.epoch_seconds
        epoch_s = float(np.median(steady))
        summary = {
            "method": self.method, "data": self.data.name, "arch": self.args.arch,
            "epochs": self.args.epochs, "batch_size": self.args.batch_size,
            "knn_top1": self.history[-1].get("knn_top1"), "knn_top1_init": self.knn_init,
            "train_seconds": self.train_seconds, "epoch_seconds": epoch_s,
            "images_per_s": self.steps_per_epoch * self.args.batch_size / epoch_s,
            "device": device_name(self.device), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), **peak_memory(self.device),
            "image_size": self.data.image_size, "args": vars(self.args),
        }
        if self.args.linear_probe and self.data.labeled:
            summary["linear_top1"] = linear_probe(self.backbone, self.data, self.stats)
        if self.args.bench and bench_step is not None:
            summary.update(measure_bound(bench_step, self.args.batch_size, self.device))
            summary["bound_ratio"] = epoch_s / (self.steps_per_epoch * self.args.batch_size / summary["bound_images_per_s"])
        self.write_summary(summary)
        plot_curves(self.history, self.knn_init, self.out / "curves.png", title=f"{self.method} on {self.data.name}")
        msg = [f"done: {self.args.epochs} epochs in {_hms(self.train_seconds)}"]
        if summary["knn_top1"] is not None:
            msg.append(f"kNN top-1 {100 * summary['knn_top1']:.2f}% (random init {100 * self.knn_init:.2f}%)")
        if "linear_top1" in summary:
            msg.append(f"linear probe {100 * summary['linear_top1']:.2f}%")
        print("; ".join(msg) + f". Outputs in {self.out}", file=sys.stderr)
        if "bound_ratio" in summary:
            print(speed_table(summary))
        return summary

    def write_summary(self, summary):
        """summary.json; a method may call it again after finish() with results of its own."""
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def save_views(self, augments, n=8):
        """views.png: each row one test (or train) image, then views from each recipe."""
        src = self.data.test_x if self.data.test_x is not None else self.data.train_x
        x = src[:n]
        cols = [F.interpolate(x.float() / 255, size=augments[0].size, mode="nearest")]
        # A forked RNG: drawing the picture must not change the training run's random
        # stream, or a resumed run would no longer match an uninterrupted one.
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if self.cuda else []):
            for aug in augments:
                for _ in range(2 if len(augments) > 1 else 4):
                    v = aug(x, normalize=False)
                    cols.append(F.interpolate(v, size=augments[0].size, mode="nearest"))
        grid = torch.stack(cols, 1)                            # (n, cols, 3, S, S)
        save_grid((grid.clamp(0, 1) * 255).round().byte().cpu(), self.out / "views.png")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return str(device)


def peak_memory(device):
    """The run's peak memory in MiB: what PyTorch allocated on the GPU, or on a CPU the
    process's resident set (weights, data and activations together, so a coarser figure)."""
    if device.type == "cuda":
        return {"peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20, "memory": "GPU allocated"}
    try:
        import resource
    except ImportError:                                        # Windows
        return {}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux, bytes on macOS
    return {"peak_memory_mib": rss / (2**20 if sys.platform == "darwin" else 2**10), "memory": "process RSS"}


def _hms(s):
    s = int(max(0, s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def measure_bound(step, batch_size, device, warmup=5, steps=20):
    """Images/s of the training step alone, on inputs already on the device: no indexing,
    no augmentation. The epoch time cannot beat this; the gap is the data pipeline's cost."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.time()
    for _ in range(steps):
        step()
    _sync(device)
    dt = (time.time() - t0) / steps
    return {"bound_step_seconds": dt, "bound_images_per_s": batch_size / dt}


def speed_table(s):
    bound_epoch = s["epoch_seconds"] / s["bound_ratio"]
    rows = [("", "epoch s", "images/s"),
            ("full pipeline (steady)", f"{s['epoch_seconds']:.2f}", f"{s['images_per_s']:.0f}"),
            ("model only (bound)", f"{bound_epoch:.2f}", f"{s['bound_images_per_s']:.0f}"),
            ("ratio", f"{s['bound_ratio']:.2f}x", "")]
    head = f"{s['method']} {s['arch']} batch {s['batch_size']} on {s['device']}, {s['date']}"
    return head + "\n" + "\n".join(f"{a:<24}{b:>10}{c:>12}" for a, b, c in rows)


# ============================================================================================
# 5. Evaluation
# Frozen features of un-augmented images, L2-normalised for kNN: the test split is
# classified by its 200 nearest training images, votes weighted by exp(cos / 0.1).
# ============================================================================================

@torch.no_grad()
def extract_features(backbone, x, stats, batch_size=1024):
    """x (N, 3, H, W) uint8 -> features (N, D) fp32, in eval mode (BN running statistics)."""
    was_training = backbone.training
    backbone.eval()
    cuda = x.device.type == "cuda"
    feats = []
    for i in range(0, len(x), batch_size):
        xb = normalize_images(x[i:i + batch_size].float() / 255, *stats)
        if cuda:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            feats.append(backbone(xb).float())
    backbone.train(was_training)
    return torch.cat(feats)


def load_encoder(run_dir, device="cpu"):
    """The encoder a finished run exported (encoder.pt), rebuilt from its summary.json."""
    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        a = summary["args"]
        backbone = build_backbone(a["arch"], summary["image_size"], a["width"], a["patch_size"])
        backbone.load_state_dict(torch.load(run_dir / "encoder.pt", map_location="cpu", weights_only=True))
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"{run_dir}: not a finished run folder with summary.json and encoder.pt "
                        f"({type(e).__name__}: {e}).") from None
    return backbone.to(device), summary


def knn_predict(train_f, train_y, test_f, num_classes, k=200, t=0.1, chunk=512):
    """Weighted kNN vote (Wu et al. 2018): each of the k nearest training features (cosine)
    votes for its class with weight exp(cos / t). Returns (M,) predicted labels."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(k, len(train_f))
    preds = []
    for i in range(0, len(test_f), chunk):
        sim = test_f[i:i + chunk] @ train_f.T                  # (m, N) cosine similarities
        top, idx = sim.topk(k, dim=1)                          # (m, k)
        votes = torch.zeros(len(sim), num_classes, device=sim.device, dtype=top.dtype)
        votes.scatter_add_(1, train_y[idx], (top / t).exp())   # (m, C)
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_top1(backbone, data, stats, k=200, t=0.1):
    train_f = extract_features(backbone, data.train_x, stats)
    test_f = extract_features(backbone, data.test_x, stats)
    pred = knn_predict(train_f, data.train_y, test_f, len(data.classes), k, t)
    return (pred == data.test_y).float().mean().item()


def linear_probe(backbone, data, stats, epochs=100, lr=1e-3, batch_size=256):
    """Top-1 of a linear classifier on frozen, standardised features (no augmentation):
    how linearly separable the classes are in the representation."""
    train_f = extract_features(backbone, data.train_x, stats)
    test_f = extract_features(backbone, data.test_x, stats)
    mu, sd = train_f.mean(0), train_f.std(0) + 1e-6
    train_f, test_f = (train_f - mu) / sd, (test_f - mu) / sd
    g = torch.Generator(device="cpu").manual_seed(0)
    clf = nn.Linear(train_f.shape[1], len(data.classes)).to(train_f.device)
    nn.init.zeros_(clf.weight), nn.init.zeros_(clf.bias)      # a convex problem: no random init needed,
    #                                                           and the result does not depend on the RNG
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(train_f) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(len(train_f), generator=g).to(train_f.device)
            for i in range(0, len(train_f), batch_size):
                idx = perm[i:i + batch_size]
                loss = F.cross_entropy(clf(train_f[idx]), data.train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    with torch.no_grad():
        return (clf(test_f).argmax(1) == data.test_y).float().mean().item()


class Classifier(nn.Module):
    """An encoder and a linear head, for fine-tuning. A ViT's feature is the average of its
    patch tokens under a fresh LayerNorm instead of [CLS] (MAE's fine-tuning, "global pool");
    a ResNet's is its pooled feature map. The head starts near 0 (MAE: normal, std 2e-5)."""

    def __init__(self, backbone, num_classes):
        super().__init__()
        self.backbone = backbone
        self.fc_norm = nn.LayerNorm(backbone.dim, eps=1e-6) if isinstance(backbone, ViT) else nn.Identity()
        self.head = nn.Linear(backbone.dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        if isinstance(self.backbone, ViT):
            h = self.fc_norm(self.backbone.features(x)[:, 1:].mean(1))   # (B, D): mean over patches
        else:
            h = self.backbone(x)                               # (B, D)
        return self.head(h)


def layer_decay(model, rate):
    """MAE's (and BEiT's) layer-wise learning-rate decay for a Classifier around a ViT: the
    head gets the full rate, block i of n gets rate^(n - i), the embeddings rate^(n + 1), so
    the early layers, which pretraining made most general, move least. Returns lr_scale(name)."""
    n = len(model.backbone.blocks)

    def lr_scale(name):
        parts = name.split(".")
        if parts[0] != "backbone" or parts[1] == "norm":
            layer = n + 1                                      # head, fc_norm
        elif parts[1] == "blocks":
            layer = int(parts[2]) + 1
        else:
            layer = 0                                          # patch_embed, cls_token, pos_embed
        return rate ** (n + 1 - layer)
    return lr_scale


def fine_tune(backbone, data, stats, epochs, lr=1e-3, batch_size=256, weight_decay=0.05, warmup_epochs=None,
              label_smoothing=0.1, layer_decay_rate=0.75, drop_path_rate=0.1, name="fine-tune"):
    """Test top-1 after training the whole encoder plus a linear head with labels, MAE's
    fine-tuning recipe: AdamW (default betas), lr per 256 images with warmup (5 of MAE's 100
    epochs, the same fraction of a shorter run) then cosine, layer-wise lr decay 0.75 and drop
    path 0.1 (ViTs only), global average pooling, label smoothing 0.1, crop + flip, bf16 on
    CUDA. Left out of the paper's recipe: RandAugment, mixup, cutmix and random erasing. Used
    with the same arguments for a pretrained encoder and a randomly initialised one, the gap
    between the two is what pretraining bought. Trains `backbone` in place: pass a copy."""
    device = data.train_x.device
    cuda = device.type == "cuda"
    vit = isinstance(backbone, ViT)
    if vit:
        backbone.set_drop_path(drop_path_rate)
    backbone.requires_grad_(True)                              # MAE's fixed positions are trained now
    model = Classifier(backbone, len(data.classes)).to(device)
    B = min(batch_size, len(data.train_x))
    base_lr = lr * B / 256
    groups = param_groups(model, weight_decay, no_decay=("cls_token", "pos_embed"),
                          lr_scale=layer_decay(model, layer_decay_rate) if vit else None)
    optimizer = make_optimizer(groups, "adamw", base_lr)
    augment = Augment(size=data.image_size, scale=(0.08, 1.0), jitter_p=0.0, gray_p=0.0, mean=stats[0], std=stats[1])
    steps = len(data.train_x) // B
    warmup = scaled_epochs(5, 100, epochs) if warmup_epochs is None else warmup_epochs
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(data.train_x), device=device)
        loss_sum = torch.zeros((), device=device)
        for i in range(steps):
            set_lr(optimizer, cosine_lr(epoch * steps + i, epochs * steps, round(warmup * steps), base_lr))
            idx = perm[i * B:(i + 1) * B]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                logits = model(augment(data.train_x[idx]))
            loss = F.cross_entropy(logits.float(), data.train_y[idx], label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
        if (epoch + 1) % max(1, epochs // 10) == 0 or epoch + 1 == epochs:
            print(f"{name}: epoch {epoch + 1}/{epochs} loss {(loss_sum / steps).item():.4f} "
                  f"({time.time() - t0:.0f}s)", file=sys.stderr)
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data.test_x), 1024):
            x = normalize_images(data.test_x[i:i + 1024].float() / 255, *stats)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                correct += (model(x).argmax(1) == data.test_y[i:i + 1024]).sum().item()
    return correct / len(data.test_x)


# ============================================================================================
# 6. Pictures
# PNGs drawn with pillow alone: image grids, and line plots with axes, ticks and a legend.
# ============================================================================================

def save_grid(grid, path, scale=3, pad=2):
    """grid (rows, cols, 3, H, W) uint8 -> one PNG, each tile upscaled `scale` times."""
    R, C, _, H, W = grid.shape
    canvas = np.full((R * (H + pad) + pad, C * (W + pad) + pad, 3), 255, dtype=np.uint8)
    for r in range(R):
        for c in range(C):
            y, x = pad + r * (H + pad), pad + c * (W + pad)
            canvas[y:y + H, x:x + W] = grid[r, c].permute(1, 2, 0).numpy()
    img = Image.fromarray(canvas)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14),
           (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def nice_ticks(lo, hi, n=5):
    """About n round tick values (1, 2 or 5 times a power of ten) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def draw_panel(draw, box, series, title, xlabel, ylabel, ymin=None, xticks=None):
    """One line plot inside box (x0, y0, x1, y1); series is {label: (xs, ys)}. ymin forces
    the y axis to include that value (0 for quantities whose fall to 0 is the story). xticks,
    a list of (x, label), replaces the automatic ticks: for a log axis, pass log10 of the
    values as x and the values as labels."""
    font = ImageFont.load_default()
    x0, y0, x1, y1 = box
    L, R, T, B = x0 + 52, x1 - 10, y0 + 24, y1 - 36
    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    draw.text(((L + R) // 2, y0 + 6), title, fill="black", font=font, anchor="mt")
    if not pts:
        draw.rectangle((L, T, R, B), outline="black")
        draw.text(((L + R) // 2, (T + B) // 2), "no data", fill="gray", font=font, anchor="mm")
        return
    fmt = lambda v: f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.0e}"
    if xticks:
        lo, hi = min(v for v, _ in xticks), max(v for v, _ in xticks)
        pad = 0.05 * (hi - lo or 1.0)                          # keep the end points off the frame
        xt, xlabels = [lo - pad, hi + pad], xticks
    else:
        xt = nice_ticks(min(p[0] for p in pts), max(p[0] for p in pts))
        xlabels = [(v, fmt(round(v, 10))) for v in xt]
    ys_all = [p[1] for p in pts] + ([ymin] if ymin is not None else [])
    yt = nice_ticks(min(ys_all), max(ys_all))
    sx = lambda v: L + (v - xt[0]) / (xt[-1] - xt[0]) * (R - L)
    sy = lambda v: B - (v - yt[0]) / (yt[-1] - yt[0]) * (B - T)
    for v, text in xlabels:
        draw.line((sx(v), B, sx(v), B + 4), fill="black")
        draw.text((sx(v), B + 6), text, fill="black", font=font, anchor="mt")
    for v in yt:
        draw.line((L - 4, sy(v), L, sy(v)), fill="black")
        draw.line((L + 1, sy(v), R - 1, sy(v)), fill=(230, 230, 230))
        draw.text((L - 6, sy(v)), fmt(round(v, 10)), fill="black", font=font, anchor="rm")
    draw.rectangle((L, T, R, B), outline="black")           # the frame, over the grid lines
    draw.text(((L + R) // 2, y1 - 12), xlabel, fill="black", font=font, anchor="mm")
    draw.text((x0 + 4, T - 14), ylabel, fill="black", font=font)
    # The legend goes to the top or the bottom, whichever has fewer points near it.
    upper = sum(sy(y) < (T + B) / 2 for _, y in pts)
    legend_y = T + 6 if upper <= len(pts) / 2 else B - 6 - 14 * len(series)
    legend_x = R - 30 - max(draw.textlength(label, font=font) for label in series)   # fits the longest label
    for i, (label, (xs, ys)) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        xy = [(sx(x), sy(y)) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for px, py in xy:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=color)
        ly = legend_y + 14 * i
        draw.line((legend_x, ly + 5, legend_x + 15, ly + 5), fill=color, width=2)
        draw.text((legend_x + 20, ly), label, fill="black", font=font)


def line_plot(panels, path, panel_size=(420, 300)):
    """panels: list of dicts(title, xlabel, ylabel, series={label: (xs, ys)}, optional ymin),
    drawn side by side."""
    W, H = panel_size
    img = Image.new("RGB", (W * len(panels), H), "white")
    draw = ImageDraw.Draw(img)
    for i, p in enumerate(panels):
        draw_panel(draw, (i * W, 0, (i + 1) * W, H), p["series"], p["title"], p["xlabel"], p["ylabel"],
                   p.get("ymin"), p.get("xticks"))
    img.save(path)


def bar_plot(bars, path, title, xlabel, width=560):
    """Horizontal bars from 0, one per (label, value) in `bars`, top to bottom, each with its
    value written at its end; a value of None is drawn as "not run"."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 16 + max(probe.textlength(label, font=font) for label, _ in bars)
    row, T = 22, 30
    H = T + row * len(bars) + 46
    img = Image.new("RGB", (width, H), "white")
    draw = ImageDraw.Draw(img)
    L, R, B = left, width - 50, T + row * len(bars)
    values = [v for _, v in bars if v is not None and math.isfinite(v)]
    xt = nice_ticks(0.0, max(values, default=1.0))
    sx = lambda v: L + v / xt[-1] * (R - L)
    draw.text(((L + R) // 2, 8), title, fill="black", font=font, anchor="mt")
    for v in xt:
        draw.line((sx(v), T, sx(v), B), fill=(230, 230, 230))
        draw.line((sx(v), B, sx(v), B + 4), fill="black")
        draw.text((sx(v), B + 6), f"{v:g}", fill="black", font=font, anchor="mt")
    for i, (label, v) in enumerate(bars):
        y = T + row * i
        draw.text((L - 6, y + row // 2), label, fill="black", font=font, anchor="rm")
        if v is None or not math.isfinite(v):
            draw.text((L + 4, y + row // 2), "not run", fill="gray", font=font, anchor="lm")
            continue
        draw.rectangle((L, y + 4, sx(v), y + row - 4), fill=PALETTE[0])
        draw.text((sx(v) + 4, y + row // 2), f"{v:.1f}", fill="black", font=font, anchor="lm")
    draw.line((L, T, L, B), fill="black")
    draw.line((L, B, R, B), fill="black")
    draw.text(((L + R) // 2, H - 12), xlabel, fill="black", font=font, anchor="mm")
    img.save(path)


def plot_curves(history, knn_init, path, title=""):
    """curves.png: loss, kNN top-1 and the collapse monitor, per epoch."""
    ep = [h["epoch"] for h in history]
    knn = [(h["epoch"], 100 * h["knn_top1"]) for h in history if "knn_top1" in h]
    knn_series = {"kNN top-1": ([e for e, _ in knn], [a for _, a in knn])}
    if knn_init is not None and knn:
        knn_series["random init"] = ([0, ep[-1]], [100 * knn_init] * 2)
    line_plot([
        dict(title=f"{title}: training loss", xlabel="epoch", ylabel="loss",
             series={"loss": (ep, [h["loss"] for h in history])}),
        dict(title="kNN accuracy (test)", xlabel="epoch", ylabel="top-1 %", series=knn_series),
        dict(title="collapse monitor", xlabel="epoch", ylabel="std x sqrt(d)", ymin=0.0,
             series={"embeddings": (ep, [h["emb_std"] / h["emb_std_ref"] for h in history]),
                     "healthy (1)": ([0, ep[-1]], [1.0, 1.0])}),
    ], path)
