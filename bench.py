"""bench.py: how close a method's epoch comes to the speed of its model alone.

    python bench.py simclr --data path/to/cifar10-jpg.tar.gz        # or moco, byol, ... (make bench)

Two runs of the method file, in this process, on the same device:

    1. the full pipeline: a few epochs exactly as a user runs them (batch indexing, the
       augmentations, the training step, the log); its steady-state epoch time.
    2. the model alone: the same flags, with every augmentation's views computed once and
       reused at each step (common.Augment is swapped for a cached version here, the one
       place in the project that does such a thing) and no kNN evaluation.

The ratio of the two is what the data pipeline costs; the epoch cannot be faster than the
bound. For MAE, a third run encodes every patch instead of 25%, which shows the paper's
speed-up from encoding the visible patches alone.
"""
import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import common

METHODS = ["simclr", "moco", "byol", "simsiam", "dino", "mae", "supervised"]


def run_method(module, argv, out):
    """Run the method file's main into `out`; its summary and the seconds of each epoch."""
    module.main(argv + ["--out", str(out)])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), [h["seconds"] for h in log]


def model_alone(module, argv, out, batch_size, steps):
    """Seconds per step of the training step alone: views computed once, no evaluation."""
    real_call, real_knn, cache = common.Augment.__call__, common.knn_top1, {}

    def cached(aug, x, normalize=True):
        key = (id(aug), tuple(x.shape), normalize)
        if key not in cache:
            cache[key] = real_call(aug, x, normalize)
        return cache[key]
    common.Augment.__call__, common.knn_top1 = cached, lambda *a, **k: 0.0
    try:
        _, seconds = run_method(module, argv + ["--subset", str(steps * batch_size), "--epochs", "2",
                                                "--eval-every", "0", "--no-linear-probe"], out)
    finally:
        common.Augment.__call__, common.knn_top1 = real_call, real_knn
    return seconds[-1] / steps                                 # the second epoch: warm


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                epilog="Other flags go to the method file.")
    p.add_argument("method", choices=METHODS)
    p.add_argument("--epochs", type=common.positive_int, default=3, help="epochs of the full pipeline (>= 2)")
    p.add_argument("--steps", type=common.positive_int, default=20, help="steps per epoch of the model-alone run")
    args, rest = p.parse_known_args()
    module = importlib.import_module(args.method)
    flags = module.make_parser().parse_args(rest)
    extra = ["--finetune-epochs", "0"] if args.method == "mae" else []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        summary, seconds = run_method(module, rest + extra + ["--epochs", str(max(2, args.epochs)),
                                                              "--eval-every", "0"], tmp / "full")
        step = model_alone(module, rest + extra, tmp / "bound", flags.batch_size, args.steps)
        steps_per_epoch = round(summary["images_per_s"] * summary["epoch_seconds"] / flags.batch_size)
        epoch_s, bound_s = summary["epoch_seconds"], step * steps_per_epoch
        rows = [("", "epoch s", "images/s"),
                ("full pipeline (steady)", f"{epoch_s:.2f}", f"{summary['images_per_s']:.0f}"),
                ("model alone (bound)", f"{bound_s:.2f}", f"{flags.batch_size / step:.0f}"),
                ("ratio", f"{epoch_s / bound_s:.2f}x", "")]
        if args.method == "mae":
            L = (flags.image_size // flags.patch_size) ** 2
            full = model_alone(module, rest + extra + ["--mask-ratio", str(1 / L)], tmp / "all",
                               flags.batch_size, args.steps)
            rows.append((f"all {L} patches encoded", f"{full * steps_per_epoch:.2f}", f"{flags.batch_size / full:.0f}"))
    print(f"{args.method} {summary['arch']} batch {flags.batch_size} on {summary['device']}, "
          f"{time.strftime('%Y-%m-%d')}, epochs {[round(s, 2) for s in seconds]}")
    print("\n".join(f"{a:<24}{b:>10}{c:>12}" for a, b, c in rows))


if __name__ == "__main__":
    sys.argv[0] = "bench.py"
    common.run_main(main)
