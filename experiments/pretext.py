"""Early pretext tasks plateau: rotation prediction beside SimCLR, MAE and supervised training.

The lecture's "clever, but wrong": the first wave of self-supervised learning (2014-2018)
invented puzzles, rotation prediction (Gidaris et al. 2018, rotation.py) the best known, and
their features stayed well below supervised pretraining, because solving the puzzle takes
rotation cues, not concepts. Here the four objectives train the same kind of encoder on the same
data for the same epochs and batch size (the runs of `make compare`, shared with it), and each
encoder is scored by kNN and a linear probe on the true labels; the untrained encoders are the
bar. Rotation's row adds how well it solved its own task (rotation top-1 on the test images,
chance 25%). `claim_holds` in the JSON: rotation's linear probe below supervised's and below the
better of SimCLR and MAE.

On the built-in `shapes` data the claim cannot be tested fairly: every shape is drawn at a
random angle when the data set is generated, so how an image was turned afterwards cannot be
read from the shape; only low-level cues (a background texture that is not symmetric under a
quarter turn) give it away, and rotation's own top-1 says how much. On CIFAR-10 photographs
have an upright, the setting of the paper:

    python experiments/pretext.py --epochs 10 --data shapes -- --image-size 16 --width 16
    make exp-pretext DATA=path/to/cifar10-jpg.tar.gz EPOCHS=5 EXP_ARGS="--subset 20000 --width 16"

(the second at the laptop budget of `make laptop`, whose runs it shares). Writes
results/pretext.png, results/pretext.json and results/pretext.md.
"""
from pathlib import Path

import compare
import harness
from harness import common

ROWS = [  # (label, script, flags): the runs of make compare
    ("Rotation", "rotation.py", []),
    next(r for r in harness.METHODS if r[0] == "SimCLR"),
    next(r for r in harness.METHODS if r[0] == "MAE"),
    ("Supervised", "supervised.py", []),
]


def table(rows):
    return harness.markdown_table(
        ["encoder", "objective", "backbone", "kNN %", "linear probe %", "own task top-1 %"],
        [(r["method"], r["objective"], compare.ARCH_NAMES.get(r["arch"], r["arch"]), harness.pct(r["knn_top1"]),
          harness.pct(r["linear_top1"]), harness.pct(r.get("task_top1"))) for r in rows])


OBJECTIVES = {"Rotation": "pretext: which of 4 turns", "SimCLR": "contrastive", "MAE": "generative (masked pixels)",
              "Supervised": "the labels"}


def main(argv=None):
    args = harness.parse(harness.make_parser(__doc__.splitlines()[0]), argv)
    rows, first_of_arch = [], {}
    for label, script, flags in ROWS:
        run_dir = harness.train(script, flags, args, label)
        s = harness.read_summary(run_dir)
        rows.append({"method": label, "objective": OBJECTIVES[label], "arch": s["arch"], "knn_top1": s["knn_top1"],
                     "linear_top1": harness.evaluate(run_dir, 1.0, 0, args.device)["linear_top1"],
                     "task_top1": s.get("test_rotation_top1", s.get("test_top1"))})
        first_of_arch.setdefault(s["arch"], run_dir)
    for run_dir in first_of_arch.values():                     # the bar a method must clear
        for r in compare.init_rows(run_dir, args):
            rows.append({"method": r["method"], "objective": "none", "arch": r["arch"], "knn_top1": r["knn_top1"],
                         "linear_top1": r["linear_top1"], "task_top1": None})
    linear = {r["method"]: r["linear_top1"] for r in rows[:len(ROWS)]}
    harness.bar_plot([(f"{r['method']} ({compare.ARCH_NAMES.get(r['arch'], r['arch'])})", 100 * r["linear_top1"])
                      for r in rows], Path(args.results) / "pretext.png",
                     "pretext task vs contrastive vs generative vs labels", "linear probe top-1 %")
    harness.write_results(args, "pretext", {
        "rows": rows, "data_rotated_at_random": args.data == "shapes",
        "rotation_minus_supervised_points": 100 * (linear["Rotation"] - linear["Supervised"]),
        "rotation_minus_best_ssl_points": 100 * (linear["Rotation"] - max(linear["SimCLR"], linear["MAE"])),
        "claim_holds": linear["Rotation"] < min(linear["Supervised"], max(linear["SimCLR"], linear["MAE"]))},
        table(rows))


if __name__ == "__main__":
    common.run_main(main)
