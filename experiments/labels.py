"""When to use SSL, supervised or from scratch on a real budget: accuracy against the number
of labels.

The setting: all the images, but labels for only 1%, 10% or 100% of them (class-balanced,
supervised.label_subset). Four ways to spend them, each at the same compute:
  - an SSL encoder pretrained on all the images (no labels), then a linear probe on the
    labelled ones, or fine-tuning it on them;
  - supervised training (supervised.py) on the labelled images alone, for as many steps as
    the SSL pretraining;
  - the fine-tuning recipe from random init ("from scratch"), for as many steps as the
    fine-tuning of the SSL encoders.
The lecture's claim: with few labels, pretraining wins by a wide margin; with all the labels,
supervised training catches up. The SSL encoders are the comparison's runs (make compare), so
running both trains each once. Writes results/labels.png, results/labels.json, results/labels.md.

    python experiments/labels.py --epochs 10 --data shapes -- --image-size 16 --width 16
    python experiments/labels.py --epochs 100 --data cifar10-jpg.tar.gz      # on a GPU
"""
import math
from pathlib import Path

import harness
from harness import common

FRACTIONS = [0.01, 0.1, 1.0]


def plot(series_linear, series_ft, path):
    """series_*: {label: [accuracy in [0, 1] or None per fraction]}; the x axis is log10 %."""
    xs = [math.log10(100 * f) for f in FRACTIONS]
    ticks = [(x, f"{100 * f:g}%") for x, f in zip(xs, FRACTIONS)]
    pc = lambda vs: [None if v is None else 100 * v for v in vs]
    common.line_plot([
        dict(title="linear probe (frozen encoder)", xlabel="labelled images (log scale)", ylabel="top-1 %",
             series={k: (xs, pc(v)) for k, v in series_linear.items()}, xticks=ticks),
        dict(title="fine-tuned", xlabel="labelled images (log scale)", ylabel="top-1 %",
             series={k: (xs, pc(v)) for k, v in series_ft.items()}, xticks=ticks),
    ], path, panel_size=(480, 340))


def main(argv=None):
    p = harness.make_parser(__doc__.splitlines()[0])
    p.add_argument("--ft-epochs", type=common.positive_int, default=None,
                   help="fine-tuning budget in epochs over all the images (default: a fifth of --epochs, "
                        "at least 1); fewer labels get more epochs over them, at the same compute")
    args = harness.parse(p, argv)
    ft = max(1, args.epochs // 5) if args.ft_epochs is None else args.ft_epochs
    linear, finetune = {}, {}
    for label, script, flags in harness.METHODS:
        run_dir = harness.train(script, flags, args, label)
        evals = [harness.evaluate(run_dir, f, ft, args.device) for f in FRACTIONS]
        linear[label] = [e["linear_top1"] for e in evals]
        finetune[label] = [e["finetune_top1"] for e in evals]
    supervised = [harness.read_summary(harness.train("supervised.py", ["--label-fraction", str(f)], args,
                                                     f"Supervised, {100 * f:g}% labels"))["test_top1"]
                  for f in FRACTIONS]
    resnet = harness.train(*harness.METHODS[0][1:], args, harness.METHODS[0][0])   # its architecture, new weights
    scratch = [harness.evaluate(resnet, f, ft, args.device, scratch=True)["finetune_top1"] for f in FRACTIONS]
    refs = {"supervised": supervised, "from scratch": scratch}
    plot({**linear, **refs}, {**finetune, **refs}, Path(args.results) / "labels.png")
    header = ["encoder", "evaluation"] + [f"{100 * f:g}% labels" for f in FRACTIONS]
    rows = []
    for label in linear:
        rows.append((label, "linear probe", *map(harness.pct, linear[label])))
        rows.append((label, f"fine-tune ({ft} ep)", *map(harness.pct, finetune[label])))
    rows.append(("Supervised", f"trained on the labels ({args.epochs} ep)", *map(harness.pct, supervised)))
    rows.append(("From scratch", f"fine-tune recipe ({ft} ep)", *map(harness.pct, scratch)))
    harness.write_results(args, "labels", {"fractions": FRACTIONS, "finetune_epochs": ft, "linear_top1": linear,
                                           "finetune_top1": finetune, "supervised_top1": supervised,
                                           "scratch_top1": scratch}, harness.markdown_table(header, rows))


if __name__ == "__main__":
    common.run_main(main)
