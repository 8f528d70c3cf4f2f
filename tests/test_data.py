"""Data loading: the CIFAR-10 reader, folders and tarballs, the cache, and clear errors."""
import io
from collections import Counter
import pickle
import tarfile
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from PIL import Image

import common
from conftest import run_script


def write_cifar_archive(path, n=4):
    """A tiny archive in the official layout: 5 training batches and a test batch, each a
    pickled dict of bytes keys with a (n, 3072) uint8 array and a list of labels."""
    rng = np.random.default_rng(0)
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            labels = rng.integers(0, 10, n).tolist()
            blob = pickle.dumps({b"batch_label": name.encode(), b"data": data, b"labels": labels}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            batches[name] = (data, labels)
    return batches


def test_cifar_reader_on_official_format(tmp_path):
    batches = write_cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    d = common.load_cifar10(tmp_path)
    assert d.train_x.shape == (20, 3, 32, 32) and d.test_x.shape == (4, 3, 32, 32)
    assert d.train_x.dtype == torch.uint8 and d.classes[0] == "airplane"
    # Row r of a batch is 1024 red, 1024 green, 1024 blue values in row-major order.
    data, labels = batches["data_batch_2"]
    assert torch.equal(d.train_x[4 + 1, 1, 2, 3], torch.tensor(data[1, 1024 + 2 * 32 + 3]))
    assert d.train_y[4:8].tolist() == labels
    assert d.test_y.tolist() == batches["test_batch"][1]


def test_cifar_reader_refuses_code_in_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        blob = pickle.dumps({b"data": Evil()})
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(common.UserError, match="not a CIFAR-10 batch"):
        common.load_cifar10(tmp_path)


def test_missing_cifar_offline_names_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_OFFLINE", "1")
    with pytest.raises(common.UserError) as e:
        common.load_cifar10(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "--data shapes" in msg and "cifar-10-python.tar.gz" in msg


def test_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.delenv("SSL_OFFLINE", raising=False)

    def no_network(*a, **k):
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(common.urllib.request, "urlopen", no_network)
    with pytest.raises(common.UserError, match="could not download"):
        common.load_cifar10(tmp_path)
    assert list(tmp_path.iterdir()) == []


def save_image(path, size=(32, 32), mode="RGB", seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return arr


def make_tree(root):
    """train/{cat,dog}, test/{cat,dog}: PNGs of mixed modes and sizes."""
    arrays = {}
    for split, n in (("train", 3), ("test", 2)):
        for c in ("cat", "dog"):
            for i in range(n):
                arrays[f"{split}/{c}/{i}.png"] = save_image(root / split / c / f"{i}.png", seed=i + 10 * len(c))
    save_image(root / "train" / "dog" / "gray.png", mode="L")
    save_image(root / "train" / "dog" / "big.jpg", size=(80, 50))
    save_image(root / "train" / "cat" / "pal.png", mode="P")
    save_image(root / "train" / "cat" / "alpha.png", mode="RGBA")
    (root / "train" / "notes.txt").write_text("not an image, ignored")
    return arrays


def test_folder_loading(tmp_path):
    arrays = make_tree(tmp_path / "pets")
    d = common.load_data(str(tmp_path / "pets"), tmp_path / "data", image_size=32)
    assert d.classes == ["cat", "dog"]
    assert d.train_x.shape == (10, 3, 32, 32) and d.test_x.shape == (4, 3, 32, 32)
    assert d.train_y.tolist().count(0) == 5 and d.test_y.tolist() == [0, 0, 1, 1]
    # A same-size RGB PNG comes through bit for bit.
    assert np.array_equal(d.test_x[2].permute(1, 2, 0).numpy(), arrays["test/dog/0.png"])


def test_tarball_with_single_top_folder_and_cache(tmp_path, monkeypatch):
    make_tree(tmp_path / "pets")
    tgz = tmp_path / "pets.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(tmp_path / "pets", arcname="pets")
    d1 = common.load_data(str(tgz), tmp_path / "data", image_size=16)
    assert d1.train_x.shape == (10, 3, 16, 16) and d1.classes == ["cat", "dog"]
    assert len(list((tmp_path / "data" / "cache").glob("*.npz"))) == 1

    def no_decoding(*a):
        raise AssertionError("should have come from the cache")
    monkeypatch.setattr(common, "_decode", no_decoding)
    d2 = common.load_data(str(tgz), tmp_path / "data", image_size=16)
    assert torch.equal(d1.train_x, d2.train_x) and torch.equal(d1.test_y, d2.test_y)


def test_flat_folder_is_unlabeled(tmp_path):
    for i in range(5):
        save_image(tmp_path / "imgs" / f"{i}.png", seed=i)
    d = common.load_data(str(tmp_path / "imgs"), tmp_path / "data", image_size=32)
    assert d.train_x.shape == (5, 3, 32, 32) and d.train_y is None and d.test_x is None
    assert not d.labeled


def test_corrupt_image_names_the_file(tmp_path):
    make_tree(tmp_path / "pets")
    (tmp_path / "pets" / "train" / "cat" / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(common.UserError, match="broken.jpg"):
        common.load_data(str(tmp_path / "pets"), tmp_path / "data", image_size=32)


def test_missing_path_and_bad_layouts(tmp_path):
    with pytest.raises(common.UserError, match="no such file or folder"):
        common.load_data(str(tmp_path / "nope"), tmp_path / "data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UserError, match="no images found"):
        common.load_data(str(tmp_path / "empty"), tmp_path / "data")
    save_image(tmp_path / "mixed" / "train" / "cat" / "0.png")
    save_image(tmp_path / "mixed" / "train" / "loose.png")
    with pytest.raises(common.UserError, match="loose.png"):
        common.load_data(str(tmp_path / "mixed"), tmp_path / "data")
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(common.UserError, match="junk.tar.gz"):
        common.load_data(str(tmp_path / "junk.tar.gz"), tmp_path / "data")


def test_shapes_is_deterministic_and_balanced():
    x1, y1 = common.make_shapes(300, seed=7, size=16)
    x2, y2 = common.make_shapes(300, seed=7, size=16)
    x3, _ = common.make_shapes(300, seed=8, size=16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert x1.shape == (300, 3, 16, 16) and x1.dtype == torch.uint8
    counts = torch.bincount(y1, minlength=10)
    assert counts.min() > 10                                   # every class present


def test_shapes_carry_grey_grain():
    """The film grain is grey and fine: what is left of each image after a 3x3 box blur is
    strong and the same in the red and green channels (correlation about 0.7 here; about 0
    without the grain, where that residual is edges and colour noise of each channel)."""
    x = common.make_shapes(300, seed=3, size=32)[0].float() / 255          # (300, 3, 32, 32)
    residual = x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    residual = residual - residual.mean((2, 3), keepdim=True)
    r, g = residual[:, 0], residual[:, 1]                                 # (300, 32, 32)
    corr = (r * g).mean((1, 2)) / (r.std((1, 2)) * g.std((1, 2)))
    assert corr.mean() > 0.5 and residual.std() > 0.08


def test_subset_is_random_not_first(tmp_path):
    d = common.load_data("shapes", tmp_path, image_size=16, subset=100, seed=0)
    assert len(d.train_x) == 100 and len(d.train_y) == 100
    assert torch.bincount(d.train_y, minlength=10).min() > 0


def run_simclr(*args):
    return run_script("simclr.py", *args)


def test_corrupt_image_gives_clear_error(tmp_path):
    from PIL import Image
    for c in ("a", "b"):
        for i in range(3):
            (tmp_path / "d" / "train" / c).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / "d" / "train" / c / f"{i}.png")
    (tmp_path / "d" / "train" / "a" / "bad.png").write_bytes(b"\x89PNG truncated")
    r = run_simclr("--data", str(tmp_path / "d"), "--data-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "bad.png" in r.stderr and "Traceback" not in r.stderr


# --- faults and odd inputs ------------------------------------------------------------------------

@pytest.mark.parametrize("mode,values,want", [
    ("I;16", [0, 257 * 100, 65535], [0, 100, 255]),           # 16 bits: divided by 257
    ("I", [-1000, 0, 3000], [0, 64, 255]),                     # 32-bit integers: their own range
    ("F", [0.0, 0.25, 1.0], [0, 64, 255]),                     # floats: their own range
])
def test_images_of_any_mode_decode_to_8_bits(tmp_path, mode, values, want):
    arr = np.array([values * 4] * 12, dtype={"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])   # (12, 12)
    im = Image.fromarray(arr)
    assert im.mode == mode
    path = tmp_path / "imgs" / ("a.tif" if mode != "I;16" else "a.png")
    path.parent.mkdir()
    im.save(path)
    x = common.load_data(str(tmp_path / "imgs"), tmp_path / "data", image_size=12).train_x[0]   # (3, 12, 12)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])            # grey
    assert x[0, 0, :3].tolist() == want


def test_train_and_test_are_found_beside_other_folders(tmp_path):
    """A root with train/, test/ and a stray folder and file: the pair is used, the rest
    left out with a note, never mixed into one unlabelled set with the test images."""
    make_tree(tmp_path / "d" / "pets")
    save_image(tmp_path / "d" / "pets" / "extra" / "x.png")
    save_image(tmp_path / "d" / "pets" / "loose.png")
    d = common.load_data(str(tmp_path / "d"), tmp_path / "data", image_size=32)
    assert d.classes == ["cat", "dog"] and d.train_x.shape[0] == 10 and d.test_x.shape[0] == 4


def test_two_train_folders_are_refused_with_what_was_found(tmp_path):
    make_tree(tmp_path / "d" / "a")
    make_tree(tmp_path / "d" / "b")
    with pytest.raises(common.UserError, match="more than one train/.*a/train.*b/train"):
        common.load_data(str(tmp_path / "d"), tmp_path / "data")


def test_a_single_class_trains_without_knn(tmp_path, capsys):
    for split in ("train", "test"):
        for i in range(3):
            save_image(tmp_path / "d" / split / "cat" / f"{i}.png", seed=i)
    d = common.load_data(str(tmp_path / "d"), tmp_path / "data")
    assert not d.labeled and "single class" in capsys.readouterr().err


def test_a_truncated_cache_is_rebuilt(tmp_path, capsys):
    make_tree(tmp_path / "pets")
    d1 = common.load_data(str(tmp_path / "pets"), tmp_path / "data", image_size=16)
    cache = next((tmp_path / "data" / "cache").glob("*.npz"))
    cache.write_bytes(cache.read_bytes()[:100])                # a copy cut short
    d2 = common.load_data(str(tmp_path / "pets"), tmp_path / "data", image_size=16)
    assert torch.equal(d1.train_x, d2.train_x) and "unreadable" in capsys.readouterr().err
    assert common.load_data(str(tmp_path / "pets"), tmp_path / "data", image_size=16).train_x.shape[0] == 10


def test_a_data_dir_that_cannot_hold_the_download(tmp_path, monkeypatch):
    monkeypatch.delenv("SSL_OFFLINE", raising=False)
    monkeypatch.setattr(common.urllib.request, "urlopen", lambda *a, **k: pytest.fail("no download expected"))
    (tmp_path / "afile").write_text("")
    with pytest.raises(common.UserError, match="--data-dir .*afile.*cannot write"):
        common.load_cifar10(tmp_path / "afile")


def test_corrupt_image_message_names_the_file_not_a_buffer(tmp_path):
    make_tree(tmp_path / "pets")
    (tmp_path / "pets" / "train" / "cat" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(common.UserError) as e:
        common.load_data(str(tmp_path / "pets"), tmp_path / "data")
    assert "broken.png" in str(e.value) and "BytesIO" not in str(e.value)
