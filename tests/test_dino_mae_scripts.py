"""dino.py and mae.py end to end on CPU, writing their pictures; clear errors for bad flags."""
import json

import pytest
from PIL import Image

from conftest import TINY, run_script

DINO_SMALL = ["--subset", "128", "--head-hidden", "64", "--head-bottleneck", "16", "--out-dim", "64",
              "--local-crops", "2", "--local-size", "8"]
MAE_SMALL = ["--subset", "128", "--decoder-dim", "32", "--decoder-depth", "1", "--finetune-epochs", "1"]


def test_dino_one_epoch_writes_attention_maps(tmp_path):
    out = tmp_path / "run"
    r = run_script("dino.py", *TINY, *DINO_SMALL, "--epochs", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    for name in ["log.jsonl", "checkpoint.pt", "encoder.pt", "views.png", "curves.png", "summary.json",
                 "attention.png"]:
        assert (out / name).is_file(), name
    w, h = Image.open(out / "attention.png").size
    assert h > w > 0                                           # 8 rows, 1 + 3 heads columns
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == "dino" and 0 <= s["knn_top1"] <= 1


def test_dino_with_a_resnet(tmp_path):
    out = tmp_path / "run"
    r = run_script("dino.py", *TINY, *DINO_SMALL, "--arch", "resnet18", "--epochs", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "encoder.pt").is_file() and not (out / "attention.png").exists()


def test_mae_one_epoch_writes_reconstructions_and_finetune_comparison(tmp_path):
    out = tmp_path / "run"
    r = run_script("mae.py", *TINY, *MAE_SMALL, "--epochs", "1", "--out", str(out), "--bench")
    assert r.returncode == 0, r.stderr
    for name in ["log.jsonl", "checkpoint.pt", "encoder.pt", "reconstructions.png", "summary.json"]:
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text())
    for key in ["knn_top1", "linear_top1", "finetune_top1_pretrained", "finetune_top1_scratch",
                "bound_images_per_s", "bound_images_per_s_all_tokens"]:
        assert 0 <= s[key], key
    assert "fine-tuned 1 epochs" in r.stderr + r.stdout


@pytest.mark.parametrize("script,args,needle", [
    ("mae.py", ["--mask-ratio", "1.0"], "--mask-ratio"),
    ("mae.py", ["--arch", "resnet18"], "--arch"),
    ("mae.py", ["--patch-size", "3"], "--patch-size"),
    ("dino.py", ["--momentum", "1"], "--momentum"),
    ("dino.py", ["--local-size", "6"], "--local-size"),
])
def test_bad_flags_give_clear_errors(tmp_path, script, args, needle):
    r = run_script(script, *TINY, "--out", str(tmp_path / "o"), *args)
    assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr
