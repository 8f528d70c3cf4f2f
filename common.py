"""common.py: what the self-supervised methods here share, as a short chapter in eight sections.

    1. data            CIFAR-10, the built-in `shapes` set, image folders and tarballs
    2. augmentations   torchvision's transforms, batched on the tensor's device
    3. backbones       ResNet-18/34/50 (small-image stem), ViT-Tiny/Small, the MLP head
    4. optimizers      LARS, parameter groups, schedules, the EMA of slow teachers, precision
    5. evaluation      kNN and linear probe on frozen features, fine-tuning
    6. pictures        image grids and plots, drawn with pillow
    7. processes       several processes as one run (torchrun): gathers, DDP
    8. a training run  flags, checkpoints, and `Run`: folder, log, progress, evaluation

Each section uses only the ones above it. The method files (simclr.py, ...) read top to
bottom and call into this file; nothing in here serves one method alone. The design choice
that shapes the rest: the whole training set lives on the training device as one uint8
tensor and batches are augmented there, so no worker processes feed the GPU and an epoch
runs close to the speed of the model itself.

What to read first. A few functions carry the lecture's ideas; read them beside the slides:

    Augment, random_resized_crop,     the views: "augmentation defines the task" (SimCLR's
    color_jitter                      first component); what make exp-augment switches off
    ResNet, ViT, build_backbone       the encoder f; a ViT's tokens are what MAE masks and
                                      DINO's attention maps show
    LARS                              the large-batch optimizer of SimCLR and BYOL (a trust
                                      ratio per layer)
    ema_update                        the slow teacher of MoCo, BYOL and DINO, in one line
    knn_predict, linear_probe,        "did it learn?": evaluating a frozen encoder, and the
    random_init_bars                  untrained encoder as the bar to clear
    fine_tune, layer_decay            MAE's fine-tuning, pretrained against from scratch
    embedding_std                     the collapse monitor: std of the normalised embeddings,
                                      about 1/sqrt(d) when spread, 0 when collapsed

The rest is plumbing a student may skip: reading CIFAR-10, image folders and tarballs, and
generating `shapes` (section 1, except `Dataset`); the crop's resampling matrices and the
colour-space conversions inside the augmentations; parameter groups and schedules (section
4 around LARS); the pictures (section 6); and section 7, `Run` and its helpers: flags,
checkpoints written atomically, the lock on the output folder, resuming, the progress line,
summary.json. A method file uses `Run` as a black box: `start`, `batches`, `log_step`,
`end_epoch`, `finish`.
"""

import argparse
import atexit
import copy
import datetime
import functools
import gc
import hashlib
import inspect
import io
import json
import math
import os
import pickle
import re
import signal
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont


class UserError(Exception):
    """A problem with what the user gave us (a path, a file, a flag). Printed as one
    paragraph by `run_main` (section 7), never as a traceback."""


def write_atomic(path, write):
    """Every file a run writes comes through here. write(f) fills a temporary file of our own
    (a unique name, created new, never through a symlink), renamed over `path` when whole: a
    crash, a full disk or a second run never leaves half a file where the last good one was.
    Ctrl-C waits for the rename. A failure is a message naming the file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with _ctrl_c_deferred():
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if not isinstance(e, (OSError, RuntimeError)):     # torch.save reports a full disk as RuntimeError
            raise
        kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise UserError(f"could not write {path} ({type(e).__name__}: {why}); {kept}. Is the disk full?") from None


@contextmanager
def _ctrl_c_deferred():
    """Hold Ctrl-C until the block ends, then raise it. Raised inside torch.save it would
    come out as a write error, and the file being written would be lost."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    pressed = []
    signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pressed:
        raise KeyboardInterrupt


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

    def mean_std(self):
        """Per-channel mean and std of the training images in [0, 1], used to normalise. A
        channel that never changes gets std 1/255 rather than 0, which would divide by zero."""
        step = max(1, len(self.train_x) // 10000)              # strided: folders are sorted by class
        x = self.train_x[::step].float() / 255                 # (n, 3, H, W)
        return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).clamp(min=1 / 255).tolist()


MAX_IMAGE_BYTES = 256 << 20     # one image file larger than this is refused, not read whole


def available_memory():
    """Bytes of memory free for this process (MemAvailable on Linux), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return None


def check_fits(need, what):
    """Refuse, before allocating it, a data set that cannot fit in memory, saying how much it needs."""
    free = available_memory()
    if free is not None and need > free:
        raise UserError(f"{what} needs about {_size(need)} of memory, and {_size(free)} is free. Lower "
                        f"--image-size (or --subset the data beforehand).")


def _size(n):
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def load_data(spec, data_dir, image_size=32, subset=0, seed=0):
    """`spec` is 'cifar10', 'shapes', or a path to an image folder / .tar(.gz) of one."""
    data_dir = Path(data_dir)
    if spec == "cifar10":
        data = load_cifar10(data_dir)
    elif spec == "shapes":
        # 12,000 uint8 images, and make_shapes's float32 work arrays for 500 at twice the size.
        check_fits(12000 * 3 * image_size ** 2 + 500 * (2 * image_size) ** 2 * 4 * 8,
                   f"--data shapes at --image-size {image_size}")
        data = make_shapes_dataset(image_size)
    else:
        data = load_image_tree(Path(spec), image_size, data_dir / "cache")
    if subset > len(data.train_x):
        print(f"note: --subset {subset} is more than the {len(data.train_x)} training images; using all of "
              f"them.", file=sys.stderr)
    elif subset:
        # A random (seeded) subset, not the first N: folders are sorted by class.
        keep = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(seed))[:subset]
        data.train_x = data.train_x[keep]
        data.train_y = None if data.train_y is None else data.train_y[keep]
    return data


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
    # A label out of range would crash the kNN or train to 0% without a word; a count out of
    # step would pair images with the wrong labels.
    if y.ndim != 1 or len(y) != len(x) or (len(y) and (y.min() < 0 or y.max() >= len(CIFAR10_CLASSES))):
        what = f"{len(x)} images but {y.size} labels" if y.ndim != 1 or len(y) != len(x) else \
            f"labels from {y.min()} to {y.max()}, not 0 to {len(CIFAR10_CLASSES) - 1}"
        raise UserError(f"{where} is corrupt: it holds {what}. Delete it and run again to download a fresh copy.")
    return x, y


def load_cifar10(data_dir):
    """Look for cifar-10-python.tar.gz (or its extracted folder) in data_dir; download it
    there when missing, unless $SSL_OFFLINE is set."""
    folder = data_dir / "cifar-10-batches-py"
    archive = data_dir / "cifar-10-python.tar.gz"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if _kind(folder, "--data-dir") == "dir":
        parts = []
        for n in names:
            if not _kind(folder / n, "--data-dir"):
                raise UserError(f"{folder} is missing {n}. Delete the folder to fall back to the archive.")
            try:
                with open(folder / n, "rb") as f:
                    parts.append(_read_cifar_batch(f, folder / n))
            except OSError as e:                               # unreadable, or a folder of that name
                raise UserError(f"cannot read {folder / n} ({type(e).__name__}: {e.strerror or e}). Delete the "
                                f"folder to fall back to the archive.") from None
    else:
        if not _kind(archive, "--data-dir"):
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
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        open(part, "wb").close()
    except OSError as e:
        raise UserError(f"--data-dir {dest.parent}: cannot write the download there ({type(e).__name__}: "
                        f"{e}). Point --data-dir at a writable folder.") from None
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

def _kind(path, flag):
    """'dir', 'file' or None (nothing there). A path the system refuses to look at (a name too
    long, a folder that cannot be entered) is a message naming it and the flag it came from."""
    try:
        return "dir" if path.is_dir() else "file" if path.exists() else None
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot look there ({type(e).__name__}: {e.strerror or e}).") from None


def _image_files(path):
    """Every image file under the folder `path`, sorted. A folder that cannot be listed is an
    error naming it: Path.rglob would skip it and train on the rest without a word."""
    def refuse(e):
        raise UserError(f"--data {path}: cannot read the folder {e.filename} ({type(e).__name__}: "
                        f"{e.strerror or e}). Make it readable, or move it out of the data.")
    files = [Path(top) / n for top, _, names in os.walk(path, onerror=refuse, followlinks=True) for n in names]
    return sorted(p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _read_tar(path):
    """{name: bytes} of the images in a tarball. tarfile takes a damaged header for the end of
    the archive, so what follows that end must be the zero padding of a real one; reading it
    to the end also checks a gzip stream's checksum."""
    with tarfile.open(path, "r:*") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and Path(m.name).suffix.lower() in IMAGE_EXTENSIONS]
        for m in members:
            _check_image_bytes(f"{path}:{m.name}", m.size)
        tar.fileobj.seek(tar.offset)
        while chunk := tar.fileobj.read(1 << 20):
            if chunk.strip(b"\0"):
                raise tarfile.ReadError(f"damaged after {len(members)} images: what follows is not the archive's end")
        return {m.name.lstrip("./"): tar.extractfile(m).read() for m in members}


def _check_image_bytes(name, size):
    if size > MAX_IMAGE_BYTES:
        raise UserError(f"{name} is {size:,} bytes, more than any image this code reads ({MAX_IMAGE_BYTES:,}); "
                        f"remove it from the data.")


def _list_images(path):
    """Return ({relative posix name: zero-argument reader of bytes}, fingerprint for the cache)."""
    kind = _kind(path, "--data")
    if kind == "dir":
        files = _image_files(path)
        readers = {p.relative_to(path).as_posix(): p.read_bytes for p in files}
        stamp = [(k, p.stat().st_size, p.stat().st_mtime_ns) for k, p in zip(readers, files)]
        for k, size, _ in stamp:
            _check_image_bytes(path / k, size)
        return readers, stamp
    if kind == "file" and path.suffix.lower() in IMAGE_EXTENSIONS:
        raise UserError(f"--data {path} is a single image; give the folder that holds the images (or train/ and "
                        f"test/ with one subfolder per class), or a .tar.gz of one.")
    if kind == "file":
        try:
            blobs = _read_tar(path)
        except UserError:
            raise
        except Exception as e:                                 # tarfile, gzip, zlib, lzma, bz2 all raise their own
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--data {path}: not a folder and not a readable .tar/.tar.gz ({why}).") from None
        st = path.stat()
        return {k: (lambda b=b: b) for k, b in sorted(blobs.items())}, [(str(path), st.st_size, st.st_mtime_ns)]
    raise UserError(f"--data {path}: no such file or folder. Give 'cifar10', 'shapes', or a path to an "
                    f"image folder (train/ and test/ with one subfolder per class) or a .tar.gz of one.")


def _split_layout(names, where):
    """Map relative names to {split: [(name, class or None)]}. The data are the train/ and
    test/ folders found under one common root (the folder itself, or a folder in it at any
    depth), each with one subfolder per class, or flat images (unlabeled). With no train/
    anywhere, every image is unlabeled training data. Two roots with a train/ are refused."""
    parts = {n: n.split("/") for n in names}
    first = {n: p.index("train") for n, p in parts.items() if "train" in p[:-1]}   # the shallowest train/
    roots = sorted({tuple(parts[n][:i]) for n, i in first.items()})
    # A train/ inside another root's train/ or test/ is a class named train (CIFAR-100 has one).
    roots = [r for r in roots if not any(len(r) > len(o) and r[:len(o)] == o and r[len(o)] in ("train", "test")
                                         for o in roots)]
    if len(roots) > 1:
        found = ", ".join("/".join(r + ("train",)) for r in roots)
        raise UserError(f"--data {where}: found more than one train/ folder ({found}); keep one, or point "
                        f"--data at the folder that holds the train/ and test/ you mean.")
    if not roots:
        if any("test" in p[:-1] for p in parts.values()):
            raise UserError(f"--data {where}: found test/ but no train/ images.")
        return {"train": [(n, None) for n in names]}          # a plain folder: all training data
    root = roots[0]
    splits, ignored = {"train": [], "test": []}, []
    for name, p in parts.items():
        rest = p[len(root):]
        if p[:len(root)] == list(root) and len(rest) > 1 and rest[0] in splits:
            splits[rest[0]].append((name, rest[1:]))
        else:
            ignored.append(name)
    if ignored:
        print(f"note: {len(ignored)} images outside {'/'.join(root + ('train',))} and test/ are not used, "
              f"such as {ignored[0]}.", file=sys.stderr)
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


def _to_rgb(im):
    """Any pillow mode as 8-bit RGB. 16-bit images are divided by 257 (65535 -> 255); 32-bit
    integer and float images are stretched from their own minimum to their maximum, since
    their range has no fixed meaning; the rest go through pillow's convert."""
    if im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64) / 257
    elif im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = a.min(), a.max()
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
    else:
        return im.convert("RGB")
    return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")


def _decode(name, read, size):
    """The image that read() returns, as uint8 (3, size, size); a file that cannot be read or
    decoded is a message naming it."""
    try:
        im = _to_rgb(Image.open(io.BytesIO(read())))
    except Exception as e:
        why = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))   # pillow names its buffer
        raise UserError(f"cannot read image {name} ({type(e).__name__}: {why}). Remove or replace that "
                        f"file and run again.") from None
    if im.size != (size, size):
        # Scale the shorter side to `size`, then take the central square: resize only that
        # square's source box, as pillow can. Scaling the whole image first would cost, for a
        # 1 x 2,000,000 picture, 32 x 64,000,000 pixels.
        w, h = im.size
        s = size / min(w, h)
        W, H = max(size, round(w * s)), max(size, round(h * s))   # the size the whole image would get
        left, top = (W - size) // 2, (H - size) // 2
        box = (left * w / W, top * h / H, (left + size) * w / W, (top + size) * h / H)
        im = im.resize((size, size), Image.BICUBIC, box=box)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)     # (3, H, W)


def _check_cached(d, size):
    """Raise ValueError unless `d` is what load_image_tree caches: uint8 images (n, 3, size,
    size), one int64 label per image when there are classes, a test split only with them."""
    for x, y in [(d.train_x, d.train_y), (d.test_x, d.test_y)]:
        if x is None:
            continue
        if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != (3, size, size):
            raise ValueError(f"images of {x.dtype} {tuple(x.shape)}, not uint8 (n, 3, {size}, {size})")
        if (y is None) != (not d.classes) or y is not None and (y.dtype != torch.int64 or y.shape != x.shape[:1]
                                                               or len(y) and not 0 <= y.min() <= y.max() < len(d.classes)):
            raise ValueError("labels that do not match the images or the classes")
    if d.test_x is not None and not d.classes:
        raise ValueError("a test split without classes")


def load_image_tree(path, image_size, cache_dir):
    """Decode a folder or tarball of images once, cache the arrays, reuse them afterwards."""
    readers, stamp = _list_images(path)
    # macOS leaves ._name files (its metadata, not images) beside copies and in __MACOSX/.
    junk = {n for n in readers if any(part.startswith("._") or part == "__MACOSX" for part in n.split("/"))}
    if junk:
        print(f"note: {len(junk)} macOS metadata files (._ names, __MACOSX/) are not images and not used, such as "
              f"{min(junk)}.", file=sys.stderr)
        readers = {n: r for n, r in readers.items() if n not in junk}
    if not readers:
        raise UserError(f"--data {path}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}).")
    key = hashlib.sha1(json.dumps([str(path.resolve()), image_size, stamp]).encode()).hexdigest()[:16]
    cache = cache_dir / f"{path.name.split('.')[0]}-{image_size}px-{key}.npz"
    if _kind(cache, "--data-dir"):
        try:
            with np.load(cache, allow_pickle=False) as z:
                arr = {k: torch.from_numpy(z[k]) for k in z.files if k != "classes"}
                classes = z["classes"].tolist()
            data = Dataset(arr["train_x"], arr.get("train_y"), arr.get("test_x"), arr.get("test_y"),
                           classes, path.name)
            _check_cached(data, image_size)
            return data
        except Exception as e:                                 # a cache cut short or not ours: decode again
            print(f"note: the cache {cache} is unreadable ({type(e).__name__}: {e}); decoding the images again.",
                  file=sys.stderr)
            cache.unlink(missing_ok=True)

    layout = _split_layout(list(readers), path)
    train_classes = {c for _, c in layout["train"]}
    classes = sorted(train_classes) if None not in train_classes else []
    if len(classes) == 1:
        print(f"note: {path} has a single class, {classes[0]}: nothing to tell apart, so no kNN or probe.",
              file=sys.stderr)
        classes = []
    n = sum(len(items) for split, items in layout.items() if split == "train" or classes)
    check_fits(2 * n * 3 * image_size ** 2, f"--data {path} ({n} images) at --image-size {image_size}")
    arrays = {}
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        for split, items in layout.items():
            if split == "test" and not classes:
                if None in train_classes:
                    print(f"note: {path} train/ has no class folders, so test/ is not used (no kNN).",
                          file=sys.stderr)
                continue
            unknown = {c for _, c in items} - set(classes)
            if split == "test" and unknown:
                raise UserError(f"--data {path}: test/ has classes that train/ lacks: {sorted(map(str, unknown))}.")
            imgs = list(pool.map(lambda item: _decode(f"{path}/{item[0]}", readers[item[0]], image_size), items))
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


def make_shapes(n, seed, size=32, masks=False):
    """n images (n, 3, size, size) uint8 and labels (n,), deterministic in `seed`; with masks,
    also each image's shape mask (n, size, size) float32: the fraction of each pixel the shape
    covers, the ground truth that the attention maps are scored against (make exp-attention).

    Each image is one of ten shapes with random colour, size, position and rotation, over a
    random textured background (stripes, checks, blobs or a gradient), under film grain.
    Colour, texture and grain carry no class information, so a network must look at the
    outline to tell classes apart: random-init features do poorly, self-supervised ones
    learn to do well."""
    rng = np.random.default_rng(seed)
    f32 = lambda a: np.asarray(a, dtype=np.float32)
    grid = lambda s: np.meshgrid(*[f32((np.arange(s) + 0.5) / s * 2 - 1)] * 2, indexing="ij")
    gy, gx = grid(size)                                        # (S, S) pixel centres in [-1, 1]
    ss = 2                                                     # supersample the outline, 2x2 per pixel
    hy, hx = grid(size * ss)
    y = rng.integers(0, 10, n)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    cover = np.empty((n, size, size), dtype=np.float32)
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
        cover[i0:i1] = alpha[..., 0]
        shade = 0.85 + 0.15 * (u * 0.5 + 0.5).clip(0, 1).reshape(m, size, ss, size, ss).mean((2, 4))[..., None]
        # A fill colour far from the background's mean keeps the outline visible.
        fill = f32(rng.random((m, 1, 1, 3)))
        bg_mean = (c0 + c1) / 2
        far = np.abs(fill - bg_mean).sum(-1, keepdims=True) < 0.6
        fill = np.where(far, 1 - bg_mean, fill)
        img = img * (1 - alpha) + fill * shade * alpha         # (m, S, S, 3)
        img += f32(rng.normal(0, 0.03, img.shape))             # sensor noise
        # Film grain: grey noise of its own in every image, as in a photograph. Two uncropped
        # views share it pixel for pixel, an easy match that says nothing of the shape; a crop
        # resamples it, so the crop is what makes the shape the cue (SimCLR, 20 epochs: 41.6%
        # kNN with crops of 60-100%, 28.6% without).
        img += f32(rng.normal(0, 0.1, (m, size, size, 1)))
        out[i0:i1] = (img.clip(0, 1) * 255 + 0.5).astype(np.uint8)
    x = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    return (x, torch.from_numpy(y), torch.from_numpy(cover)) if masks else (x, torch.from_numpy(y))


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
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != c:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    @property
    def last_bn(self):
        """The BN that zero_init_residual zeroes. A property, not a second name for the module:
        a module registered twice is missed by whatever replaces modules by name (SyncBatchNorm,
        MoCo's split BatchNorm), and the stale copy's parameters then get no gradient."""
        return self.bn2

    def _load_from_state_dict(self, state_dict, prefix, *args):
        for k in [k for k in state_dict if k.startswith(prefix + "last_bn.")]:
            del state_dict[k]                                  # the alias, in files written before 2026-12-06
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args)

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
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != 4 * c:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, 4 * c, 1, stride, bias=False), nn.BatchNorm2d(4 * c))

    last_bn = property(lambda self: self.bn3)                  # as in BasicBlock
    _load_from_state_dict = BasicBlock._load_from_state_dict

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

    def forward(self, x):
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, h, L, D/h)
        out = F.scaled_dot_product_attention(*qkv.unbind(0))   # (B, h, L, D/h): softmax(q k^T / sqrt(d)) v, fused
        return self.proj(out.transpose(1, 2).reshape(B, L, D))   # (B, L, D)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)); each branch dropped
    for a fraction `drop` of the samples in training (stochastic depth, 0 = off)."""

    def __init__(self, dim, heads, mlp_ratio=4, drop=0.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.drop = drop

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop, self.training)


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


ARCHS = ["resnet18", "resnet34", "resnet50", "vit_mini", "vit_tiny", "vit_small"]


def build_backbone(arch, image_size=32, width=64, patch_size=4, depth=12, zero_init_residual=False,
                   drop_path=0.0):
    """Small inputs (<= 64 px) get the small-image stem. width and zero_init_residual apply to
    ResNets; patch_size, depth (blocks) and drop_path (stochastic depth) to ViTs."""
    small = image_size <= 64
    if arch == "resnet18":
        return ResNet(BasicBlock, [2, 2, 2, 2], width, small, zero_init_residual)
    if arch == "resnet34":
        return ResNet(BasicBlock, [3, 4, 6, 3], width, small, zero_init_residual)
    if arch == "resnet50":
        return ResNet(Bottleneck, [3, 4, 6, 3], width, small, zero_init_residual)
    if arch == "vit_mini":                                     # half ViT-Tiny's width, for a CPU: 4x cheaper blocks
        return ViT(image_size, patch_size, 96, depth, 3, drop_path)
    if arch == "vit_tiny":
        return ViT(image_size, patch_size, 192, depth, 3, drop_path)
    if arch == "vit_small":
        return ViT(image_size, patch_size, 384, depth, 6, drop_path)
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
# 4. Optimizers and schedules
# LARS (what SimCLR and BYOL use at large batch), the parameter groups every optimizer gets
# (no weight decay on biases and norms), the schedules, and the EMA of the slow teachers.
# ============================================================================================

def scaled_epochs(flag, value, recipe_epochs, epochs, at_least=0):
    """The length in epochs of a schedule (a warmup, say): `flag` when the user gave one, else
    the recipe's `value` epochs fitted to this run. A run at least as long as the recipe's
    `recipe_epochs` keeps the recipe's length; a shorter one gets the same fraction of itself,
    so a 5-epoch run follows a compressed recipe instead of stopping inside its first epochs.
    Most LR warmups ask for `at_least` one epoch (never more than the recipe's): a few steps of
    warmup let MoCo collapse (CIFAR-10, 5 epochs: kNN 26.0% with 4 steps, 38.2% with one epoch)."""
    if flag is not None:
        return flag
    return value if epochs >= recipe_epochs else min(value, max(at_least, value * epochs / recipe_epochs))


def cosine_lr(step, total, warmup, base, final=0.0):
    """Linear warmup from 0 to `base` over `warmup` steps (a fraction is fine), then a cosine
    from `base` to `final` at step `total`."""
    if step < warmup:
        return base * min(1.0, (step + 1) / warmup)
    t = (step - warmup) / max(1, total - warmup)
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step for each weight tensor is rescaled by the trust ratio
    (You et al., arXiv 1708.03888, eq. 6):

        trust = eta * ||w|| / (||g|| + wd * ||w||),   d = min(trust / lr, 1) * (g + wd * w)

    so that each layer moves by a set fraction of its own size, which keeps large-batch
    training stable. The min(., 1) is the "clip" mode of NVIDIA's LARC, which solo-learn's
    CIFAR recipes use: the layer's rate is min(trust, lr), the global lr a ceiling. Groups
    with decay=False (biases, norms) take plain SGD steps and no weight decay; so does a
    tensor whose weight or gradient norm is 0. solo-learn's LARS, in multi-tensor ops."""

    def __init__(self, params, lr, momentum=0.9, eta=0.02, eps=1e-8):
        super().__init__(params, dict(lr=lr, weight_decay=0.0, momentum=momentum, eta=eta, decay=True, eps=eps))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:                            # g: a parameter group
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
                trust = torch.clamp(trust / g["lr"], max=1.0)    # the layer's rate min(trust, lr), as a factor of lr
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
    last name is in `no_decay` (MAE's tokens) get neither, as solo-learn's LARS recipes (SimCLR,
    BYOL) and MAE's fine-tuning do. For MoCo, SimSiam and MAE's pretraining, whose official code
    decays them, this is a departure (docs/recipes.md): one rule for every method.
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


def cosine_schedule(step, total, start, end):
    """From `start` at step 0 to `end` at step `total` along half a cosine: BYOL's EMA momentum
    tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 with end 1, DINO's weight decay."""
    return end - (end - start) * (math.cos(math.pi * min(step / max(1, total), 1.0)) + 1) / 2


def pick_precision(device, fp32=False, capability=None, forced=None):
    """The number format of the training forward: "bf16", "fp16" or "fp32".

    bf16 has fp32's range, so autocast to it needs nothing else; CUDA GPUs compute it natively
    from compute capability 8.0 (Ampere: A100, RTX 30xx) on. Older ones (a free notebook's T4
    is 7.5, a V100 7.0) get fp16, whose small range needs the loss scaled (Precision below).
    CPU and Apple's MPS train in fp32. `--fp32` turns autocast off; the environment variable
    SSL_PRECISION=fp16 (or bf16) forces a format on CUDA, e.g. to try a T4's path on a newer card.
    `capability` is (major, minor), read from the GPU when None."""
    if device.type != "cuda" or fp32:
        return "fp32"
    forced = os.environ.get("SSL_PRECISION", "") if forced is None else forced
    if forced:
        if forced not in ("bf16", "fp16", "fp32"):
            raise UserError(f"SSL_PRECISION={forced}: give bf16, fp16 or fp32 (or leave it unset to choose by GPU).")
        return forced
    major, _ = torch.cuda.get_device_capability(device) if capability is None else capability
    return "bf16" if major >= 8 else "fp16"


class Precision:
    """Mixed precision for a training step, in three calls that replace the usual ones:

        with amp:                       # autocast: the forward in bf16 or fp16 (or fp32: a no-op)
            loss = ...
        optimizer.zero_grad()
        amp.backward(loss)              # loss.backward(), of the scaled loss in fp16
        amp.step(optimizer)             # optimizer.step(), skipped in fp16 if a gradient overflowed

    fp16 gradients below 6e-8 round to zero, so fp16 multiplies the loss by a large scale before
    backward and divides the gradients by it before the step (torch.amp.GradScaler, which also
    lowers the scale after an overflow). With bf16 and fp32 the calls are exactly
    loss.backward() and optimizer.step(). amp.unscale(optimizer) before clipping gradients."""

    DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, device, kind="fp32"):
        self.kind, self.device_type = kind, device.type
        self.scaler = torch.amp.GradScaler(device.type) if kind == "fp16" else None
        self._context = None

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.DTYPES[self.kind]) if self.kind in self.DTYPES \
            else nullcontext()

    def __enter__(self):
        self._context = self.autocast()
        return self._context.__enter__()

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer):
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer):
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self):
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state):
        if self.scaler and state:
            self.scaler.load_state_dict(state)


FP32 = Precision(torch.device("cpu"))             # the plain fp32 step, for tests and tools


# ============================================================================================
# 5. Evaluation
# Frozen features of un-augmented images, L2-normalised for kNN: the test split is
# classified by its 200 nearest training images, votes weighted by exp(cos / 0.1).
# ============================================================================================

@torch.no_grad()
def extract_features(backbone, x, mean_std, batch_size=1024):
    """x (N, 3, H, W) uint8 -> features (N, D) fp32, in eval mode (BN running statistics)."""
    was_training = backbone.training
    backbone.eval()
    cuda = x.device.type == "cuda"
    amp = Precision(x.device, pick_precision(x.device))       # bf16 or fp16 on CUDA, else fp32
    feats = []
    for i in range(0, len(x), batch_size):
        xb = normalize_images(x[i:i + batch_size].float() / 255, *mean_std)
        if cuda:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with amp:
            feats.append(backbone(xb).float())
    backbone.train(was_training)
    return torch.cat(feats)


def knn_predict(train_f, train_y, test_f, num_classes, k=200, t=0.1, chunk=512):
    """Weighted kNN vote (Wu et al. 2018): each of the k nearest training features (cosine)
    votes for its class with weight exp(cos / t). Returns (M,) predicted labels. k = 200 and
    t = 0.1 are MoCo's CIFAR-10 demo's and lightly's; Wu et al. use t = 0.07."""
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


def knn_top1(backbone, data, mean_std, k=200, t=0.1):
    train_f = extract_features(backbone, data.train_x, mean_std)
    test_f = extract_features(backbone, data.test_x, mean_std)
    pred = knn_predict(train_f, data.train_y, test_f, len(data.classes), k, t)
    return (pred == data.test_y).float().mean().item()


@torch.no_grad()
def refresh_batchnorm(backbone, x, mean_std, batches=20, batch_size=256):
    """A copy of `backbone` whose BatchNorm running statistics are recomputed on up to `batches`
    whole batches of the un-augmented images x (a seeded random choice; each statistic the
    average of its batch values), no weight changed; None for a network without BatchNorm (a ViT).
    `backbone` and the global random stream are left as they were."""
    net = copy.deepcopy(backbone)
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return None
    for m in norms:
        m.reset_running_stats()
    n = min(batches, max(1, len(x) // batch_size)) * batch_size   # whole batches (or all of a small x)
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]
    net.train()
    for i, idx in enumerate(pick.to(x.device).split(batch_size)):
        for m in norms:
            m.momentum = 1 / (i + 1)                           # the running average of batches 1..i+1
        net(normalize_images(x[idx].float() / 255, *mean_std))
    return net.eval()


def random_init_bars(backbone, data, mean_std):
    """The bars a training run has to clear: the kNN top-1 of the untrained `backbone`, and the
    same with refresh_batchnorm's statistics (None without BatchNorm; both None without labels).
    An untrained ResNet's kNN depends on its BatchNorm running statistics, which start at mean
    0 and variance 1 and which any training refreshes, whether or not it learns; the second
    bar is the untrained network without that head start or handicap."""
    if not data.labeled:
        return dict(knn_top1_init=None, knn_top1_init_bn=None)
    net = refresh_batchnorm(backbone, data.train_x, mean_std)
    return dict(knn_top1_init=knn_top1(backbone, data, mean_std),
                knn_top1_init_bn=None if net is None else knn_top1(net, data, mean_std))


def linear_probe(backbone, data, mean_std, epochs=100, lr=1e-3, batch_size=256):
    """Top-1 of a linear classifier on frozen, standardised features (no augmentation):
    how linearly separable the classes are in the representation. The project's own protocol
    (AdamW, a ResNet's pooled feature or a ViT's last [CLS]), fast and deterministic on a CPU;
    not any paper's (MoCo: SGD at LR 30; MAE: LARS after a BatchNorm; DINO: the last four [CLS]
    tokens; SimCLR: with crops and flips), so its figures compare runs here, not with papers."""
    train_f = extract_features(backbone, data.train_x, mean_std)
    test_f = extract_features(backbone, data.test_x, mean_std)
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


def fine_tune(backbone, data, mean_std, epochs, lr=1e-3, batch_size=256, weight_decay=0.05, warmup_epochs=None,
              label_smoothing=0.1, layer_decay_rate=0.75, drop_path_rate=0.1, name="fine-tune"):
    """Test top-1 after training the whole encoder plus a linear head with labels, MAE's
    fine-tuning recipe: AdamW (default betas), lr per 256 images with warmup (5 of MAE's 100
    epochs, the same fraction of a shorter run) then cosine, layer-wise lr decay 0.75 and drop
    path 0.1 (ViTs only), global average pooling, label smoothing 0.1, crop + flip, bf16 (or
    fp16) on CUDA. Left out of the paper's recipe: RandAugment, mixup, cutmix and random erasing. Used
    with the same arguments for a pretrained encoder and a randomly initialised one, the gap
    between the two is what pretraining bought. Trains `backbone` in place: pass a copy."""
    device = data.train_x.device
    amp = Precision(device, pick_precision(device))           # bf16 or fp16 (scaled) on CUDA, else fp32
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
    augment = Augment(size=data.image_size, scale=(0.08, 1.0), jitter_p=0.0, gray_p=0.0, mean=mean_std[0], std=mean_std[1])
    steps = len(data.train_x) // B
    warmup = scaled_epochs(warmup_epochs, 5, 100, epochs, at_least=1) * steps
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(data.train_x), device=device)
        loss_sum = torch.zeros((), device=device)
        for i in range(steps):
            set_lr(optimizer, cosine_lr(epoch * steps + i, epochs * steps, warmup, base_lr, final=1e-6))
            idx = perm[i * B:(i + 1) * B]
            with amp:
                logits = model(augment(data.train_x[idx]))
            loss = F.cross_entropy(logits.float(), data.train_y[idx], label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            amp.backward(loss)
            amp.step(optimizer)
            loss_sum += loss.detach()
        if (epoch + 1) % max(1, epochs // 10) == 0 or epoch + 1 == epochs:
            print(f"{name}: epoch {epoch + 1}/{epochs} loss {(loss_sum / steps).item():.4f} "
                  f"({time.time() - t0:.0f}s)", file=sys.stderr)
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data.test_x), 1024):
            x = normalize_images(data.test_x[i:i + 1024].float() / 255, *mean_std)
            with amp:
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
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    write_atomic(path, lambda f: img.save(f, format="PNG"))


def save_views(augments, images, path, n=8):
    """views.png: each row one image (uint8, (n, 3, H, W)), then views from each recipe."""
    x = images[:n]
    cols = [F.interpolate(x.float() / 255, size=augments[0].size, mode="nearest")]
    for aug in augments:
        for _ in range(2 if len(augments) > 1 else 4):
            cols.append(F.interpolate(aug(x, normalize=False), size=augments[0].size, mode="nearest"))
    grid = torch.stack(cols, 1)                                # (n, cols, 3, S, S)
    save_grid((grid.clamp(0, 1) * 255).round().byte().cpu(), path)


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
    write_atomic(path, lambda f: img.save(f, format="PNG"))


def plot_curves(history, bars, path, title=""):
    """curves.png: loss, kNN top-1 and the collapse monitor, per epoch, with the random-init
    bars (see random_init_bars) as flat lines."""
    ep = [h["epoch"] for h in history]
    knn = [(h["epoch"], 100 * h["knn_top1"]) for h in history if "knn_top1" in h]
    knn_series = {"kNN top-1": ([e for e, _ in knn], [a for _, a in knn])}
    for label, key in [("random init", "knn_top1_init"), ("random init, BN refreshed", "knn_top1_init_bn")]:
        if bars.get(key) is not None and knn:
            knn_series[label] = ([0, ep[-1]], [100 * bars[key]] * 2)
    line_plot([
        dict(title=f"{title}: training loss", xlabel="epoch", ylabel="loss",
             series={"loss": (ep, [h["loss"] for h in history])}),
        dict(title="kNN accuracy (test)", xlabel="epoch", ylabel="top-1 %", series=knn_series),
        dict(title="collapse monitor", xlabel="epoch", ylabel="std x sqrt(d)", ymin=0.0,
             series={"embeddings": (ep, [h["emb_std"] / h["emb_std_ref"] for h in history]),
                     "healthy (1)": ([0, ep[-1]], [1.0, 1.0])}),
    ], path)


# ============================================================================================
# 7. Several processes
# `torchrun --nproc-per-node N simclr.py ...` starts N copies of a script, one per GPU (or N on
# a CPU), and tells each its RANK (0..N-1), LOCAL_RANK (its GPU on this machine) and WORLD_SIZE
# in the environment. Together they are one run: every process holds the whole model and
# trains on its shard of each batch, B/N images; DDP averages the gradients over the processes
# during the backward pass, so every process takes the step a single process would take on the
# whole batch and the copies stay identical. What a method needs beyond that (SimCLR's
# negatives from every process, MoCo's shared queue, DINO's shared centre) it asks of the three
# collectives below, in its own file. With one process all of this is a no-op.
# ============================================================================================

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


def world_size():
    """How many processes train this run: torchrun's WORLD_SIZE (1 for a plain `python`)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank():
    """This process's number, 0..N-1 (torchrun's RANK)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main():
    """Rank 0 writes the run's files, evaluates and prints; the others only train."""
    return rank() == 0


def init_distributed(device_flag):
    """The device of this process, after joining the others when torchrun started several:
    GPU LOCAL_RANK and NCCL on CUDA, gloo on a CPU (Apple's MPS has no collectives)."""
    device = pick_device(device_flag)
    if world_size() == 1 or dist.is_initialized():
        return device
    if device.type == "mps":
        raise UserError("torchrun with --device mps: Apple's MPS backend has no collectives for several "
                        "processes. Use --device cpu, or one process.")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UserError(f"torchrun started process {local} on a machine with {torch.cuda.device_count()} "
                            f"visible GPU(s): give --nproc-per-node at most that many.")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    # The timeout bounds a wait for another process: rank 0 evaluates (kNN) while the others
    # wait at the next collective. A process that fails makes torchrun stop the others.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=60))
    signal.signal(signal.SIGTERM, _stop_on_sigterm)           # torchrun's way to stop the others
    return device


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt                                    # run_main's message, the lock released


def end_distributed():
    """Leave the process group (once the DDP wrappers are gone: a live one at exit can abort)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather that lets the gradient through: forward, every process's rows in rank order;
    backward, each process gets the gradient of *every* process's loss with respect to its own
    rows (an all_reduce sum of the incoming gradients, then its slice). DDP then averages over
    the processes, which makes it the gradient of the mean loss over the whole batch. A plain
    all_gather returns tensors without a history, so the other processes' losses would not
    reach this process's rows: a silently wrong gradient."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def gather_with_grad(x):
    """x (n, ...) on each of N processes -> (N n, ...), rank 0's rows first, differentiable."""
    return _GatherWithGrad.apply(x) if world_size() > 1 else x


@torch.no_grad()
def gather(x):
    """x (n, ...) on each of N processes -> (N n, ...), rank 0's rows first; no gradient."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def all_mean(x):
    """The mean of x over the processes (x itself with one)."""
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()


class DistributedDataParallel(nn.parallel.DistributedDataParallel):
    """torch's DDP, through which a training step can still reach the model's own attributes
    (model.queue, model.teacher), as it can through torch.compile's wrapper."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def distribute(model, device, sync_batchnorm=True):
    """The module the training loop calls on several processes: rank 0's weights and buffers
    copied to every process (same seed or not, all start equal), BatchNorm made global on CUDA
    (SyncBatchNorm: statistics over the whole batch, as the papers' multi-GPU runs had;
    gloo on a CPU has no SyncBatchNorm, so there each process normalises its own shard), and
    DDP around it. Buffers are not re-sent at every forward: BatchNorm's running statistics
    stay each process's own (rank 0's are the ones evaluated and saved), and MoCo's queue and
    DINO's centre are kept equal by the methods themselves. EMA teachers inside the model have
    no gradient, so DDP leaves them alone: each process updates its copy from the identical
    student, and they stay identical. With one process, `model` itself."""
    if world_size() == 1:
        return model
    if sync_batchnorm and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)   # same parameters: the optimizer keeps them
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t, 0)
    no_resync = "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   **({"forward_sync_buffers": False} if no_resync else {"broadcast_buffers": False}))


# ============================================================================================
# 8. A training run
# The flags every method shares, checkpoints, and `Run`: the output folder, the log,
# progress and evaluation, so that each method file keeps only its model, its loss and an
# explicit training loop.
# ============================================================================================

def _number(cast, ok, what):
    """An argparse type: a number of type `cast` for which ok(value) holds."""
    def parse(s):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a {'whole ' if cast is int else ''}number") from None
        if not (math.isfinite(v) and ok(v)):
            raise argparse.ArgumentTypeError(f"{s} must be {what}")
        return v
    return parse


positive_int = _number(int, lambda v: v >= 1, "at least 1")
nonneg_int = _number(int, lambda v: v >= 0, "a whole number >= 0")
positive_float = _number(float, lambda v: v > 0, "a positive number")
nonneg_float = _number(float, lambda v: v >= 0, "a number >= 0")
fraction = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")
ema_momentum = _number(float, lambda v: 0 <= v < 1, "in [0, 1)")
seed_int = _number(int, lambda v: -2**63 <= v < 2**64, "within 64 bits, as torch.manual_seed takes")


def make_parser(description, arch):
    """A parser with the flags every method takes (data, backbone, run); `--help` shows each
    default. Each method file adds its own group, --epochs and --batch-size among them."""
    p = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = p.add_argument_group("data")
    group.add_argument("--data", default="cifar10",
                       help="'cifar10' (downloaded once into --data-dir), 'shapes' (built in, offline), or a "
                            "path to an image folder or .tar/.tar.gz with train/ and test/ class subfolders")
    group.add_argument("--data-dir", default=os.environ.get("SSL_DATA", "data"),
                       help="where CIFAR-10 and decoded-image caches live ($SSL_DATA if set)")
    group.add_argument("--image-size", type=positive_int, default=32,
                       help="side in pixels; folder images of another size are resized and centre-cropped")
    group.add_argument("--subset", type=nonneg_int, default=0,
                       help="train on a random N training images (0 = all); for quick runs")
    group = p.add_argument_group("backbone")
    group.add_argument("--arch", default=arch, choices=ARCHS, help="backbone network")
    group.add_argument("--width", type=positive_int, default=64,
                       help="ResNet base channels (64 is standard; 16 trains ~12x faster on a CPU)")
    group.add_argument("--patch-size", type=positive_int, default=4, help="ViT patch side in pixels (4 at 32 px)")
    group.add_argument("--depth", type=positive_int, default=12,
                       help="ViT blocks (12 is ViT-Tiny's and ViT-Small's; MAE's CPU demo trains 4, ~2x faster)")
    group = p.add_argument_group("run")
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                       help="auto picks cuda, then mps, then cpu")
    group.add_argument("--fp32", action="store_true", help="disable bf16 autocast on CUDA")
    group.add_argument("--compile", action="store_true", help="torch.compile the training forward (CUDA)")
    group.add_argument("--seed", type=seed_int, default=0, help="seeds weights, batches and augmentations")
    group.add_argument("--out", default=None, help="output folder (default runs/<method>-<date>-<time>)")
    group.add_argument("--resume", default=None, metavar="PATH",
                       help="continue from a checkpoint.pt, by default into its folder, up to --epochs")
    group.add_argument("--eval-every", type=nonneg_int, default=10,
                       help="kNN every N epochs (0 = only at the end); it always runs at the end")
    group.add_argument("--linear-probe", action=argparse.BooleanOptionalAction, default=False,
                       help="also fit a linear probe on frozen features at the end")
    return p


WHERE_FLAGS = {"out", "resume", "device", "compile", "data_dir"}     # where and how it runs, not what
RESUME_FLAGS = {"epochs", "eval_every", "linear_probe"}              # what a resumed run may change


def parse_args(parser, argv, method):
    """Parse the command line, and with --resume take the run's flags from its checkpoint so
    that it continues as it started. WHERE_FLAGS come from this command line; RESUME_FLAGS
    from the checkpoint unless given again; any other flag given with another value is
    ignored, with a note. Fills in --out. Returns the flags; the caller's parser is unchanged."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    given = {a.dest for a in parser._actions for s in argv for o in a.option_strings
             if s == o or s.startswith(o + "=")}
    if args.resume:
        ckpt = read_checkpoint(Path(args.resume), method)
        actions = {a.dest: a for a in parser._actions}
        for k, saved in ckpt["args"].items():
            if k in actions and k not in WHERE_FLAGS and not _saved_flag_ok(actions[k], saved):
                raise UserError(f"--resume {args.resume}: the checkpoint's --{k.replace('_', '-')} {saved!r} is not "
                                f"a value the command line takes (a hand-made checkpoint?). Resume from another "
                                f"checkpoint, or start afresh.")
            now = getattr(args, k, saved)
            if k in WHERE_FLAGS or (k in RESUME_FLAGS and k in given):
                continue
            if k in given and now != saved:
                print(f"note: --{k.replace('_', '-')} {now} ignored; the checkpoint's value {saved} is kept.",
                      file=sys.stderr)
            setattr(args, k, saved)
        if args.epochs <= ckpt["epoch"]:
            parser.error(f"--resume {args.resume}: the checkpoint already has {ckpt['epoch']} of "
                         f"--epochs {args.epochs}; pass a larger --epochs to continue")
    if args.out is None:
        args.out = str(Path(args.resume).parent) if args.resume else f"runs/{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


def to_device(model, device):
    """Move a model to the device. channels_last (NHWC) is the layout the fast convolution
    kernels want, on CUDA (tensor cores) and on CPU (oneDNN, 1.45x faster on our test machine)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type in ("cuda", "cpu") else model


def embedding_std(z):
    """Collapse monitor: mean per-dimension std of L2-normalised embeddings z (N, D). Healthy
    embeddings spread over the sphere give about 1/sqrt(D); a collapsed encoder gives 0."""
    return F.normalize(z.detach().float(), dim=1).std(0).mean()


def read_checkpoint(path, method):
    if _kind(path, "--resume") != "file":
        raise UserError(f"--resume {path}: no such checkpoint file.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["args"], ckpt["epoch"]
    except Exception as e:
        raise UserError(f"--resume {path}: not a readable checkpoint ({type(e).__name__}: {e}).") from None
    if ckpt.get("method") != method:
        raise UserError(f"--resume {path} is a {ckpt.get('method')} checkpoint, not {method}.")
    bad = [k for k, ok in _checkpoint_fields(ckpt).items() if not ok]
    if bad:
        raise UserError(f"--resume {path}: not a checkpoint this code wrote ({', '.join(bad)} missing or "
                        f"malformed). Resume from another checkpoint, or start afresh.")
    return ckpt


def _checkpoint_fields(c):
    """{field: whether it holds what Run wrote}: a hand-made or damaged checkpoint is a message."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    epoch = c.get("epoch")
    return {
        "args": isinstance(c.get("args"), dict),
        "epoch": isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 1,
        "history": isinstance(c.get("history"), list) and len(c["history"]) == epoch
                   and all(isinstance(h, dict) and number(h.get("seconds")) for h in c["history"]),
        "bars": isinstance(c.get("bars"), dict) and {"knn_top1_init", "knn_top1_init_bn"} <= set(c["bars"]),
        "train_seconds": number(c.get("train_seconds")),
        "weight_norm_init": isinstance(c.get("weight_norm_init"), torch.Tensor) or number(c.get("weight_norm_init")),
        "model": isinstance(c.get("model"), dict), "optimizer": isinstance(c.get("optimizer"), dict),
        "rng": isinstance(c.get("rng"), dict) and isinstance(c["rng"].get("torch"), torch.Tensor),
    }


def _saved_flag_ok(action, value):
    """Whether a flag's value read from a checkpoint is one its command line could have given."""
    if value == action.default:
        return True
    many = isinstance(action, argparse._AppendAction)
    if many and not isinstance(value, list):
        return False
    for v in value if many else [value]:
        if action.choices is not None and v not in action.choices:
            return False
        if action.nargs == 0 and not isinstance(v, bool):    # a switch: --fp32, --linear-probe
            return False
        if action.nargs != 0 and action.type is None and action.choices is None and not isinstance(v, str):
            return False
        if action.type is not None:
            try:
                if action.type(str(v)) != v:
                    return False
            except (argparse.ArgumentTypeError, TypeError, ValueError):
                return False
    return True


def save_atomic(obj, path):
    """torch.save through write_atomic (section 1's top): whole, or the previous file kept."""
    write_atomic(path, lambda f: torch.save(obj, f))


class RunFolder:
    """A run's output folder, claimed by one process at a time: an exclusive lock file in it
    (created with O_EXCL, so only one process can create it) holds the owner's pid and is
    removed at exit. A second run into the same folder stops with the first one's pid
    instead of interleaving their logs; a lock that names no live process (left by a killed
    run, emptied by a full disk, made by hand) is taken over."""

    def __init__(self, path):
        self.path, self.lock = path, path / ".lock"

    def claim(self):
        # The folders this run makes, the deepest first: release removes them again if empty.
        self.created = [p for p in [self.path, *self.path.parents] if _kind(p, "--out") is None]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for _ in range(3):                                 # another run may take it between two tries
                try:
                    self._create_lock()
                    return self._remove_dead_temporaries()
                except FileExistsError:
                    pid = self._owner()
                    if pid is not None and pid != os.getpid() and _is_running(pid):
                        break
                    self.lock.unlink()                         # names no live process
            raise UserError(f"--out {self.path} is in use by another run (process {self._owner()}); wait for it "
                            f"to finish or choose another --out.")
        except OSError as e:
            raise UserError(f"--out {self.path}: cannot write there ({type(e).__name__}: {e}).") from None

    def _remove_dead_temporaries(self):
        """write_atomic's temporary files whose process is gone: a run killed while writing
        one (up to a whole checkpoint) leaves it, and nothing else would ever remove it."""
        for p in self.path.glob(".*.tmp"):
            m = re.fullmatch(r"\..+\.([0-9]{1,9})\.[0-9a-f]{8}\.tmp", p.name)
            if m and (int(m[1]) == os.getpid() or not _is_running(int(m[1]))):
                p.unlink(missing_ok=True)

    def _create_lock(self):
        fd = os.open(self.lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            os.write(fd, str(os.getpid()).encode())
        except BaseException:                                  # a full disk: leave no empty lock behind
            os.close(fd)
            self.lock.unlink(missing_ok=True)
            raise
        os.close(fd)

    def _owner(self):
        """The pid the lock holds, or None: empty, not a number, or a symlink (no lock of ours)."""
        if self.lock.is_symlink() or not self.lock.is_file():
            return None
        text = self.lock.read_text(errors="replace")
        if not text:                                           # perhaps being written this instant
            time.sleep(0.1)
            text = self.lock.read_text(errors="replace")
        return int(text) if re.fullmatch(r"[0-9]{1,9}", text) and int(text) > 0 else None

    def release(self, litter=()):
        """Drop the lock and delete `litter`; remove the folders this run made if they are empty.
        Nothing, in a process that never claimed the folder (ranks 1.. of a torchrun)."""
        if not hasattr(self, "created"):
            return
        for name in litter:
            (self.path / name).unlink(missing_ok=True)
        if self._owner() == os.getpid():
            self.lock.unlink()
        for folder in getattr(self, "created", []):
            if not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _is_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                   # alive, but another user's
        return True
    return True


def _bars(knn_top1_init, knn_top1_init_bn):
    bn = "" if knn_top1_init_bn is None else f", {100 * knn_top1_init_bn:.2f}% with BatchNorm statistics of the data"
    return f"{100 * knn_top1_init:.2f}%{bn}"


def weight_norm(model):
    return torch.linalg.vector_norm(torch.stack([p.detach().float().norm() for p in model.parameters()]))


def check_training(loss, growth, epoch, checkpoint):
    """Stop a run whose loss is not finite or whose weights have grown 1000 times their initial
    norm (a loss bounded like InfoNCE can stay finite while the weights diverge)."""
    if math.isfinite(loss) and math.isfinite(growth) and growth < 1e3:
        return
    kept = f"the last good checkpoint is {checkpoint}" if checkpoint.exists() else "no checkpoint was written yet"
    what = f"the loss became {loss}" if not math.isfinite(loss) else \
        f"the weights diverged (their norm grew {growth:.3g}x since the start)"
    raise UserError(f"{what} during epoch {epoch + 1}; training stopped and {kept}. Try a lower --lr, a longer "
                    f"--warmup-epochs, or --fp32.")


def warn_collapse(std, dim):
    if std * math.sqrt(dim) < 0.2:
        print(f"warning: embedding std {std:.4f} is far below 1/sqrt(d) = {1 / math.sqrt(dim):.4f}: the "
              f"embeddings are collapsing toward one point.", file=sys.stderr)


def restore(path, method, model, optimizer):
    """Load a checkpoint into the model and the optimizer and restore the RNG; return it."""
    c = read_checkpoint(path, method)
    try:
        model.load_state_dict(c["model"])
        optimizer.load_state_dict(c["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:                 # e.g. written by an older version
        raise UserError(f"--resume {path}: the checkpoint does not fit the model {method}.py builds now "
                        f"(written by another version of the code?): {str(e).splitlines()[0]}") from None
    try:
        set_rng_state(c["rng"])
    except (RuntimeError, TypeError, ValueError) as e:
        raise UserError(f"--resume {path}: its random number generator state is malformed "
                        f"({str(e).splitlines()[0]}).") from None
    return c


def rng_state():
    return {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_json(obj, path):
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_log(history, path):
    """log.jsonl, one line per epoch, rewritten whole from the history: atomic like the rest."""
    write_atomic(path, lambda f: f.write("".join(json.dumps(h) + "\n" for h in history).encode()))


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


ACTIVE = {}                     # the run in progress, for run_main's message on Ctrl-C


class Run:
    """One training run. The method file parses its flags with parse_args, then:

        run = common.Run(args, "simclr")             # --out locked, the data on the device
        ... build the model and the optimizer ...
        run.start(model, optimizer, backbone)        # the folder; resume, or the random-init bars
        train_model = run.wrap(model)                # DDP on several processes, else model
        for epoch in range(run.start_epoch, args.epochs):
            for step, idx in run.batches(epoch):      # idx: (B,) indices into run.data.train_x
                ... augment, forward (train_model), loss, run.amp.backward, run.amp.step ...
                run.log_step(loss, embeddings)        # accumulated on the device: no host sync
            run.end_epoch(epoch)                      # checks, kNN, checkpoint, log line
        run.finish()                                  # encoder.pt, curves.png, summary.json

    It reads the flags of make_parser and the method's --epochs and --batch-size, and
    changes none of them. Method state (MoCo's queue, DINO's centre) lives in the model's
    buffers, so the checkpoint's state_dict carries it.

    Under torchrun (section 7) every process runs the same script and the run is still one:
    run.batches yields each process its shard of every batch, the shards of a step joined in
    rank order being the batch of a single process (one permutation per epoch, drawn by rank 0
    and sent to the others); each process augments with its own random stream; rank 0 alone
    holds the lock and writes, evaluates and prints. `run.wrap(model)` is the module to train
    (DDP on several processes). --batch-size stays the global batch, so learning rates and
    schedules are those of one process."""

    def __init__(self, args, method):
        self.args, self.method = args, method
        self.world = world_size()
        if args.batch_size % self.world:
            raise UserError(f"--batch-size {args.batch_size} is the batch of the whole run, split over the "
                            f"{self.world} processes torchrun started; it must be a multiple of {self.world}.")
        self.device = init_distributed(args.device)
        self.main, self.rank = is_main(), rank()
        self.local_batch = args.batch_size // self.world      # this process's shard of every batch
        self.history, self.train_seconds, self.start_epoch, self.checkpoints = [], 0.0, 0, 0
        self.litter = set()                                    # what to delete if no checkpoint gets written
        self.folder = RunFolder(Path(args.out))
        self.out = self.folder.path
        # Claim the folder before the data loads: a second run into it stops at once, and the
        # check below is made under the lock, so no two runs can both pass it.
        if self.main:
            self.folder.claim()
        atexit.register(self.release)
        ACTIVE["run"] = self
        ckpt = self.out / "checkpoint.pt"
        if self.main and _kind(ckpt, "--out") and not (args.resume and _same_file(Path(args.resume), ckpt)):
            raise UserError(f"--out {self.out} already holds a run (checkpoint.pt). Continue it with "
                            f"--resume {ckpt}, or choose another --out.")
        torch.manual_seed(args.seed)
        t0 = time.time()
        data = load_data(args.data, args.data_dir, args.image_size, args.subset, args.seed)
        self.mean_std = data.mean_std()                        # (mean, std) per channel, to normalise
        self.data = data.to(self.device)
        self.steps_per_epoch = len(data.train_x) // args.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"--batch-size {args.batch_size} is larger than the {len(data.train_x)} training "
                            f"images; lower it.")
        self.total_steps = self.steps_per_epoch * args.epochs
        if args.linear_probe and not data.labeled:
            print("note: --linear-probe needs labels on a train and a test split; there is none.", file=sys.stderr)
        cuda = self.device.type == "cuda"
        torch.backends.cudnn.benchmark = cuda
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cuda
        # The number format, chosen once: bf16 on recent GPUs, fp16 with loss scaling on older ones.
        self.amp = Precision(self.device, pick_precision(self.device, args.fp32))
        processes = f", {self.world} processes of {self.local_batch} images a step" if self.world > 1 else ""
        self.print(f"{method}: {len(data.train_x)} training images from {data.name} "
                   f"({'labeled' if data.labeled else 'unlabeled, no kNN'}), loaded in {time.time() - t0:.1f}s, "
                   f"device {self.device}{processes}, {self.amp.kind}, output {self.out}")

    def print(self, *a, **kw):
        """Print to stderr, from rank 0 only."""
        if self.main:
            print(*a, file=sys.stderr, **kw)

    def wrap(self, model, sync_batchnorm=True):
        """The module the training loop calls: DDP on several processes (distribute, section 7),
        then torch.compile with --compile. Call it after start(), which evaluates the untrained
        model on rank 0 alone."""
        model = distribute(model, self.device, sync_batchnorm)
        return torch.compile(model) if self.args.compile else model

    def start(self, model, optimizer, backbone):
        """Restore the checkpoint or measure the random-init kNN; the log is rewritten from the
        history. Nothing is written before, so bad input leaves no file."""
        self.model, self.optimizer, self.backbone = model, optimizer, backbone
        if self.args.resume:                                   # every process reads the same checkpoint
            c = restore(Path(self.args.resume), self.method, model, optimizer)
            self.amp.load_state_dict(c.get("amp", {}))
            self.start_epoch, self.history, self.bars = c["epoch"], c["history"], c["bars"]
            self.train_seconds, self.weight_norm_init = c["train_seconds"], c["weight_norm_init"]
            self.print(f"resumed from {self.args.resume} at epoch {self.start_epoch}")
        else:
            self.weight_norm_init = weight_norm(model)
            self.bars = random_init_bars(backbone, self.data, self.mean_std) if self.main else None
            if self.main and self.data.labeled:
                self.print(f"kNN top-1 of the random-init encoder: {_bars(**self.bars)}")
        if self.rank > 0:
            # Each process its own augmentations (and MAE its own masks): a stream of its own,
            # new at each start so that a resumed run does not repeat its first epoch's.
            torch.manual_seed(hash((self.args.seed, self.rank, self.start_epoch)) % 2**63)
        if self.main:
            self.litter.add("log.jsonl")
            write_log(self.history, self.out / "log.jsonl")

    def release(self):
        """Drop the lock; a run stopped before a checkpoint was in its folder leaves no litter."""
        self.folder.release(() if (self.out / "checkpoint.pt").exists() else self.litter)

    def batches(self, epoch, order=None):
        """Yield (global step, indices) for one epoch, drop_last: the batch's B indices, or
        with N processes this process's B/N of them. `order`: the images to visit, at least
        steps_per_epoch * B indices (default: a fresh permutation of all); rank 0's is used."""
        self.model.train()
        self._epoch, self._t0, self._t_print, self._n = epoch, time.time(), time.time(), 0
        self._sums = torch.zeros(2, device=self.device)       # loss, collapse monitor
        B, n = self.args.batch_size, self.local_batch
        order = torch.randperm(len(self.data.train_x), device=self.device) if order is None else order
        if self.world > 1:
            dist.broadcast(order, 0)                           # one order for the run: rank 0's
        for i in range(self.steps_per_epoch):                  # shards of batch i: rank r takes rows r*n..(r+1)*n
            yield epoch * self.steps_per_epoch + i, order[i * B + self.rank * n:i * B + (self.rank + 1) * n]

    def log_step(self, loss, embeddings):
        """Accumulate the loss and the collapse monitor of `embeddings` (N, D) on the device;
        read them back (one sync) only when printing progress."""
        self._sums += torch.stack([loss.detach().float(), embedding_std(embeddings)])
        self._dim, self._n = embeddings.shape[1], self._n + 1
        if self.main and time.time() - self._t_print >= (1.0 if sys.stderr.isatty() else 30.0):
            self._t_print, done, elapsed = time.time(), self._n / self.steps_per_epoch, time.time() - self._t0
            left = (self.args.epochs - self._epoch - done) * elapsed / done
            line = (f"epoch {self._epoch + 1}/{self.args.epochs} {100 * done:3.0f}% loss {self._sums[0].item() / self._n:.4f}"
                    f" {self._n * self.args.batch_size / elapsed:7.0f} img/s ETA {_hms(left)}")
            print(line.ljust(72), end="\r" if sys.stderr.isatty() else "\n", file=sys.stderr, flush=True)

    def end_epoch(self, epoch):
        """Stop on a diverged model (the last good checkpoint is kept), evaluate when due, then
        write the checkpoint and, after it, the log line."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - self._t0
        loss, std = (all_mean(self._sums) / self._n).tolist()  # over the processes: the whole batch's
        growth = (weight_norm(self.model) / self.weight_norm_init).item()
        check_training(loss, growth, epoch, self.out / "checkpoint.pt")
        self.train_seconds += seconds
        rec = {"epoch": epoch + 1, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
               "emb_std": std, "emb_std_ref": 1 / math.sqrt(self._dim), "weight_norm_growth": growth,
               "seconds": seconds, "images_per_s": self.steps_per_epoch * self.args.batch_size / seconds}
        self.history.append(rec)
        if not self.main:                                      # the rest is rank 0's
            return
        every = self.args.eval_every
        if self.data.labeled and (epoch + 1 == self.args.epochs or (every and (epoch + 1) % every == 0)):
            rec["knn_top1"] = knn_top1(self.backbone, self.data, self.mean_std)
        save_atomic({"method": self.method, "args": vars(self.args), "epoch": epoch + 1,
                     "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "rng": rng_state(),
                     "history": self.history, "bars": self.bars, "train_seconds": self.train_seconds,
                     "weight_norm_init": self.weight_norm_init, "amp": self.amp.state_dict(),
                     "processes": self.world}, self.out / "checkpoint.pt")
        self.checkpoints += 1
        write_log(self.history, self.out / "log.jsonl")
        knn = f" kNN {100 * rec['knn_top1']:.2f}%" if "knn_top1" in rec else ""
        print(f"epoch {epoch + 1}/{self.args.epochs} loss {loss:.4f} std*sqrt(d) {std * math.sqrt(self._dim):.2f}"
              f"{knn} {seconds:.1f}s {rec['images_per_s']:.0f} img/s".ljust(72), file=sys.stderr)
        warn_collapse(std, self._dim)

    def save_views(self, augments):
        """views.png, drawn on a forked RNG: the picture must not change the run's random stream."""
        if not self.main:
            return
        self.litter.add("views.png")
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if self.device.type == "cuda" else []):
            save_views(augments, self.data.test_x if self.data.test_x is not None else self.data.train_x,
                       self.out / "views.png")

    def finish(self):
        """Export the encoder, fit the linear probe if asked, write summary.json and curves.png;
        return the summary (None on ranks 1.., which have nothing left to do)."""
        if not self.main:
            return None
        save_atomic(self.backbone.state_dict(), self.out / "encoder.pt")
        epoch_s = float(np.median([h["seconds"] for h in self.history[1:] or self.history]))   # steady state
        summary = {
            "method": self.method, "data": self.data.name, "arch": self.args.arch, "epochs": self.args.epochs,
            "batch_size": self.args.batch_size, "knn_top1": self.history[-1].get("knn_top1"),
            **self.bars, "train_seconds": self.train_seconds, "epoch_seconds": epoch_s,
            "images_per_s": self.steps_per_epoch * self.args.batch_size / epoch_s,
            "device": device_name(self.device), "processes": self.world, "precision": self.amp.kind,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            **peak_memory(self.device), "image_size": self.data.image_size, "args": vars(self.args)}
        if self.args.linear_probe and self.data.labeled:
            summary["linear_top1"] = linear_probe(self.backbone, self.data, self.mean_std)
        write_json(summary, self.out / "summary.json")
        plot_curves(self.history, self.bars, self.out / "curves.png", title=f"{self.method} on {self.data.name}")
        knn = f"; kNN top-1 {100 * summary['knn_top1']:.2f}% (random init {_bars(**self.bars)})" \
            if summary["knn_top1"] is not None else ""
        probe = f"; linear probe {100 * summary['linear_top1']:.2f}%" if "linear_top1" in summary else ""
        print(f"done: {self.args.epochs} epochs in {_hms(self.train_seconds)}{knn}{probe}. Outputs in {self.out}",
              file=sys.stderr)
        return summary


def run_main(main):
    """Run a script's main(): a problem with the input becomes a one-paragraph message and exit
    code 2, never a traceback; Ctrl-C says what there is to resume."""
    ACTIVE.pop("run", None)                                    # a run of an earlier main() in this process
    who = f"[process {rank()} of {world_size()}] " if world_size() > 1 else ""
    try:
        main()
    except (UserError, MemoryError, RuntimeError) as e:
        message = e if isinstance(e, UserError) else _out_of_memory(e) or _peer_failed(e)
        if not message:
            raise
        if ACTIVE.get("run"):
            ACTIVE["run"].release()
        print(f"{who}error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if ACTIVE.get("run"):
            ACTIVE["run"].release()
        if is_main():
            print(f"\n{_what_to_resume(ACTIVE.get('run'))}", file=sys.stderr)
        sys.exit(130)
    end_distributed()


def _peer_failed(e):
    """The message for a collective that failed because another process of the run stopped."""
    if world_size() > 1 and (isinstance(e, getattr(dist, "DistError", ())) or
                             re.search(r"Connection (closed|reset) by peer|NCCL|gloo", str(e))):
        return (f"another process of this run stopped (its message is above), so this one stops too "
                f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}).")
    return None


def _out_of_memory(e):
    """The message for an allocation that failed (the model or a batch too large), else None."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))) or "can't allocate memory" in text or \
            "out of memory" in text.lower():
        text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text)
        return (f"out of memory ({text or type(e).__name__}). The model or a batch does not fit on this machine: "
                f"lower --width, --depth, --batch-size or --image-size.")
    return None


def _what_to_resume(run):
    """Ctrl-C's message: this run's checkpoint, else the one it was resumed from, else none."""
    script = Path(sys.argv[0]).name
    ckpt = run.out / "checkpoint.pt" if run else None
    if ckpt is not None and ckpt.exists():
        try:
            epoch = f" (epoch {torch.load(ckpt, map_location='cpu', weights_only=True)['epoch']})"
        except Exception:                                      # the message matters more than the epoch
            epoch = ""
        return f"interrupted. The last checkpoint is {ckpt}{epoch}; continue with: python {script} --resume {ckpt}"
    if run and run.args.resume:
        return (f"interrupted before the first checkpoint in {run.out}; {run.args.resume} is as it was. Continue "
                f"with: python {script} --resume {run.args.resume} --epochs {run.args.epochs} --out {run.out}")
    return "interrupted before the first checkpoint: nothing to resume."
