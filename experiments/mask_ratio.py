"""Why 75% masking? MAE's linear-probe and fine-tuning accuracy against the mask ratio.

With few patches hidden, a hidden patch can be filled in from its neighbours by
interpolation, and the encoder need not understand the object; with most hidden, it must.
Too many hidden and too little is left to reason from. The MAE paper (Figure 5) finds 75%
best for both linear probing and fine-tuning on ImageNet; BERT masks 15% of the words, as a
word is hard to guess from its neighbours, and 0.15 is in the sweep to show that patches are
not words. One MAE run per ratio, everything else equal; each encoder is then probed and
fine-tuned with the same recipe (experiments/harness.evaluate), and the same ViT fine-tuned
from random init is the reference.

What "solved by interpolation" means, without training (interpolation_mse): on the test
images, hide the same share of patches at random and fill every hidden pixel with the nearest
visible one; its mean squared error on the hidden pixels (in the normalised pixels the encoder
sees), per ratio, beside that of filling them with the mean of the visible pixels. Where the
nearest-pixel fill is far better than the flat one, neighbours give the answer away.
Writes results/mask_ratio.png, results/mask_ratio.json and results/mask_ratio.md.

    python experiments/mask_ratio.py --epochs 20 --data shapes -- --image-size 16 --depth 4 --decoder-depth 2 --lr 1e-3
    python experiments/mask_ratio.py --epochs 100 --data cifar10-jpg.tar.gz      # on a GPU
"""
from pathlib import Path

import torch

import harness
from harness import common
import mae  # noqa: E402  (harness put the repository on the path)

RATIOS = [0.15, 0.25, 0.5, 0.75, 0.9]                         # 0.15: BERT's share of masked words


def interpolation_mse(x, patch_size, ratio, seed=0):
    """Hide int(L * ratio) of the L patches of each image x (N, 3, H, W) (normalised pixels) at
    random, as MAE does (mae.random_masking), and fill them in without any learning. Returns
    the mean squared error over the hidden pixels of two fills: (nearest, flat) = each hidden
    pixel copied from the nearest visible pixel (ties: the first in row-major order), and every
    hidden pixel the image's mean over its visible pixels."""
    N, C, H, W = x.shape
    torch.manual_seed(seed)
    _, mask, _ = mae.random_masking(mae.patchify(x, patch_size), ratio)          # (N, L), 1 = hidden
    pixel_mask = mae.unpatchify(mask[..., None].expand(-1, -1, patch_size ** 2), patch_size, 1)  # (N, 1, H, W)
    hidden = pixel_mask.flatten(1).bool()                      # (N, P), P = H * W pixels
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], 1).float()                    # (P, 2)
    dist = ((pos[:, None] - pos[None]) ** 2).sum(-1)           # (P, P) squared distances, exact: ties stay ties
    flat_x = x.flatten(2)                                      # (N, C, P)
    chunk = max(1, 2 ** 24 // (H * W) ** 2)
    nearest = torch.cat([dist.masked_fill(hidden[i:i + chunk, None, :], float("inf")).argmin(-1)
                         for i in range(0, N, chunk)])         # (N, P): each pixel's nearest visible pixel
    fill_nearest = flat_x.gather(2, nearest[:, None, :].expand(-1, C, -1))       # (N, C, P)
    visible = (~hidden).float()[:, None, :]                    # (N, 1, P)
    fill_flat = (flat_x * visible).sum(-1, keepdim=True) / visible.sum(-1, keepdim=True)   # (N, C, 1)
    err = lambda fill: (((fill - flat_x) ** 2) * hidden[:, None, :]).sum().item() / (C * hidden.sum().item())
    return err(fill_nearest), err(fill_flat)


def plot(ratios, linear, finetune, scratch, path, interpolation=None):
    """Accuracies in [0, 1], one per ratio; `scratch` one number, drawn as a flat line.
    interpolation: {"nearest visible pixel": [mse per ratio], "mean of the visible pixels": [...]},
    drawn in a second panel."""
    pc = lambda vs: [None if v is None else 100 * v for v in vs]
    series = {"linear probe": (ratios, pc(linear)), "fine-tune": (ratios, pc(finetune))}
    if scratch is not None:
        series["fine-tune from scratch"] = ([ratios[0], ratios[-1]], [100 * scratch] * 2)
    ticks = [(r, f"{r:g}") for r in ratios]
    panels = [dict(title="MAE: accuracy against mask ratio", xlabel="mask ratio", ylabel="top-1 %",
                   series=series, xticks=ticks)]
    if interpolation:
        panels.append(dict(title="filling the hidden patches without learning", xlabel="mask ratio",
                           ylabel="MSE on hidden pixels", series={k: (ratios, v) for k, v in interpolation.items()},
                           xticks=ticks, ymin=0.0))
    common.line_plot(panels, path, panel_size=(520, 320))


def interpolation_baseline(run_dir, ratios, n=2000):
    """interpolation_mse on the first n test images of a run's data, per ratio."""
    s = harness.read_summary(run_dir)
    a = s["args"]
    data, mean_std = harness._data(a["data"], a["data_dir"], a["image_size"], a["subset"], a["seed"], "cpu")
    x = common.normalize_images(data.test_x[:n].float() / 255, *mean_std)
    errors = [interpolation_mse(x, a["patch_size"], r, a["seed"]) for r in ratios]
    return {"nearest visible pixel": [e[0] for e in errors], "mean of the visible pixels": [e[1] for e in errors]}


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
    interpolation = interpolation_baseline(runs[0.75], RATIOS)
    plot(RATIOS, linear, finetune, scratch, Path(args.results) / "mask_ratio.png", interpolation)
    fills = list(zip(*interpolation.values()))                # (nearest, flat) per ratio
    rows = [(f"{r:g}", harness.pct(evals[r]["linear_top1"]), harness.pct(evals[r].get("finetune_top1")),
             harness.pct(harness.read_summary(runs[r])["knn_top1"]), f"{fill[0]:.3f}", f"{fill[1]:.3f}")
            for r, fill in zip(RATIOS, fills)]
    rows.append(("from scratch", "–", harness.pct(scratch), "–", "–", "–"))
    table = harness.markdown_table(["mask ratio", "linear probe %", f"fine-tune % ({ft} ep)", "kNN %",
                                    "nearest-pixel fill MSE", "flat fill MSE"], rows)
    harness.write_results(args, "mask_ratio", {
        "ratios": RATIOS, "linear_top1": linear, "finetune_top1": finetune, "finetune_top1_scratch": scratch,
        "knn_top1": [harness.read_summary(runs[r])["knn_top1"] for r in RATIOS], "finetune_epochs": ft,
        "interpolation_mse": interpolation}, table)


if __name__ == "__main__":
    common.run_main(main)
