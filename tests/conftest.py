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


class NoAutocast:
    """Stands in for common.Run in a direct call of a train_step: fp32 on the CPU."""

    def autocast(self):
        return torch.autocast("cpu", enabled=False)
