"""Do the attention maps of a DINO-trained ViT find the object? The lecture's showcase, scored.

DINO's ViT and the same ViT supervised on the labels are trained on `shapes` at 32 px with
4 px patches (an 8 x 8 grid); then the [CLS] token's attention in the last block, one map per
head (dino.last_attention), is scored against the true shape masks as the DINO paper does
(Caron et al. 2021, section 4.2.1, Fig. 4): each head's map is thresholded to keep 60% of
its attention mass (the fewest patches whose weights add up to 0.6), and the Jaccard index
(intersection over union) of that mask with the shape's pixels is averaged over the test
images. Like the paper, the headline is each network's best head (chosen on the same test
images); the mean over heads is written too. The untrained ViT (the DINO run's initial
weights) is the bar: its maps are near uniform, so its mask is about 60% of the image.
Both networks train 10 epochs in batches of 64 (each run's seconds: results/attention.json);
with 5 epochs of batches of 128 DINO's heads had barely begun to follow the shapes and the
supervised ViT had barely left its random init (docs/notes.md, DINO).

Writes results/attention.json ({"jaccard": {"dino", "supervised", "random"}, ...}, as
fractions) and results/attention.png (rows: the image, its true mask, then DINO's,
supervised's and the untrained ViT's best-head map).

    python experiments/attention.py                 # make exp-attention
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import harness
from harness import common

import dino  # noqa: E402  (harness puts the repository root on the path)

IMAGE_SIZE, PATCH = 32, 4
VIT = ["--arch", "vit_mini", "--image-size", str(IMAGE_SIZE), "--patch-size", str(PATCH), "--depth", "3"]
# DINO's ViT with the teacher of its ResNet recipe (T_t 0.04 and EMA 0.99 throughout, a 2-layer
# head with BatchNorm, 2048 prototypes, no local crops; AdamW as the paper): in a run of a few
# hundred steps the ViT recipe's teacher (T_t rising to 0.07, EMA rising from 0.996 to 1) stays
# at its random init, and on CIFAR-10 reverting the ResNet recipe's teacher to it stops DINO
# from learning (docs/notes.md, DINO).
DINO_FLAGS = ["--head-layers", "2", "--head-bn", "--out-dim", "2048", "--teacher-temp", "0.04", "--momentum", "0.99",
              "--momentum-end", "0.99", "--local-crops", "0", "--min-scale", "0.4", "--clip-grad", "0",
              "--freeze-last-layer", "0"]
# The supervised ViT with AdamW at DeiT's rate and weight decay: with supervised.py's SGD
# (the ResNet recipe) this ViT stays at chance in 5 epochs.
SUPERVISED_FLAGS = ["--optimizer", "adamw", "--lr", "5e-4", "--weight-decay", "0.05"]
RUNS = [  # (key, label, script, flags)
    ("dino", "DINO", "dino.py", VIT + DINO_FLAGS),
    ("supervised", "supervised", "supervised.py", VIT + SUPERVISED_FLAGS),
]
MASS = 0.6                      # the paper's: keep 60% of the attention mass
N_SCORED = 500                  # test images scored


def mass_masks(attn, mass=MASS):
    """attn (..., L) non-negative weights -> bool masks (..., L) keeping the fewest largest
    entries whose sum reaches `mass` of the total: the paper's thresholding."""
    w = attn / attn.sum(-1, keepdim=True)
    sorted_w, order = w.sort(-1, descending=True)
    before = sorted_w.cumsum(-1) - sorted_w                    # the mass of the larger entries
    keep_sorted = before < mass                                # kept until the mass is reached
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def jaccard(a, b):
    """Intersection over union of bool masks a, b (..., H, W) -> (...). 1 when both are empty."""
    inter = (a & b).flatten(-2).sum(-1).float()
    union = (a | b).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@torch.no_grad()
def head_maps(vit, images, mean_std, batch=250):
    """The last block's [CLS] attention over the patches, per head: (n, heads, g, g)."""
    vit.eval()
    out = []
    for i in range(0, len(images), batch):
        x = common.normalize_images(images[i:i + batch].float() / 255, *mean_std)
        out.append(dino.last_attention(vit, x)[:, :, 0, 1:].float())   # (b, heads, L)
    attn = torch.cat(out)
    g = int(attn.shape[-1] ** 0.5)
    return attn.view(*attn.shape[:2], g, g)


def score(maps, masks):
    """maps (n, heads, g, g), masks (n, S, S) coverage -> Jaccard per head (heads,), each the
    mean over images; the thresholded patch masks are blown up to pixels (nearest)."""
    n, heads, g, _ = maps.shape
    keep = mass_masks(maps.flatten(2)).view(n, heads, g, g)
    scale = masks.shape[-1] // g
    keep = keep.repeat_interleave(scale, -2).repeat_interleave(scale, -1)   # (n, heads, S, S)
    return jaccard(keep, (masks >= 0.5).unsqueeze(1)).mean(0)


def picture(images, masks, maps, path, n=8):
    """Rows: image, true mask, then each network's best-head map (bright = attended)."""
    S = images.shape[-1]
    cols = [images[:n].float() / 255, masks[:n].unsqueeze(1).expand(-1, 3, -1, -1)]
    for m in maps:                                             # (n, g, g) each
        m = m[:n] / m[:n].flatten(1).amax(1).view(-1, 1, 1)
        up = F.interpolate(m.unsqueeze(1), size=(S, S), mode="nearest")   # (n, 1, S, S)
        heat = torch.cat([up.mul(2).clamp(max=1), up.mul(2).sub(1).clamp(min=0), torch.zeros_like(up)], 1)
        cols.append(heat)
    grid = torch.stack(cols, 1)                                # (n, 2 + models, 3, S, S)
    common.save_grid((grid * 255).round().byte(), path, scale=4)


def main(argv=None):
    p = harness.make_parser(__doc__.splitlines()[0])
    p.set_defaults(epochs=10, batch_size=64)                  # both networks: the same budget
    args = harness.parse(p, argv)
    if args.data != "shapes":
        p.error("--data: this experiment needs the true object masks, which only the built-in `shapes` has")
    nets, knn, seconds = {}, {}, {}
    for key, label, script, flags in RUNS:
        run_dir = harness.train(script, flags, args, label)
        nets[key], summary = harness.load_encoder(run_dir)
        knn[key], seconds[key] = summary["knn_top1"], summary["train_seconds"]
        if key == "dino":                                      # the untrained ViT: the DINO run's initial weights
            torch.manual_seed(summary["args"]["seed"])
            nets["random"] = harness.build_encoder(summary)
            knn["random"] = summary["knn_top1_init"]
    data = common.make_shapes_dataset(IMAGE_SIZE)             # as the runs saw it (its mean and std)
    test_x, _, test_masks = common.make_shapes(len(data.test_x), seed=1, size=IMAGE_SIZE, masks=True)
    assert torch.equal(test_x, data.test_x)                    # the same images, now with their masks
    images, masks = test_x[:N_SCORED], test_masks[:N_SCORED]
    per_head = {k: score(head_maps(v, images, data.mean_std()), masks) for k, v in nets.items()}
    best = {k: int(v.argmax()) for k, v in per_head.items()}
    payload = {"jaccard": {k: float(v.max()) for k, v in per_head.items()},
               "jaccard_mean_over_heads": {k: float(v.mean()) for k, v in per_head.items()},
               "jaccard_per_head": {k: v.tolist() for k, v in per_head.items()},
               "best_head": best, "knn_top1": knn, "train_seconds": seconds,
               "images_scored": N_SCORED, "mass": MASS,
               "runs": {key: [script, *flags] for key, _, script, flags in RUNS}}
    maps = [head_maps(nets[k], images[:8], data.mean_std())[:, best[k]] for k in ("dino", "supervised", "random")]
    picture(images, masks, maps, Path(args.results) / "attention.png")
    table = harness.markdown_table(
        ["ViT-Mini/4, 3 blocks", "Jaccard, best head", "mean over heads", "kNN top-1 %"],
        [(k, f"{payload['jaccard'][k]:.3f}", f"{payload['jaccard_mean_over_heads'][k]:.3f}", harness.pct(knn[k]))
         for k in ("dino", "supervised", "random")])
    harness.write_results(args, "attention", payload, table)


if __name__ == "__main__":
    common.run_main(main)
