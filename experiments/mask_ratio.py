"""Why 75% masking? MAE's linear-probe and fine-tuning accuracy against the mask ratio.

With few patches hidden, a hidden patch can be filled in from its neighbours by
interpolation, and the encoder need not understand the object; with most hidden, it must.
Too many hidden and too little is left to reason from. The MAE paper (Figure 5) finds 75%
best for both linear probing and fine-tuning on ImageNet. One MAE run per ratio, everything
else equal; each encoder is then probed and fine-tuned with the same recipe
(experiments/harness.evaluate), and the same ViT fine-tuned from random init is the
reference. Writes results/mask_ratio.png, results/mask_ratio.json and results/mask_ratio.md.

    python experiments/mask_ratio.py --epochs 20 --data shapes -- --image-size 16 --depth 4 --decoder-depth 2 --lr 1e-3
    python experiments/mask_ratio.py --epochs 100 --data cifar10-jpg.tar.gz      # on a GPU
"""
from pathlib import Path

import harness
from harness import common

RATIOS = [0.25, 0.5, 0.75, 0.9]


def plot(ratios, linear, finetune, scratch, path):
    """Accuracies in [0, 1], one per ratio; `scratch` one number, drawn as a flat line."""
    pc = lambda vs: [None if v is None else 100 * v for v in vs]
    series = {"linear probe": (ratios, pc(linear)), "fine-tune": (ratios, pc(finetune))}
    if scratch is not None:
        series["fine-tune from scratch"] = ([ratios[0], ratios[-1]], [100 * scratch] * 2)
    common.line_plot([dict(title="MAE: accuracy against mask ratio", xlabel="mask ratio", ylabel="top-1 %",
                           series=series, xticks=[(r, f"{r:g}") for r in ratios])], path, panel_size=(520, 320))


def main(argv=None):
    p = harness.make_parser(__doc__.splitlines()[0])
    p.add_argument("--ft-epochs", type=common.nonneg_int, default=None,
                   help="fine-tuning epochs (default: a fifth of --epochs, at least 1; 0: no fine-tuning)")
    args = harness.parse(p, argv)
    ft = max(1, args.epochs // 5) if args.ft_epochs is None else args.ft_epochs
    runs = {r: harness.train("mae.py", ["--mask-ratio", str(r), "--finetune-epochs", "0"], args, f"MAE mask {r}")
            for r in RATIOS}
    evals = {r: harness.evaluate(run_dir, 1.0, ft, args.device) for r, run_dir in runs.items()}
    scratch = harness.evaluate(runs[0.75], 1.0, ft, args.device, scratch=True).get("finetune_top1")
    linear = [evals[r]["linear_top1"] for r in RATIOS]
    finetune = [evals[r].get("finetune_top1") for r in RATIOS]
    plot(RATIOS, linear, finetune, scratch, Path(args.results) / "mask_ratio.png")
    rows = [(f"{r:g}", harness.pct(evals[r]["linear_top1"]), harness.pct(evals[r].get("finetune_top1")),
             harness.pct(harness.read_summary(runs[r])["knn_top1"])) for r in RATIOS]
    rows.append(("from scratch", "–", harness.pct(scratch), "–"))
    table = harness.markdown_table(["mask ratio", "linear probe %", f"fine-tune % ({ft} ep)", "kNN %"], rows)
    harness.write_results(args, "mask_ratio", {
        "ratios": RATIOS, "linear_top1": linear, "finetune_top1": finetune, "finetune_top1_scratch": scratch,
        "knn_top1": [harness.read_summary(runs[r])["knn_top1"] for r in RATIOS], "finetune_epochs": ft}, table)


if __name__ == "__main__":
    common.run_main(main)
