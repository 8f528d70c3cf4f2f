"""DINO: self-distillation with no labels, on a Vision Transformer.

The idea (Caron et al. 2021, arXiv 2104.14294): a student network is trained to output the
same probability distribution over K "prototypes" as a teacher network, for different crops
of one image. The teacher is an exponential moving average of the student (no gradient) and
sees only the two large global crops; the student also sees small local crops, so it must
infer the whole from a part ("local-to-global"). No negatives: two operations on the
teacher's output keep it from collapsing, and they pull in opposite directions:

    centering    subtract a running mean c of the teacher's logits: no prototype may dominate
                 (alone, this would push towards the uniform distribution)
    sharpening   a low teacher temperature (0.04 -> 0.07): the distribution must be peaked
                 (alone, this would push towards one prototype for every image)

The lecture's pieces:
    1. multi-crop          2 global crops at full size + M local crops      (dino_augments)
    2. student g_s         ViT-Tiny/4 + DINO head (MLP, L2-normalised bottleneck, weight-normalised
                           last layer to K outputs), P_s = softmax(g_s(x) / T_s)
    3. teacher g_t         the same, theta_t <- m theta_t + (1 - m) theta_s, m from 0.996 to 1
    4. loss                sum over pairs of H(P_t(global j), P_s(crop i)), i != j   (dino_loss)
    5. attention maps      the last block's [CLS] attention, per head: attention.png (last_attention)

Notation: B batch, K prototypes (head outputs), S student crops (2 + M), L patches.

Run:
    python dino.py --data shapes --image-size 16 --subset 2000 --epochs 5   # CPU smoke run
    python dino.py --epochs 200                                             # CIFAR-10, one GPU

Result: CIFAR-10 on a GPU not yet measured (no GPU was available to the session that wrote it).
"""

import argparse
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ============================================================================================
# Configuration
# Defaults follow the paper's ViT recipe (the official main_dino.py with its README's ViT-S
# command, 300 epochs; every value below) with CIFAR-sized crops and head (4096 prototypes, 6 local
# crops of half the image side) and main_dino.py's fixed last-layer norm (README says why).
# ============================================================================================

RECIPE_EPOCHS = 300             # the length of the cited recipe; shorter runs scale its schedules


def make_parser():
    p = common.make_parser("DINO self-supervised pretraining.", arch="vit_tiny")
    group = p.add_argument_group("DINO")
    group.add_argument("--epochs", type=common.positive_int, default=200, help="passes over the training set")
    group.add_argument("--batch-size", type=common.positive_int, default=512, help="images per step")
    group.add_argument("--lr", type=common.positive_float, default=5e-4,
                       help="base learning rate per 256 images (scaled linearly with --batch-size)")
    group.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "lars"], help="AdamW for ViTs (the paper)")
    group.add_argument("--weight-decay", type=common.nonneg_float, default=0.04, help="weight decay at the start ...")
    group.add_argument("--weight-decay-end", type=common.nonneg_float, default=0.4, help="... rising to it on a cosine")
    group.add_argument("--warmup-epochs", type=common.nonneg_float, default=None,
                       help="linear LR warmup in epochs (default: 10 of 300, scaled to a shorter run, >= 1)")
    group.add_argument("--momentum", type=common.ema_momentum, default=0.996, help="teacher's EMA momentum at step 0 (to 1)")
    group.add_argument("--student-temp", type=common.positive_float, default=0.1, help="T_s")
    group.add_argument("--teacher-temp", type=common.positive_float, default=0.07, help="T_t after the warmup")
    group.add_argument("--warmup-teacher-temp", type=common.positive_float, default=0.04,
                       help="T_t at step 0: a very sharp teacher early on keeps the start from collapsing")
    group.add_argument("--warmup-teacher-temp-epochs", type=common.nonneg_float, default=None,
                       help="epochs of linear rise to --teacher-temp (default: 30 of 300, scaled to a shorter run)")
    group.add_argument("--center-momentum", type=common.ema_momentum, default=0.9, help="EMA momentum of the centre c")
    group.add_argument("--local-crops", type=common.nonneg_int, default=6,
                       help="M small crops per image, student only (the paper's 8; each costs a forward and backward)")
    group.add_argument("--local-size", type=common.positive_int, default=None,
                       help="local crop side in pixels (default: half of --image-size; the paper's 96 of 224)")
    group.add_argument("--clip-grad", type=common.nonneg_float, default=3.0, help="max grad norm per tensor (0: off)")
    group.add_argument("--drop-path", type=common.nonneg_float, default=0.1, help="stochastic depth, student ViT only")
    group.add_argument("--freeze-last-layer", type=common.nonneg_float, default=None,
                       help="epochs with the head's last layer frozen (default: 1 of 300, scaled to a shorter run)")
    group.add_argument("--head-hidden", type=common.positive_int, default=2048, help="head MLP width")
    group.add_argument("--head-bottleneck", type=common.positive_int, default=256, help="L2-normalised bottleneck")
    group.add_argument("--out-dim", type=common.positive_int, default=4096, help="K prototypes (the paper: 65536)")
    group.add_argument("--norm-last-layer", action=argparse.BooleanOptionalAction, default=True,
                       help="every prototype's length fixed at 1, the logits cosines (main_dino.py's default)")
    return p


# ============================================================================================
# Augmentation: multi-crop
# ============================================================================================

def dino_augments(mean_std, size, local_size, local_crops):
    """The paper's DataAugmentationDINO. Both global views: crops of 40-100% of the area
    (14-100% when there are no local crops, as its README advises), flip, colour jitter
    0.4, 0.4, 0.2, 0.1 with p 0.8, grayscale p 0.2; blur p 1.0 on the first, p 0.1 and
    solarisation p 0.2 on the second. Local views: crops of 5-40% at local_size, blur p 0.5."""
    view = lambda crop_size, scale, blur_p, solarize_p=0.0: common.Augment(
        crop_size, scale=scale, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=blur_p,
        solarize_p=solarize_p, mean=mean_std[0], std=mean_std[1])
    global_scale = (0.4, 1.0) if local_crops else (0.14, 1.0)
    return (view(size, global_scale, 1.0), view(size, global_scale, 0.1, 0.2),
            view(local_size, (0.05, 0.4), 0.5))


# ============================================================================================
# Model: DINO head, then student and teacher
# ============================================================================================

class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised linear layer: logit k is g_k times the
    cosine of the bottleneck and prototype k, g_k fixed at 1 with norm_last_layer, else trained."""

    def __init__(self, in_dim, hidden, bottleneck, out_dim, norm_last_layer=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        # The prototypes start at PyTorch's Linear default, as the official last layer does: AdamW
        # moves every entry by about the LR per step, so smaller entries would turn them faster.
        bound = bottleneck ** -0.5
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck).uniform_(-bound, bound))   # (K, bottleneck)
        self.gain = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)   # g (K, 1), weight_g
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, h):                                      # (N, in_dim)
        x = F.normalize(self.mlp(h), dim=1)                    # (N, bottleneck) on the unit sphere
        return x @ (self.gain * F.normalize(self.prototypes, dim=1)).T   # (N, K)


class DINO(nn.Module):
    def __init__(self, backbone, hidden, bottleneck, out_dim, norm_last_layer=True):
        super().__init__()
        self.student = nn.Sequential(backbone, DINOHead(backbone.dim, hidden, bottleneck, out_dim, norm_last_layer))
        # The teacher starts as a copy and moves only through ema_update: no optimizer sees it.
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        if isinstance(backbone, common.ViT):
            self.teacher[0].set_drop_path(0.0)                 # stochastic depth is the student's alone
        # The centre c (K,): a buffer, so that state_dict (and every checkpoint) carries it.
        self.register_buffer("center", torch.zeros(out_dim))

    def forward(self, global_crops, local_crops=None):
        """global_crops (2B, 3, H, W), local_crops (MB, 3, h, w) or None, crop-major (every image's
        first crop, then every second, ...) -> student logits (S*B, K), teacher's (2B, K)."""
        s = [self.student(global_crops)]                       # (2B, K)
        if local_crops is not None:
            s.append(self.student(local_crops))                # (MB, K): a second pass, a smaller size
        with torch.no_grad():
            t = self.teacher(global_crops)                     # (2B, K)
        return torch.cat(s), t


# ============================================================================================
# The loss
# ============================================================================================

def dino_loss(student_out, teacher_out, center, student_temp, teacher_temp):
    """student_out (S, B, K) logits for S crops, teacher_out (2, B, K) for the two global
    crops; student crop i in {0, 1} is the same view as teacher crop i. center (K,).

        P_t = softmax((g_t - c) / T_t)       centred, sharpened, no gradient
        P_s = softmax(g_s / T_s)
        L   = mean over pairs (j teacher, i student, i != j) of  mean_b  H(P_t[j, b], P_s[i, b])

    with H(p, q) = -sum_k p_k log q_k, the cross-entropy. In fp32 with autocast off: at
    T_t = 0.04 a bf16 logit is off by up to 0.05 after the division."""
    S = student_out.shape[0]
    with torch.autocast(student_out.device.type, enabled=False):
        p_t = F.softmax((teacher_out.float() - center) / teacher_temp, dim=-1).detach()   # (2, B, K)
        log_p_s = F.log_softmax(student_out.float() / student_temp, dim=-1)               # (S, B, K)
        ce = -torch.einsum("jbk,ibk->jib", p_t, log_p_s).mean(-1)   # (2, S): H averaged over the batch
        same_view = torch.eye(2, S, dtype=torch.bool, device=ce.device)   # teacher j vs student j
        return ce[~same_view].mean()


@torch.no_grad()
def update_center(center, teacher_out, momentum):
    """c <- m c + (1 - m) mean_b g_t(x_b), over both global crops; teacher_out (2, B, K)."""
    return center * momentum + teacher_out.float().mean((0, 1)) * (1 - momentum)


def teacher_temperature(step, warmup_steps, start, end):
    """Linear from `start` to `end` over the warmup, then constant."""
    return end if step >= warmup_steps else start + (end - start) * step / warmup_steps


@torch.no_grad()
def clip_gradients(params, max_norm):
    """The paper's clipping: each tensor's gradient on its own (not one norm over all) to a norm <= max_norm."""
    grads = [p.grad for p in params if p.grad is not None]
    torch._foreach_mul_(grads, [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in torch._foreach_norm(grads)])


# ============================================================================================
# One training step
# ============================================================================================

def train_step(model, optimizer, global_crops, local_crops, teacher_temp, momentum, args, autocast,
               freeze_last_layer=False):
    """Returns the loss and the student's logits for the first global crops (for the collapse
    monitor). The teacher and the centre follow the student after the step."""
    B = global_crops.shape[0] // 2
    with autocast:
        s, t = model(global_crops, local_crops)                # (S*B, K), (2B, K)
        s = s.view(-1, B, s.shape[-1])                         # (S, B, K)
        t = t.view(2, B, t.shape[-1])                          # (2, B, K)
        loss = dino_loss(s, t, model.center, args.student_temp, teacher_temp)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if args.clip_grad:
        clip_gradients(model.student.parameters(), args.clip_grad)
    if freeze_last_layer:
        model.student[1].prototypes.grad = model.student[1].gain.grad = None   # the optimizer skips them
    optimizer.step()
    common.ema_update(model.teacher, model.student, momentum)
    model.center.copy_(update_center(model.center, t, args.center_momentum))
    return loss, s[0]


# ============================================================================================
# Pictures
# ============================================================================================

@torch.no_grad()
def last_attention(vit, x):
    """Attention weights of the ViT's last block, softmax(q k^T / sqrt(d)) (B, heads, 1 + L, 1 + L),
    rebuilt from its qkv projection (the fused kernel of the forward pass never forms them)."""
    h = vit.embed(x)
    for blk in vit.blocks[:-1]:
        h = blk(h)
    blk, (B, L, D) = vit.blocks[-1], h.shape
    q, k, _ = blk.attn.qkv(blk.norm1(h)).view(B, L, 3, blk.attn.heads, -1).permute(2, 0, 3, 1, 4)   # (B, heads, L, d)
    return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)   # (B, heads, L, L)


@torch.no_grad()
def save_attention(vit, images, mean_std, path):
    """attention.png: per image, per head of the last block, the [CLS] token's attention over the
    patches laid over the image (bright = attended). Without labels, heads come to find the object."""
    was_training = vit.training
    vit.eval()
    x = common.normalize_images(images.float() / 255, *mean_std)
    attn = last_attention(vit, x)[:, :, 0, 1:].float()         # (n, heads, L): [CLS] -> each patch
    n, heads, L = attn.shape
    g, S = math.isqrt(L), images.shape[-1]
    maps = (attn / attn.amax(-1, keepdim=True)).reshape(n * heads, 1, g, g)   # each map on [0, 1]
    maps = F.interpolate(maps, size=(S, S), mode="bilinear", align_corners=False).clamp(0, 1).view(n, heads, 1, S, S)
    heat = torch.cat([maps.mul(2).clamp(max=1), maps.mul(2).sub(1).clamp(min=0), torch.zeros_like(maps)], 2)
    img = images.float().div(255).unsqueeze(1)                 # (n, 1, 3, S, S)
    grid = torch.cat([img, 0.35 * img + 0.65 * heat], 1)       # (n, 1 + heads, 3, S, S): overlays black-red-yellow
    common.save_grid((grid * 255).round().byte().cpu(), path, scale=4)
    vit.train(was_training)


# ============================================================================================
# main
# ============================================================================================

def main(argv=None):
    parser = make_parser()
    args = common.parse_args(parser, argv, "dino")
    local_size = args.local_size or max(1, args.image_size // 2)
    if args.local_crops and local_size > args.image_size:
        parser.error(f"--local-size {local_size} is larger than --image-size {args.image_size}")
    if args.arch.startswith("vit") and args.local_crops and local_size % args.patch_size:
        parser.error(f"--local-size {local_size} is not a multiple of --patch-size {args.patch_size}")
    run = common.Run(args, "dino")

    backbone = common.build_backbone(args.arch, run.data.image_size, args.width, args.patch_size, args.depth,
                                     drop_path=args.drop_path)
    model = common.to_device(DINO(backbone, args.head_hidden, args.head_bottleneck, args.out_dim, args.norm_last_layer),
                             run.device)
    base_lr = args.lr * args.batch_size / 256
    optimizer = common.make_optimizer(common.param_groups(model, args.weight_decay), args.optimizer, base_lr)
    # Schedules, in steps: the recipe's length in epochs, or the same fraction of a shorter run.
    steps = lambda flag, value, at_least=0: \
        common.scaled_epochs(flag, value, RECIPE_EPOCHS, args.epochs, at_least) * run.steps_per_epoch
    warmup, warmup_temp, frozen = steps(args.warmup_epochs, 10, at_least=1), \
        steps(args.warmup_teacher_temp_epochs, 30), steps(args.freeze_last_layer, 1)
    teacher_backbone = model.teacher[0]                        # evaluated and exported: the better of the two
    run.start(model, optimizer, teacher_backbone)
    global1, global2, local = dino_augments(run.mean_std, run.data.image_size, local_size, args.local_crops)
    run.save_views([global1, global2, local])
    train_model = torch.compile(model) if args.compile else model

    for epoch in range(run.start_epoch, args.epochs):
        for step, idx in run.batches(epoch):                   # idx: (B,) this step's images
            common.set_lr(optimizer, common.cosine_lr(step, run.total_steps, warmup, base_lr, final=1e-6))
            wd = common.cosine_schedule(step, run.total_steps, args.weight_decay, args.weight_decay_end)
            for group in optimizer.param_groups:               # the matrices' weight decay rises; 0 elsewhere
                group["weight_decay"] = wd if group["decay"] else 0.0
            temp = teacher_temperature(step, warmup_temp, args.warmup_teacher_temp, args.teacher_temp)
            momentum = common.cosine_schedule(step, run.total_steps, args.momentum, 1.0)
            x = run.data.train_x[idx]                          # (B, 3, H, W) uint8, on the device
            global_crops = torch.cat([global1(x), global2(x)])   # (2B, 3, H, W)
            local_crops = local(x.repeat(args.local_crops, 1, 1, 1)) if args.local_crops else None   # (MB, 3, h, w)
            loss, s1 = train_step(train_model, optimizer, global_crops, local_crops, temp, momentum, args,
                                  run.autocast, freeze_last_layer=step < frozen)
            run.log_step(loss, s1)
        run.end_epoch(epoch)

    if isinstance(teacher_backbone, common.ViT):
        src = run.data.test_x if run.data.test_x is not None else run.data.train_x
        save_attention(teacher_backbone, src[:8], run.mean_std, run.out / "attention.png")
    run.finish()


if __name__ == "__main__":
    common.run_main(main)
