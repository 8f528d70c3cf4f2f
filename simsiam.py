"""SimSiam: two views, one network, a predictor and a stop-gradient; no negatives, no EMA.

The idea (Chen & He 2020, arXiv 2011.10566): BYOL without the momentum encoder. Both views go
through the same encoder f (backbone + projector); a small predictor h maps one view's
embedding to the other's, and the other side is treated as a constant (stop-gradient). The
paper's finding, the lecture's point: the stop-gradient alone prevents collapse. Remove it
(`--no-stop-grad`) and the embeddings fall to one point within a few epochs; the collapse
monitor (std of the L2-normalised z, about 1/sqrt(D) when healthy) drops toward 0.

    1. data augmentation   two views, as SimCLR                         (common.simclr_augment)
    2. encoder f           ResNet-18 + 3-layer projector ending in BN:  z = f(x)
    3. predictor h         bottleneck MLP D -> D/4 -> D:  p = h(z)
    4. loss                D(p1, z2)/2 + D(p2, z1)/2, D(p, z) = -cos(p, stopgrad(z)), eq. (3)-(4)

Notation: N batch, D projection dimension.

Run:
    python simsiam.py --data shapes --image-size 16 --width 16 --epochs 15   # CPU, a few minutes
    python simsiam.py --epochs 200                                           # CIFAR-10, one GPU
    python simsiam.py --no-stop-grad --epochs 20                             # watch it collapse

Result: CIFAR-10 on a GPU not yet measured (no GPU was available to the session that wrote it).
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ============================================================================================
# Configuration
# Defaults follow solo-learn's CIFAR-10 SimSiam recipe (SGD 0.5 per 256 images, weight decay
# 1e-5, projector 2048 wide, predictor bottleneck 512) at batch 512.
# ============================================================================================

def make_parser():
    p = argparse.ArgumentParser(description="SimSiam self-supervised pretraining.")
    common.add_common_args(p, arch="resnet18")
    g = p.add_argument_group("SimSiam")
    g.add_argument("--epochs", type=common.positive_int, default=200, help="passes over the training set")
    g.add_argument("--batch-size", type=common.positive_int, default=512,
                   help="images per step; SimSiam works from batch 64 up (no negatives)")
    g.add_argument("--lr", type=common.positive_float, default=0.5,
                   help="base learning rate per 256 images (scaled linearly with --batch-size)")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "lars"], help="plain SGD, as in the paper")
    g.add_argument("--weight-decay", type=float, default=1e-5, help="L2 penalty on weight matrices")
    g.add_argument("--warmup-epochs", type=common.nonneg_int, default=10, help="linear LR warmup")
    g.add_argument("--stop-grad", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-stop-grad lets the gradient through z too: the embeddings collapse")
    g.add_argument("--fixed-pred-lr", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the predictor's learning rate at the base value instead of decaying it "
                        "(the paper: h must keep adapting to the latest representation)")
    g.add_argument("--min-scale", type=common.positive_float, default=0.08,
                   help="smallest crop as a fraction of the image area")
    g.add_argument("--proj-hidden", type=common.positive_int, default=2048, help="projector hidden width")
    g.add_argument("--proj-dim", type=common.positive_int, default=2048, help="dimension of z and p")
    g.add_argument("--pred-hidden", type=common.positive_int, default=512,
                   help="predictor bottleneck (the paper's D/4)")
    return p


# ============================================================================================
# Model: encoder f (backbone + projector) and predictor h
# ============================================================================================

class SimSiam(nn.Module):
    def __init__(self, backbone, proj_hidden, proj_dim, pred_hidden):
        super().__init__()
        # f: the projector ends in a BatchNorm without affine, as in the paper.
        self.encoder = nn.Sequential(backbone, common.mlp([backbone.dim, proj_hidden, proj_hidden, proj_dim],
                                                          last_bn=True))
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
    easiest way to agree is for everything to collapse to one vector."""
    z = z.detach() if stop_grad else z
    return -(F.normalize(p.float(), dim=1) * F.normalize(z.float(), dim=1)).sum(1).mean()


# ============================================================================================
# One training step
# ============================================================================================

def train_step(model, optimizer, x1, x2, stop_grad, run):
    """Both views in one forward pass through the one shared network; the symmetrised loss
    L = D(p1, z2)/2 + D(p2, z1)/2 of eq. (4)."""
    with run.autocast():
        p, z = model(torch.cat([x1, x2]))                      # (2N, D) each
        p1, p2 = p.chunk(2)                                    # (N, D) each
        z1, z2 = z.chunk(2)
        loss = simsiam_loss(p1, z2, stop_grad) / 2 + simsiam_loss(p2, z1, stop_grad) / 2
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, z1


# ============================================================================================
# main
# ============================================================================================

def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    run = common.Run(args, "simsiam", parser)

    backbone = common.build_backbone(args.arch, run.data.image_size, args.width, args.patch_size)
    model = run.prepare(SimSiam(backbone, args.proj_hidden, args.proj_dim, args.pred_hidden))
    base_lr = args.lr * args.batch_size / 256
    # Two parameter groups per module (decay / no decay): groups 2 and 3 are the predictor's.
    optimizer = common.make_optimizer([(model.encoder, 1.0), (model.predictor, 1.0)], args.optimizer,
                                      base_lr, args.weight_decay)
    run.start(model, optimizer, model.backbone)
    augment = common.simclr_augment(run.stats, run.data.image_size, args.min_scale)
    run.save_views([augment])
    forward = run.compiled(model)

    for epoch in range(run.start_epoch, args.epochs):
        for step, x in run.batches(epoch):                     # x: (B, 3, H, W) uint8
            common.set_lr(optimizer, common.cosine_lr(step, run.total_steps,
                                                      args.warmup_epochs * run.steps_per_epoch, base_lr))
            if args.fixed_pred_lr:
                for group in optimizer.param_groups[2:]:
                    group["lr"] = base_lr
            x1, x2 = augment(x), augment(x)                    # (B, 3, H, W) fp32 each
            loss, z = train_step(forward, optimizer, x1, x2, args.stop_grad, run)
            run.log_step(loss, z)
        run.end_epoch(epoch)

    x = run.data.train_x[:args.batch_size]
    x1, x2 = augment(x), augment(x)
    run.finish(bench_step=lambda: train_step(forward, optimizer, x1, x2, args.stop_grad, run))


if __name__ == "__main__":
    common.run_main(main)
