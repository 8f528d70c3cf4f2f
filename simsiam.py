"""SimSiam: two views, one network, a predictor and a stop-gradient; no negatives, no EMA.

The idea (Chen & He 2020, arXiv 2011.10566): BYOL without the momentum encoder. Both views go
through the same encoder f (backbone + projector); a small predictor h maps one view's
embedding to the other's, and the other side is treated as a constant (stop-gradient). The
paper's finding, the lecture's point: the stop-gradient alone prevents collapse. Remove it
(`--no-stop-grad`) and the embeddings fall to one point within a few epochs; the collapse
monitor (std of the L2-normalised z, about 1/sqrt(D) when healthy) drops toward 0.

    1. data augmentation   two views, SimCLR's recipe with weaker colour jitter (simsiam_augment)
    2. encoder f           ResNet-18 + 3-layer projector ending in BN:  z = f(x)
    3. predictor h         bottleneck MLP D -> D/4 -> D:  p = h(z)
    4. loss                D(p1, z2)/2 + D(p2, z1)/2, D(p, z) = -cos(p, stopgrad(z)), eq. (3)-(4)

Notation: N batch, D projection dimension.

Run:
    make demo METHOD=simsiam  # CPU, built-in shapes, a few minutes; the same as
    python simsiam.py --data shapes --image-size 16 --width 16 --min-scale 0.6 --batch-size 256 \
        --epochs 16 --eval-every 5
    python simsiam.py         # CIFAR-10 on one GPU: the defaults are the recipe (batch 512, 200 epochs)
    torchrun --standalone --nproc-per-node 4 simsiam.py   # the same run on 4 GPUs (README, "Several GPUs")
    make exp-collapse         # with and without the stop-gradient (--no-stop-grad collapses)

Results: README.md, "A demo per method" (the demo; its figures are in results/demos.json)
and docs/results.md; the CIFAR-10 recipe on a GPU is not measured yet.
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ============================================================================================
# Configuration
# Defaults follow solo-learn's CIFAR-10 SimSiam recipe (scripts/pretrain/cifar/simsiam.yaml and
# augmentations/symmetric_weak.yaml: SGD 0.5 per 256 images, weight decay 1e-5, projector
# 2048 wide, predictor bottleneck 512 with a fixed learning rate, 1000 epochs with 10 of
# warmup), run at batch 512 for 200 epochs.
# ============================================================================================

RECIPE_EPOCHS = 1000            # the length of the cited recipe; shorter runs scale its schedules

def make_parser():
    p = common.make_parser("SimSiam self-supervised pretraining.", arch="resnet18")
    group = p.add_argument_group("SimSiam")
    group.add_argument("--epochs", type=common.positive_int, default=200, help="passes over the training set")
    group.add_argument("--batch-size", type=common.positive_int, default=512,
                       help="images per step; SimSiam works from batch 64 up (no negatives)")
    group.add_argument("--lr", type=common.positive_float, default=0.5,
                       help="base learning rate per 256 images (scaled linearly with --batch-size)")
    group.add_argument("--optimizer", default="sgd", choices=["sgd", "lars"], help="plain SGD, as in the paper")
    group.add_argument("--weight-decay", type=common.nonneg_float, default=1e-5,
                       help="L2 penalty on weight matrices; biases and norms get none, where the official code "
                            "and solo-learn decay them too (one rule for every method here)")
    group.add_argument("--warmup-epochs", type=common.nonneg_float, default=None,
                       help="linear LR warmup, in epochs (default: the recipe's 10 of 1000, the same fraction "
                            "of a shorter run, but at least one epoch)")
    group.add_argument("--stop-grad", action=argparse.BooleanOptionalAction, default=True,
                       help="--no-stop-grad lets the gradient through z too: the embeddings collapse")
    group.add_argument("--fixed-pred-lr", action=argparse.BooleanOptionalAction, default=True,
                       help="keep the predictor's learning rate at the base value instead of decaying it "
                            "(the paper: h must keep adapting to the latest representation)")
    group.add_argument("--min-scale", type=common.fraction, default=0.08,
                       help="smallest crop as a fraction of the image area")
    group.add_argument("--proj-hidden", type=common.positive_int, default=2048, help="projector hidden width")
    group.add_argument("--proj-dim", type=common.positive_int, default=2048, help="dimension of z and p")
    group.add_argument("--pred-hidden", type=common.positive_int, default=512,
                       help="predictor bottleneck (the paper's D/4)")
    return p


# ============================================================================================
# Augmentation: both views from the same distribution
# ============================================================================================

def simsiam_augment(mean_std, size, min_scale=0.08):
    """solo-learn's symmetric_weak.yaml: crops of 8-100% of the area (bicubic), flip, colour
    jitter 0.4, 0.4, 0.4, 0.1 with p 0.8, grayscale p 0.2, blur p 0.5. The paper's code (MoCo
    v2's augmentation) crops 20-100% and resizes bilinearly; 8-100% bicubic is solo-learn's,
    kept with the rest of solo-learn's recipe (docs/recipes.md)."""
    return common.Augment(size, scale=(min_scale, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2,
                          blur_p=0.5, mean=mean_std[0], std=mean_std[1])


# ============================================================================================
# Model: encoder f (backbone + projector) and predictor h
# ============================================================================================

def projector(dim, hidden, out):
    """SimSiam's 3-layer projector: (Linear-BN-ReLU) x 2, then Linear-BN with no affine
    parameters, so z is standardised per dimension (the paper's Sec. 4.4)."""
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, out, bias=False), nn.BatchNorm1d(out, affine=False))


class SimSiam(nn.Module):
    def __init__(self, backbone, proj_hidden, proj_dim, pred_hidden):
        super().__init__()
        self.encoder = nn.Sequential(backbone, projector(backbone.dim, proj_hidden, proj_dim))   # f: x -> z
        self.predictor = common.mlp([proj_dim, pred_hidden, proj_dim])   # h: a bottleneck, no BN at its end

    @property
    def backbone(self):
        return self.encoder[0]

    def forward(self, x):
        z = self.encoder(x)                                    # (N, D)
        p = self.predictor(z)                                  # (N, D)
        return p, z


# ============================================================================================
# The loss
# ============================================================================================

def simsiam_loss(p, z, stop_grad=True):
    """The negative cosine similarity of eq. (1), with the stop-gradient of eq. (3):

        D(p, z) = - mean_i  p_i/|p_i| . stopgrad(z_i)/|z_i|

    p (N, D) predictions of one view, z (N, D) projections of the other. stop_grad=False is
    the ablation of the paper's Figure 2: the loss then pulls z toward p as well, and the
    easiest way to agree is for everything to collapse to one vector. In fp32, autocast off."""
    z = z.detach() if stop_grad else z
    with torch.autocast(p.device.type, enabled=False):
        return -(F.normalize(p.float(), dim=1) * F.normalize(z.float(), dim=1)).sum(1).mean()


# ============================================================================================
# One training step
# ============================================================================================

def train_step(model, optimizer, x1, x2, stop_grad, amp):
    """Each view through the one shared network in its own forward pass, so BatchNorm
    normalises each with its own statistics (the paper's code); the symmetrised loss
    L = D(p1, z2)/2 + D(p2, z1)/2 of eq. (4)."""
    with amp:
        p1, z1 = model(x1)                                     # (N, D) each
        p2, z2 = model(x2)
        loss = simsiam_loss(p1, z2, stop_grad) / 2 + simsiam_loss(p2, z1, stop_grad) / 2
    optimizer.zero_grad(set_to_none=True)
    amp.backward(loss)
    amp.step(optimizer)
    return loss, z1


# ============================================================================================
# main
# ============================================================================================

def main(argv=None):
    args = common.parse_args(make_parser(), argv, "simsiam")
    run = common.Run(args, "simsiam")

    # Residual branches start at 0 (torchvision's zero_init_residual), as in the paper's code.
    backbone = common.build_backbone(args.arch, run.data.image_size, args.width, args.patch_size, args.depth,
                                     zero_init_residual=True)
    model = common.to_device(SimSiam(backbone, args.proj_hidden, args.proj_dim, args.pred_hidden), run.device)
    base_lr = args.lr * args.batch_size / 256
    groups = common.param_groups(model.encoder, args.weight_decay) + \
        [dict(g, predictor=True) for g in common.param_groups(model.predictor, args.weight_decay)]
    optimizer = common.make_optimizer(groups, args.optimizer, base_lr)
    warmup = common.scaled_epochs(args.warmup_epochs, 10, RECIPE_EPOCHS, args.epochs, at_least=1) * run.steps_per_epoch
    run.start(model, optimizer, model.backbone)
    augment = simsiam_augment(run.mean_std, run.data.image_size, args.min_scale)
    run.save_views([augment])
    train_model = run.wrap(model)

    for epoch in range(run.start_epoch, args.epochs):
        for step, idx in run.batches(epoch):                   # idx: this step's images, B (B/N on each of N processes)
            common.set_lr(optimizer, common.cosine_lr(step, run.total_steps, warmup, base_lr))
            if args.fixed_pred_lr:
                for group in optimizer.param_groups:
                    if group.get("predictor"):
                        group["lr"] = base_lr
            x = run.data.train_x[idx]                          # (B, 3, H, W) uint8, on the device
            x1, x2 = augment(x), augment(x)                    # (B, 3, H, W) fp32 each
            loss, z1 = train_step(train_model, optimizer, x1, x2, args.stop_grad, run.amp)
            run.log_step(loss, z1)
        run.end_epoch(epoch)
    run.finish()


if __name__ == "__main__":
    common.run_main(main)
