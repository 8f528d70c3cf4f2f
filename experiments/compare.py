"""When matched, they are within about a point: the six methods under one recipe and budget.

Published comparisons (solo-learn's CIFAR tables, the BYOL and SimSiam papers' own) find that
with the same backbone, epochs, batch size and evaluation, the contrastive and predictive
methods land close together; differences in published numbers are mostly differences in
recipe. Every method here trains for the same epochs at the same batch size on the same data,
with its own paper's defaults otherwise, and is evaluated the same way: kNN and a linear probe
of the frozen encoder. The supervised line (labels, cross-entropy, same budget) is the
reference, and rotation prediction (rotation.py) the early pretext task's. Writes
results/compare.png, results/compare.json and results/compare.md with accuracy, epoch time and
peak memory.

    python experiments/compare.py --epochs 10 --data shapes -- --image-size 16 --width 16
    python experiments/compare.py --epochs 100 --data cifar10-jpg.tar.gz      # on a GPU
"""
from pathlib import Path

import harness
from harness import common

ARCH_NAMES = {"resnet18": "ResNet-18", "resnet34": "ResNet-34", "resnet50": "ResNet-50",
              "vit_tiny": "ViT-Tiny", "vit_small": "ViT-Small"}


def row(label, summary, linear):
    return {"method": label, "arch": summary["arch"], "knn_top1": summary["knn_top1"], "linear_top1": linear,
            "epoch_seconds": summary["epoch_seconds"], "images_per_s": summary["images_per_s"],
            "peak_memory_mib": summary.get("peak_memory_mib"), "memory": summary.get("memory")}


def init_rows(run_dir, args):
    """The same encoder untrained: the bar a method must clear to have learned anything. With
    BatchNorm (a ResNet), also the second bar, its running statistics refreshed on the data."""
    summary = harness.read_summary(run_dir)
    bars = [("Random init (untrained)", summary["knn_top1_init"], False)]
    if summary.get("knn_top1_init_bn") is not None:
        bars.append(("Random init, BN refreshed", summary["knn_top1_init_bn"], True))
    return [{"method": label, "arch": summary["arch"], "knn_top1": knn,
             "linear_top1": harness.evaluate(run_dir, 1.0, 0, args.device, scratch=True, refresh_bn=bn)["linear_top1"],
             "epoch_seconds": None, "images_per_s": None, "peak_memory_mib": None, "memory": None}
            for label, knn, bn in bars]


def table(rows):
    num = lambda v, fmt: "–" if v is None else format(v, fmt)
    return harness.markdown_table(
        ["method", "backbone", "kNN %", "linear probe %", "epoch s", "images/s", "peak memory MiB"],
        [(r["method"], ARCH_NAMES.get(r["arch"], r["arch"]), harness.pct(r["knn_top1"]), harness.pct(r["linear_top1"]),
          num(r["epoch_seconds"], ".1f"), num(r["images_per_s"], ",.0f"), num(r["peak_memory_mib"], ",.0f"))
         for r in rows])


def plot(rows, path):
    harness.bar_plot([(f"{r['method']} ({ARCH_NAMES.get(r['arch'], r['arch'])})",
                      None if r["linear_top1"] is None else 100 * r["linear_top1"]) for r in rows], path,
                    "linear probe top-1, matched recipe and budget", "linear probe top-1 %")


def main(argv=None):
    args = harness.parse(harness.make_parser(__doc__.splitlines()[0]), argv)
    rows, first_of_arch = [], {}
    references = [("Supervised", "supervised.py", []), ("Rotation", "rotation.py", [])]
    for label, script, flags in harness.METHODS + references:
        run_dir = harness.train(script, flags, args, label)
        rows.append(row(label, harness.read_summary(run_dir), harness.evaluate(run_dir, 1.0, 0, args.device)["linear_top1"]))
        first_of_arch.setdefault(rows[-1]["arch"], run_dir)
    rows += [r for run_dir in first_of_arch.values() for r in init_rows(run_dir, args)]
    plot(rows, Path(args.results) / "compare.png")
    ssl = [r["linear_top1"] for r in rows[:len(harness.METHODS)]]
    harness.write_results(args, "compare", {"rows": rows, "linear_spread_points": 100 * (max(ssl) - min(ssl))},
                          table(rows))


if __name__ == "__main__":
    common.run_main(main)
