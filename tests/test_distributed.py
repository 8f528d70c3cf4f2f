"""Several processes are one run: torchrun with gloo on the CPU, 2 processes.

The oracle is a single process on the whole batch (tests/ddp_steps.py): the processes' weights
after two steps must equal its weights, for every method, and fail to when the gather loses its
gradient. Then whole runs under torchrun: one set of outputs, no lock, a resume on one process.
"""
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import common
from conftest import ROOT, TINY, run_script

sys.path.insert(0, str(ROOT / "tests"))
import ddp_steps  # noqa: E402


def torchrun(*args, n=2, timeout=300):
    env = dict(os.environ, SSL_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                           *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    """{variant: {method: state after two steps}}: one process, two processes, two broken ones."""
    d = tmp_path_factory.mktemp("ddp")
    out = {"one": {m: ddp_steps.train(m) for m in ddp_steps.METHODS}}
    for variant, extra in (("two", []), ("broken", ["broken"])):
        r = torchrun(ROOT / "tests" / "ddp_steps.py", d / f"{variant}.pt", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        out[variant] = torch.load(d / f"{variant}.pt", weights_only=True)
    return out


def differences(a, b):
    """{key: max |a - b|} over a state_dict, MoCo's queue compared as a set of rows."""
    d = {}
    for k in a:
        x, y = a[k].double(), b[k].double()
        if k == "queue":                                       # the same keys, maybe in another order
            x, y = x[torch.argsort(x[:, 0])], y[torch.argsort(y[:, 0])]
        d[k] = (x - y).abs().max().item() if x.numel() else 0.0
    return d


@pytest.mark.parametrize("method", ddp_steps.METHODS)
def test_two_processes_take_the_single_process_step(states, method):
    d = differences(states["one"][method], states["two"][method])
    worst = max(d, key=d.get)
    assert d[worst] < 1e-6, (worst, d[worst])


def test_the_negative_controls_fail(states):
    """A gather without gradient changes SimCLR's weights; MoCo's queue without the other
    process's keys and DINO's centre of one process's crops are not the single process's."""
    one, bad = states["one"], states["broken"]
    assert max(differences(one["simclr"], bad["simclr"]).values()) > 1e-3
    assert differences(one["moco"], bad["moco"])["queue"] > 1e-3
    assert differences(one["dino"], bad["dino"])["center"] > 1e-4
    # and the methods that need no collective of their own are unaffected
    assert max(differences(one["byol"], bad["byol"]).values()) < 1e-6


def test_the_shards_of_a_step_are_the_single_process_batch(monkeypatch):
    """Run.batches on 2 processes (the permutation broadcast from rank 0 stubbed: both draw it
    from the same seed here) against Run.batches on one."""
    monkeypatch.setattr(common.dist, "broadcast", lambda t, src: t)

    def batches(world, rank):
        run = object.__new__(common.Run)
        run.model, run.device = torch.nn.Identity(), torch.device("cpu")
        run.args, run.steps_per_epoch = SimpleNamespace(batch_size=12), 4
        run.data = SimpleNamespace(train_x=torch.zeros(50))
        run.world, run.rank, run.local_batch = world, rank, 12 // world
        torch.manual_seed(3)
        return [(step, idx) for step, idx in run.batches(1)]

    single = batches(1, 0)
    shards = [batches(3, r) for r in range(3)]
    for i, (step, idx) in enumerate(single):
        assert [s[i][0] for s in shards] == [step] * 3
        assert torch.equal(torch.cat([s[i][1] for s in shards]), idx)


def test_a_torchrun_run_writes_its_outputs_once_and_resumes_on_one_process(tmp_path):
    out = tmp_path / "run"
    r = torchrun("simclr.py", "--device", "cpu", "--data", "shapes", "--image-size", "16", "--width", "8",
                 "--batch-size", "64", "--subset", "512", "--epochs", "2", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "curves.png", "encoder.pt", "log.jsonl",
                                                     "summary.json", "views.png"]   # no lock, no stray file
    assert r.stderr.count("done: 2 epochs") == 1                # rank 0 alone reports
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["batch_size"] == 64
    assert summary["images_per_s"] == pytest.approx(512 // 64 * 64 / summary["epoch_seconds"])

    r = run_script("simclr.py", "--resume", str(out / "checkpoint.pt"), "--epochs", "3")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["processes"] == 1
    r = torchrun("simclr.py", "--resume", out / "checkpoint.pt", "--epochs", "4")   # and back to two
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("script,flags", [
    ("moco.py", []), ("byol.py", []), ("simsiam.py", []), ("dino.py", ["--arch", "resnet18"]),
    ("mae.py", ["--arch", "vit_mini", "--depth", "1", "--decoder-depth", "1", "--finetune-epochs", "1"]),
    ("supervised.py", []), ("rotation.py", []),
])
def test_every_method_runs_under_torchrun(tmp_path, script, flags):
    out = tmp_path / "run"
    r = torchrun(script, "--device", "cpu", "--data", "shapes", "--image-size", "16", "--width", "8",
                 "--batch-size", "64", "--subset", "256", "--epochs", "1", *flags, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert {"checkpoint.pt", "encoder.pt", "summary.json", "log.jsonl"} <= names and ".lock" not in names
    assert not [n for n in names if n.endswith(".tmp")]
    assert json.loads((out / "summary.json").read_text())["processes"] == 2


def test_a_bad_batch_or_a_failing_process_stops_every_process(tmp_path):
    r = torchrun("simclr.py", *TINY, "--batch-size", "63", "--epochs", "1", "--out", tmp_path / "a")
    assert r.returncode != 0
    assert "--batch-size 63 is the batch of the whole run, split over the 2 processes" in r.stderr
    assert not re.search(rf'File "{re.escape(str(ROOT))}/(?!\.venv)', r.stderr)   # no traceback through our files
    assert not (tmp_path / "a").exists()
    # Only rank 0 takes the lock, so only it fails here; the other must stop too, not wait for it.
    (tmp_path / "file").write_text("")
    r = torchrun("simclr.py", *TINY, "--epochs", "1", "--out", tmp_path / "file" / "run", timeout=120)
    assert r.returncode != 0
    assert "[process 0 of 2] error: --out" in r.stderr


@pytest.mark.parametrize("device,capability,fp32,forced,expected", [
    ("cpu", None, False, "", "fp32"),
    ("mps", None, False, "", "fp32"),
    ("cuda", (9, 0), False, "", "bf16"),       # H100
    ("cuda", (8, 0), False, "", "bf16"),       # A100
    ("cuda", (7, 5), False, "", "fp16"),       # T4
    ("cuda", (7, 0), False, "", "fp16"),       # V100
    ("cuda", (9, 0), True, "", "fp32"),        # --fp32
    ("cuda", (9, 0), False, "fp16", "fp16"),   # SSL_PRECISION=fp16: a T4's path on a new card
    ("cpu", None, False, "fp16", "fp32"),      # CPU and MPS train in fp32 whatever is asked
])
def test_the_number_format_follows_the_gpu(device, capability, fp32, forced, expected):
    assert common.pick_precision(torch.device(device), fp32, capability, forced) == expected


def test_an_unknown_forced_format_is_a_message():
    with pytest.raises(common.UserError, match="SSL_PRECISION=fp8"):
        common.pick_precision(torch.device("cuda"), False, (9, 0), "fp8")


def test_fp16_scales_the_loss_and_skips_a_step_that_overflows():
    """Precision("fp16") on the CPU: the step equals plain SGD's (the scale is a power of two,
    so scaling and unscaling are exact) and a step with an infinite gradient is skipped."""
    torch.manual_seed(0)
    w = torch.randn(4, requires_grad=True)
    ref = w.detach().clone().requires_grad_()
    amp = common.Precision(torch.device("cpu"), "fp16")
    opt, opt_ref = torch.optim.SGD([w], lr=0.1), torch.optim.SGD([ref], lr=0.1)
    x = torch.randn(4)
    amp.backward((w * x).sum())
    assert torch.allclose(w.grad, x * amp.scaler.get_scale())  # the scaled gradient
    amp.step(opt)
    (ref * x).sum().backward()
    opt_ref.step()
    assert torch.equal(w, ref)
    before = w.detach().clone()
    opt.zero_grad()
    amp.backward((w * torch.tensor([float("inf"), 1, 1, 1])).sum())
    amp.step(opt)
    assert torch.equal(w, before)                              # skipped, and the scale lowered
    assert amp.scaler.get_scale() < 65536.0
