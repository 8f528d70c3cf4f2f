"""Rotation prediction: the best known of the early pretext tasks, as a reference line.

Not one of the six methods: the lecture's "early pretext tasks: clever, but wrong". Gidaris et
al. 2018 (arXiv 1803.07728, eq. 1-2) turn each image by 0, 90, 180 or 270 degrees and train a
network to say which: to tell an upright dog from an upside-down one it must find the dog, its
head and its legs, so the hope is that object features come for free. They come partly: the
task is narrow, and whatever cue gives the orientation away (the sky is on top, text reads
left to right, a lamp lights from above) solves it without the object. The same encoder, data
on the device and evaluation (kNN, linear probe) as the six method files:

    1. augmentation      crop + flip, as supervised.py's default (rotation_augment)
    2. rotation          each image turned by y * 90 degrees, y uniform in {0, 1, 2, 3}   (rotate)
    3. encoder f         ResNet-18 with the small-image stem, h = f(x)   (common.build_backbone)
    4. classifier        one linear layer, 4 logits = W h + b
    5. loss              cross-entropy with the rotation y                (rotation_loss)

The authors' code feeds all four rotations of every image in each batch (4B inputs a step);
here each image gets one rotation drawn at random, so a step costs what a step of the other
files costs and `make exp-pretext` compares them at one budget. On the built-in `shapes` data
every shape is drawn at a random angle, so a shape's orientation says nothing about how the
image was turned afterwards: the task there can only be solved from low-level cues (see
experiments/pretext.py). On CIFAR-10, photographs have an upright.

Run:
    make demo METHOD=rotation # CPU, built-in shapes, a few minutes; the same as
    python rotation.py --data shapes --image-size 16 --width 16 --min-scale 0.6 --batch-size 256 \
        --epochs 30 --warmup-epochs 1 --eval-every 5
    python rotation.py        # CIFAR-10 on one GPU (the authors' batch 128, 200 epochs)
    make exp-pretext          # beside SimCLR, MAE and supervised at one budget

Results: docs/results.md (`make exp-pretext`).
"""

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ============================================================================================
# Configuration
# Defaults are the authors' CIFAR-10 RotNet recipe (gidariss/FeatureLearningRotNet,
# config/CIFAR10_RotNet_NIN4blocks.py: SGD with Nesterov momentum 0.9, learning rate 0.1,
# weight decay 5e-4, batch 128, 200 epochs), on the ResNet-18 of the other files instead of
# their Network-in-Network, and with the cosine schedule of the other files instead of their
# steps (x0.2 at epochs 60, 120 and 160), so that a short run follows the same shape.
# ============================================================================================

ROTATIONS = 4                   # 0, 90, 180, 270 degrees: the paper's best number of classes (its Table 2)


def make_parser():
    p = common.make_parser("Rotation prediction (RotNet): the pretext-task reference line.", arch="resnet18")
    group = p.add_argument_group("rotation")
    group.add_argument("--epochs", type=common.positive_int, default=200,
                       help="passes over the training set (the authors' config: 200)")
    group.add_argument("--batch-size", type=common.positive_int, default=128,
                       help="images per step, one rotation each (the authors' 128 images, fed in all four "
                            "rotations)")
    group.add_argument("--lr", type=common.positive_float, default=0.1,
                       help="learning rate per 512 inputs: the authors' 0.1 for a step of 128 images in 4 rotations "
                            "each; scaled linearly with --batch-size, one input per image here")
    group.add_argument("--weight-decay", type=common.nonneg_float, default=5e-4,
                       help="L2 penalty on weight matrices (the authors' 5e-4)")
    group.add_argument("--warmup-epochs", type=common.nonneg_float, default=0.0,
                       help="linear LR warmup, in epochs (the authors' code has none)")
    group.add_argument("--min-scale", type=common.fraction, default=0.75,
                       help="smallest crop as a fraction of the image area: about what the authors' random "
                            "32 px crop of the image padded by 4 px keeps, (28/32)^2")
    return p


# ============================================================================================
# Augmentation and the pretext labels: crop and flip, then a rotation the network must name
# ============================================================================================

def rotation_augment(mean_std, size, min_scale):
    """The authors' CIFAR-10 augmentation is a padded random crop and a horizontal flip, no
    colour changes; common.Augment's resized crop of at least `min_scale` stands in for the crop.
    The flip comes before the rotation, so the label names the rotation of a flipped image."""
    return common.Augment(size, scale=(min_scale, 1.0), jitter_p=0.0, gray_p=0.0, mean=mean_std[0], std=mean_std[1])


def rotate(x, y):
    """Each image x[i] (N, C, H, W), square, turned by y[i] * 90 degrees counter-clockwise (y (N,)
    in 0..3), as torch.rot90(x[i], y[i], dims=(1, 2)) turns it: 90 degrees moves the top row to
    the left column. One rot90 per angle on the images that drew it, not one per image."""
    out = x.clone()
    for k in range(1, ROTATIONS):
        pick = y == k                                          # (N,) bool
        out[pick] = torch.rot90(x[pick], k, dims=(2, 3))
    return out


def random_rotations(x):
    """x (N, C, H, W) -> (rotated images (N, C, H, W), labels y (N,) uniform in 0..3)."""
    y = torch.randint(0, ROTATIONS, (x.shape[0],), device=x.device)
    return rotate(x, y), y


class Rotated:
    """The augmentation, then a random rotation: what the network sees (the second recipe of
    views.png; the training loop calls the two itself, as it needs the labels)."""
    def __init__(self, augment):
        self.augment, self.size = augment, augment.size

    def __call__(self, x, normalize=True):
        return random_rotations(self.augment(x, normalize))[0]


# ============================================================================================
# Model: encoder f followed by a linear 4-way classifier
# ============================================================================================

class Rotation(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone                               # f: images -> h (N, dim)
        self.classifier = nn.Linear(backbone.dim, ROTATIONS)   # h -> logits (N, 4)

    def forward(self, x):
        h = self.backbone(x)                                   # (N, dim)
        return self.classifier(h), h


# ============================================================================================
# The loss
# ============================================================================================

def rotation_loss(logits, y):
    """Cross-entropy with the rotation each image was given, the paper's eq. (1)-(2): logits
    (N, 4), y (N,) in 0..3.

        l(i) = -log  exp(s_{i, y_i})  /  sum_{r=0..3} exp(s_{i, r})

    In fp32 with autocast off."""
    with torch.autocast(logits.device.type, enabled=False):
        return F.cross_entropy(logits.float(), y)


# ============================================================================================
# One training step
# ============================================================================================

def train_step(model, optimizer, x, y, amp):
    with amp:
        logits, h = model(x)                                   # (B, 4), (B, dim)
        loss = rotation_loss(logits, y)
    optimizer.zero_grad(set_to_none=True)
    amp.backward(loss)
    amp.step(optimizer)
    return loss, h


@torch.no_grad()
def test_rotation_top1(model, data, mean_std, seed=0):
    """How well the pretext task itself is solved: top-1 of the rotation classifier on the
    test images (un-augmented), each turned by a seeded random rotation. Chance is 25%."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, ROTATIONS, (len(data.test_x),), generator=g).to(data.test_x.device)
    features = common.extract_features(model.backbone, rotate(data.test_x, y), mean_std)   # (M, dim)
    return (model.classifier(features).argmax(1) == y).float().mean().item()


# ============================================================================================
# main
# ============================================================================================

def main(argv=None):
    args = common.parse_args(make_parser(), argv, "rotation")
    run = common.Run(args, "rotation")

    backbone = common.build_backbone(args.arch, run.data.image_size, args.width, args.patch_size, args.depth)
    model = common.to_device(Rotation(backbone), run.device)
    base_lr = args.lr * args.batch_size / 512                 # the authors' step: 128 images x 4 rotations
    optimizer = common.make_optimizer(common.param_groups(model, args.weight_decay), "sgd", base_lr, nesterov=True)
    warmup = args.warmup_epochs * run.steps_per_epoch
    run.start(model, optimizer, model.backbone)
    augment = rotation_augment(run.mean_std, run.data.image_size, args.min_scale)
    run.save_views([augment, Rotated(augment)])
    train_model = run.wrap(model)

    for epoch in range(run.start_epoch, args.epochs):
        for step, idx in run.batches(epoch):                   # idx: this step's images, B (B/N on each of N processes)
            common.set_lr(optimizer, common.cosine_lr(step, run.total_steps, warmup, base_lr))
            x = augment(run.data.train_x[idx])                 # (B, 3, H, W) fp32, on the device
            x, y = random_rotations(x)                         # (B, 3, H, W), (B,) in 0..3
            loss, h = train_step(train_model, optimizer, x, y, run.amp)
            run.log_step(loss, h)
        run.end_epoch(epoch)

    summary = run.finish()
    if summary is None:                                        # ranks 1.. of a torchrun: rank 0 reports
        return
    if run.data.test_x is not None:
        summary["test_rotation_top1"] = test_rotation_top1(model, run.data, run.mean_std, args.seed)
        common.write_json(summary, run.out / "summary.json")
        print(f"rotation classifier on the test images: top-1 {100 * summary['test_rotation_top1']:.2f}% "
              f"(chance 25%)", file=sys.stderr)


if __name__ == "__main__":
    common.run_main(main)
