"""The Makefile's `make demo METHOD=...` recipes: each runs its own script with flags that
script accepts, on the built-in data; an unknown METHOD stops with a message."""
import importlib
import shlex
import shutil
import subprocess

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
METHODS = ["simclr", "moco", "byol", "simsiam", "dino", "mae", "rotation"]


def make_demo(method, dry_run=True):
    """`make demo METHOD=method`, printed but not run; .venv counts as built."""
    cmd = ["make", "-s", "-o", ".venv/.installed", "demo", f"METHOD={method}", "PY=python"]
    return subprocess.run(cmd[:1] + ["-n"] * dry_run + cmd[1:], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("method", METHODS)
def test_every_demo_recipe_parses(method):
    out = make_demo(method)
    assert out.returncode == 0, out.stderr
    script, *flags = shlex.split(next(line for line in out.stdout.splitlines() if line.startswith("python ")))[1:]
    assert script == f"{method}.py"
    args = importlib.import_module(method).make_parser().parse_args(flags)   # an unknown flag exits
    assert args.data == "shapes" and args.image_size == 16 and args.eval_every > 0


def test_unknown_demo_method_says_which_exist():
    out = make_demo("swav", dry_run=False)
    assert out.returncode != 0
    assert "METHOD=swav" in out.stdout + out.stderr and "simsiam" in out.stdout + out.stderr
