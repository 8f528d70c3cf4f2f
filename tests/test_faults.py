"""Faults (issue 32): no run overwrites another, no data is dropped without a word, and bad
input, a full disk or Ctrl-C end in a one-paragraph message, never a traceback."""
import dataclasses
import gzip
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import common
import simclr
from conftest import TINY as TINY_COMMON
from conftest import run_script

TINY = TINY_COMMON + ["--proj-hidden", "64", "--proj-dim", "32", "--eval-every", "0"]


SHAPES = {}


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """These tests are about files, not accuracy: the shapes are made once, kNN is a stub."""
    real = common.load_data

    def load_data(spec, data_dir, image_size=32, subset=0, seed=0):
        if spec != "shapes":
            return real(spec, data_dir, image_size, subset, seed)
        key = (image_size, subset, seed)
        if key not in SHAPES:
            SHAPES[key] = real(spec, data_dir, image_size, subset, seed)
        return dataclasses.replace(SHAPES[key])
    monkeypatch.setattr(common, "load_data", load_data)
    monkeypatch.setattr(common, "knn_top1", lambda *a, **k: 0.5)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 1-epoch run, made once; tests copy it rather than train again."""
    out = tmp_path_factory.mktemp("finished") / "run"
    simclr.main(TINY + ["--epochs", "1", "--out", str(out)])
    return out


def copy_run(src, dest):
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def save_png(path, seed=0, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def make_pets(root, n=3):
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            for i in range(n):
                save_png(root / split / c / f"{i}.png", seed=i + 7 * len(c))
    return root


# --- 1, 2: a run never overwrites another ------------------------------------------------------

def in_run_main(argv, capsys):
    """simclr.main(argv) as the command line runs it; (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: simclr.main(argv))
    return e.value.code, capsys.readouterr().err


def test_resume_into_another_runs_folder_is_refused(finished, tmp_path, capsys):
    """Item 1: --resume A/checkpoint.pt --out B, where B holds a run of its own."""
    b = copy_run(finished, tmp_path / "b")
    (b / "checkpoint.pt").write_bytes(b"B's own checkpoint")
    before = snapshot(b)
    code, err = in_run_main(["--resume", str(finished / "checkpoint.pt"), "--epochs", "2", "--out", str(b)], capsys)
    assert code == 2 and f"--out {b} already holds a run" in err
    assert snapshot(b) == before


def test_resume_into_its_own_folder_is_allowed(finished, tmp_path):
    a = copy_run(finished, tmp_path / "a")
    simclr.main(["--resume", str(a / ".." / "a" / "checkpoint.pt"), "--epochs", "2", "--out", str(a)])
    assert torch.load(a / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_a_busy_folder_stops_the_run_before_its_data_loads(tmp_path, monkeypatch):
    """Item 2: the lock is taken before the data loads, so a second run stops at once."""
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(str(sleeper.pid))
        monkeypatch.setattr(common, "load_data", lambda *a, **k: pytest.fail("the data loaded"))
        with pytest.raises(common.UserError, match=f"in use by another run \\(process {sleeper.pid}\\)"):
            simclr.main(TINY + ["--epochs", "1", "--out", str(out)])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_run_finished_while_this_one_waited_for_the_lock_is_kept(tmp_path, monkeypatch):
    """Item 2: the "already holds a run" check is made under the lock, so a run that finished
    between a first look and the claim is not overwritten."""
    out = tmp_path / "run"
    real_claim = common.RunFolder.claim

    def finish_another_run_first(self):
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "checkpoint.pt").write_bytes(b"the other run's")
        return real_claim(self)
    monkeypatch.setattr(common.RunFolder, "claim", finish_another_run_first)
    with pytest.raises(common.UserError, match="already holds a run"):
        simclr.main(TINY + ["--epochs", "1", "--out", str(out)])
    assert (out / "checkpoint.pt").read_bytes() == b"the other run's"


# --- 3: a lock that holds no live pid ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["empty", "text", "zero", "huge", "symlink"])
def test_a_lock_without_a_live_pid_is_taken_over(tmp_path, kind):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".lock"
    if kind == "symlink":
        (tmp_path / "target").write_text("12")
        lock.symlink_to(tmp_path / "target")
    else:
        lock.write_text({"empty": "", "text": "not a pid", "zero": "0", "huge": "9" * 30}[kind])
    folder = common.RunFolder(out)
    folder.claim()
    assert not lock.is_symlink() and lock.read_text() == str(os.getpid())
    if kind == "symlink":
        assert (tmp_path / "target").read_text() == "12"
    folder.release()
    assert not lock.exists()


def test_a_full_disk_while_locking_leaves_no_empty_lock(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    real_write = os.write

    def disk_full(fd, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(common.os, "write", disk_full)
    with pytest.raises(common.UserError, match=f"--out {out}: cannot write there.*No space left"):
        common.RunFolder(out).claim()
    monkeypatch.setattr(common.os, "write", real_write)
    assert not (out / ".lock").exists()
    common.RunFolder(out).claim()                              # and the next run can take it


# --- 4, 5, 6: no data dropped without a word ---------------------------------------------------

def write_tar(path, root, mode):
    """The same bytes every time: no dates, owners or gzip time stamp."""
    def fixed(info):
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(root, arcname=root.name, filter=fixed)
    path.write_bytes(gzip.compress(buf.getvalue(), mtime=0) if mode == "w:gz" else buf.getvalue())
    return path


def flat_images(root, n=32):
    """Plain one-colour images: small, so that most of an archive of them is tar headers."""
    root.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (8 * i, 0, 0)).save(root / f"{i:02d}.png")
    return root


@pytest.mark.parametrize("where,damage", [(0.25, "zero"), (0.4, "zero"), (0.5, "xor"), (0.5, "zero"), (-1, "header")])
def test_a_damaged_archive_is_an_error_naming_it(tmp_path, where, damage):
    """Item 4: tarfile takes a damaged header for the end of the archive (before: 1, 7 and 11
    of 32 images loaded with exit 0; and a zlib.error traceback)."""
    name = "imgs.tar" if damage == "header" else "imgs.tar.gz"
    archive = write_tar(tmp_path / name, flat_images(tmp_path / "imgs"), "w" if damage == "header" else "w:gz")
    blob = bytearray(archive.read_bytes())
    if damage == "header":                                     # the last header, its checksum broken
        with tarfile.open(archive) as tar:
            last = tar.getmembers()[-1].offset
        blob[last + 148:last + 156] = b"9999999\0"
    else:
        at = int(len(blob) * where)
        blob[at:at + 16] = bytes(16) if damage == "zero" else bytes(b ^ 0xFF for b in blob[at:at + 16])
    archive.write_bytes(bytes(blob))
    with pytest.raises(common.UserError, match=name):
        common.load_data(str(archive), tmp_path / "data", image_size=8)


def test_an_intact_archive_still_loads(tmp_path):
    make_pets(tmp_path / "pets")
    for mode, name in [("w:gz", "p.tar.gz"), ("w", "p.tar")]:
        d = common.load_data(str(write_tar(tmp_path / name, tmp_path / "pets", mode)), tmp_path / "data", image_size=8)
        assert d.train_x.shape[0] == 6 and d.test_x.shape[0] == 6


def refuse_reads_of(monkeypatch, target):
    """Simulate a folder or a file the user cannot read (root reads everything, so chmod cannot)."""
    real_scandir, real_read = os.scandir, common.Path.read_bytes

    def scandir(path="."):
        if os.fspath(path) == str(target):
            raise PermissionError(13, "Permission denied", str(target))
        return real_scandir(path)

    def read_bytes(self):
        if str(self) == str(target):
            raise PermissionError(13, "Permission denied", str(target))
        return real_read(self)
    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(common.Path, "read_bytes", read_bytes)


@pytest.mark.parametrize("what", ["train/dog", "train/cat/1.png", "."])
def test_an_unreadable_folder_or_file_is_an_error_naming_it(tmp_path, monkeypatch, what):
    """Item 5 (and 8's unreadable image, 12's unreadable root)."""
    root = make_pets(tmp_path / "pets")
    target = (root / what) if what != "." else root
    refuse_reads_of(monkeypatch, target)
    with pytest.raises(common.UserError) as e:
        common.load_data(str(root), tmp_path / "data", image_size=8)
    assert str(target) in str(e.value) and "Permission denied" in str(e.value)


def write_cifar(folder, labels=None, n=4):
    """The official layout, extracted: five training batches and a test batch."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        y = rng.integers(0, 10, n).tolist() if labels is None or name != "data_batch_3" else labels
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": y}
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))


@pytest.mark.parametrize("labels", [[0, 1, 2, -1], [0, 1, 2, 99], [0, 1, 2, 3, 4, 5], [0, 1]])
def test_corrupt_cifar_labels_are_an_error_naming_the_batch(tmp_path, labels):
    """Item 6: labels outside 0..9, or not one per image."""
    write_cifar(tmp_path / "cifar-10-batches-py", labels)
    with pytest.raises(common.UserError, match="data_batch_3"):
        common.load_cifar10(tmp_path)


def test_good_cifar_labels_load(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    assert common.load_cifar10(tmp_path).train_y.shape == (20,)


# --- 7: a full disk at any write is a message, and loses nothing -------------------------------

def fill_disk_for(monkeypatch, name):
    """Refuse, with ENOSPC, to open for writing any file whose name holds `name` (the file or a
    temporary one of it), through every way Python opens one."""
    import builtins
    real_open, real_os_open = builtins.open, os.open

    def full(path):
        return OSError(28, "No space left on device", str(path))

    def py_open(file, mode="r", *a, **k):
        if name in os.path.basename(str(file)) and any(c in mode for c in "wax+"):
            raise full(file)
        return real_open(file, mode, *a, **k)

    def low_open(path, flags, *a, **k):
        if name in os.path.basename(str(path)) and flags & (os.O_WRONLY | os.O_RDWR):
            raise full(path)
        return real_os_open(path, flags, *a, **k)
    monkeypatch.setattr(builtins, "open", py_open)
    monkeypatch.setattr(io, "open", py_open)
    monkeypatch.setattr(os, "open", low_open)


@pytest.mark.parametrize("name", ["log.jsonl", "views.png", "encoder.pt", "summary.json", "curves.png"])
def test_a_full_disk_at_any_write_is_a_message_naming_the_file(tmp_path, monkeypatch, capsys, name):
    out = tmp_path / "run"
    fill_disk_for(monkeypatch, name)
    code, err = in_run_main(TINY + ["--epochs", "1", "--out", str(out)], capsys)
    assert code == 2 and f"could not write {out / name}" in err and "No space left" in err, err
    assert not (out / name).exists()                           # no empty or half file in its place
    assert [p.name for p in out.glob("*tmp*")] == [] if out.exists() else True
    if name in ("encoder.pt", "summary.json", "curves.png"):   # after the checkpoint: it is kept
        assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


# --- 11: Ctrl-C says what there is to resume, whenever it comes ---------------------------------

def test_ctrl_c_while_a_checkpoint_is_written_waits_for_it(tmp_path, monkeypatch, capsys, request):
    import signal
    # Ctrl-C as a terminal delivers it: a suite started in the background (`nohup ... &`) inherits
    # SIGINT ignored, and the run then rightly has no Ctrl-C to defer.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, old))
    real_save = torch.save

    def interrupted_save(obj, f):
        os.kill(os.getpid(), signal.SIGINT)                    # Ctrl-C in the middle of the write
        real_save(obj, f)
    monkeypatch.setattr(common.torch, "save", interrupted_save)
    out = tmp_path / "run"
    code, err = in_run_main(TINY + ["--epochs", "2", "--out", str(out)], capsys)
    assert code == 130 and "(epoch 1)" in err and f"--resume {out / 'checkpoint.pt'}" in err, err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert [p.name for p in out.glob("*tmp*")] == []


def test_ctrl_c_in_a_resumed_run_before_its_first_checkpoint(finished, tmp_path, monkeypatch, capsys):
    """--resume A --out S1, Ctrl-C before S1 has a checkpoint: A is named to resume from, and S1
    holds no log and no picture without a checkpoint."""
    def interrupt(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(simclr, "train_step", interrupt)
    s1 = tmp_path / "s1"
    code, err = in_run_main(["--resume", str(finished / "checkpoint.pt"), "--epochs", "2", "--out", str(s1)], capsys)
    assert code == 130 and f"--resume {finished / 'checkpoint.pt'}" in err and "nothing to resume" not in err, err
    assert not s1.exists()


# --- 13: a killed write leaves no temporary file for good ---------------------------------------

def test_temporary_files_of_a_killed_run_are_removed(finished, tmp_path):
    a = copy_run(finished, tmp_path / "a")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = a / f".checkpoint.pt.{dead.pid}.0123abcd.tmp"
    stale.write_bytes(b"half a checkpoint")
    mine = a / "notes.tmp"                                     # not ours: left alone
    mine.write_text("keep")
    simclr.main(["--resume", str(a / "checkpoint.pt"), "--epochs", "2"])
    assert not stale.exists() and mine.read_text() == "keep"


# --- 8: paths the system refuses to look at ------------------------------------------------------

@pytest.mark.parametrize("flag", ["--out", "--resume", "--data", "--data-dir"])
def test_a_name_too_long_is_a_message_naming_the_flag(tmp_path, capsys, flag):
    """Path.exists() raises ENAMETOOLONG (Python 3.11) for a name over 255 bytes."""
    long = str(tmp_path / ("x" * 300))
    argv = TINY + ["--epochs", "1", "--out", str(tmp_path / "run")]
    if flag == "--data-dir":
        make_pets(tmp_path / "pets")
        argv += ["--data", str(tmp_path / "pets"), "--data-dir", long]
    else:
        argv += [flag, long]
    code, err = in_run_main(argv, capsys)
    assert code == 2 and flag in err and "x" * 300 in err, err


def test_a_folder_shaped_cifar_batch_is_a_message_naming_it(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").unlink()
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").mkdir()
    with pytest.raises(common.UserError, match="data_batch_2"):
        common.load_cifar10(tmp_path)


def test_an_out_inside_a_folder_that_cannot_be_entered(tmp_path, monkeypatch, capsys):
    """Simulated (root enters every folder): Path.exists raises PermissionError below `locked`."""
    locked = tmp_path / "locked"
    real_stat = common.Path.stat

    def stat(self, *a, **k):
        if str(self).startswith(str(locked) + "/"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *a, **k)
    monkeypatch.setattr(common.Path, "stat", stat)
    code, err = in_run_main(TINY + ["--epochs", "1", "--out", str(locked / "run")], capsys)
    assert code == 2 and f"--out {locked / 'run'}" in err and "Permission denied" in err, err


# --- 14: what is read back is checked --------------------------------------------------------------

def _damage(ckpt, how):
    if how == "args as a list":
        ckpt["args"] = list(ckpt["args"].items())
    elif how == "batch size 0":
        ckpt["args"]["batch_size"] = 0
    elif how == "arch unknown":
        ckpt["args"]["arch"] = "vgg"
    elif how == "epoch as a string":
        ckpt["epoch"] = "1"
    elif how == "no history":
        del ckpt["history"]
    elif how == "bad rng state":
        ckpt["rng"] = {"torch": torch.zeros(3, dtype=torch.uint8)}
    elif how == "not a dict":
        return [1, 2, 3]
    return ckpt


@pytest.mark.parametrize("how", ["args as a list", "batch size 0", "arch unknown", "epoch as a string", "no history",
                                 "bad rng state", "not a dict"])
def test_a_hand_made_checkpoint_is_a_message_naming_it(finished, tmp_path, capsys, how):
    a = copy_run(finished, tmp_path / "a")
    ckpt = a / "checkpoint.pt"
    torch.save(_damage(torch.load(ckpt, weights_only=True), how), ckpt)
    before = snapshot(a)
    code, err = in_run_main(["--resume", str(ckpt), "--epochs", "2"], capsys)
    assert code == 2 and f"--resume {ckpt}" in err, err
    assert snapshot(a) == before                               # left as it was


@pytest.mark.parametrize("how", ["shape", "labels", "dtype"])
def test_a_cache_of_the_wrong_shape_is_decoded_again(tmp_path, capsys, how):
    root = make_pets(tmp_path / "pets")
    good = common.load_data(str(root), tmp_path / "data", image_size=8)
    cache = next((tmp_path / "data" / "cache").glob("*.npz"))
    with np.load(cache) as z:
        arrays = dict(z)
    if how == "shape":
        arrays["train_x"] = arrays["train_x"][:, :, :4]
    elif how == "labels":
        arrays["train_y"] = arrays["train_y"][:2]
    else:
        arrays["test_x"] = arrays["test_x"].astype(np.float32)
    with open(cache, "wb") as f:
        np.savez(f, **arrays)
    again = common.load_data(str(root), tmp_path / "data", image_size=8)
    assert torch.equal(again.train_x, good.train_x) and torch.equal(again.test_y, good.test_y)
    assert str(cache) in capsys.readouterr().err


# --- 12: odd but honest data -------------------------------------------------------------------

def test_a_class_named_train(tmp_path):
    """CIFAR-100 has a class `train`: train/train/ is a class folder, not a second root."""
    for split in ("train", "test"):
        for c in ("apple", "train"):
            for i in range(2):
                save_png(tmp_path / "c100" / split / c / f"{i}.png", seed=i)
    d = common.load_data(str(tmp_path / "c100"), tmp_path / "data", image_size=8)
    assert d.classes == ["apple", "train"] and d.train_x.shape[0] == 4 and d.test_x.shape[0] == 4


def test_macos_metadata_files_are_skipped(tmp_path, capsys):
    root = make_pets(tmp_path / "pets")
    (root / "train" / "cat" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")
    (root / "__MACOSX" / "train").mkdir(parents=True)
    (root / "__MACOSX" / "train" / "._x.png").write_bytes(b"\0\5\26\7 AppleDouble")
    d = common.load_data(str(root), tmp_path / "data", image_size=8)
    assert d.train_x.shape[0] == 6 and "2 macOS metadata files" in capsys.readouterr().err


def test_a_single_image_as_data_says_so(tmp_path):
    save_png(tmp_path / "one.png")
    with pytest.raises(common.UserError) as e:
        common.load_data(str(tmp_path / "one.png"), tmp_path / "data")
    assert "one.png" in str(e.value) and "folder" in str(e.value) and "\n" not in str(e.value)


# --- 10: MAE's decoder flags are checked like the encoder's ------------------------------------

@pytest.mark.parametrize("flags,needle", [(["--decoder-dim", "2", "--decoder-heads", "4"], "--decoder-heads 4"),
                                          (["--decoder-heads", "3"], "--decoder-heads 3"),
                                          (["--decoder-dim", "6", "--decoder-heads", "2"], "--decoder-dim 6")])
def test_mae_decoder_flags_that_do_not_fit(tmp_path, monkeypatch, capsys, flags, needle):
    import mae
    monkeypatch.setattr(common, "load_data", lambda *a, **k: pytest.fail("checked after the data loaded"))
    with pytest.raises(SystemExit) as e:
        mae.main(TINY_COMMON + ["--arch", "vit_tiny", "--depth", "1", "--patch-size", "8", "--epochs", "1",
                                "--out", str(tmp_path / "o"), *flags])
    assert e.value.code == 2 and needle in capsys.readouterr().err


# --- 9: what cannot fit is refused, with how much it needs --------------------------------------

def test_a_long_thin_image_is_never_resized_whole(tmp_path, monkeypatch):
    """A 1 x 100,000 image: scaling its short side to 8 px first would make 8 x 800,000 pixels."""
    (tmp_path / "imgs").mkdir()
    Image.new("1", (1, 100_000), 1).save(tmp_path / "imgs" / "thin.png")
    save_png(tmp_path / "imgs" / "ok.png", size=20)
    sizes, real = [], Image.Image.resize

    def resize(self, size, *a, **k):
        sizes.append(tuple(size))
        return real(self, size, *a, **k)
    monkeypatch.setattr(Image.Image, "resize", resize)
    d = common.load_data(str(tmp_path / "imgs"), tmp_path / "data", image_size=8)
    assert d.train_x.shape == (2, 3, 8, 8) and max(max(s) for s in sizes) == 8, sizes


def test_resizing_a_crop_matches_resizing_then_cropping(tmp_path):
    rng = np.random.default_rng(0)
    for w, h in [(80, 50), (33, 47), (16, 16), (5, 9)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        s = 16 / min(w, h)
        big = im.resize((max(16, round(w * s)), max(16, round(h * s))), Image.BICUBIC)
        left, top = (big.width - 16) // 2, (big.height - 16) // 2
        want = np.asarray(big.crop((left, top, left + 16, top + 16))).transpose(2, 0, 1)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        got = common._decode("x.png", buf.getvalue, 16)
        assert np.abs(got.astype(int) - want).max() <= 1, (w, h)


def test_a_huge_archive_member_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "MAX_IMAGE_BYTES", 10_000)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "big.png").write_bytes(bytes(20_000))
    save_png(tmp_path / "imgs" / "ok.png")
    archive = write_tar(tmp_path / "imgs.tar.gz", tmp_path / "imgs", "w:gz")
    with pytest.raises(common.UserError, match="big.png.*20,000 bytes"):
        common.load_data(str(archive), tmp_path / "data")


def test_data_that_cannot_fit_in_memory_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "available_memory", lambda: 2**30)
    with pytest.raises(common.UserError, match=r"--image-size 1000.*GiB"):
        common.load_data("shapes", tmp_path, image_size=1000)
    make_pets(tmp_path / "pets")
    monkeypatch.setattr(common, "available_memory", lambda: 1000)
    with pytest.raises(common.UserError, match=r"pets \(12 images\) at --image-size 64 needs about"):
        common.load_data(str(tmp_path / "pets"), tmp_path / "data", image_size=64)


@pytest.mark.parametrize("flags,needle", [(["--seed", str(2**64)], "--seed"), (["--width", "1000000"], "memory")])
def test_flags_too_large_for_the_machine(tmp_path, capsys, flags, needle):
    code, err = in_run_main(TINY + ["--epochs", "1", "--out", str(tmp_path / "o"), *flags], capsys)
    assert code == 2 and needle in err and not (tmp_path / "o").exists(), err
