"""MoCo v2: contrastive learning against a queue of keys from a slowly moving encoder.

The idea (He et al. 2019, arXiv 1911.05722; v2: Chen et al. 2020, arXiv 2003.04297): SimCLR
takes its negatives from the batch, so it needs a large batch. MoCo keeps the keys of the
last K images in a FIFO queue instead, so the number of negatives no longer depends on the
batch size. Keys computed many steps ago are only comparable with today's query if the
encoder that made them has barely moved since: the key encoder is therefore a slow
exponential moving average of the query encoder, never trained by gradient. The lecture's
"queue + slow teacher":

    1. data augmentation   two views per image, as SimCLR            (common.simclr_augment)
    2. query encoder f_q   ResNet-18 + projection MLP, q = f_q(x_q), trained by SGD
    3. key encoder f_k     same architecture, theta_k <- m theta_k + (1 - m) theta_q, no gradient
    4. queue               the K most recent keys (K, D), L2-normalised, oldest replaced first
    5. loss                (K+1)-way cross-entropy, eq. (1) of the paper       (moco_loss below)

Notation as in the paper: N batch, D embedding, K queue length, m momentum, tau temperature.
`--version 3` switches to MoCo v3 (Chen et al. 2021, arXiv 2104.02057): no queue, a
predictor on the query side, and the other keys of the batch as negatives.

Run:
    python moco.py --data shapes --image-size 16 --width 16 --epochs 15   # CPU, a few minutes
    python moco.py --epochs 200                                           # CIFAR-10, one GPU

Result: CIFAR-10 on a GPU not yet measured (no GPU was available to the session that wrote it).
"""

import argparse
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ============================================================================================
# Configuration
# Defaults follow solo-learn's CIFAR-10 MoCo v2+ recipe (SGD 0.3 per 256 images, weight decay
# 1e-4, temperature 0.2, a 2048-wide projector, symmetric loss) with the CIFAR-sized
# queue (4096) and momentum (0.99).
# ============================================================================================

def make_parser():
    p = argparse.ArgumentParser(description="MoCo v2 (or v3) self-supervised pretraining.")
    common.add_common_args(p, arch="resnet18")
    g = p.add_argument_group("MoCo")
    g.add_argument("--epochs", type=common.positive_int, default=200, help="passes over the training set")
    g.add_argument("--batch-size", type=common.positive_int, default=512,
                   help="images per step; with the queue, the number of negatives does not depend on it")
    g.add_argument("--lr", type=common.positive_float, default=0.3,
                   help="base learning rate per 256 images (scaled linearly with --batch-size)")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "lars"],
                   help="plain SGD suffices: MoCo does not need the huge batches LARS is for")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="L2 penalty on weight matrices")
    g.add_argument("--warmup-epochs", type=common.nonneg_int, default=10, help="linear LR warmup")
    g.add_argument("--temperature", type=common.positive_float, default=0.2,
                   help="tau in the softmax (MoCo v2's 0.2; v1 used 0.07)")
    g.add_argument("--momentum", type=float, default=0.99,
                   help="m of the key encoder's EMA, in [0, 1); 0.99 suits CIFAR's short epochs, "
                        "the paper's 0.999 is ImageNet's")
    g.add_argument("--queue-size", type=common.positive_int, default=4096,
                   help="K, negatives kept; 4096 suits CIFAR's 50k images, the paper's 65536 is ImageNet's")
    g.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=True,
                   help="each view is the query once and the key once (twice the signal per image); "
                        "--no-symmetric is the paper's one-way loss")
    g.add_argument("--bn-splits", type=common.positive_int, default=8,
                   help="BatchNorm statistics over this many groups of the batch, keys shuffled across "
                        "them: the one-device stand-in for MoCo's shuffled BN (1 turns it off)")
    g.add_argument("--version", type=int, default=2, choices=[2, 3],
                   help="3: MoCo v3, no queue, a predictor, in-batch negatives")
    g.add_argument("--min-scale", type=common.positive_float, default=0.08,
                   help="smallest crop as a fraction of the image area")
    g.add_argument("--proj-hidden", type=common.positive_int, default=2048, help="projector hidden width")
    g.add_argument("--proj-dim", type=common.positive_int, default=256, help="dimension of q and k")
    return p


# ============================================================================================
# Model: query encoder, key encoder (its EMA), the queue
# ============================================================================================

class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are computed separately over G equal groups of
    the batch, as if each group sat on its own GPU. It replaces both the 2-d BatchNorms of
    the ResNet and the 1-d ones of the projector, with the same parameters and buffers, so
    the encoder still loads into a plain ResNet; in eval mode it is plain BatchNorm.

    Why MoCo needs it: with one BatchNorm over the whole batch, the positive key k+ is the
    only candidate computed with the current batch's statistics (every negative in the queue
    was computed with an older batch's). The network can learn to spot that statistical
    signature instead of the image's content, and the loss drops without learning much. MoCo
    shuffles the keys across GPUs before the key encoder, so a query and its key are
    normalised with statistics of different sub-batches. On one device we get the same
    effect with G groups and a shuffle of the key batch."""

    def __init__(self, num_features, groups, affine=True):
        super().__init__(num_features, affine=affine)
        self.groups = groups

    def _check_input_dim(self, x):
        if x.dim() not in (2, 4):
            raise ValueError(f"expected (N, C) or (N, C, H, W) input, got {tuple(x.shape)}")

    def forward(self, x):                                      # (N, C) or (N, C, H, W)
        G = self.groups
        if not self.training or G == 1:
            return super().forward(x)
        N, C = x.shape[:2]
        xg = x.view(G, N // G, C, -1)                          # (G, N/G, C, H*W); group g: rows g*N/G...
        var, mean = torch.var_mean(xg.float(), dim=(1, 3), correction=0, keepdim=True)   # (G, 1, C, 1)
        y = (xg - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.view(1, 1, C, 1) + self.bias.view(1, 1, C, 1)
        with torch.no_grad():                                  # running stats: the mean over groups
            n = xg.shape[1] * xg.shape[3]
            self.running_mean.lerp_(mean.mean(0).flatten(), self.momentum)
            self.running_var.lerp_((var * n / max(n - 1, 1)).mean(0).flatten(), self.momentum)
            self.num_batches_tracked += 1
        return y.view(x.shape).to(x.dtype)


def split_batchnorm(module, groups):
    """Replace every BatchNorm1d/2d inside `module` by a SplitBatchNorm with its state."""
    for name, child in module.named_children():
        if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d):
            split = SplitBatchNorm(child.num_features, groups, child.affine)
            split.load_state_dict(child.state_dict())
            for new, old in zip(split.parameters(), child.parameters()):
                new.requires_grad_(old.requires_grad)          # the key encoder's stay frozen
            setattr(module, name, split)
        else:
            split_batchnorm(child, groups)
    return module


class MoCo(nn.Module):
    def __init__(self, backbone, hidden, out, version=2):
        super().__init__()
        self.encoder_q = nn.Sequential(backbone, common.mlp([backbone.dim, hidden, out]))  # f_q: x -> q (N, D)
        # v3 adds a predictor on the query side only, BYOL-style; v2 has none.
        self.predictor = common.mlp([out, hidden, out]) if version == 3 else nn.Identity()
        # f_k starts as a copy of f_q and moves only through ema_update: no optimizer sees it.
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)

    @property
    def backbone(self):
        return self.encoder_q[0]

    def forward(self, x_q, x_k):
        """Queries (N, D) of x_q and keys (N, D) of x_k; row i of each is the same image."""
        q = self.predictor(self.encoder_q(x_q))                # (N, D)
        with torch.no_grad():
            # Shuffle the keys across the BatchNorm groups (see SplitBatchNorm), then undo it.
            perm = torch.randperm(x_k.shape[0], device=x_k.device)
            k = self.encoder_k(x_k[perm])                      # (N, D), rows in shuffled order
            k = k[torch.argsort(perm)]                         # (N, D), row i is image i again
        return q, k


class KeyQueue:
    """The dictionary of negatives: a FIFO of the K most recent L2-normalised keys. A fixed
    tensor (K, D) and a pointer to the oldest row; a push overwrites the oldest rows,
    wrapping around the end. Nothing is ever reallocated or copied wholesale."""

    def __init__(self, size, dim, device):
        # Random unit vectors to start with: the first K/N steps see random negatives.
        self.keys = F.normalize(torch.randn(size, dim, device=device), dim=1)   # (K, D)
        self.ptr = 0                                           # a Python int: no device sync to move it

    def push(self, k):
        """Enqueue the batch of keys k (N, D), dequeuing the N oldest."""
        k = F.normalize(k.detach().float(), dim=1)
        K, n = self.keys.shape[0], k.shape[0]
        if n >= K:                                             # only the newest K survive
            self.keys.copy_(k[n - K:])
            self.ptr = 0
            return
        first = min(n, K - self.ptr)                           # rows up to the end of the tensor
        self.keys[self.ptr:self.ptr + first] = k[:first]
        self.keys[:n - first] = k[first:]                      # the rest wraps to the start
        self.ptr = (self.ptr + n) % K

    def oldest_first(self):
        return torch.roll(self.keys, -self.ptr, 0)             # (K, D) in FIFO order

    def state(self):
        return {"queue": self.keys, "queue_ptr": self.ptr}

    def load(self, state):
        self.keys.copy_(state["queue"])
        self.ptr = int(state["queue_ptr"])


# ============================================================================================
# The loss
# ============================================================================================

def moco_loss(q, k, queue, temperature):
    """InfoNCE of the paper's eq. (1): q (N, D) queries, k (N, D) their positive keys,
    queue (K, D) the negatives. All are L2-normalised here.

        L_q = -log  exp(q.k+ / tau)  /  ( exp(q.k+ / tau) + sum_{i=1..K} exp(q.k_i / tau) )

    a (K+1)-way classification whose right answer is always candidate 0, the positive."""
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    queue = F.normalize(queue.float(), dim=1)
    l_pos = (q * k).sum(1, keepdim=True)                       # (N, 1): q . k+
    l_neg = q @ queue.T                                        # (N, K): q . k_i
    logits = torch.cat([l_pos, l_neg], 1) / temperature        # logits: N x (1+K)
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)   # the positive is index 0
    return F.cross_entropy(logits, labels)


def moco_v3_loss(q, k, temperature):
    """MoCo v3: the negatives of q_i are the other keys of the batch; q, k (N, D).

        L = 2 tau * mean_i  -log  exp(q_i.k_i / tau) / sum_j exp(q_i.k_j / tau)

    The factor 2 tau is the paper's: it makes the gradient's scale independent of tau."""
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    logits = q @ k.T / temperature                             # (N, N); the positives on the diagonal
    labels = torch.arange(q.shape[0], device=q.device)
    return 2 * temperature * F.cross_entropy(logits, labels)


# ============================================================================================
# One training step
# ============================================================================================

def train_step(model, optimizer, queue, x1, x2, args, run):
    """Symmetric: both views in one batch as queries (x1 then x2) and, in the opposite order,
    as keys, so row i of the keys is the positive of row i of the queries. The mean of
    moco_loss over those 2N rows is exactly the mean of the two one-way losses."""
    # The slow teacher moves first, towards the current f_q, then makes this step's keys.
    common.ema_update(model.encoder_k, model.encoder_q, args.momentum)
    if args.symmetric or args.version == 3:
        x_q, x_k = torch.cat([x1, x2]), torch.cat([x2, x1])   # (2N, 3, H, W) each
    else:
        x_q, x_k = x1, x2
    with run.autocast():
        q, k = model(x_q, x_k)                                 # (2N, D) or (N, D)
        if args.version == 3:                                  # each view against its own batch
            loss = sum(moco_v3_loss(qa, ka, args.temperature) for qa, ka in zip(q.chunk(2), k.chunk(2))) / 2
        else:
            loss = moco_loss(q, k, queue.keys, args.temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if args.version == 2:
        queue.push(k)                                          # after the loss: never its own negative
    return loss, q[:x1.shape[0]]


# ============================================================================================
# main
# ============================================================================================

def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.momentum < 1:
        raise common.UserError(f"--momentum {args.momentum}: must be in [0, 1).")
    rows = args.batch_size * (2 if args.symmetric else 1)
    if args.version == 2 and rows % args.bn_splits:
        raise common.UserError(f"--bn-splits {args.bn_splits} must divide the {rows} images the encoder sees "
                               f"per step (--batch-size {args.batch_size}).")
    run = common.Run(args, "moco", parser)

    backbone = common.build_backbone(args.arch, run.data.image_size, args.width, args.patch_size)
    model = MoCo(backbone, args.proj_hidden, args.proj_dim, args.version)
    if args.version == 2 and args.bn_splits > 1:
        model = split_batchnorm(model, args.bn_splits)        # both encoders, backbone and projector
    model = run.prepare(model)
    queue = KeyQueue(args.queue_size, args.proj_dim, run.device)
    base_lr = args.lr * args.batch_size / 256
    optimizer = common.make_optimizer(model, args.optimizer, base_lr, args.weight_decay)
    extra = run.start(model, optimizer, model.backbone)
    if extra:
        queue.load(extra)
    augment = common.simclr_augment(run.stats, run.data.image_size, args.min_scale)
    run.save_views([augment])
    forward = run.compiled(model)

    for epoch in range(run.start_epoch, args.epochs):
        for step, x in run.batches(epoch):                     # x: (B, 3, H, W) uint8
            common.set_lr(optimizer, common.cosine_lr(step, run.total_steps,
                                                      args.warmup_epochs * run.steps_per_epoch, base_lr))
            x1, x2 = augment(x), augment(x)                    # (B, 3, H, W) fp32 each
            loss, z = train_step(forward, optimizer, queue, x1, x2, args, run)
            run.log_step(loss, z)
        run.end_epoch(epoch, queue.state())

    x = run.data.train_x[:args.batch_size]
    x1, x2 = augment(x), augment(x)
    run.finish(bench_step=lambda: train_step(forward, optimizer, queue, x1, x2, args, run))


if __name__ == "__main__":
    common.run_main(main)
