"""DINO: self-distillation with no labels.

The idea (Caron et al. 2021, arXiv 2104.14294): a student network is trained to output the
same probability distribution over K "prototypes" as a teacher network, for different crops
of one image. The teacher is an exponential moving average of the student (no gradient) and
sees only the two large global crops; the student also sees small local crops, so it must
infer the whole from a part ("local-to-global"). No negatives: two operations on the
teacher's output keep it from collapsing, and they pull in opposite directions:

    centering    subtract a running mean c of the teacher's logits: no prototype may dominate
                 (alone, this would push towards the uniform distribution)
    sharpening   a low teacher temperature T_t (0.04): the distribution must be peaked
                 (alone, this would push towards one prototype for every image)

The lecture's pieces:
    1. multi-crop          2 global crops + M local crops, student only        (dino_augments)
    2. student g_s         backbone + DINO head (MLP, L2-normalised bottleneck, weight-normalised
                           last layer to K outputs), P_s = softmax(g_s(x) / T_s)   (DINOHead)
    3. teacher g_t         the same, theta_t <- m theta_t + (1 - m) theta_s      (train_step)
    4. loss                sum over pairs of H(P_t(global j), P_s(crop i)), i != j   (dino_loss)
    5. attention maps      a ViT's last-block [CLS] attention, per head: attention.png
                           (last_attention); scored against true masks by make exp-attention

Two recipes, picked by --arch (RECIPES below; docs/recipes.md): the paper's for a ViT (AdamW,
a 3-layer head, 6 local crops, T_t rising to 0.07, EMA rising to 1) and lightly's CIFAR-10
benchmark for a ResNet (SGD, a 2-layer head with BatchNorm, no local crops, T_t 0.04 and EMA
0.99 throughout). Any flag given on the command line wins.

Notation: B batch, K prototypes (head outputs), S student crops (2 + M), L patches.

Run:
    make demo METHOD=dino                                   # shapes on a CPU: see the Makefile's DEMO_dino
    make exp-attention                                      # a ViT's attention maps against the true masks
    python dino.py --arch resnet18 --epochs 200             # CIFAR-10, one GPU, lightly's recipe
    python dino.py --epochs 200                             # CIFAR-10, one GPU, ViT-Tiny/4, the paper's
    torchrun --standalone --nproc-per-node 4 dino.py --epochs 200   # the same on 4 GPUs (README, "Several GPUs")

Results: README.md, "A demo per method"; docs/results.md.
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
# Two recipes, picked by the backbone; a flag given on the command line always wins.
#   ViT     the paper's: the official main_dino.py with its README's ViT-S command (300 epochs),
#           with CIFAR-sized crops and head (4096 prototypes, 6 local crops of half the side).
#   ResNet  lightly's CIFAR-10 benchmark (benchmarks/cifar10_benchmark.py, DINOModel, 200
#           epochs): SGD, a 2-layer head with BatchNorm, 2048 prototypes, a sharp teacher (T_t
#           0.04) on a fast EMA (0.99), two global crops and nothing else. The official README's
#           ResNet-50 command is also SGD (0.03 per 256, weight decay 1e-4) with T_t 0.04.
#           The ViT recipe on a ResNet never left the uniform output (loss log K) here in forty
#           tries, and its teacher alone (T_t rising to 0.07, EMA rising from 0.996 to 1) stops
#           the ResNet recipe from learning in a short run: docs/notes.md, "DINO".
#           A short run (the `shapes` demo, the laptop budget) passes --out-dim 256 --teacher-temp
#           0.02: with 2048 prototypes and T_t 0.04 the teacher stays near the uniform output
#           (loss near log K) for hundreds of steps; a sharper teacher over fewer prototypes
#           sharpens in the first epoch (docs/notes.md, "DINO"). Not the default, which is
#           lightly's recipe for 200 epochs, where it has not been measured.
# Departures from both: biases and norm parameters get no weight decay (main_dino.py's rule;
# lightly decays them), and the cosine ends at 1e-6 (lightly's at 0).
# ============================================================================================

class ByArch:
    """The default of a flag whose value depends on --arch (RECIPES); shown as such in --help."""

    def __repr__(self):
        return "by --arch"
    __str__ = __repr__


BY_ARCH = ByArch()

RECIPES = {
    #                         ViT (the paper)   ResNet (lightly's CIFAR-10)
    "optimizer":            ("adamw",          "sgd"),
    "lr":                   (5e-4,             0.12),    # per 256 images; lightly: 0.06 per 128
    "weight_decay":         (0.04,             5e-4),
    "weight_decay_end":     (0.4,              5e-4),    # the ResNet's stays constant
    "momentum":             (0.996,            0.99),    # teacher EMA at step 0 ...
    "momentum_end":         (1.0,              0.99),    # ... and at the end (lightly: fixed)
    "teacher_temp":         (0.07,             0.04),
    "warmup_teacher_temp":  (0.04,             0.04),
    "local_crops":          (6,                0),
    "clip_grad":            (3.0,              0.0),
    "head_layers":          (3,                2),       # lightly: "use only 2 layers for cifar10"
    "head_bn":              (False,            True),
    "out_dim":              (4096,             2048),
}
# Schedule lengths in epochs of the recipe's length (RECIPE_EPOCHS); a shorter run gets the same
# fraction of itself (common.scaled_epochs), a flag given is taken as it is.
RECIPE_EPOCHS = (300, 200)
SCHEDULES = {
    "warmup_epochs":              (10, 0),     # LR warmup; lightly has none
    "warmup_teacher_temp_epochs": (30, 0),     # T_t's rise; lightly's T_t is 0.04 throughout
    "freeze_last_layer":          (1, 0),      # prototypes frozen; lightly never freezes them
}


def recipe_column(arch):
    """0 for a ViT (the paper's recipe), 1 for a ResNet (lightly's)."""
    return 1 if arch.startswith("resnet") else 0


def resolve_recipe(args):
    """Fill every flag still at BY_ARCH from the recipe of args.arch's family. The global crops'
    smallest area: 0.4 (both recipes), 0.14 for a ViT without local crops (the official README's
    advice for that case)."""
    col = recipe_column(args.arch)
    for name, values in RECIPES.items():
        if getattr(args, name, BY_ARCH) is BY_ARCH:
            setattr(args, name, values[col])
    if args.min_scale is BY_ARCH:
        args.min_scale = 0.14 if col == 0 and not args.local_crops else 0.4
    return args


def make_parser():
    p = common.make_parser("DINO self-supervised pretraining. Flags shown 'by --arch' take the paper's ViT "
                           "recipe with a ViT and lightly's CIFAR-10 ResNet recipe with a ResNet "
                           "(dino.py: RECIPES; docs/recipes.md).", arch="vit_tiny")
    group = p.add_argument_group("DINO")
    by = lambda vit, resnet: f"; ViT {vit} (the paper), ResNet {resnet} (lightly's CIFAR-10)"
    group.add_argument("--epochs", type=common.positive_int, default=200, help="passes over the training set")
    group.add_argument("--batch-size", type=common.positive_int, default=512, help="images per step")
    group.add_argument("--lr", type=common.positive_float, default=BY_ARCH,
                       help="base learning rate per 256 images (scaled linearly with --batch-size)" + by(5e-4, 0.12))
    group.add_argument("--optimizer", default=BY_ARCH, choices=["adamw", "sgd", "lars"], help="optimizer" + by("adamw", "sgd"))
    group.add_argument("--weight-decay", type=common.nonneg_float, default=BY_ARCH,
                       help="weight decay at the start ..." + by(0.04, 5e-4))
    group.add_argument("--weight-decay-end", type=common.nonneg_float, default=BY_ARCH,
                       help="... moving to this on a cosine" + by(0.4, 5e-4))
    group.add_argument("--warmup-epochs", type=common.nonneg_float, default=None,
                       help="linear LR warmup in epochs (default: the recipe's, scaled to a shorter run, >= 1)"
                            + by("10 of 300", "none"))
    group.add_argument("--momentum", type=common.ema_momentum, default=BY_ARCH,
                       help="teacher's EMA momentum at step 0 ..." + by(0.996, 0.99))
    group.add_argument("--momentum-end", type=common.fraction, default=BY_ARCH,
                       help="... rising to this on a cosine" + by(1.0, 0.99))
    group.add_argument("--student-temp", type=common.positive_float, default=0.1, help="T_s (both recipes)")
    group.add_argument("--teacher-temp", type=common.positive_float, default=BY_ARCH,
                       help="T_t after the warmup" + by(0.07, 0.04))
    group.add_argument("--warmup-teacher-temp", type=common.positive_float, default=BY_ARCH,
                       help="T_t at step 0: a very sharp teacher early on keeps the start from collapsing" + by(0.04, 0.04))
    group.add_argument("--warmup-teacher-temp-epochs", type=common.nonneg_float, default=None,
                       help="epochs of linear rise to --teacher-temp (default: the recipe's, scaled to a shorter "
                            "run)" + by("30 of 300", "none"))
    group.add_argument("--center-momentum", type=common.ema_momentum, default=0.9, help="EMA momentum of the centre c")
    group.add_argument("--local-crops", type=common.nonneg_int, default=BY_ARCH,
                       help="M small crops per image, student only (each costs a forward and backward)" + by(6, 0))
    group.add_argument("--local-size", type=common.positive_int, default=None,
                       help="local crop side in pixels (default: half of --image-size; the paper's 96 of 224)")
    group.add_argument("--min-scale", type=common.fraction, default=BY_ARCH,
                       help="smallest area of a global crop, as a fraction of the image; both recipes 0.4, "
                            "a ViT without local crops 0.14 (the official README)")
    group.add_argument("--clip-grad", type=common.nonneg_float, default=BY_ARCH,
                       help="max grad norm per tensor (0: off)" + by(3.0, "off"))
    group.add_argument("--drop-path", type=common.nonneg_float, default=0.1, help="stochastic depth, student ViT only")
    group.add_argument("--freeze-last-layer", type=common.nonneg_float, default=None,
                       help="epochs with the head's last layer frozen (default: the recipe's, scaled to a shorter "
                            "run)" + by("1 of 300", "none"))
    group.add_argument("--head-layers", type=common.positive_int, default=BY_ARCH,
                       help="Linear layers of the head's MLP, the bottleneck's included" + by(3, 2))
    group.add_argument("--head-bn", action=argparse.BooleanOptionalAction, default=BY_ARCH,
                       help="BatchNorm after each hidden layer of the head" + by("no", "yes"))
    group.add_argument("--head-hidden", type=common.positive_int, default=2048, help="head MLP width (both recipes)")
    group.add_argument("--head-bottleneck", type=common.positive_int, default=256, help="L2-normalised bottleneck")
    group.add_argument("--out-dim", type=common.positive_int, default=BY_ARCH,
                       help="K prototypes (the paper's ImageNet head: 65536)" + by(4096, 2048))
    group.add_argument("--norm-last-layer", action=argparse.BooleanOptionalAction, default=True,
                       help="every prototype's length fixed at 1, the logits cosines (main_dino.py's and lightly's "
                            "default)")
    return p


# ============================================================================================
# Augmentation: multi-crop
# ============================================================================================

def dino_augments(mean_std, size, local_size, min_scale=0.4):
    """The paper's DataAugmentationDINO. Both global views: crops of min_scale-100% of the area,
    flip, colour jitter 0.4, 0.4, 0.2, 0.1 with p 0.8, grayscale p 0.2; blur p 1.0 on the
    first, p 0.1 and solarisation p 0.2 on the second. Local views: crops of 5-40% at
    local_size, blur p 0.5. Blur only above 32 px: every CIFAR recipe (lightly's, solo-learn's)
    drops it, since a 32 px image is already about as blurred as a 224 px one after the blur."""
    blur = lambda p: p if size > 32 else 0.0
    view = lambda crop_size, scale, blur_p, solarize_p=0.0: common.Augment(
        crop_size, scale=scale, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=blur(blur_p),
        solarize_p=solarize_p, mean=mean_std[0], std=mean_std[1])
    return (view(size, (min_scale, 1.0), 1.0), view(size, (min_scale, 1.0), 0.1, 0.2),
            view(local_size, (0.05, 0.4), 0.5))


# ============================================================================================
# Model: DINO head, then student and teacher
# ============================================================================================

class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised linear layer: logit k is g_k times the
    cosine of the bottleneck and prototype k, g_k fixed at 1 with norm_last_layer, else trained.
    The MLP has `layers` Linear layers (in -> hidden -> ... -> bottleneck), GELU between them,
    and with batch_norm a BatchNorm after each hidden one: the paper's ViT head has 3 layers
    without, lightly's CIFAR-10 ResNet head 2 layers with."""

    def __init__(self, in_dim, hidden, bottleneck, out_dim, norm_last_layer=True, layers=3, batch_norm=False):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        mods = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods += [nn.BatchNorm1d(dims[i + 1]), nn.GELU()] if batch_norm else [nn.GELU()]
        self.mlp = nn.Sequential(*mods)
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
    def __init__(self, backbone, hidden, bottleneck, out_dim, norm_last_layer=True, head_layers=3, head_bn=False):
        super().__init__()
        self.student = nn.Sequential(backbone, DINOHead(backbone.dim, hidden, bottleneck, out_dim, norm_last_layer,
                                                        head_layers, head_bn))
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
    """c <- m c + (1 - m) mean_b g_t(x_b), over both global crops; teacher_out (2, B, K). On
    several processes the mean is over every process's crops (the official code's all_reduce),
    so that the centre stays the same everywhere."""
    return center * momentum + common.all_mean(teacher_out.float().mean((0, 1))) * (1 - momentum)


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

def train_step(model, optimizer, global_crops, local_crops, teacher_temp, momentum, args, amp,
               freeze_last_layer=False):
    """Returns the loss and the student's logits for the first global crops (for the collapse
    monitor). The teacher and the centre follow the student after the step."""
    B = global_crops.shape[0] // 2
    with amp:
        s, t = model(global_crops, local_crops)                # (S*B, K), (2B, K)
        s = s.view(-1, B, s.shape[-1])                         # (S, B, K)
        t = t.view(2, B, t.shape[-1])                          # (2, B, K)
        loss = dino_loss(s, t, model.center, args.student_temp, teacher_temp)
    optimizer.zero_grad(set_to_none=True)
    amp.backward(loss)
    if args.clip_grad:
        amp.unscale(optimizer)                                 # fp16: clip the true gradients
        clip_gradients(model.student.parameters(), args.clip_grad)
    if freeze_last_layer:
        model.student[1].prototypes.grad = model.student[1].gain.grad = None   # the optimizer skips them
    amp.step(optimizer)
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
    args = resolve_recipe(common.parse_args(parser, argv, "dino"))
    local_size = args.local_size or max(1, args.image_size // 2)
    if args.local_crops and local_size > args.image_size:
        parser.error(f"--local-size {local_size} is larger than --image-size {args.image_size}")
    if args.arch.startswith("vit") and args.local_crops and local_size % args.patch_size:
        parser.error(f"--local-size {local_size} is not a multiple of --patch-size {args.patch_size}")
    run = common.Run(args, "dino")

    backbone = common.build_backbone(args.arch, run.data.image_size, args.width, args.patch_size, args.depth,
                                     drop_path=args.drop_path)
    model = common.to_device(DINO(backbone, args.head_hidden, args.head_bottleneck, args.out_dim, args.norm_last_layer,
                                  args.head_layers, args.head_bn), run.device)
    base_lr = args.lr * args.batch_size / 256
    optimizer = common.make_optimizer(common.param_groups(model, args.weight_decay), args.optimizer, base_lr)
    # Schedules, in steps: the recipe's length in epochs, or the same fraction of a shorter run.
    col = recipe_column(args.arch)
    steps = lambda name, at_least=0: common.scaled_epochs(
        getattr(args, name), SCHEDULES[name][col], RECIPE_EPOCHS[col], args.epochs, at_least) * run.steps_per_epoch
    warmup, warmup_temp, frozen = steps("warmup_epochs", at_least=1), steps("warmup_teacher_temp_epochs"), \
        steps("freeze_last_layer")
    teacher_backbone = model.teacher[0]                        # evaluated and exported: the better of the two
    run.start(model, optimizer, teacher_backbone)
    global1, global2, local = dino_augments(run.mean_std, run.data.image_size, local_size, args.min_scale)
    run.save_views([global1, global2, local] if args.local_crops else [global1, global2])
    train_model = run.wrap(model)

    for epoch in range(run.start_epoch, args.epochs):
        for step, idx in run.batches(epoch):                   # idx: this step's images, B (B/N on each of N processes)
            common.set_lr(optimizer, common.cosine_lr(step, run.total_steps, warmup, base_lr, final=1e-6))
            wd = common.cosine_schedule(step, run.total_steps, args.weight_decay, args.weight_decay_end)
            for group in optimizer.param_groups:               # the matrices' weight decay rises; 0 elsewhere
                group["weight_decay"] = wd if group["decay"] else 0.0
            temp = teacher_temperature(step, warmup_temp, args.warmup_teacher_temp, args.teacher_temp)
            momentum = common.cosine_schedule(step, run.total_steps, args.momentum, args.momentum_end)
            x = run.data.train_x[idx]                          # (B, 3, H, W) uint8, on the device
            global_crops = torch.cat([global1(x), global2(x)])   # (2B, 3, H, W)
            local_crops = local(x.repeat(args.local_crops, 1, 1, 1)) if args.local_crops else None   # (MB, 3, h, w)
            loss, s1 = train_step(train_model, optimizer, global_crops, local_crops, temp, momentum, args,
                                  run.amp, freeze_last_layer=step < frozen)
            run.log_step(loss, s1)
        run.end_epoch(epoch)

    if isinstance(teacher_backbone, common.ViT) and run.main:
        src = run.data.test_x if run.data.test_x is not None else run.data.train_x
        save_attention(teacher_backbone, src[:8], run.mean_std, run.out / "attention.png")
    run.finish()


if __name__ == "__main__":
    common.run_main(main)
