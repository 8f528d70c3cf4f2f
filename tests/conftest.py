"""Shared test setup: import the top-level scripts, keep hypothesis fast and deterministic."""
import os
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
