"""Why doesn't BYOL or SimSiam collapse? Each method against the same method without the
piece that holds it up: SimSiam without the stop-gradient, BYOL without the predictor.

For every run: the collapse monitor (std of the L2-normalised embeddings times sqrt(d):
about 1 when they spread over the sphere, 0 when every image maps to one point) and kNN
top-1, per epoch. Writes results/collapse.png and results/collapse.json.

    python experiments/collapse.py --epochs 10 --data shapes -- --image-size 16 --width 16
    python experiments/collapse.py --epochs 50 --data cifar10-jpg.tar.gz      # on a GPU
"""
import sys
from pathlib import Path

import harness
from harness import common

RUNS = [  # (label, script, flags)
    ("SimSiam", "simsiam.py", []),
    ("SimSiam, no stop-grad", "simsiam.py", ["--no-stop-grad"]),
    ("BYOL", "byol.py", []),
    ("BYOL, no predictor", "byol.py", ["--no-predictor"]),
]


def plot(results, path):
    """results: {label: list of log.jsonl records}. Two panels: collapse monitor, kNN."""
    std, knn = {}, {}
    for label, log in results.items():
        std[label] = ([r["epoch"] for r in log], [r["emb_std"] / r["emb_std_ref"] for r in log])
        pts = [(r["epoch"], 100 * r["knn_top1"]) for r in log if "knn_top1" in r]
        knn[label] = ([e for e, _ in pts], [a for _, a in pts])
    common.line_plot([
        dict(title="collapse monitor", xlabel="epoch", ylabel="std x sqrt(d)", series=std, ymin=0.0),
        dict(title="kNN accuracy (test)", xlabel="epoch", ylabel="top-1 %", series=knn),
    ], path)


def main(argv=None):
    args = harness.parse(harness.make_parser(__doc__.splitlines()[0]), argv)
    results = {}
    for label, script, flags in RUNS:                          # kNN every epoch: the curve is the story
        results[label] = harness.read_log(harness.train(script, [*flags, "--eval-every", "1"], args, label))
    plot(results, Path(args.results) / "collapse.png")
    payload = {label: {"emb_std_x_sqrt_d": [r["emb_std"] / r["emb_std_ref"] for r in log],
                       "knn_top1": [r.get("knn_top1") for r in log]} for label, log in results.items()}
    harness.write_results(args, "collapse", payload)
    for label, log in results.items():
        print(f"{label:24s} std*sqrt(d) {log[0]['emb_std'] / log[0]['emb_std_ref']:.2f} -> "
              f"{log[-1]['emb_std'] / log[-1]['emb_std_ref']:.2f}, kNN {100 * log[-1]['knn_top1']:.1f}%")


if __name__ == "__main__":
    common.run_main(main)
