"""The augmentation pipeline matters more than the loss: SimCLR with one part of its
augmentation switched off at a time.

Contrastive learning learns what the views share; the augmentations decide what that is. The
SimCLR paper's study of augmentations finds that no single transformation suffices and that crop
plus colour distortion is the composition that matters: with crops alone, two views of an
image still share their colour histogram, and the network can match them by colour alone.
Every run is SimCLR with the same loss, temperature and budget; only `--drop-aug` changes.
Writes results/augment.png, results/augment.json and results/augment.md.

    python experiments/augment.py --epochs 10 --data shapes -- --image-size 16 --width 16
    python experiments/augment.py --epochs 100 --data cifar10-jpg.tar.gz      # on a GPU
"""
from pathlib import Path

import harness
from harness import common

ABLATIONS = [  # (label, parts switched off)
    ("full pipeline", []),
    ("no crop", ["crop"]),
    ("no flip", ["flip"]),
    ("no colour jitter", ["jitter"]),
    ("no grayscale", ["gray"]),
    ("crop + flip only", ["jitter", "gray"]),
    ("crop only", ["flip", "jitter", "gray"]),
    ("no augmentation", ["crop", "flip", "jitter", "gray", "blur"]),
]
BLUR = ("no blur", ["blur"])                                   # blur is on only above 64 px


def ablations(args):
    size = harness.script_parser("simclr.py").parse_known_args(args.extra)[0].image_size
    return ABLATIONS[:5] + [BLUR] + ABLATIONS[5:] if size > 64 else ABLATIONS


def plot(rows, path):
    """rows: [(label, kNN top-1 in [0, 1] or None)]."""
    harness.bar_plot([(label, None if v is None else 100 * v) for label, v in rows], path,
                    "SimCLR kNN top-1 with one part of the augmentation off", "kNN top-1 %")


def main(argv=None):
    args = harness.parse(harness.make_parser(__doc__.splitlines()[0]), argv)
    knn = {}
    for label, parts in ablations(args):
        flags = [f for part in parts for f in ("--drop-aug", part)]
        knn[label] = harness.read_summary(harness.train("simclr.py", flags, args, f"SimCLR, {label}"))["knn_top1"]
    knn_init = harness.read_summary(harness.train("simclr.py", [], args, "SimCLR"))["knn_top1_init"]
    plot(list(knn.items()) + [("random init, untrained", knn_init)], Path(args.results) / "augment.png")
    full = knn["full pipeline"]
    rows = [(label, harness.pct(v), f"{100 * (v - full):+.1f}") for label, v in knn.items()]
    rows.append(("random init, untrained", harness.pct(knn_init), f"{100 * (knn_init - full):+.1f}"))
    table = harness.markdown_table(["augmentation", "kNN top-1 %", "vs full"], rows)
    harness.write_results(args, "augment", {"knn_top1": knn, "knn_top1_init": knn_init,
                                            "parts_off": {label: parts for label, parts in ablations(args)}}, table)


if __name__ == "__main__":
    common.run_main(main)
