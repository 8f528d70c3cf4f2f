"""SimCLR: contrastive learning from two augmented views of each image.

The idea (Chen et al. 2020, arXiv 2002.05709): augment every image twice, encode both views,
and train the encoder so that the two views of one image are closer to each other than to
the views of every other image in the batch. The lecture's four components:

    1. data augmentation   crop + flip + colour jitter + grayscale + blur  (simclr_augment)
    2. encoder f           ResNet-18 with the small-image stem, h = f(x)   (common.build_backbone)
    3. projection head g   MLP, z = g(h); the loss is applied to z, kNN uses h
    4. contrastive loss    NT-Xent / InfoNCE with temperature tau, eq. (1)  (info_nce below)

Run:
    make demo                 # CPU, built-in shapes, a few minutes; the same as
    python simclr.py --data shapes --image-size 16 --width 16 --min-scale 0.6 --batch-size 256 \
        --epochs 20 --warmup-epochs 2 --eval-every 5
    python simclr.py          # CIFAR-10 on one GPU: the defaults are the recipe (batch 512, 200 epochs)
    torchrun --standalone --nproc-per-node 4 simclr.py   # the same run on 4 GPUs (README, "Several GPUs")

Results: README.md, "A demo per method" (the demo; its figures are in results/demos.json)
and docs/results.md; the CIFAR-10 recipe on a GPU is not measured yet.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ============================================================================================
# Configuration
# Defaults follow solo-learn's CIFAR-10 SimCLR recipe (scripts/pretrain/cifar/simclr.yaml: LARS
# 0.4 per 256 images, temperature 0.2, a 2048-wide projector, 1000 epochs with 10 of warmup),
# run at batch 512 for 200 epochs, with the SimCLR paper's own CIFAR-10 augmentation (B.9).
# ============================================================================================

RECIPE_EPOCHS = 1000            # the length of the cited recipe; shorter runs scale its schedules


def make_parser():
    p = common.make_parser("SimCLR self-supervised pretraining.", arch="resnet18")
    group = p.add_argument_group("SimCLR")
    group.add_argument("--epochs", type=common.positive_int, default=200, help="passes over the training set")
    group.add_argument("--batch-size", type=common.positive_int, default=512,
                       help="images per step; each gives 2 views, so 2*B-2 negatives per anchor")
    group.add_argument("--lr", type=common.positive_float, default=0.4,
                       help="base learning rate per 256 images (scaled linearly with --batch-size)")
    group.add_argument("--optimizer", default="lars", choices=["lars", "sgd"],
                       help="LARS keeps large-batch contrastive training stable")
    group.add_argument("--weight-decay", type=common.nonneg_float, default=1e-4, help="L2 penalty on weight matrices")
    group.add_argument("--warmup-epochs", type=common.nonneg_float, default=None,
                       help="linear LR warmup, in epochs (default: the recipe's 10 of 1000, the same fraction of "
                            "a shorter run, but at least one epoch); the large LARS LR diverges without it")
    group.add_argument("--temperature", type=common.positive_float, default=0.2,
                       help="tau in the softmax; smaller weights the hardest negatives more")
    group.add_argument("--min-scale", type=common.fraction, default=0.08,
                       help="smallest crop as a fraction of the image area (the paper's 0.08; raise it for "
                            "tiny images, where an 8%% crop is a few pixels)")
    group.add_argument("--color-strength", type=common.nonneg_float, default=0.5,
                       help="s, the strength of the colour distortion (the paper's Appendix A): jitter 0.8s, 0.8s, "
                            "0.8s, 0.2s. 0.5 is the paper's CIFAR-10 choice (B.9); solo-learn uses 1 and blur")
    group.add_argument("--drop-aug", action="append", default=[], choices=AUGMENT_PARTS, metavar="PART",
                       help="switch one part of the augmentation off, for ablations (repeatable): "
                            + ", ".join(AUGMENT_PARTS))
    group.add_argument("--proj-hidden", type=common.positive_int, default=2048, help="projector hidden width")
    group.add_argument("--proj-dim", type=common.positive_int, default=256, help="dimension of z")
    return p


# ============================================================================================
# Augmentation: both views from the same distribution
# ============================================================================================

AUGMENT_PARTS = ("crop", "flip", "jitter", "gray", "blur")


def simclr_augment(mean_std, size, min_scale=0.08, strength=0.5, drop=()):
    """The paper's augmentation (its Appendix A): crops of 8-100% of the area, flip, colour
    jitter of strength s (0.8s, 0.8s, 0.8s, 0.2s) with p 0.8, grayscale p 0.2, and a blur with
    p 0.5 for ImageNet-sized images only. For CIFAR-10 the paper uses s = 0.5 and no blur
    (Appendix B.9), the defaults here; solo-learn's symmetric.yaml uses s = 1 and blurs at
    32 px too, which did worse at the laptop budget (docs/recipes.md). `drop` switches parts
    off, for an ablation like the paper's study of augmentations (its Figure 5)."""
    s = strength
    aug = common.Augment(size, scale=(min_scale, 1.0), jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), jitter_p=0.8,
                         gray_p=0.2, blur_p=0.5 if size > 64 else 0.0, mean=mean_std[0], std=mean_std[1])
    if "crop" in drop:
        aug.scale, aug.ratio = (1.0, 1.0), (1.0, 1.0)          # each view is the whole image
    aug.flip_p = 0.0 if "flip" in drop else aug.flip_p
    aug.jitter_p = 0.0 if "jitter" in drop else aug.jitter_p
    aug.gray_p = 0.0 if "gray" in drop else aug.gray_p
    aug.blur_p = 0.0 if "blur" in drop else aug.blur_p
    return aug


# ============================================================================================
# Model: encoder f followed by projection head g
# ============================================================================================

class SimCLR(nn.Module):
    def __init__(self, backbone, hidden, out):
        super().__init__()
        self.backbone = backbone                               # f: images -> h (N, dim)
        self.projector = common.mlp([backbone.dim, hidden, out])   # g: h -> z (N, out)

    def forward(self, x):
        return self.projector(self.backbone(x))


# ============================================================================================
# The loss
# ============================================================================================

def info_nce(z1, z2, temperature):
    """NT-Xent over the 2N views of a batch: z1, z2 (N, D), row i of each from image i.

        l(i, j) = -log  exp(sim(z_i, z_j) / tau)  /  sum_{k != i} exp(sim(z_i, z_k) / tau)

    with sim the cosine similarity, j the other view of i's image, k over the 2N-1 views
    other than i itself. Returned: the mean of l over all 2N anchors, written as a
    cross-entropy whose "class" is the index of the positive among the 2N-1 candidates.
    Computed in fp32 with autocast off: a bf16 matmul divided by tau is not this formula.

    On P processes (torchrun) each holds n = N/P images of the batch: its 2n views are the
    anchors, and the candidates are the 2N views of every process, gathered with their
    gradient (common.gather_with_grad), as in the paper's TPU code. DDP averages the P losses,
    which is the loss over all 2N anchors above. With one process, n = N."""
    n = z1.shape[0]
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)   # on the unit sphere
        anchors = torch.cat([z1, z2])                          # (2n, D): this process's views
        cand = torch.cat([common.gather_with_grad(z1), common.gather_with_grad(z2)])   # (2N, D), rank order
        N = cand.shape[0] // 2
        logits = anchors @ cand.T / temperature                # (2n, 2N)
        mine = common.rank() * n + torch.arange(n, device=z1.device)   # (n,): this process's images in the batch
        self_col = torch.cat([mine, mine + N])                 # (2n,): where each anchor is among the candidates
        positive = torch.cat([mine + N, mine])                 # (2n,): its other view
        rows = torch.arange(2 * n, device=z1.device)
        logits[rows, self_col] = float("-inf")                 # a view is not its own candidate
        return F.cross_entropy(logits, positive)


# ============================================================================================
# One training step
# ============================================================================================

def train_step(model, optimizer, x1, x2, temperature, amp):
    """Both views in one forward pass: one large batch keeps the GPU busy, and BatchNorm
    sees the statistics of both views together, as in the paper's code (solo-learn encodes
    the views one at a time)."""
    with amp:
        z = model(torch.cat([x1, x2]))                         # (2N, D)
        z1, z2 = z.chunk(2)                                    # (N, D) each
        loss = info_nce(z1, z2, temperature)
    optimizer.zero_grad(set_to_none=True)
    amp.backward(loss)
    amp.step(optimizer)
    return loss, z1


# ============================================================================================
# main
# ============================================================================================

def main(argv=None):
    args = common.parse_args(make_parser(), argv, "simclr")
    run = common.Run(args, "simclr")

    backbone = common.build_backbone(args.arch, run.data.image_size, args.width, args.patch_size, args.depth)
    model = common.to_device(SimCLR(backbone, args.proj_hidden, args.proj_dim), run.device)
    base_lr = args.lr * args.batch_size / 256
    optimizer = common.make_optimizer(common.param_groups(model, args.weight_decay), args.optimizer, base_lr)
    warmup = common.scaled_epochs(args.warmup_epochs, 10, RECIPE_EPOCHS, args.epochs, at_least=1) * run.steps_per_epoch
    run.start(model, optimizer, model.backbone)
    augment = simclr_augment(run.mean_std, run.data.image_size, args.min_scale, args.color_strength, args.drop_aug)
    run.save_views([augment])
    train_model = run.wrap(model)

    for epoch in range(run.start_epoch, args.epochs):
        for step, idx in run.batches(epoch):                   # idx: this step's images, B (B/N on each of N processes)
            common.set_lr(optimizer, common.cosine_lr(step, run.total_steps, warmup, base_lr))
            x = run.data.train_x[idx]                          # (B, 3, H, W) uint8, on the device
            x1, x2 = augment(x), augment(x)                    # (B, 3, H, W) fp32 each
            loss, z1 = train_step(train_model, optimizer, x1, x2, args.temperature, run.amp)
            run.log_step(loss, z1)
        run.end_epoch(epoch)
    run.finish()


if __name__ == "__main__":
    common.run_main(main)
