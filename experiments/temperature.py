"""Temperature tau reshapes the gradient landscape: SimCLR's kNN accuracy against tau.

InfoNCE divides the cosine similarities by tau before the softmax. A small tau makes the
softmax peaky: the gradient goes almost entirely to the hardest negatives (the most similar
other images), and the embedding spreads them apart; a large tau weights every negative
alike, which is gentler but separates near-duplicates less. The SimCLR paper finds
a middle value best; the solo-learn CIFAR recipe uses 0.2. One SimCLR run per tau, everything
else equal. Writes results/temperature.png, .json and .md.

    python experiments/temperature.py --epochs 10 --data shapes -- --image-size 16 --width 16
    python experiments/temperature.py --epochs 100 --data cifar10-jpg.tar.gz      # on a GPU
"""
import math
from pathlib import Path

import harness
from harness import common

TAUS = [0.05, 0.1, 0.2, 0.5, 1.0]


def plot(results, path, knn_init=None):
    """results: {tau: list of log.jsonl records}. Final kNN against tau on a log axis, and
    the kNN curves over epochs; knn_init (the untrained encoder's kNN) as a flat line."""
    taus = sorted(results)
    final = [100 * results[t][-1]["knn_top1"] for t in taus]
    xs = [math.log10(t) for t in taus]
    curves = {}
    for t in taus:
        pts = [(r["epoch"], 100 * r["knn_top1"]) for r in results[t] if "knn_top1" in r]
        curves[f"tau {t:g}"] = ([e for e, _ in pts], [a for _, a in pts])
    sweep = {"kNN top-1 after training": (xs, final)}
    if knn_init is not None:
        sweep["random init"] = ([xs[0], xs[-1]], [100 * knn_init] * 2)
    common.line_plot([
        dict(title="SimCLR: kNN top-1 against temperature", xlabel="temperature tau (log scale)",
             ylabel="top-1 %", series=sweep, xticks=[(x, f"{t:g}") for x, t in zip(xs, taus)]),
        dict(title="kNN accuracy over training", xlabel="epoch", ylabel="top-1 %", series=curves),
    ], path)


def main(argv=None):
    args = harness.parse(harness.make_parser(__doc__.splitlines()[0]), argv)
    runs = {tau: harness.train("simclr.py", ["--temperature", str(tau)], args, f"SimCLR tau {tau}") for tau in TAUS}
    results = {tau: harness.read_log(run_dir) for tau, run_dir in runs.items()}
    knn_init = harness.read_summary(runs[TAUS[0]])["knn_top1_init"]   # the same seed: the same init for all
    plot(results, Path(args.results) / "temperature.png", knn_init)
    rows = [(f"{tau:g}", harness.pct(log[-1]["knn_top1"]), f"{log[-1]['loss']:.3f}") for tau, log in results.items()]
    table = harness.markdown_table(["tau", "kNN top-1 %", "final loss"], rows)
    harness.write_results(args, "temperature", {
        "taus": TAUS, "knn_top1_init": knn_init, "knn_top1": [results[t][-1]["knn_top1"] for t in TAUS],
        "final_loss": [results[t][-1]["loss"] for t in TAUS],
        "knn_curves": {f"{t:g}": [[r["epoch"], r["knn_top1"]] for r in results[t] if "knn_top1" in r] for t in TAUS},
    }, table)


if __name__ == "__main__":
    common.run_main(main)
