"""BYOL: predict a slow teacher's embedding of another view; no negatives at all.

The idea (Grill et al. 2020, arXiv 2006.07733): an online network looks at one view and
predicts the embedding that a target network gives to the other view. The target is an
exponential moving average of the online network and receives no gradient. Without
negatives nothing in the loss forbids the trivial solution (every image mapped to one
point); what keeps BYOL away from it in practice is the asymmetry: a predictor on the online
side only, and a target that moves slowly. `--no-predictor` removes the first and shows the
collapse the lecture warns about. The lecture's pieces:

    1. data augmentation   two asymmetric views (solarise differs)          (byol_augments)
    2. online network      encoder f_theta, projector g_theta, predictor q_theta:  p = q(g(f(v)))
    3. target network      encoder f_xi, projector g_xi:  z' = g_xi(f_xi(v')), no gradient,
                           xi <- tau xi + (1 - tau) theta, tau from tau_base to 1 (cosine)
    4. loss                2 - 2 cos(p, z'), eq. (2), symmetrised over the views  (byol_loss)

Notation: N batch, D projection dimension, tau the target's EMA momentum.

Run:
    make demo METHOD=byol     # CPU, built-in shapes, a few minutes; the same as
    python byol.py --data shapes --image-size 16 --width 16 --min-scale 0.6 --batch-size 256 \
        --epochs 16 --tau-base 0.8 --eval-every 5
    python byol.py            # CIFAR-10 on one GPU: the defaults are the recipe (batch 512, 200 epochs)
    torchrun --standalone --nproc-per-node 4 byol.py   # the same run on 4 GPUs (README, "Several GPUs")
    make exp-collapse         # with and without the predictor (--no-predictor collapses)

Results: README.md, "A demo per method" (the demo; its figures are in results/demos.json)
and docs/results.md; the CIFAR-10 recipe on a GPU is not measured yet.
"""

import argparse
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ============================================================================================
# Configuration
# Defaults follow solo-learn's CIFAR-10 BYOL recipe (scripts/pretrain/cifar/byol.yaml and
# augmentations/asymmetric.yaml: LARS 1.0 per 256 images, weight decay 1e-5, 4096-wide
# projector and predictor, tau from 0.99 to 1, 1000 epochs with 10 of warmup), run at batch
# 512 for 200 epochs.
# ============================================================================================

RECIPE_EPOCHS = 1000            # the length of the cited recipe; shorter runs scale its schedules

def make_parser():
    p = common.make_parser("BYOL self-supervised pretraining.", arch="resnet18")
    group = p.add_argument_group("BYOL")
    group.add_argument("--epochs", type=common.positive_int, default=200, help="passes over the training set")
    group.add_argument("--batch-size", type=common.positive_int, default=512,
                       help="images per step; BYOL has no negatives, so it is far less batch-hungry than SimCLR")
    group.add_argument("--lr", type=common.positive_float, default=1.0,
                       help="base learning rate per 256 images (scaled linearly with --batch-size)")
    group.add_argument("--optimizer", default="lars", choices=["lars", "sgd"], help="LARS, as in the paper")
    group.add_argument("--weight-decay", type=common.nonneg_float, default=1e-5, help="L2 penalty on weight matrices")
    group.add_argument("--warmup-epochs", type=common.nonneg_float, default=None,
                       help="linear LR warmup, in epochs (default: the recipe's 10 of 1000, the same fraction "
                            "of a shorter run, however short: unlike SimCLR and MoCo, BYOL did better without "
                            "a one-epoch floor; docs/recipes.md, Short runs)")
    group.add_argument("--tau-base", type=common.ema_momentum, default=None,
                       help="the target's EMA momentum at step 0, in [0, 1); it rises to 1 on a cosine. The "
                            "target remembers about 1/(1 - tau) steps. Default: the recipe's 0.99, or lower in "
                            "a run under 4000 steps, so that the target remembers 2.5%% of the run and keeps up "
                            "with the online network (measured on CIFAR-10: docs/recipes.md, Short runs)")
    group.add_argument("--min-scale", type=common.fraction, default=0.08,
                       help="smallest crop as a fraction of the image area")
    group.add_argument("--predictor", action=argparse.BooleanOptionalAction, default=True,
                       help="--no-predictor drops q_theta: the asymmetry goes and the embeddings collapse")
    group.add_argument("--proj-hidden", type=common.positive_int, default=4096, help="projector hidden width")
    group.add_argument("--proj-dim", type=common.positive_int, default=256, help="dimension of z and p")
    group.add_argument("--pred-hidden", type=common.positive_int, default=4096, help="predictor hidden width")
    return p


# ============================================================================================
# Augmentation: two views from two different distributions
# ============================================================================================

def byol_augments(mean_std, size, min_scale=0.08):
    """solo-learn's asymmetric.yaml: both views crop (8-100% of the area), flip, colour jitter
    0.4, 0.4, 0.2, 0.1 with p 0.8 and grayscale p 0.2; the second view alone is solarised
    with p 0.2. The paper also blurs (p 1.0 and 0.1), which solo-learn drops at 32 px: here
    blur comes on above 64 px, with the paper's probabilities."""
    big = size > 64
    view = lambda blur_p, solarize_p: common.Augment(
        size, scale=(min_scale, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=blur_p,
        solarize_p=solarize_p, mean=mean_std[0], std=mean_std[1])
    return view(1.0 if big else 0.0, 0.0), view(0.1 if big else 0.0, 0.2)


# ============================================================================================
# Model: online network (with predictor) and target network (its EMA)
# ============================================================================================

class BYOL(nn.Module):
    def __init__(self, backbone, proj_hidden, proj_dim, pred_hidden, predictor=True):
        super().__init__()
        self.online = nn.Sequential(backbone, common.mlp([backbone.dim, proj_hidden, proj_dim]))  # g(f(x)) (N, D)
        self.predictor = common.mlp([proj_dim, pred_hidden, proj_dim]) if predictor else nn.Identity()
        # The target starts as a copy and moves only through ema_update: no optimizer sees it.
        self.target = copy.deepcopy(self.online).requires_grad_(False)

    @property
    def backbone(self):
        return self.online[0]

    def forward(self, x):
        """Predictions p (N, D) of the online network and projections z (N, D) of the target,
        both for the same images x; the caller pairs them across views."""
        p = self.predictor(self.online(x))                     # (N, D)
        with torch.no_grad():
            z = self.target(x)                                 # (N, D)
        return p, z


# ============================================================================================
# The loss
# ============================================================================================

def byol_loss(p, z):
    """Eq. (2) of the paper, the mean over the batch of

        || p/|p| - z/|z| ||^2  =  2 - 2 cos(p, z)

    p (N, D) from the online network; z (N, D) from the target, a fixed regression target:
    the gradient never flows into it (detached here, whatever the caller passes). In fp32
    with autocast off."""
    with torch.autocast(p.device.type, enabled=False):
        p = F.normalize(p.float(), dim=1)
        z = F.normalize(z.detach().float(), dim=1)
        return (2 - 2 * (p * z).sum(1)).mean()


# ============================================================================================
# One training step
# ============================================================================================

def train_step(model, optimizer, x1, x2, tau, amp):
    """The online prediction of each view regresses the target's projection of the other
    (the paper's L + L~). Each view has its own forward pass, so BatchNorm normalises each
    with its own statistics, as in the paper's code. The target then follows."""
    with amp:
        p1, z1 = model(x1)                                     # (N, D) each
        p2, z2 = model(x2)
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)
    optimizer.zero_grad(set_to_none=True)
    amp.backward(loss)
    amp.step(optimizer)
    common.ema_update(model.target, model.online, tau)        # xi <- tau xi + (1 - tau) theta
    return loss, p1


# ============================================================================================
# main
# ============================================================================================

def main(argv=None):
    args = common.parse_args(make_parser(), argv, "byol")
    run = common.Run(args, "byol")

    # Residual branches start at 0 (torchvision's zero_init_residual), as in the paper's ResNet.
    backbone = common.build_backbone(args.arch, run.data.image_size, args.width, args.patch_size, args.depth,
                                     zero_init_residual=True)
    model = common.to_device(BYOL(backbone, args.proj_hidden, args.proj_dim, args.pred_hidden, args.predictor),
                             run.device)
    base_lr = args.lr * args.batch_size / 256
    optimizer = common.make_optimizer(common.param_groups(model, args.weight_decay), args.optimizer, base_lr)
    warmup = common.scaled_epochs(args.warmup_epochs, 10, RECIPE_EPOCHS, args.epochs) * run.steps_per_epoch
    # A short run's target must keep up: memory 1/(1 - tau_base) at most 2.5% of the run.
    tau_base = args.tau_base if args.tau_base is not None else max(0.0, min(0.99, 1 - 40 / run.total_steps))
    run.start(model, optimizer, model.backbone)
    augment1, augment2 = byol_augments(run.mean_std, run.data.image_size, args.min_scale)
    run.save_views([augment1, augment2])
    train_model = run.wrap(model)

    for epoch in range(run.start_epoch, args.epochs):
        for step, idx in run.batches(epoch):                   # idx: this step's images, B (B/N on each of N processes)
            common.set_lr(optimizer, common.cosine_lr(step, run.total_steps, warmup, base_lr))
            tau = common.cosine_schedule(step, run.total_steps, tau_base, 1.0)
            x = run.data.train_x[idx]                          # (B, 3, H, W) uint8, on the device
            x1, x2 = augment1(x), augment2(x)                  # (B, 3, H, W) fp32 each
            loss, p1 = train_step(train_model, optimizer, x1, x2, tau, run.amp)
            run.log_step(loss, p1)
        run.end_epoch(epoch)
    run.finish()


if __name__ == "__main__":
    common.run_main(main)
