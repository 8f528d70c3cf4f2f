"""simclr.py end to end on CPU: smoke run, resume, clear errors for bad input."""
import json

import pytest
import torch

import common
import simclr
from conftest import TINY as TINY_COMMON
from conftest import run_script as run_any_script

TINY = TINY_COMMON + ["--proj-hidden", "64", "--proj-dim", "32"]


def run_script(*args, cwd=None):
    return run_any_script("simclr.py", *args, cwd=cwd)


def test_smoke_run_writes_every_output(tmp_path):
    out = tmp_path / "run"
    r = run_script(*TINY, "--epochs", "1", "--out", str(out), "--linear-probe", "--bench")
    assert r.returncode == 0, r.stderr
    for name in ["log.jsonl", "checkpoint.pt", "encoder.pt", "views.png", "curves.png", "summary.json"]:
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text())
    for key in ["knn_top1", "knn_top1_init", "epochs", "train_seconds", "images_per_s", "device",
                "linear_top1", "bound_images_per_s"]:
        assert key in s, key
    assert 0 <= s["knn_top1"] <= 1 and s["epochs"] == 1 and s["images_per_s"] > 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in log] == [1] and "knn_top1" in log[0] and "emb_std" in log[0]
    encoder = torch.load(out / "encoder.pt", weights_only=True)
    net = common.build_backbone("resnet18", 16, width=8)
    net.load_state_dict(encoder)                               # a plain backbone state_dict
    assert "model only (bound)" in r.stdout


def run_in_process(argv):
    simclr.main(argv)


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch):
    straight, interrupted = tmp_path / "a", tmp_path / "b"
    args = TINY + ["--epochs", "2", "--eval-every", "0"]
    run_in_process(args + ["--out", str(straight)])

    real_save = common.save_checkpoint

    def save_then_interrupt(state, path):                      # Ctrl-C right after epoch 1's checkpoint
        real_save(state, path)
        raise KeyboardInterrupt
    monkeypatch.setattr(common, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_in_process(args + ["--out", str(interrupted)])
    monkeypatch.setattr(common, "save_checkpoint", real_save)
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
    r = run_script(*TINY, "--out", str(tmp_path / "o"), *args)
    assert r.returncode != 0
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_corrupt_image_gives_clear_error(tmp_path):
    from PIL import Image
    for c in ("a", "b"):
        for i in range(3):
            (tmp_path / "d" / "train" / c).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / "d" / "train" / c / f"{i}.png")
    (tmp_path / "d" / "train" / "a" / "bad.png").write_bytes(b"\x89PNG truncated")
    r = run_script("--data", str(tmp_path / "d"), "--data-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "bad.png" in r.stderr and "Traceback" not in r.stderr


def test_existing_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"precious")
    r = run_script(*TINY, "--epochs", "1", "--out", str(out))
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
    r = run_script("--data", str(tmp_path / "imgs"), "--data-dir", str(tmp_path / "cache"), "--image-size", "16",
                   "--width", "8", "--batch-size", "16", "--proj-hidden", "32", "--proj-dim", "16",
                   "--epochs", "1", "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["knn_top1"] is None and s["knn_top1_init"] is None and (out / "encoder.pt").is_file()
