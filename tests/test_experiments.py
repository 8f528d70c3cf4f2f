"""The experiments: the harness (flags, run identity, caching, label budgets), every plot and
table on small synthetic results, and one experiment end to end on tiny runs."""
import json
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import ROOT
from conftest import TINY as TINY_COMMON

sys.path.insert(0, str(ROOT / "experiments"))
import augment  # noqa: E402
import collapse  # noqa: E402
import common  # noqa: E402
import compare  # noqa: E402
import harness  # noqa: E402
import labels  # noqa: E402
import laptop  # noqa: E402
import supervised  # noqa: E402
import mask_ratio  # noqa: E402
import temperature  # noqa: E402


# Width 16, not 8: oneDNN 3.12 (torch 2.13, AVX-512, 2 threads) corrupts the heap in the
# backward pass of a 1x1 stride-2 convolution with 8 input channels in channels_last at some
# batch sizes (25 and 33, for example), and the fine-tuning batches here are the label count.
TINY = TINY_COMMON + ["--width", "16"]


def colors_in(path):
    return {tuple(c) for _, c in Image.open(path).convert("RGB").getcolors(1 << 20)}


# --- the harness ------------------------------------------------------------------------------

def test_flags_for_leaves_out_what_a_script_does_not_take(capsys):
    flags = ["--image-size", "16", "--min-scale", "0.3", "--norm-pix-loss", "--width", "16", "--bogus",
             "--no-linear-probe", "--mask-ratio=0.5"]
    assert harness.flags_for("mae.py", flags) == ["--image-size", "16", "--norm-pix-loss", "--width", "16",
                                                 "--no-linear-probe", "--mask-ratio=0.5"]
    err = capsys.readouterr().err
    assert "mae.py has no --min-scale" in err and "--bogus" in err
    # simclr.py takes --min-scale, with its value
    assert harness.flags_for("simclr.py", ["--min-scale", "0.3"]) == ["--min-scale", "0.3"]


def test_run_identity_is_the_resolved_configuration(tmp_path):
    base = ["--data", "shapes", "--epochs", "3"]
    folder = lambda *f: harness.run_folder("simclr.py", [*base, *f], tmp_path)
    same = folder("--temperature", "0.2", "--device", "cpu", "--out", "x")   # the default, spelt out
    assert same == folder() and same.parent == tmp_path and same.name.startswith("simclr-")
    assert folder("--temperature", "0.5") != same
    assert folder("--drop-aug", "crop") != folder("--drop-aug", "flip")
    assert harness.run_folder("byol.py", base, tmp_path) != same


@pytest.mark.parametrize("ft, n, N", [(3, 100, 10000), (3, 1000, 10000), (10, 10000, 10000), (1, 500, 50000)])
def test_finetune_epochs_match_the_images_seen(ft, n, N):
    e = harness.finetune_epochs(ft, n, N)
    assert e * n == pytest.approx(ft * N, rel=0.01)


def test_markdown_table():
    assert harness.markdown_table(["a", "b"], [("x", 1), ("y", "2.5")]) == \
        "| a | b |\n|:---|---:|\n| x | 1 |\n| y | 2.5 |\n"
    assert harness.pct(0.1234) == "12.3" and harness.pct(None) == "–"


def test_parse_splits_extra_flags_and_makes_the_results_folder(tmp_path):
    p = harness.make_parser("x")
    args = harness.parse(p, ["--epochs", "2", "--results", str(tmp_path / "r"), "--", "--width", "8"])
    assert args.epochs == 2 and args.extra == ["--width", "8"] and (tmp_path / "r").is_dir()


# --- plots and tables on synthetic results ----------------------------------------------------

def log(knns, stds=None):
    stds = stds or [0.5] * len(knns)
    return [{"epoch": e + 1, "loss": 5.0 - e, "emb_std": s / 16, "emb_std_ref": 1 / 16,
             **({"knn_top1": k} if k is not None else {})} for e, (s, k) in enumerate(zip(stds, knns))]


def test_collapse_plot(tmp_path):
    results = {"SimSiam": log([0.2, 0.3, 0.35], [0.9, 0.8, 0.85]),
               "SimSiam, no stop-grad": log([0.15, None, 0.1], [0.6, 0.1, 0.01])}
    collapse.plot(results, tmp_path / "c.png")
    assert Image.open(tmp_path / "c.png").size == (840, 300)
    assert set(common.PALETTE[:2]) <= colors_in(tmp_path / "c.png")


def test_temperature_plot(tmp_path):
    results = {t: log([0.2, 0.3 + t / 10]) for t in temperature.TAUS}
    temperature.plot(results, tmp_path / "t.png", knn_init=0.25)
    assert Image.open(tmp_path / "t.png").size == (840, 300)
    assert set(common.PALETTE[:len(temperature.TAUS)]) <= colors_in(tmp_path / "t.png")


def test_log_axis_ticks_place_points_where_the_labels_are(tmp_path):
    """With xticks, x is drawn linearly in the values given: the first tick's column, derived
    from the panel's margins, holds the first point."""
    xs = [math.log10(t) for t in (0.05, 1.0)]
    common.line_plot([dict(title="", xlabel="", ylabel="", series={"s": (xs, [1.0, 2.0])},
                           xticks=[(x, str(x)) for x in xs])], tmp_path / "x.png", panel_size=(420, 300))
    img = Image.open(tmp_path / "x.png").convert("RGB")
    L, R = 52, 420 - 10                                        # draw_panel's plot area
    col = L + 0.05 / 1.1 * (R - L)                             # 5% padding each side of the ticks
    blue = [x for x in range(img.width) for y in range(img.height) if img.getpixel((x, y)) == common.PALETTE[0]]
    assert abs(min(blue) - col) <= 3


def test_bar_plot_lengths_are_proportional(tmp_path):
    bars = [("a", 10.0), ("b", 40.0), ("c", None), ("d", 20.0)]
    harness.bar_plot(bars, tmp_path / "b.png", "title", "x")
    img = Image.open(tmp_path / "b.png").convert("RGB")
    widths = []
    for i in range(len(bars)):
        y = 30 + 22 * i + 11                                   # the middle of row i
        widths.append(sum(img.getpixel((x, y)) == common.PALETTE[0] for x in range(img.width)))
    assert widths[2] == 0                                      # None: "not run", no bar
    assert widths[1] / widths[0] == pytest.approx(4, rel=0.05) and widths[3] / widths[0] == pytest.approx(2, rel=0.05)


def test_bar_plot_draws_negative_values_left_of_zero(tmp_path):
    """A gain below 0 (a method that ends under its random init) is a bar to the left of the
    zero line, as long as its value says."""
    bars = [("up", 30.0), ("down", -10.0)]
    harness.bar_plot(bars, tmp_path / "b.png", "title", "x")
    img = Image.open(tmp_path / "b.png").convert("RGB")
    spans = []
    for i in range(len(bars)):
        y = 30 + 22 * i + 11
        xs = [x for x in range(img.width) if img.getpixel((x, y)) == common.PALETTE[0]]
        spans.append((min(xs), max(xs)))
    assert spans[1][1] <= spans[0][0] + 2                      # "down" ends where "up" starts: at 0
    assert (spans[0][1] - spans[0][0]) / (spans[1][1] - spans[1][0]) == pytest.approx(3, rel=0.1)


def test_augment_mask_ratio_labels_and_compare_plots(tmp_path):
    augment.plot([("full pipeline", 0.5), ("no crop", 0.3), ("no augmentation", None)], tmp_path / "a.png")
    mask_ratio.plot(mask_ratio.RATIOS, [0.3, 0.35, 0.4, 0.38], [0.5, 0.55, 0.6, None], 0.45, tmp_path / "m.png")
    fr = len(labels.FRACTIONS)
    series = {f"m{i}": [0.1 * i + 0.01 * j for j in range(fr)] for i in range(8)}
    labels.plot(series, series, tmp_path / "l.png")
    rows = [{"method": m, "arch": "resnet18", "knn_top1": 0.5, "linear_top1": 0.6, "epoch_seconds": 1.0,
             "images_per_s": 1000.0, "peak_memory_mib": 512.0, "memory": "process RSS"} for m in ("SimCLR", "BYOL")]
    rows.append({"method": "Random init (untrained)", "arch": "vit_tiny", "knn_top1": 0.2, "linear_top1": 0.25,
                 "epoch_seconds": None, "images_per_s": None, "peak_memory_mib": None, "memory": None})
    compare.plot(rows, tmp_path / "c.png")
    for name, n_colors in [("a", 1), ("m", 3), ("l", 8), ("c", 1)]:
        assert set(common.PALETTE[:n_colors]) <= colors_in(tmp_path / f"{name}.png"), name
    table = compare.table(rows)
    assert table.count("\n") == 5 and "| SimCLR | ResNet-18 | 50.0 | 60.0 | 1.0 | 1,000 | 512 |" in table
    assert "| Random init (untrained) | ViT-Tiny | 20.0 | 25.0 | – | – | – |" in table


# --- end to end on tiny runs ------------------------------------------------------------------

def run_experiment(name, tmp_path, epochs=1):
    cmd = [sys.executable, str(ROOT / "experiments" / f"{name}.py"), "--epochs", str(epochs), "--device", "cpu",
           "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs"), "--", *TINY]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def temperature_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exp")
    first = run_experiment("temperature", tmp)
    return tmp, first


def test_temperature_end_to_end_then_from_cache(temperature_sweep):
    tmp, first = temperature_sweep
    assert first.returncode == 0, first.stderr
    res = json.loads((tmp / "results" / "temperature.json").read_text())
    assert res["taus"] == temperature.TAUS and len(res["knn_top1"]) == 5
    assert all(0 <= k <= 1 for k in res["knn_top1"]) and res["config"]["epochs"] == 1
    assert (tmp / "results" / "temperature.png").is_file()
    assert (tmp / "results" / "temperature.md").read_text().count("\n") == 2 + 5
    assert first.stderr.count("== SimCLR tau") == 5
    second = run_experiment("temperature", tmp)                # every run is found finished: nothing trains
    assert second.returncode == 0 and "== SimCLR" not in second.stderr
    assert json.loads((tmp / "results" / "temperature.json").read_text())["knn_top1"] == res["knn_top1"]


def test_evaluate_with_half_the_labels_is_cached(temperature_sweep, monkeypatch):
    tmp, _ = temperature_sweep
    run = sorted((tmp / "runs").iterdir())[0]
    result = harness.evaluate(run, 0.5, 1, "cpu")
    data = common.load_data("shapes", tmp, 16, subset=256)
    assert result["labeled_images"] == len(supervised.label_subset(data.train_y, 0.5))
    assert 0 <= result["linear_top1"] <= 1 and 0 <= result["finetune_top1"] <= 1
    scratch = harness.evaluate(run, 0.5, 1, "cpu", scratch=True)
    assert set(json.loads((run / "evaluations.json").read_text())) == {
        "pretrained fraction=0.5 ft_epochs=1", "scratch fraction=0.5 ft_epochs=1"}
    # A second call reads the cache: neither probe nor fine-tuning runs again.
    monkeypatch.setattr(common, "fine_tune", lambda *a, **k: pytest.fail("fine-tuned again"))
    monkeypatch.setattr(common, "linear_probe", lambda *a, **k: pytest.fail("probed again"))
    assert harness.evaluate(run, 0.5, 1, "cpu") == result
    assert harness.evaluate(run, 0.5, 1, "cpu", scratch=True) == scratch


def test_evaluate_rebuilds_the_runs_encoder_whatever_its_depth(tmp_path, monkeypatch):
    """A run of a 2-block ViT: the pretrained evaluation probes its saved weights, the scratch
    one a fresh encoder of the same shapes (not ViT-Tiny's default 12 blocks)."""
    args = {"arch": "vit_tiny", "width": 64, "patch_size": 4, "depth": 2, "seed": 0, "data": "shapes",
            "data_dir": str(tmp_path), "image_size": 16, "subset": 64}
    torch.manual_seed(1)                                       # not the run's seed, 0: other weights
    saved = common.build_backbone("vit_tiny", 16, patch_size=4, depth=2)
    torch.save(saved.state_dict(), tmp_path / "encoder.pt")
    (tmp_path / "summary.json").write_text(json.dumps({"args": args, "image_size": 16}))
    probed = []
    monkeypatch.setattr(common, "linear_probe", lambda backbone, *a, **k: probed.append(backbone) or 0.5)
    harness.evaluate(tmp_path, 0.5, 0, "cpu")
    harness.evaluate(tmp_path, 0.5, 0, "cpu", scratch=True)
    pretrained, scratch = (m.state_dict() for m in probed)
    want = saved.state_dict()
    assert len(probed[1].blocks) == 2
    assert {k: v.shape for k, v in scratch.items()} == {k: v.shape for k, v in want.items()}
    assert all(torch.equal(pretrained[k], v) for k, v in want.items())
    assert not torch.equal(scratch["blocks.0.attn.qkv.weight"], want["blocks.0.attn.qkv.weight"])


def test_evaluate_the_bn_refreshed_bar(tmp_path, monkeypatch):
    """refresh_bn probes the scratch encoder's weights with BatchNorm statistics of the data
    (not the initial 0 and 1), under its own cache key."""
    args = {"arch": "resnet18", "width": 8, "patch_size": 4, "depth": 12, "seed": 0, "data": "shapes",
            "data_dir": str(tmp_path), "image_size": 16, "subset": 64}
    torch.save(common.build_backbone("resnet18", 16, width=8).state_dict(), tmp_path / "encoder.pt")
    (tmp_path / "summary.json").write_text(json.dumps({"args": args, "image_size": 16}))
    probed = []
    monkeypatch.setattr(common, "linear_probe", lambda backbone, *a, **k: probed.append(backbone) or 0.5)
    harness.evaluate(tmp_path, 1.0, 0, "cpu", scratch=True)
    harness.evaluate(tmp_path, 1.0, 0, "cpu", scratch=True, refresh_bn=True)
    plain, refreshed = (m.state_dict() for m in probed)
    assert all(torch.equal(plain[k], v) for k, v in refreshed.items() if "running" not in k and "num_batches" not in k)
    assert torch.equal(plain["stem.1.running_mean"], torch.zeros(8))
    assert not torch.equal(refreshed["stem.1.running_mean"], torch.zeros(8))
    assert set(json.loads((tmp_path / "evaluations.json").read_text())) == {
        "scratch fraction=1 ft_epochs=0", "scratch bn-refreshed fraction=1 ft_epochs=0"}


def test_compare_has_the_second_bar_where_there_is_batchnorm(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(harness, "evaluate", lambda *a, **k: calls.append(k) or {"linear_top1": 0.3})
    args = harness.parse(harness.make_parser("x"), ["--device", "cpu"])
    for arch, bn, labels in [("resnet18", 0.12, ["Random init (untrained)", "Random init, BN refreshed"]),
                             ("vit_tiny", None, ["Random init (untrained)"])]:
        (tmp_path / "summary.json").write_text(json.dumps({"arch": arch, "knn_top1_init": 0.2, "knn_top1_init_bn": bn}))
        rows = compare.init_rows(tmp_path, args)
        assert [r["method"] for r in rows] == labels
        assert [r["knn_top1"] for r in rows] == [0.2, bn][:len(labels)]
    assert [c["refresh_bn"] for c in calls] == [False, True, False]


def test_an_interrupted_run_is_continued(tmp_path):
    """A run folder with a checkpoint but no summary is continued from it, not restarted."""
    args = harness.parse(harness.make_parser("x"), ["--epochs", "2", "--device", "cpu", "--runs", str(tmp_path / "r"),
                                                    "--results", str(tmp_path / "res"), "--", *TINY])
    flags = harness.run_flags("simclr.py", [], args)
    out = harness.run_folder("simclr.py", flags, args.runs)
    # One epoch of the same configuration in the folder, as if the 2-epoch run had been stopped.
    r = subprocess.run([sys.executable, str(ROOT / "simclr.py"), *flags, "--epochs", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (out / "summary.json").unlink()
    assert harness.train("simclr.py", [], args, "SimCLR") == out
    log = harness.read_log(out)
    assert [rec["epoch"] for rec in log] == [1, 2] and harness.read_summary(out)["epochs"] == 2


def test_a_failed_run_names_its_folder(tmp_path):
    args = harness.parse(harness.make_parser("x"), ["--epochs", "1", "--device", "cpu", "--runs", str(tmp_path / "r"),
                                                    "--results", str(tmp_path / "res"), "--", *TINY,
                                                    "--batch-size", "100000"])
    with pytest.raises(common.UserError, match="'SimCLR' failed.*simclr-"):
        harness.train("simclr.py", [], args, "SimCLR")


def test_load_encoder_names_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(common.UserError, match=str(tmp_path)):
        harness.load_encoder(tmp_path)


def test_laptop_gives_dino_the_demos_short_run_flags():
    """make laptop's DINO row and `make demo METHOD=dino` depart from DINO's defaults in the same
    way (docs/notes.md, DINO): each flag of laptop.SHORT_RUN, with its value, is in the demo's
    command as the Makefile writes it, and in the row laptop trains."""
    import demos
    demo = demos.demo_command("dino").split()
    row = next(flags for label, script, flags in laptop.ROWS if label == "DINO")
    pairs = lambda flags: {(a, b) for a, b in zip(flags, flags[1:]) if a.startswith("--")}
    short = pairs(laptop.SHORT_RUN["DINO"])
    assert short and short <= pairs(demo) and short <= pairs(row)


def test_laptop_table_end_to_end(tmp_path, monkeypatch):
    """make laptop on one tiny row: the table has the run and the random-init bar of its
    backbone, each with kNN and a linear probe; without --data it stops with a message."""
    monkeypatch.setattr(laptop, "ROWS", [("SimCLR", "simclr.py", [])])
    monkeypatch.setattr(laptop, "BUDGET", [])
    laptop.main(["--data", "shapes", "--epochs", "1", "--device", "cpu", "--results", str(tmp_path / "results"),
                 "--runs", str(tmp_path / "runs"), "--", *TINY])
    res = json.loads((tmp_path / "results" / "laptop.json").read_text())
    run, init = res["rows"]
    assert run["method"] == "SimCLR" and init["method"] == "Random init" and init["arch"] == run["arch"]
    assert init["knn_init"] == run["knn_init"] and init["knn"] is None
    assert 0 <= run["knn_init_bn"] <= 1 and init["knn_init_bn"] == run["knn_init_bn"]
    assert all(0 <= r["linear"] <= 1 for r in (run, init)) and 0 <= run["knn"] <= 1
    assert run["budget"] == "256 images, 1 epoch"
    assert (tmp_path / "results" / "laptop.md").read_text().count("\n") == 2 + 2
    assert (tmp_path / "results" / "laptop.png").is_file()
    with pytest.raises(SystemExit):
        laptop.main(["--results", str(tmp_path / "results")])


def test_laptop_only_remeasures_the_named_method(tmp_path, monkeypatch):
    """--only METHOD re-runs that method's rows and keeps every other row of laptop.json, the
    random-init bars included, as they were; without an earlier laptop.json it says so."""
    monkeypatch.setattr(laptop, "ROWS", [("SimCLR", "simclr.py", []), ("BYOL", "byol.py", [])])
    monkeypatch.setattr(laptop, "BUDGET", [])
    results = tmp_path / "results"
    argv = ["--data", "shapes", "--epochs", "1", "--device", "cpu", "--results", str(results),
            "--runs", str(tmp_path / "runs"), "--only", "BYOL", "--", *TINY]
    with pytest.raises(common.UserError, match="laptop.json"):
        laptop.main(argv)
    fake = {"method": "SimCLR", "arch": "resnet18", "budget": "old", "knn_init": 0.5, "knn_init_bn": 0.5, "knn": 0.9,
            "linear": 0.9, "epoch_seconds": 1.0, "images_per_s": 1.0}
    bar = dict(fake, method="Random init", knn=None, epoch_seconds=None, images_per_s=None)
    old_config = {"date": "2026-01-01", "device": "elsewhere", "batch_size": 256}
    (results / "laptop.json").write_text(json.dumps({"rows": [fake, dict(fake, method="BYOL"), bar],
                                                     "config": old_config}))
    laptop.main(argv)
    res = json.loads((results / "laptop.json").read_text())
    rows = res["rows"]
    assert rows[0] == fake and rows[2] == bar                  # kept as they were
    assert res["config_of_kept_rows"] == old_config            # and where and when they were measured
    assert rows[1]["method"] == "BYOL" and rows[1]["budget"] == "256 images, 1 epoch" and rows[1]["knn"] != 0.9
    assert "measured" in rows[1]
