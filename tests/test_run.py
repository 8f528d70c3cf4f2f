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


def run_simclr(*args, cwd=None):
    return run_script("simclr.py", *args, cwd=cwd)


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
    assert ca["bars"] == cb["bars"] and ca["bars"]["knn_top1_init_bn"] is not None   # carried through the resume
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


def test_checkpoint_that_does_not_fit_the_model_gives_clear_error(tmp_path):
    """A checkpoint from another version of the code (here: a weight renamed) stops the resume
    with a message naming it, and is left as it was."""
    out = tmp_path / "run"
    assert run_simclr(*TINY, "--epochs", "1", "--out", str(out)).returncode == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["model"]["old_name"] = ckpt["model"].pop(next(iter(ckpt["model"])))
    torch.save(ckpt, out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    r = run_simclr("--resume", str(out / "checkpoint.pt"), "--epochs", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"--resume {out / 'checkpoint.pt'}: the checkpoint does not fit the model simclr.py" in r.stderr
    assert (out / "checkpoint.pt").read_bytes() == before


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


# --- faults: a clear message and nothing lost ---------------------------------------------------

def test_log_equals_the_checkpoint_history_after_a_kill_between_them(tmp_path, monkeypatch):
    """A kill after the checkpoint but before the log line: the resumed run's log.jsonl is the
    uninterrupted run's (the checkpoint is the source of truth), also in another --out."""
    args = TINY + ["--epochs", "3", "--eval-every", "0"]
    run_in_process(args + ["--out", str(tmp_path / "a")])
    real_save = common.save_atomic

    def save_then_kill(state, path):
        real_save(state, path)
        if path.name == "checkpoint.pt" and state["epoch"] == 2:
            raise KeyboardInterrupt                            # the log line of epoch 2 is never written
    monkeypatch.setattr(common, "save_atomic", save_then_kill)
    with pytest.raises(KeyboardInterrupt):
        run_in_process(args + ["--out", str(tmp_path / "b")])
    monkeypatch.setattr(common, "save_atomic", real_save)
    run_in_process(["--resume", str(tmp_path / "b" / "checkpoint.pt"), "--out", str(tmp_path / "c")])
    strip = lambda out: [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_s")}
                         for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in strip(tmp_path / "c")] == [1, 2, 3]
    assert strip(tmp_path / "c") == strip(tmp_path / "a")


def test_resume_keeps_the_checkpoints_eval_every_unless_given(tmp_path, monkeypatch):
    run_in_process(TINY + ["--epochs", "1", "--eval-every", "1", "--out", str(tmp_path / "r")])
    parser = simclr.make_parser()
    ckpt = str(tmp_path / "r" / "checkpoint.pt")
    assert common.parse_args(parser, ["--resume", ckpt, "--epochs", "2"], "simclr").eval_every == 1
    assert common.parse_args(parser, ["--resume", ckpt, "--epochs", "2", "--eval-every", "5"], "simclr").eval_every == 5
    assert common.parse_args(parser, ["--resume", ckpt, "--lr", "9", "--epochs", "2"], "simclr").lr == 0.4
    r = run_simclr("--resume", ckpt)                          # the checkpoint's --epochs 1: nothing left to do
    assert r.returncode == 2 and "already has 1 of --epochs 1" in r.stderr


@pytest.mark.parametrize("script,flags", [
    ("simclr.py", TINY), ("simclr.py", TINY + ["--optimizer", "sgd"]),
    ("moco.py", TINY_COMMON + ["--proj-hidden", "64", "--queue-size", "128", "--bn-splits", "2"]),
    ("simsiam.py", TINY_COMMON + ["--proj-hidden", "64", "--proj-dim", "64", "--pred-hidden", "16"]),
])
def test_divergence_that_is_not_nan_stops_the_run(tmp_path, script, flags):
    """--lr 1e6 blows the weights up to ~1e16 while the loss stays finite: the run stops with a
    message instead of finishing with exit 0, and keeps no half-baked output."""
    out = tmp_path / "o"
    r = run_script(script, *flags, "--lr", "1e6", "--epochs", "3", "--out", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "diverged" in r.stderr or "loss became" in r.stderr
    assert not (out / "encoder.pt").exists()


def test_full_disk_keeps_the_last_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_in_process(TINY + ["--epochs", "1", "--out", str(out)])
    before = (out / "checkpoint.pt").read_bytes()
    real = torch.save

    def disk_full(obj, f):
        f.write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 1234 vs 1200")
    monkeypatch.setattr(common.torch, "save", disk_full)
    with pytest.raises(common.UserError, match="checkpoint.pt.*previous checkpoint.pt is kept.*disk full"):
        run_in_process(["--resume", str(out / "checkpoint.pt"), "--epochs", "2"])
    monkeypatch.setattr(common.torch, "save", real)
    assert (out / "checkpoint.pt").read_bytes() == before
    assert sorted(p.name for p in out.iterdir() if "tmp" in p.name) == []


def test_an_unwritable_out_gives_a_message(tmp_path, monkeypatch):
    """A read-only --out (simulated: root can write anywhere): a message, not a PermissionError."""
    out = tmp_path / "readonly"
    out.mkdir()
    real_open = common.os.open

    def refuse(path, *a, **k):
        if str(path).startswith(str(out)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)
    monkeypatch.setattr(common.os, "open", refuse)
    with pytest.raises(common.UserError, match=f"--out {out}: cannot write there.*Permission denied"):
        run_in_process(TINY + ["--epochs", "1", "--out", str(out)])


def test_a_second_run_into_the_same_folder_is_refused(tmp_path):
    """The lock file names the running process; a lock left by a dead one is taken over."""
    import subprocess
    import sys
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(str(sleeper.pid))
        r = run_simclr(*TINY, "--epochs", "1", "--out", str(out))
        assert r.returncode == 2 and f"process {sleeper.pid}" in r.stderr and "Traceback" not in r.stderr
        assert (out / ".lock").read_text() == str(sleeper.pid)   # the other run's lock is left alone
    finally:
        sleeper.kill()
        sleeper.wait()
    r = run_simclr(*TINY, "--epochs", "1", "--out", str(out))   # now a stale lock: taken over
    assert r.returncode == 0, r.stderr
    assert not (out / ".lock").exists()


def test_checkpoint_writes_leave_no_temporary_files_and_follow_no_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("not to be touched")
    (tmp_path / "checkpoint.pt").symlink_to(target)            # a symlink where the checkpoint goes
    common.save_atomic({"x": 1}, tmp_path / "checkpoint.pt")
    assert target.read_text() == "not to be touched" and not (tmp_path / "checkpoint.pt").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "elsewhere"]


def test_ctrl_c_says_what_there_is_to_resume(tmp_path, monkeypatch, capsys):
    real = simclr.info_nce

    def interrupt_at_step(n):
        calls = {"n": 0}

        def fn(*a):
            calls["n"] += 1
            if calls["n"] > n:
                raise KeyboardInterrupt
            return real(*a)
        return fn
    monkeypatch.setattr(simclr, "info_nce", interrupt_at_step(1))
    out = tmp_path / "early"
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: simclr.main(TINY + ["--epochs", "2", "--out", str(out)]))
    err = capsys.readouterr().err
    assert e.value.code == 130 and "before the first checkpoint: nothing to resume" in err and "--resume" not in err
    assert not out.exists()                                    # nothing left behind
    monkeypatch.setattr(simclr, "info_nce", interrupt_at_step(5))   # in epoch 2 of 4 steps each
    out = tmp_path / "later"
    with pytest.raises(SystemExit):
        common.run_main(lambda: simclr.main(TINY + ["--epochs", "2", "--out", str(out)]))
    err = capsys.readouterr().err
    assert f"--resume {out / 'checkpoint.pt'}" in err and "(epoch 1)" in err


@pytest.mark.parametrize("args,needle", [
    (["--weight-decay", "-10"], "--weight-decay"),
    (["--min-scale", "5"], "--min-scale"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"),
    (["--data", "shapes", "--subset", "-5"], "--subset"),
])
def test_flags_that_make_no_sense_are_refused(tmp_path, args, needle):
    r = run_simclr(*TINY, "--out", str(tmp_path / "o"), *args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_help_shows_every_default():
    r = run_simclr("--help")
    assert r.returncode == 0
    for flag, default in [("--temperature", "0.2"), ("--eval-every", "10"), ("--batch-size", "512")]:
        text = " ".join(r.stdout.split())
        assert f"(default: {default})" in text[text.index(flag):], flag


def test_notes_for_a_subset_too_large_and_a_probe_without_labels(tmp_path):
    from PIL import Image
    (tmp_path / "imgs").mkdir()
    for i in range(20):
        Image.new("RGB", (16, 16), (i * 10, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
    r = run_simclr("--data", str(tmp_path / "imgs"), "--data-dir", str(tmp_path / "cache"), "--image-size", "16",
                   "--width", "8", "--batch-size", "8", "--proj-hidden", "32", "--proj-dim", "16", "--epochs", "1",
                   "--subset", "500", "--linear-probe", "--out", str(tmp_path / "run"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "--subset 500 is more than the 20 training images" in r.stderr
    assert "--linear-probe needs labels" in r.stderr


def test_bad_input_leaves_no_run_folder(tmp_path):
    """Input refused before training leaves nothing: no runs/<method>-<time>/ with a lone views.png."""
    r = run_simclr(*TINY, "--data", str(tmp_path / "missing"), cwd=tmp_path)
    assert r.returncode == 2
    assert not (tmp_path / "runs").exists()


# --- schedules scale with the run ------------------------------------------------------------

class _FirstStep(Exception):
    pass


def _first_step_schedules(monkeypatch, tmp_path, script, epochs):
    """Start `script` in-process for `epochs` on TINY and stop at its first step; the
    schedules it asked for (the LR warmup, and DINO's teacher-temperature warmup and BYOL's
    base momentum), with the steps per epoch."""
    module = __import__(script[:-3])
    seen = {}

    def lr_spy(step, total, warmup, base, final=0.0):
        seen.update(total=total, warmup=warmup)
        return base

    def temp_spy(step, warmup_steps, start, end):
        seen["warmup_temp"] = warmup_steps
        return start

    def schedule_spy(step, total, start, end):
        seen.setdefault("momentum_start", start)
        return start

    def stop(*_, **__):
        raise _FirstStep
    monkeypatch.setattr(common, "cosine_lr", lr_spy)
    monkeypatch.setattr(common, "cosine_schedule", schedule_spy)
    monkeypatch.setattr(module, "train_step", stop)           # the schedules are read before it
    monkeypatch.setattr(common, "knn_top1", lambda *_, **__: 0.0)
    if script == "dino.py":
        monkeypatch.setattr(module, "teacher_temperature", temp_spy)
    argv = [a for a in TINY_COMMON if a not in ("--warmup-epochs", "1")] + [
        "--epochs", str(epochs), "--eval-every", "0", "--out", str(tmp_path / f"{script}-{epochs}")]
    with pytest.raises(_FirstStep):
        module.main(argv)
    seen["steps_per_epoch"] = seen["total"] // epochs
    return seen


# (script, the recipe's LR warmup in epochs, the recipe's length in epochs, the floor of a short run's)
RECIPES = [("simclr.py", 10, 1000, 1), ("moco.py", 10, 1000, 1), ("byol.py", 10, 1000, 0),
           ("simsiam.py", 10, 1000, 1), ("dino.py", 10, 300, 1), ("mae.py", 40, 800, 1), ("supervised.py", 2, 200, 1)]


@pytest.mark.parametrize("script,warmup,recipe,floor", RECIPES)
def test_schedules_scale_with_the_run(monkeypatch, tmp_path, script, warmup, recipe, floor):
    """A run as long as the recipe keeps its warmup; half as long, half the warmup; a 2-epoch
    run the same fraction, floored at one epoch for the LR except in BYOL (docs/recipes.md:
    Short runs). DINO's teacher temperature (30 epochs of 300) scales the same way, unfloored."""
    for epochs, lr_epochs in [(recipe, warmup), (recipe // 2, warmup / 2), (2, max(floor, warmup * 2 / recipe))]:
        seen = _first_step_schedules(monkeypatch, tmp_path, script, epochs)
        assert seen["warmup"] == pytest.approx(lr_epochs * seen["steps_per_epoch"]), (epochs, seen)
        if script == "dino.py":
            assert seen["warmup_temp"] == pytest.approx(30 * min(1, epochs / 300) * seen["steps_per_epoch"])


def test_byol_target_keeps_up_in_a_short_run(monkeypatch, tmp_path):
    """BYOL's base momentum: the recipe's 0.99 in a run of 4000+ steps; in a shorter one the
    target remembers 1/(1 - tau) = 2.5% of the run's steps; a flag given wins."""
    for epochs in [1000, 40, 2]:
        seen = _first_step_schedules(monkeypatch, tmp_path, "byol.py", epochs)
        memory = 0.025 * seen["total"]
        expected = 0.99 if seen["total"] >= 4000 else max(0.0, 1 - 1 / memory)
        assert seen["momentum_start"] == pytest.approx(expected), (epochs, seen)
