"""Supervised: the same encoder and augmentations, trained with labels and cross-entropy.

Not a self-supervised method: the reference line the others are measured against. The
lecture's "supervised pretraining gives about 76% linear probe on ImageNet" is this file on
ImageNet; here it is the same ResNet (or ViT), the same batched augmentations on the device,
and the same evaluation (kNN, linear probe) as the six method files, with a linear classifier
on top of the encoder and the labels as the training signal:

    1. augmentation      crop + flip (--augment crop) or SimCLR's full recipe (--augment simclr)
    2. encoder f         ResNet-18 with the small-image stem, h = f(x)   (common.build_backbone)
    3. classifier        one linear layer, logits = W h + b
    4. loss              cross-entropy with the image's class              (supervised_loss)

With --label-fraction below 1 it sees only a class-balanced fraction of the labels
(label_subset): the "what if I only have 1% labels?" baseline of experiments/labels.py.
An epoch is still N/B steps, drawn from the labelled images, so the compute is the same as a
self-supervised run over all N images.

Run:
    python supervised.py --data shapes --image-size 16 --width 16 --batch-size 256 --epochs 10   # CPU
    python supervised.py      # CIFAR-10 on one GPU (batch 512, 200 epochs)
    make compare              # beside the six methods; make exp-labels with 1%, 10%, 100% of the labels

Results: docs/results.md (`make compare`, `make exp-labels`); CIFAR-10 on a GPU is not measured yet.
"""

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ============================================================================================
# Configuration
# Defaults are the usual CIFAR ResNet recipe: SGD with Nesterov momentum, 0.1 per 256 images,
# weight decay 5e-4, 200 epochs with 2 of warmup then a cosine, mild crops and flips.
# ============================================================================================

RECIPE_EPOCHS = 200             # the length of the recipe; shorter runs scale its warmup

def make_parser():
    p = common.make_parser("Supervised training with labels: the reference line.", arch="resnet18")
    group = p.add_argument_group("supervised")
    group.add_argument("--epochs", type=common.positive_int, default=200,
                       help="epochs of N/B steps (N = all training images, whatever --label-fraction)")
    group.add_argument("--batch-size", type=common.positive_int, default=256, help="images per step")
    group.add_argument("--lr", type=common.positive_float, default=0.1,
                       help="base learning rate per 256 images (scaled linearly with --batch-size)")
    group.add_argument("--weight-decay", type=common.nonneg_float, default=5e-4, help="L2 penalty on weight matrices")
    group.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"],
                       help="SGD with Nesterov momentum (the ResNet recipe); a ViT wants AdamW (DeiT's: about 5e-4 "
                            "per 512 images, weight decay 0.05; give --lr and --weight-decay with it)")
    group.add_argument("--warmup-epochs", type=common.nonneg_float, default=None,
                       help="linear LR warmup, in epochs (default: 2 of the recipe's 200, the same fraction of a "
                            "shorter run, but at least one epoch)")
    group.add_argument("--label-smoothing", type=float, default=0.0, help="epsilon of label smoothing, in [0, 1)")
    group.add_argument("--augment", default="crop", choices=["crop", "simclr"],
                       help="crop: crop + flip (supervised practice); simclr: SimCLR's full recipe")
    group.add_argument("--min-scale", type=common.fraction, default=0.25,
                       help="smallest crop as a fraction of the image area")
    group.add_argument("--label-fraction", type=common.fraction, default=1.0,
                       help="train on this class-balanced fraction of the labels, in (0, 1]")
    return p


# ============================================================================================
# Model: encoder f followed by a linear classifier
# ============================================================================================

class Supervised(nn.Module):
    def __init__(self, backbone, num_classes):
        super().__init__()
        self.backbone = backbone                               # f: images -> h (N, dim)
        self.classifier = nn.Linear(backbone.dim, num_classes)  # h -> logits (N, C)

    def forward(self, x):
        h = self.backbone(x)                                   # (N, dim)
        return self.classifier(h), h


# ============================================================================================
# The loss
# ============================================================================================

def supervised_loss(logits, y, label_smoothing=0.0):
    """Cross-entropy with the true class, averaged over the batch: logits (N, C), y (N,).

        l(i) = -log  exp(s_{i, y_i})  /  sum_c exp(s_{i, c})

    With label smoothing eps the target is (1 - eps) on y_i plus eps / C on every class.
    In fp32 with autocast off."""
    with torch.autocast(logits.device.type, enabled=False):
        return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)


# ============================================================================================
# One training step
# ============================================================================================

def train_step(model, optimizer, x, y, label_smoothing, amp):
    with amp:
        logits, h = model(x)                                   # (B, C), (B, dim)
        loss = supervised_loss(logits, y, label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    amp.backward(loss)
    amp.step(optimizer)
    return loss, h


def label_subset(labels, fraction, seed=0):
    """Indices of a class-balanced `fraction` of the labelled images: from each class, the
    first max(1, round(fraction * n_c)) of a seeded permutation of that class. Prefixes of one
    permutation, so the 1% subset lies inside the 10% one: a smaller budget only removes labels."""
    if not 0 < fraction <= 1:
        raise common.UserError(f"label fraction {fraction}: must be in (0, 1].")
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    keep = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()            # (n_c,)
        members = members[torch.randperm(len(members), generator=g)]
        keep.append(members[:max(1, round(fraction * len(members)))])
    return torch.cat(keep).sort().values


def labeled_order(pool, n):
    """The order in which an epoch visits the labelled images `pool` (P,): whole random
    permutations of the pool, one after another, n indices in all. An epoch then has as
    many steps whatever the share of labels, so 1% of them costs the compute of all."""
    rounds = -(-n // len(pool))                                # ceil(n / P)
    return pool[torch.rand(rounds, len(pool), device=pool.device).argsort(1)].flatten()[:n]   # (n,)


@torch.no_grad()
def test_top1(model, data, mean_std):
    """Top-1 of the trained classifier itself on the test split (un-augmented images)."""
    features = common.extract_features(model.backbone, data.test_x, mean_std)   # (M, dim)
    return (model.classifier(features).argmax(1) == data.test_y).float().mean().item()


# ============================================================================================
# main
# ============================================================================================

def main(argv=None):
    parser = make_parser()
    args = common.parse_args(parser, argv, "supervised")
    if not 0 <= args.label_smoothing < 1:
        parser.error(f"--label-smoothing {args.label_smoothing}: must be in [0, 1)")
    run = common.Run(args, "supervised")
    if not run.data.labeled:
        raise common.UserError(f"--data {args.data}: supervised training needs labels on a train and a test "
                               f"split (train/ and test/ folders with one subfolder per class).")

    backbone = common.build_backbone(args.arch, run.data.image_size, args.width, args.patch_size, args.depth)
    model = common.to_device(Supervised(backbone, len(run.data.classes)), run.device)
    base_lr = args.lr * args.batch_size / 256
    optimizer = common.make_optimizer(common.param_groups(model, args.weight_decay), args.optimizer, base_lr,
                                      nesterov=True)
    warmup = common.scaled_epochs(args.warmup_epochs, 2, RECIPE_EPOCHS, args.epochs, at_least=1) * run.steps_per_epoch
    run.start(model, optimizer, model.backbone)
    if args.augment == "simclr":                               # simclr.py's recipe, written out
        augment = common.Augment(run.data.image_size, scale=(args.min_scale, 1.0), jitter=(0.4, 0.4, 0.4, 0.1),
                                 jitter_p=0.8, gray_p=0.2, mean=run.mean_std[0], std=run.mean_std[1])
    else:
        augment = common.Augment(run.data.image_size, scale=(args.min_scale, 1.0), jitter_p=0.0, gray_p=0.0,
                                 mean=run.mean_std[0], std=run.mean_std[1])
    run.save_views([augment])
    pool = label_subset(run.data.train_y, args.label_fraction, args.seed).to(run.device)
    print(f"supervised: {len(pool)} labelled training images ({100 * args.label_fraction:g}% of the labels)",
          file=sys.stderr)
    train_model = run.wrap(model)

    for epoch in range(run.start_epoch, args.epochs):
        order = labeled_order(pool, run.steps_per_epoch * args.batch_size)
        for step, idx in run.batches(epoch, order):            # idx: (B,) this step's labelled images
            common.set_lr(optimizer, common.cosine_lr(step, run.total_steps, warmup, base_lr))
            x, y = augment(run.data.train_x[idx]), run.data.train_y[idx]   # (B, 3, H, W) fp32, (B,)
            loss, h = train_step(train_model, optimizer, x, y, args.label_smoothing, run.amp)
            run.log_step(loss, h)
        run.end_epoch(epoch)

    summary = run.finish()
    if summary is None:                                        # ranks 1.. of a torchrun: rank 0 reports
        return
    summary["labeled_images"] = len(pool)
    summary["test_top1"] = test_top1(model, run.data, run.mean_std)
    common.write_json(summary, run.out / "summary.json")
    print(f"classifier test top-1 {100 * summary['test_top1']:.2f}%", file=sys.stderr)


if __name__ == "__main__":
    common.run_main(main)
