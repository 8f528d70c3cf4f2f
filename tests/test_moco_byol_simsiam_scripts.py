"""moco.py, byol.py and simsiam.py end to end on CPU: one epoch each on `shapes`, the MoCo
queue across a resume, and clear errors for their own flags."""
import json

import pytest
import torch

import common
import moco
from conftest import TINY, run_script

SMALL_HEADS = {
    "moco.py": ["--proj-hidden", "64", "--proj-dim", "32", "--queue-size", "200", "--bn-splits", "4"],
    "byol.py": ["--proj-hidden", "64", "--proj-dim", "32", "--pred-hidden", "64"],
    "simsiam.py": ["--proj-hidden", "64", "--proj-dim", "64", "--pred-hidden", "16"],
}


@pytest.mark.parametrize("script,extra", [
    ("moco.py", []),
    ("moco.py", ["--no-symmetric", "--bn-splits", "1"]),
    ("byol.py", []),
    ("simsiam.py", []),
])
def test_one_epoch_writes_every_output(tmp_path, script, extra):
    out = tmp_path / "run"
    r = run_script(script, *TINY, *SMALL_HEADS[script], *extra, "--epochs", "1", "--out", str(out), "--bench")
    assert r.returncode == 0, r.stderr
    for name in ["log.jsonl", "checkpoint.pt", "encoder.pt", "views.png", "curves.png", "summary.json"]:
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == script[:-3] and 0 <= s["knn_top1"] <= 1 and s["bound_images_per_s"] > 0
    log = json.loads((out / "log.jsonl").read_text())
    assert log["loss"] == log["loss"] and log["emb_std"] > 0   # finite, monitored
    common.build_backbone("resnet18", 16, width=8).load_state_dict(torch.load(out / "encoder.pt", weights_only=True))


def test_moco_queue_survives_resume(tmp_path, monkeypatch):
    """Interrupt after epoch 1, resume to epoch 2: the weights and the queue (contents and
    pointer) equal those of an uninterrupted two-epoch run."""
    args = TINY + SMALL_HEADS["moco.py"] + ["--epochs", "2", "--eval-every", "0"]
    straight, interrupted = tmp_path / "a", tmp_path / "b"
    moco.main(args + ["--out", str(straight)])

    real_save = common.save_checkpoint

    def save_then_interrupt(state, path):
        real_save(state, path)
        raise KeyboardInterrupt
    monkeypatch.setattr(common, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        moco.main(args + ["--out", str(interrupted)])
    monkeypatch.setattr(common, "save_checkpoint", real_save)
    first = torch.load(interrupted / "checkpoint.pt", weights_only=True)
    assert first["epoch"] == 1 and first["model"]["queue"].shape == (200, 32)
    assert first["model"]["queue_ptr"] == (4 * 2 * 64) % 200      # 4 steps of 2x64 keys, wrapped
    moco.main(["--resume", str(interrupted / "checkpoint.pt"), "--epochs", "2"])

    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(interrupted / "checkpoint.pt", weights_only=True)
    assert not torch.equal(first["model"]["queue"], b["model"]["queue"])   # it did move in epoch 2
    for k in a["model"]:                                       # the queue and its pointer included
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.parametrize("script,args,needle", [
    ("moco.py", ["--momentum", "1.5"], "--momentum"),
    ("moco.py", ["--bn-splits", "5"], "--bn-splits"),
    ("moco.py", ["--queue-size", "0"], "--queue-size"),
    ("byol.py", ["--tau-base", "1"], "--tau-base"),
    ("simsiam.py", ["--pred-hidden", "-3"], "--pred-hidden"),
])
def test_bad_flags_give_clear_errors(tmp_path, script, args, needle):
    r = run_script(script, *TINY, "--out", str(tmp_path / "o"), *args)
    assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "checkpoint.pt").exists()
