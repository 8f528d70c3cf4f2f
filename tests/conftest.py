"""Shared test setup: import the top-level scripts, keep hypothesis fast and deterministic."""
import os
import subprocess
import sys
from pathlib import Path

import torch
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["SSL_OFFLINE"] = "1"          # tests never touch the network
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("ci")


# The smallest run that still exercises everything: 16 px shapes, a narrow ResNet-18.
TINY = ["--data", "shapes", "--image-size", "16", "--subset", "256", "--width", "8", "--batch-size", "64",
        "--warmup-epochs", "1", "--device", "cpu"]


def run_script(script, *args, cwd=None):
    """Run one of the method files as a user would, in a subprocess."""
    env = dict(os.environ, SSL_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def assert_fp32_under_autocast(loss_fn):
    """A loss must be the same, to 1e-5, inside a bf16 autocast context and outside one: bf16
    keeps 8 bits of mantissa, and a matmul in it, divided by a temperature of 0.04, moves a
    loss in its third digit. Each loss switches autocast off for itself."""
    fp32 = loss_fn()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss_fn()
    assert mixed.dtype == torch.float32
    assert abs(mixed.item() - fp32.item()) <= 1e-5 * max(1.0, abs(fp32.item())), (mixed.item(), fp32.item())


def one_epoch(script, tmp_path, *flags):
    """Run `script` for one epoch on TINY with `flags`; the run folder, checked for every output."""
    out = tmp_path / "run"
    r = run_script(script, *TINY, *flags, "--epochs", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    for name in ["log.jsonl", "checkpoint.pt", "encoder.pt", "views.png", "curves.png", "summary.json"]:
        assert (out / name).is_file(), name
    assert not (out / ".lock").exists()                        # released at exit
    return out
