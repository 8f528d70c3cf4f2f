"""A training run (common.py, section 7), end to end through simclr.py: every output, resume
bit for bit, the checks that stop a run, the flags, and clear errors for bad input."""
import json
import math

import pytest
import torch

import common
import simclr
from conftest import TINY as TINY_COMMON
from conftest import run_script

TINY = TINY_COMMON + ["--proj-hidden", "64", "--proj-dim", "32"]


def run_simclr(*args):
    return run_script("simclr.py", *args)


def test_embedding_std_closed_forms():
    z = torch.randn(1, 64).repeat(100, 1)                      # collapsed: all rows equal
    assert common.embedding_std(z).item() < 1e-6
    d = 128
    spread = torch.randn(20000, d)                             # isotropic: 1/sqrt(d)
    assert common.embedding_std(spread).item() == pytest.approx(1 / math.sqrt(d), rel=0.02)


def run_in_process(argv):
    simclr.main(argv)


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch):
    straight, interrupted = tmp_path / "a", tmp_path / "b"
    args = TINY + ["--epochs", "2", "--eval-every", "0"]
    run_in_process(args + ["--out", str(straight)])

    real_save = common.save_atomic

    def save_then_interrupt(state, path):                      # Ctrl-C right after epoch 1's checkpoint
        real_save(state, path)
        raise KeyboardInterrupt
    monkeypatch.setattr(common, "save_atomic", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_in_process(args + ["--out", str(interrupted)])
    monkeypatch.setattr(common, "save_atomic", real_save)
    assert torch.load(interrupted / "checkpoint.pt", weights_only=True)["epoch"] == 1
    run_in_process(["--resume", str(interrupted / "checkpoint.pt"), "--epochs", "2"])

    a = torch.load(straight / "encoder.pt", weights_only=True)
    b = torch.load(interrupted / "encoder.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca = torch.load(straight / "checkpoint.pt", weights_only=True)
    cb = torch.load(interrupted / "checkpoint.pt", weights_only=True)
    assert [h["loss"] for h in ca["history"]] == [h["loss"] for h in cb["history"]]
    assert len((interrupted / "log.jsonl").read_text().splitlines()) == 2


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    real = simclr.info_nce

    def nan_in_second_epoch(z1, z2, t):                        # 4 steps per epoch
        calls["n"] += 1
        loss = real(z1, z2, t)
        return loss * float("nan") if calls["n"] > 4 else loss
    monkeypatch.setattr(simclr, "info_nce", nan_in_second_epoch)
    with pytest.raises(common.UserError, match="loss became nan during epoch 2"):
        run_in_process(TINY + ["--epochs", "3", "--out", str(out)])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("args,needle", [
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--epochs", "-1"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "100000"], "--batch-size"),
    (["--arch", "vgg"], "--arch"),
    (["--resume", "/no/such/checkpoint.pt"], "/no/such/checkpoint.pt"),
])
def test_bad_input_gives_clear_error(tmp_path, args, needle):
    r = run_simclr(*TINY, "--out", str(tmp_path / "o"), *args)
    assert r.returncode != 0
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_existing_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"precious")
    r = run_simclr(*TINY, "--epochs", "1", "--out", str(out))
    assert r.returncode != 0 and "--resume" in r.stderr and "Traceback" not in r.stderr
    assert (out / "checkpoint.pt").read_bytes() == b"precious"


def test_unlabeled_folder_trains_without_knn(tmp_path):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    (tmp_path / "imgs").mkdir()
    for i in range(40):
        arr = torch.randint(0, 255, (16, 16, 3), dtype=torch.uint8, generator=g).numpy()
        Image.fromarray(arr).save(tmp_path / "imgs" / f"{i}.png")
    out = tmp_path / "run"
    r = run_simclr("--data", str(tmp_path / "imgs"), "--data-dir", str(tmp_path / "cache"), "--image-size", "16",
                   "--width", "8", "--batch-size", "16", "--proj-hidden", "32", "--proj-dim", "16",
                   "--epochs", "1", "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["knn_top1"] is None and s["knn_top1_init"] is None and (out / "encoder.pt").is_file()
