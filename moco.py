"""MoCo v2: contrastive learning against a queue of keys from a slowly moving encoder.

The idea (He et al. 2019, arXiv 1911.05722; v2: Chen et al. 2020, arXiv 2003.04297): SimCLR
takes its negatives from the batch, so it needs a large batch. MoCo keeps the keys of the
last K images in a FIFO queue instead, so the number of negatives no longer depends on the
batch size. Keys computed many steps ago are only comparable with today's query if the
encoder that made them has barely moved since: the key encoder is therefore a slow
exponential moving average of the query encoder, never trained by gradient. The lecture's
"queue + slow teacher":

    1. data augmentation   two views per image, SimCLR's recipe with weaker colour jitter
    2. query encoder f_q   ResNet-18 + projection MLP, q = f_q(x_q), trained by SGD
    3. key encoder f_k     same architecture, theta_k <- m theta_k + (1 - m) theta_q, no gradient
    4. queue               the K most recent keys (K, D), L2-normalised, oldest replaced first
    5. loss                (K+1)-way cross-entropy, eq. (1) of the paper       (moco_loss below)

Notation as in the paper: N batch, D embedding, K queue length, m momentum, tau temperature.

Run:
    make demo METHOD=moco     # CPU, built-in shapes, a few minutes; the same as
    python moco.py --data shapes --image-size 16 --width 16 --min-scale 0.6 --batch-size 128 \
        --epochs 16 --queue-size 1024 --proj-bn --momentum-end 0.99 --eval-every 5
    python moco.py            # CIFAR-10 on one GPU: the defaults are the recipe (batch 512, 200 epochs)
    torchrun --standalone --nproc-per-node 4 moco.py   # the same run on 4 GPUs (README, "Several GPUs")

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
# Defaults follow solo-learn's CIFAR-10 MoCo v2+ recipe (scripts/pretrain/cifar/mocov2plus.yaml
# and augmentations/symmetric_weak.yaml: SGD 0.3 per 256 images, weight decay 1e-4,
# temperature 0.2, a 2048-wide projector without BatchNorm, momentum 0.99 -> 0.999, symmetric
# loss, 1000 epochs with 10 of warmup), run at batch 512 for 200 epochs, with a smaller queue.
# ============================================================================================

RECIPE_EPOCHS = 1000            # the length of the cited recipe; shorter runs scale its schedules


def make_parser():
    p = common.make_parser("MoCo v2 self-supervised pretraining.", arch="resnet18")
    group = p.add_argument_group("MoCo")
    group.add_argument("--epochs", type=common.positive_int, default=200, help="passes over the training set")
    group.add_argument("--batch-size", type=common.positive_int, default=512,
                       help="images per step; with the queue, the number of negatives does not depend on it")
    group.add_argument("--lr", type=common.positive_float, default=0.3,
                       help="base learning rate per 256 images (scaled linearly with --batch-size)")
    group.add_argument("--optimizer", default="sgd", choices=["sgd", "lars"],
                       help="plain SGD suffices: MoCo does not need the huge batches LARS is for")
    group.add_argument("--weight-decay", type=common.nonneg_float, default=1e-4,
                       help="L2 penalty on weight matrices; biases and norms get none, where the official code "
                            "and solo-learn decay them too (one rule for every method here)")
    group.add_argument("--warmup-epochs", type=common.nonneg_float, default=None,
                       help="linear LR warmup, in epochs (default: the recipe's 10 of 1000, the same fraction "
                            "of a shorter run, but at least one epoch)")
    group.add_argument("--temperature", type=common.positive_float, default=0.2,
                       help="tau in the softmax (MoCo v2's 0.2; v1 used 0.07)")
    group.add_argument("--momentum", type=common.ema_momentum, default=0.99,
                       help="m of the key encoder's EMA at the start, in [0, 1) ...")
    group.add_argument("--momentum-end", type=common.ema_momentum, default=0.999,
                       help="... rising to this on a cosine (solo-learn; the paper keeps 0.999 throughout, "
                            "for ImageNet's far longer epochs)")
    group.add_argument("--queue-size", type=common.positive_int, default=4096,
                       help="K, negatives kept. Smaller than solo-learn's 32768 (the paper's 65536 is "
                            "ImageNet's): the queue must hold fewer keys than an epoch, or an image meets an "
                            "old key of itself as a negative, and a laptop run trains on 20,000 images")
    group.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=True,
                       help="each view is the query once and the key once (solo-learn's MoCo v2+, twice the "
                            "signal per image); --no-symmetric is the paper's one-way loss")
    group.add_argument("--bn-splits", type=common.positive_int, default=8,
                       help="BatchNorm statistics over this many groups of the batch, keys shuffled across "
                            "them: the one-device stand-in for MoCo's shuffled BN (1 turns it off)")
    group.add_argument("--min-scale", type=common.fraction, default=0.08,
                       help="smallest crop as a fraction of the image area")
    group.add_argument("--proj-hidden", type=common.positive_int, default=2048, help="projector hidden width")
    group.add_argument("--proj-dim", type=common.positive_int, default=256, help="dimension of q and k")
    group.add_argument("--proj-bn", action=argparse.BooleanOptionalAction, default=False,
                       help="a BatchNorm after the projector's hidden layer, split like the encoder's (SimCLR's "
                            "and MoCo v3's projector; MoCo v2's has none, hence off). docs/notes.md: what it does in a "
                            "short run")
    return p


# ============================================================================================
# Augmentation: both views from the same distribution
# ============================================================================================

def moco_augment(mean_std, size, min_scale=0.08):
    """solo-learn's symmetric_weak.yaml: crops of 8-100% of the area (bicubic), flip, colour
    jitter 0.4, 0.4, 0.4, 0.1 with p 0.8, grayscale p 0.2, blur p 0.5. The paper's "aug+" as
    its code runs it crops 20-100% and resizes bilinearly; 8-100% bicubic is solo-learn's,
    kept with the rest of solo-learn's recipe (docs/recipes.md)."""
    return common.Augment(size, scale=(min_scale, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2,
                          blur_p=0.5, mean=mean_std[0], std=mean_std[1])


# ============================================================================================
# Model: query encoder, key encoder (its EMA), the queue
# ============================================================================================

class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are computed separately over G equal groups of
    the batch, as if each group sat on its own GPU. It replaces the ResNet's BatchNorms (and
    the projector's, with --proj-bn: inputs (N, C) as well as (N, C, H, W)) with the same
    parameters and buffers, so the encoder still loads into a plain ResNet; in eval mode it
    is plain BatchNorm.

    Why MoCo needs it: with one BatchNorm over the whole batch, the positive key k+ is the
    only candidate computed with the current batch's statistics (every negative in the queue
    was computed with an older batch's). The network can learn to spot that statistical
    signature instead of the image's content, and the loss drops without learning much. MoCo
    shuffles the keys across GPUs before the key encoder, so a query and its key are
    normalised with statistics of different sub-batches. On one device we get the same
    effect with G groups and a shuffle of the key batch."""

    def __init__(self, num_features, groups):
        super().__init__(num_features)
        self.groups = groups

    def _check_input_dim(self, x):                             # BatchNorm2d's check, widened to (N, C)
        if x.dim() not in (2, 4):
            raise ValueError(f"expected a 2D or 4D input, got {x.dim()}D")

    def forward(self, x):                                      # (N, C, H, W) or (N, C)
        G = self.groups
        if not self.training or G == 1 or x.shape[0] % G:    # uneven: never in training (main checks),
            return super().forward(x)                          # but refresh_batchnorm on a small data set
        N, C, rest = x.shape[0], x.shape[1], x.shape[2:]      # rest: (H, W), or () in the projector
        # The groups side by side as channels, so that one fused BatchNorm call does all of them:
        # rows g*N/G... of channel c become channel g*C + c.
        xg = x.view(G, N // G, C, *rest).transpose(0, 1).reshape(N // G, G * C, *rest)
        mean, var = self.running_mean.repeat(G), self.running_var.repeat(G)   # (G*C,) updated in place
        y = F.batch_norm(xg, mean, var, self.weight.repeat(G), self.bias.repeat(G), True, self.momentum, self.eps)
        with torch.no_grad():                                  # running stats: the mean over groups
            self.running_mean.copy_(mean.view(G, C).mean(0))
            self.running_var.copy_(var.view(G, C).mean(0))
            self.num_batches_tracked += 1
        y = y.view(N // G, G, C, *rest).transpose(0, 1).reshape(x.shape)   # back to rows in order
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return y.contiguous(memory_format=torch.channels_last)
        return y.contiguous()


def split_batchnorm(module, groups):
    """Replace every BatchNorm1d and BatchNorm2d inside `module` by a SplitBatchNorm with its state."""
    for name, child in module.named_children():
        if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d):
            split = SplitBatchNorm(child.num_features, groups)
            split.load_state_dict(child.state_dict())
            for new, old in zip(split.parameters(), child.parameters()):
                new.requires_grad_(old.requires_grad)          # the key encoder's stay frozen
            setattr(module, name, split)
        else:
            split_batchnorm(child, groups)
    return module


class MoCo(nn.Module):
    def __init__(self, backbone, hidden, dim, queue_size, proj_bn=False):
        super().__init__()
        # f_q: backbone, then a Linear-ReLU-Linear projector (no BatchNorm): x -> q (N, D). MoCo v2's
        # shape, at solo-learn's widths (512 -> 2048 -> 256); the official head is d -> d -> 128.
        # With proj_bn, Linear-BN-ReLU-Linear instead (common.mlp, SimCLR's projector).
        if proj_bn:
            projector = common.mlp([backbone.dim, hidden, dim])
        else:
            projector = nn.Sequential(nn.Linear(backbone.dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.encoder_q = nn.Sequential(backbone, projector)
        # f_k starts as a copy of f_q and moves only through ema_update: no optimizer sees it.
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        # The queue: a fixed tensor (K, D) and a pointer to its oldest row. Buffers, so that
        # state_dict (and every checkpoint) carries them. Random unit vectors to start with:
        # the first K/N steps see random negatives.
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def backbone(self):
        return self.encoder_q[0]

    def forward(self, x_q, x_k):
        """Queries (N, D) of x_q and keys (N, D) of x_k; row i of each is the same image."""
        q = self.encoder_q(x_q)                                # (N, D)
        with torch.no_grad():
            # Shuffle the keys across the BatchNorm groups (see SplitBatchNorm), then undo it.
            perm = torch.randperm(x_k.shape[0], device=x_k.device)
            k = self.encoder_k(x_k[perm])                      # (N, D), rows in shuffled order
            k = k[torch.argsort(perm)]                         # (N, D), row i is image i again
        return q, k

    @torch.no_grad()
    def push(self, k):
        """Enqueue the keys k (N, D), L2-normalised, over the N oldest; with N > K only the
        newest K survive. Index arithmetic on the device: the pointer never visits the host."""
        k = F.normalize(k.float(), dim=1)
        K, n = self.queue.shape[0], k.shape[0]
        first = self.queue_ptr + max(0, n - K)                 # where the surviving keys start
        rows = (first + torch.arange(min(n, K), device=k.device)) % K   # wraps around the end
        self.queue.index_copy_(0, rows, k[-K:])
        self.queue_ptr.copy_((self.queue_ptr + n) % K)


# ============================================================================================
# The loss
# ============================================================================================

def moco_loss(q, k, queue, temperature):
    """InfoNCE of the paper's eq. (1): q (N, D) queries, k (N, D) their positive keys,
    queue (K, D) the negatives. All are L2-normalised here.

        L_q = -log  exp(q.k+ / tau)  /  ( exp(q.k+ / tau) + sum_{i=1..K} exp(q.k_i / tau) )

    a (K+1)-way classification whose right answer is always candidate 0, the positive.
    Computed in fp32 with autocast off."""
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k.float(), dim=1)
        queue = F.normalize(queue.float(), dim=1)
        l_pos = (q * k).sum(1, keepdim=True)                   # (N, 1): q . k+
        l_neg = q @ queue.T                                    # (N, K): q . k_i
        logits = torch.cat([l_pos, l_neg], 1) / temperature    # logits: N x (1+K)
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)   # the positive is index 0
        return F.cross_entropy(logits, labels)


# ============================================================================================
# One training step
# ============================================================================================

def train_step(model, optimizer, x1, x2, momentum, args, amp):
    """Symmetric: both views in one batch as queries (x1 then x2) and, in the opposite order,
    as keys, so row i of the keys is the positive of row i of the queries. The mean of
    moco_loss over those 2N rows is exactly the mean of the two one-way losses. With the
    BatchNorm split into groups, the two views never share statistics."""
    # The slow teacher moves first, towards the current f_q, then makes this step's keys.
    common.ema_update(model.encoder_k, model.encoder_q, momentum)
    if args.symmetric:
        x_q, x_k = torch.cat([x1, x2]), torch.cat([x2, x1])   # (2N, 3, H, W) each
    else:
        x_q, x_k = x1, x2
    with amp:
        q, k = model(x_q, x_k)                                 # (2N, D) or (N, D)
        loss = moco_loss(q, k, model.queue, args.temperature)
    optimizer.zero_grad(set_to_none=True)
    amp.backward(loss)
    amp.step(optimizer)
    # One queue takes the keys of both views (2N a step), as the paper's single queue; solo-learn's
    # MoCo v2+ keeps one queue per view. After the loss: a key is never its own negative.
    # On several processes the keys of every process enter the queue, rank 0's first (the
    # official code's concat_all_gather), so that every process keeps the same queue.
    model.push(common.gather(k))
    return loss, q[:x1.shape[0]]


# ============================================================================================
# main
# ============================================================================================

def main(argv=None):
    parser = make_parser()
    args = common.parse_args(parser, argv, "moco")
    # The images one process's encoder sees per step (all of them on one process).
    rows = args.batch_size // common.world_size() * (2 if args.symmetric else 1)
    if rows % args.bn_splits:
        parser.error(f"--bn-splits {args.bn_splits} must divide the {rows} images the encoder sees per step "
                     f"(--batch-size {args.batch_size}{' over ' + str(common.world_size()) + ' processes' if common.world_size() > 1 else ''})")
    run = common.Run(args, "moco")

    backbone = common.build_backbone(args.arch, run.data.image_size, args.width, args.patch_size, args.depth)
    model = MoCo(backbone, args.proj_hidden, args.proj_dim, args.queue_size, args.proj_bn)
    if args.bn_splits > 1:
        model = split_batchnorm(model, args.bn_splits)        # both encoders
    model = common.to_device(model, run.device)
    base_lr = args.lr * args.batch_size / 256
    optimizer = common.make_optimizer(common.param_groups(model, args.weight_decay), args.optimizer, base_lr)
    warmup = common.scaled_epochs(args.warmup_epochs, 10, RECIPE_EPOCHS, args.epochs, at_least=1) * run.steps_per_epoch
    run.start(model, optimizer, model.backbone)
    augment = moco_augment(run.mean_std, run.data.image_size, args.min_scale)
    run.save_views([augment])
    # BatchNorm stays per process (no SyncBatchNorm): each process's groups act as the paper's
    # GPUs, and the key shuffle stays inside a process (the official code shuffles across GPUs).
    train_model = run.wrap(model, sync_batchnorm=False)

    for epoch in range(run.start_epoch, args.epochs):
        for step, idx in run.batches(epoch):                   # idx: this step's images, B (B/N on each of N processes)
            common.set_lr(optimizer, common.cosine_lr(step, run.total_steps, warmup, base_lr))
            momentum = common.cosine_schedule(step, run.total_steps, args.momentum, args.momentum_end)
            x = run.data.train_x[idx]                          # (B, 3, H, W) uint8, on the device
            x1, x2 = augment(x), augment(x)                    # (B, 3, H, W) fp32 each
            loss, q1 = train_step(train_model, optimizer, x1, x2, momentum, args, run.amp)
            run.log_step(loss, q1)
        run.end_epoch(epoch)
    run.finish()


if __name__ == "__main__":
    common.run_main(main)
