"""Why doesn't BYOL or SimSiam collapse? Each method against the same method without the
piece that holds it up: SimSiam without the stop-gradient, BYOL without the predictor.

For every run: the collapse monitor (std of the L2-normalised embeddings times sqrt(d):
about 1 when they spread over the sphere, 0 when every image maps to one point) and kNN
top-1, per epoch. Writes results/collapse.png and results/collapse.json.

    python experiments/collapse.py --epochs 10 --data shapes -- --image-size 16 --width 16
    python experiments/collapse.py --epochs 50 --data cifar10-jpg.tar.gz      # on a GPU
Everything after `--` is passed to every run.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

RUNS = [  # (label, script, flags)
    ("SimSiam", "simsiam.py", []),
    ("SimSiam, no stop-grad", "simsiam.py", ["--no-stop-grad"]),
    ("BYOL", "byol.py", []),
    ("BYOL, no predictor", "byol.py", ["--no-predictor"]),
]


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=common.positive_int, default=10)
    p.add_argument("--data", default="shapes")
    p.add_argument("--results", default=str(ROOT / "results"), help="where the PNG and JSON go")
    p.add_argument("--runs", default=str(ROOT / "runs" / "exp-collapse"), help="where each run's outputs go")
    args = p.parse_args(argv)
    Path(args.results).mkdir(parents=True, exist_ok=True)
    results = {}
    for label, script, flags in RUNS:
        out = Path(args.runs) / label.lower().replace(",", "").replace(" ", "-")
        cmd = [sys.executable, str(ROOT / script), "--data", args.data, "--epochs", str(args.epochs),
               "--eval-every", "1", "--out", str(out), *flags, *extra]
        done = json.loads((out / "summary.json").read_text())["epochs"] if (out / "summary.json").exists() else 0
        if done >= args.epochs:                                # an earlier call finished it
            cmd = None
        elif (out / "checkpoint.pt").exists():                 # an earlier call was interrupted: continue it
            cmd = [sys.executable, str(ROOT / script), "--resume", str(out / "checkpoint.pt"),
                   "--epochs", str(args.epochs)]
        if cmd:
            print(f"== {label}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            if subprocess.run(cmd).returncode != 0:
                raise common.UserError(f"the run '{label}' failed (its output is in {out}); see the message above.")
        results[label] = read_log(out / "log.jsonl")[:args.epochs]
    plot(results, Path(args.results) / "collapse.png")
    summary = {label: {"emb_std_x_sqrt_d": [r["emb_std"] / r["emb_std_ref"] for r in log],
                       "knn_top1": [r.get("knn_top1") for r in log]} for label, log in results.items()}
    summary["config"] = {"data": args.data, "epochs": args.epochs, "extra": extra}
    (Path(args.results) / "collapse.json").write_text(json.dumps(summary, indent=2) + "\n")
    for label, log in results.items():
        print(f"{label:24s} std*sqrt(d) {log[0]['emb_std'] / log[0]['emb_std_ref']:.2f} -> "
              f"{log[-1]['emb_std'] / log[-1]['emb_std_ref']:.2f}, kNN {100 * log[-1]['knn_top1']:.1f}%")


if __name__ == "__main__":
    common.run_main(main)
