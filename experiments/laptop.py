"""Every method learns on a laptop: the six methods, supervised and rotation on real CIFAR-10, each
at a budget of about ten minutes on 2 CPU cores (the measured times: docs/results.md).

The reference budget: 20,000 training images (a seeded random subset), a ResNet-18 of width 16,
batch 256, 5 epochs, every other flag the method's default (the recipes' schedules then compress
to 5 epochs: docs/recipes.md, "Short runs") but DINO's two short-run flags (SHORT_RUN). The ViTs
(DINO, MAE) are ViT-Tiny/4 on their defaults; where a whole run would not fit in about ten
minutes, its row says the smaller budget it got. For each run: kNN top-1 of the encoder at
random init (also with its BatchNorm statistics refreshed on the data, no weight changed:
common.random_init_bars) and after, a linear probe of the frozen encoder trained on the 20,000
training images, epoch seconds and images/s. Writes results/laptop.md, .json and .png.

    python experiments/laptop.py --data path/to/cifar10-jpg.tar.gz       # or cifar-10-python.tar.gz
    make laptop CIFAR=path/to/cifar10-jpg.tar.gz
"""
import json
import time
from pathlib import Path

import harness
from harness import common

BUDGET = ["--subset", "20000", "--width", "16"]
# The six methods of the comparison (harness.METHODS: DINO on the ResNet-18 with its ResNet
# recipe, MAE on ViT-Tiny), then supervised. DINO's own ViT is not here: with 2 global and 6
# local crops it trains at about 20 images/s on 2 cores, so 5 epochs of 20,000 images would
# take hours; `make exp-attention` trains a smaller one on `shapes` instead.
# DINO's defaults are lightly's 200-epoch recipe; in a run this short its teacher stays near the
# uniform output (loss near log K). 256 prototypes and a sharper teacher (T_t 0.02) make it
# sharpen in the first epoch, on CIFAR-10 as on `shapes` (the demo's two flags: docs/notes.md, DINO).
SHORT_RUN = {"DINO": ["--out-dim", "256", "--teacher-temp", "0.02"]}
ROWS = [(label, script, flags + SHORT_RUN.get(label, [])) for label, script, flags in harness.METHODS] + \
    [("Supervised", "supervised.py", []), ("Rotation", "rotation.py", [])]
ARCH_NAMES = {"resnet18": "ResNet-18", "vit_tiny": "ViT-Tiny"}


def table(rows):
    num = lambda v, fmt: "–" if v is None else format(v, fmt)
    return harness.markdown_table(
        ["method", "backbone", "budget", "kNN % at init", "at init, BN refreshed", "kNN %", "gain", "linear probe %",
         "epoch s", "images/s"],
        [(r["method"], ARCH_NAMES.get(r["arch"], r["arch"]), r["budget"], harness.pct(r["knn_init"]),
          harness.pct(r["knn_init_bn"]),
          harness.pct(r["knn"]), num(None if r["knn"] is None else 100 * (r["knn"] - r["knn_init"]), "+.1f"),
          harness.pct(r["linear"]), num(r["epoch_seconds"], ".0f"), num(r["images_per_s"], ",.0f")) for r in rows])


def budget(summary):
    a = summary["args"]
    return f"{a['subset'] or 'all'} images, {a['epochs']} epoch{'s' if a['epochs'] != 1 else ''}"


def main(argv=None):
    p = harness.make_parser(__doc__.splitlines()[0])
    p.set_defaults(epochs=5, batch_size=256, data=None)
    p.add_argument("--only", action="append", metavar="METHOD", choices=sorted({r[0] for r in ROWS}),
                   help="re-measure only this method's rows (repeatable) and keep the other rows of "
                        "results/laptop.json as they are: for a change that moves one method's figures")
    args = harness.parse(p, argv)
    if args.data is None:
        p.error("--data: give the path of CIFAR-10 (cifar10-jpg.tar.gz, or cifar-10-python.tar.gz)")
    if Path(args.data).name == "cifar-10-python.tar.gz":      # the official archive: read from its folder
        args.extra = ["--data-dir", str(Path(args.data).parent)] + args.extra
        args.data = "cifar10"
    kept, kept_config = [], None
    if args.only:
        try:
            earlier = json.loads((Path(args.results) / "laptop.json").read_text())
            kept, kept_config = earlier["rows"], earlier.get("config_of_kept_rows", earlier.get("config"))
        except (OSError, ValueError, KeyError) as e:
            raise common.UserError(f"--only needs the earlier results in {args.results}/laptop.json ({e}).") from None
    rows, inits = [], {}
    for i, (label, script, flags) in enumerate(ROWS):
        if args.only and label not in args.only:
            if i >= len(kept) or kept[i]["method"] != label:
                raise common.UserError(f"--only: {args.results}/laptop.json does not have the rows of this "
                                       f"script in its order; run it whole instead.")
            rows.append(kept[i])
            continue
        run_dir = harness.train(script, BUDGET + flags, args, f"{label} ({script})")
        s = harness.read_summary(run_dir)
        rows.append({"method": label, "arch": s["arch"], "budget": budget(s), "knn_init": s["knn_top1_init"],
                     "knn_init_bn": s.get("knn_top1_init_bn"),   # None in a summary from before it
                     "knn": s["knn_top1"], "linear": harness.evaluate(run_dir, 1.0, 0, args.device)["linear_top1"],
                     "epoch_seconds": s["epoch_seconds"], "images_per_s": s["images_per_s"],
                     "measured": f"{time.strftime('%Y-%m-%d')}, {harness.machine_label(args.device)}, "
                                 f"{harness.device_label(args.device)}"})
        inits.setdefault(s["arch"], run_dir)
    if args.only:                                              # the bars: measured with the rows kept
        rows += [r for r in kept if r["method"] == "Random init"]
        inits = {}
    for arch, run_dir in inits.items():                        # the bar a method must clear
        s = harness.read_summary(run_dir)
        rows.append({"method": "Random init", "arch": arch, "budget": "–", "knn_init": s["knn_top1_init"],
                     "knn_init_bn": s.get("knn_top1_init_bn"),
                     "knn": None, "linear": harness.evaluate(run_dir, 1.0, 0, args.device, scratch=True)["linear_top1"],
                     "epoch_seconds": None, "images_per_s": None})
    harness.bar_plot([(f"{r['method']} ({ARCH_NAMES.get(r['arch'], r['arch'])})",
                       None if r["knn"] is None else 100 * (r["knn"] - r["knn_init"])) for r in rows[:len(ROWS)]],
                     Path(args.results) / "laptop.png", "CIFAR-10 on 2 CPU cores: kNN gain over random init",
                     "kNN top-1 after training minus at random init, points")
    payload = {"rows": rows, "budget": BUDGET}
    if kept_config:                                            # where and when the rows not re-run were measured
        payload["config_of_kept_rows"] = kept_config
    harness.write_results(args, "laptop", payload, table(rows))


if __name__ == "__main__":
    common.run_main(main)
