"""MAE: masked autoencoders, the ViT learns by filling in the 75% of an image it cannot see.

The idea (He et al. 2021, arXiv 2111.06377): cut the image into patches, hide a random 75%
of them, encode only the visible 25% with a ViT, and let a small decoder reconstruct the
pixels of the hidden ones. Why 75%: images are spatially redundant, so with few patches
hidden a neighbour's pixels give the answer away; with most hidden, the model must
understand the object to fill it in. Why "encoder sees only visible patches": the encoder,
the big network, then processes a quarter of the tokens (attention cost falls ~16x, the
rest ~4x), and the mask token never enters it, so there is no train/test mismatch.

    1. patchify           image (B, 3, H, W) -> patches (B, L, p*p*3)          (patchify)
    2. random masking     keep a random 25% per image                     (random_masking)
    3. encoder            ViT-Tiny on the visible patches only (+ [CLS])
    4. decoder            narrow, shallow ViT on visible latents + a shared mask token at
                          every hidden position, with its own positional embeddings
    5. loss               MSE between predicted and true pixels, on masked patches only,
                          each patch's pixels normalised by its own mean/std (--norm-pix-loss)

Evaluation tells the lecture's story, "same architecture, same fine-tuning, the gap is the
recipe": kNN and a linear probe of the encoder, then fine-tuning the pretrained encoder and the
same ViT from random init with the same budget (common.fine_tune); all in summary.json.

Notation: B batch, L patches per image, p patch side, D widths.

Run:
    make demo METHOD=mae      # CPU, built-in shapes, a few minutes; the same as
    python mae.py --data shapes --image-size 16 --patch-size 4 --depth 4 --decoder-depth 2 --lr 1e-3 \
        --batch-size 256 --epochs 20 --finetune-epochs 0 --eval-every 5
    python mae.py             # CIFAR-10 on one GPU: the defaults are the recipe (ViT-Tiny/4, batch 512)
    torchrun --standalone --nproc-per-node 4 mae.py   # the same run on 4 GPUs (README, "Several GPUs")
    make exp-mask-ratio       # the mask ratio, probed and fine-tuned

Results: README.md, "A demo per method" (the demo; its figures are in results/demos.json)
and docs/results.md; the CIFAR-10 recipe on a GPU is not measured yet.
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
# Defaults follow the paper's pretraining recipe (Sec. A.1 and the official main_pretrain.py:
# AdamW 1.5e-4 per 256 images, betas 0.9/0.95, weight decay 0.05, 800 epochs with 40 of
# warmup, 75% masking, normalised-pixel targets, fixed sine-cosine positions, xavier init)
# with a CIFAR-sized decoder, and its fine-tuning recipe for the evaluation.
# ============================================================================================

RECIPE_EPOCHS = 800             # the length of the cited recipe; shorter runs scale its schedules

def make_parser():
    p = common.make_parser("MAE self-supervised pretraining.", arch="vit_tiny")
    group = p.add_argument_group("MAE")
    group.add_argument("--epochs", type=common.positive_int, default=200, help="passes over the training set")
    group.add_argument("--batch-size", type=common.positive_int, default=512, help="images per step")
    group.add_argument("--lr", type=common.positive_float, default=1.5e-4,
                       help="base learning rate per 256 images (scaled linearly with --batch-size)")
    group.add_argument("--weight-decay", type=common.nonneg_float, default=0.05, help="AdamW weight decay on matrices")
    group.add_argument("--warmup-epochs", type=common.nonneg_float, default=None,
                       help="linear LR warmup, in epochs (default: the recipe's 40 of 800, the same fraction "
                            "of a shorter run, but at least one epoch)")
    group.add_argument("--mask-ratio", type=float, default=0.75,
                       help="fraction of patches hidden, in (0, 1); the paper's sweet spot is 0.75")
    group.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True,
                       help="targets are each patch's pixels normalised by that patch's mean and std "
                            "(the paper: better representations); --no-norm-pix-loss predicts raw pixels")
    group.add_argument("--decoder-dim", type=common.positive_int, default=128, help="decoder width")
    group.add_argument("--decoder-depth", type=common.positive_int, default=4, help="decoder blocks")
    group.add_argument("--decoder-heads", type=common.positive_int, default=4, help="decoder attention heads")
    group.add_argument("--finetune-epochs", type=common.nonneg_int, default=100,
                       help="after pretraining, fine-tune the encoder and a from-scratch ViT for this many "
                            "epochs each (0: skip)")
    group.add_argument("--finetune-lr", type=common.positive_float, default=1e-3,
                       help="fine-tuning AdamW learning rate per 256 images (the paper's base rate)")
    p.set_defaults(linear_probe=True)                          # part of MAE's story: on by default
    return p


# ============================================================================================
# Model pieces: patches, masking, encoder, decoder
# ============================================================================================

def patchify(imgs, p):
    """(B, C, H, W) -> (B, L, p*p*C), patches in row-major order, each flattened as (p, p, C)."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)                         # (B, C, h, p, w, p)
    x = x.permute(0, 2, 4, 3, 5, 1)                            # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)                      # (B, L, p*p*C)


def unpatchify(x, p, channels=3):
    """(B, L, p*p*C) -> (B, C, H, W): the inverse of patchify (square images)."""
    B, L, _ = x.shape
    h = w = int(round(L ** 0.5))
    x = x.reshape(B, h, w, p, p, channels)                     # (B, h, w, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)                            # (B, C, h, p, w, p)
    return x.reshape(B, channels, h * p, w * p)


def random_masking(x, mask_ratio):
    """Keep a random subset of the tokens x (B, L, D) of each sample, independently per sample.

    Per-sample uniform noise is sorted: the argsort is a random shuffle of the L positions.
    Small noise is keep, large is remove: the first int(L (1 - mask_ratio)) of the shuffle are
    kept. Returns x_kept (B, L_keep, D); mask (B, L) in the original order, 1 = masked,
    0 = visible; ids_restore (B, L), the inverse of the shuffle, with which the decoder puts
    the visible latents and the mask tokens back in place."""
    B, L, D = x.shape
    keep = int(L * (1 - mask_ratio))
    noise = torch.rand(B, L, device=x.device)                  # (B, L)
    ids_shuffle = torch.argsort(noise, dim=1)                  # (B, L): ascending, small first
    ids_restore = torch.argsort(ids_shuffle, dim=1)            # (B, L): where each position went
    ids_keep = ids_shuffle[:, :keep]                           # (B, L_keep)
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))   # (B, L_keep, D)
    mask = torch.ones(B, L, device=x.device)
    mask[:, :keep] = 0                                         # in shuffled order: visible first
    mask = torch.gather(mask, 1, ids_restore)                  # (B, L) in the original order
    return x_kept, mask, ids_restore


def sincos_positions(dim, grid):
    """Fixed 2-D sine-cosine positional embeddings (1, 1 + grid*grid, dim), [CLS] first (all
    zeros), patches in row-major order. The first half of the channels encodes a patch's
    column, the second half its row; each half is sin(c w_k) then cos(c w_k) for the
    coordinate c and dim/4 frequencies w_k = 1 / 10000^(k / (dim/4)). Nothing to learn: the
    paper finds them as good as learned ones, and they cost no parameters."""
    n = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(n, dtype=torch.float64) / n)   # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")   # (g, g) each

    def encode(coord):                                         # (g, g) -> (g*g, dim/2)
        angle = coord.flatten().double()[:, None] * freqs[None]
        return torch.cat([angle.sin(), angle.cos()], 1)
    emb = torch.cat([encode(cols), encode(rows)], 1).float()   # (L, dim)
    return torch.cat([torch.zeros(1, dim), emb]).unsqueeze(0)  # (1, 1 + L, dim)


def init_weights(model):
    """MAE's initialisation: xavier-uniform for every Linear and for the patch embedding seen
    as a Linear (following the JAX ViT), zero biases, normal(0.02) for the tokens."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    w = model.encoder.patch_embed.weight                       # (D, 3, p, p)
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.normal_(model.encoder.cls_token, std=0.02)
    nn.init.normal_(model.mask_token, std=0.02)


class MAE(nn.Module):
    def __init__(self, encoder, decoder_dim, decoder_depth, decoder_heads):
        super().__init__()
        self.encoder = encoder                                 # common.ViT
        p, L = encoder.patch_size, encoder.num_patches
        grid = math.isqrt(L)
        # The encoder's positions become fixed sine-cosine ones: kept as its (frozen) parameter,
        # as in the paper's code, so the encoder loads into a plain ViT for fine-tuning.
        encoder.pos_embed.requires_grad_(False).copy_(sincos_positions(encoder.dim, grid))
        self.decoder_embed = nn.Linear(encoder.dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))   # one learned vector for every hole
        self.register_buffer("decoder_pos", sincos_positions(decoder_dim, grid))   # (1, 1 + L, Dd), fixed
        self.decoder_blocks = nn.ModuleList(common.Block(decoder_dim, decoder_heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, p * p * 3)   # pixels of one patch
        init_weights(self)

    @property
    def backbone(self):
        return self.encoder

    def forward_encoder(self, imgs, mask_ratio):
        """Visible patches only: (B, 1 + L_keep, D) latents, the mask and ids_restore."""
        x = self.encoder.embed(imgs)                           # (B, 1 + L, D), positions added
        cls, x = x[:, :1], x[:, 1:]
        x, mask, ids_restore = random_masking(x, mask_ratio)  # (B, L_keep, D)
        x = torch.cat([cls, x], 1)                             # (B, 1 + L_keep, D)
        for blk in self.encoder.blocks:
            x = blk(x)
        return self.encoder.norm(x), mask, ids_restore

    def forward_decoder(self, latent, ids_restore):
        """Latents of the visible patches -> predicted pixels of every patch (B, L, p*p*3)."""
        x = self.decoder_embed(latent)                         # (B, 1 + L_keep, Dd)
        B, L = ids_restore.shape
        holes = self.mask_token.expand(B, L - (x.shape[1] - 1), -1)   # (B, L - L_keep, Dd)
        x_ = torch.cat([x[:, 1:], holes], 1)                   # (B, L, Dd) in shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))   # original order
        x = torch.cat([x[:, :1], x_], 1) + self.decoder_pos    # (B, 1 + L, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, L, p*p*3), [CLS] dropped

    def forward(self, imgs, mask_ratio):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        return self.forward_decoder(latent, ids_restore), mask, latent[:, 0]


# ============================================================================================
# The loss
# ============================================================================================

def patch_targets(imgs, p, norm_pix):
    """The regression targets (B, L, p*p*3): each patch's pixels, optionally normalised by the
    patch's own mean and variance (then a bright and a dark copy of a texture are one target)."""
    target = patchify(imgs.float(), p)
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    return target


def mae_loss(pred, target, mask):
    """Mean squared error per patch, averaged over the masked patches only:

        L = sum_{b,l} mask[b,l] * mean_j (pred[b,l,j] - target[b,l,j])^2  /  sum_{b,l} mask[b,l]

    pred, target (B, L, p*p*3); mask (B, L), 1 = masked. Visible patches do not count: copying
    what the encoder saw would be no task at all. In fp32 with autocast off."""
    with torch.autocast(pred.device.type, enabled=False):
        per_patch = ((pred.float() - target.float()) ** 2).mean(-1)   # (B, L)
        return (per_patch * mask).sum() / mask.sum()


# ============================================================================================
# One training step
# ============================================================================================

def train_step(model, optimizer, imgs, args, amp):
    """Returns the loss and the encoder's [CLS] feature (for the collapse monitor)."""
    with amp:
        pred, mask, cls = model(imgs, args.mask_ratio)         # (B, L, p*p*3), (B, L), (B, D)
        loss = mae_loss(pred, patch_targets(imgs, args.patch_size, args.norm_pix_loss), mask)
    optimizer.zero_grad(set_to_none=True)
    amp.backward(loss)
    amp.step(optimizer)
    return loss, cls


# ============================================================================================
# Pictures
# ============================================================================================

@torch.no_grad()
def save_reconstructions(model, images, mean_std, args, path):
    """reconstructions.png: each row one image, then the masked input (hidden patches grey),
    then the reconstruction with the visible patches pasted back. With --norm-pix-loss the
    model predicts each patch up to its brightness and contrast; for display the prediction
    is given the true patch's mean and std."""
    was_training = model.training
    model.eval()
    p = args.patch_size
    x = common.normalize_images(images.float() / 255, *mean_std)
    pred, mask, _ = model(x, args.mask_ratio)                  # (n, L, p*p*3), (n, L)
    pred = pred.float()
    target = patchify(x, p)                                    # (n, L, p*p*3), normalised pixels
    if args.norm_pix_loss:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    m = mask.unsqueeze(-1)                                     # (n, L, 1)
    mean_c, std_c = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in mean_std)
    to_pixels = lambda t: (unpatchify(t, p) * std_c + mean_c).clamp(0, 1)   # back to [0, 1] images
    grey = common.normalize_images(torch.full_like(x, 0.5), *mean_std)
    masked = to_pixels(target * (1 - m) + patchify(grey, p) * m)
    pasted = to_pixels(target * (1 - m) + pred * m)
    grid = torch.stack([images.float() / 255, masked, pasted], 1)   # (n, 3, 3, S, S)
    common.save_grid((grid * 255).round().byte().cpu(), path, scale=4)
    model.train(was_training)


# ============================================================================================
# main
# ============================================================================================

def main(argv=None):
    parser = make_parser()
    args = common.parse_args(parser, argv, "mae")
    if not 0 < args.mask_ratio < 1:
        parser.error(f"--mask-ratio {args.mask_ratio}: must be in (0, 1)")
    if not args.arch.startswith("vit"):
        parser.error(f"--arch {args.arch}: MAE needs a ViT (vit_tiny or vit_small); a ResNet cannot skip the "
                     f"masked patches")
    if args.image_size % args.patch_size:
        parser.error(f"--patch-size {args.patch_size} does not divide --image-size {args.image_size}")
    L = (args.image_size // args.patch_size) ** 2
    if int(L * (1 - args.mask_ratio)) < 1:
        parser.error(f"--mask-ratio {args.mask_ratio} leaves no visible patch out of the {L} patches of a "
                     f"{args.image_size} px image cut into {args.patch_size} px patches")
    if args.decoder_dim % args.decoder_heads:                  # each head takes an equal share of the width
        parser.error(f"--decoder-heads {args.decoder_heads} does not divide --decoder-dim {args.decoder_dim}")
    if args.decoder_dim % 4:                                   # sincos_positions: sin and cos of rows and columns
        parser.error(f"--decoder-dim {args.decoder_dim} must be a multiple of 4 (its fixed positional embedding)")
    run = common.Run(args, "mae")

    encoder = common.build_backbone(args.arch, run.data.image_size, args.width, args.patch_size, args.depth)
    model = common.to_device(MAE(encoder, args.decoder_dim, args.decoder_depth, args.decoder_heads), run.device)
    base_lr = args.lr * args.batch_size / 256
    # The tokens get no weight decay, as in the fine-tuning (timm's no_weight_decay list): a departure,
    # since main_pretrain.py decays them (its add_weight_decay spares only 1-D parameters); a learned
    # token is an input, not a weight to shrink. The fixed positions are not trained at all.
    groups = common.param_groups(model, args.weight_decay, no_decay=("cls_token", "mask_token"))
    optimizer = common.make_optimizer(groups, "adamw", base_lr, betas=(0.9, 0.95))
    warmup = common.scaled_epochs(args.warmup_epochs, 40, RECIPE_EPOCHS, args.epochs, at_least=1) * run.steps_per_epoch
    run.start(model, optimizer, model.encoder)
    # Crops of 20-100% of the area (bicubic) and flips, nothing else: the masking is the hard part.
    augment = common.Augment(run.data.image_size, scale=(0.2, 1.0), jitter_p=0.0, gray_p=0.0,
                             mean=run.mean_std[0], std=run.mean_std[1])
    run.save_views([augment])
    train_model = run.wrap(model)

    for epoch in range(run.start_epoch, args.epochs):
        for step, idx in run.batches(epoch):                   # idx: this step's images, B (B/N on each of N processes)
            common.set_lr(optimizer, common.cosine_lr(step, run.total_steps, warmup, base_lr))
            x = augment(run.data.train_x[idx])                 # (B, 3, H, W) fp32
            loss, cls = train_step(train_model, optimizer, x, args, run.amp)
            run.log_step(loss, cls)
        run.end_epoch(epoch)

    if not run.main:                                           # the pictures and the fine-tuning: rank 0's
        return
    src = run.data.test_x if run.data.test_x is not None else run.data.train_x
    save_reconstructions(model, src[:8], run.mean_std, args, run.out / "reconstructions.png")
    summary = run.finish()
    if args.finetune_epochs and run.data.labeled:
        # Same ViT, same fine-tuning; the only difference is where the weights start.
        scratch = common.build_backbone(args.arch, run.data.image_size, args.width, args.patch_size, args.depth)
        for name, net in (("pretrained", copy.deepcopy(model.encoder)), ("scratch", scratch.to(run.device))):
            summary[f"finetune_top1_{name}"] = common.fine_tune(
                net, run.data, run.mean_std, args.finetune_epochs, lr=args.finetune_lr, name=f"fine-tune ({name})")
        summary["finetune_epochs"] = args.finetune_epochs
        print(f"fine-tuned {args.finetune_epochs} epochs: MAE-pretrained {100 * summary['finetune_top1_pretrained']:.2f}% "
              f"vs from scratch {100 * summary['finetune_top1_scratch']:.2f}%")
        common.write_json(summary, run.out / "summary.json")


if __name__ == "__main__":
    common.run_main(main)
