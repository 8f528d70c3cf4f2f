"""Two training steps of every method, on one process or as one of several (torchrun).

The oracle of tests/test_distributed.py: N processes, each given its shard of a fixed batch,
must end with the weights that one process reaches on the whole batch. The models here have
no BatchNorm (each is replaced by the identity): per-process BatchNorm is *meant* to differ
from one process's (SyncBatchNorm, which would not, runs on CUDA only), and everything else
must not. Every view and mask is drawn once for the whole batch, before any shard is taken.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_steps.py OUT.pt [broken]

writes {method: final state} from rank 0. `broken` makes the three mistakes the negative
controls need: SimCLR's differentiable gather becomes a plain all_gather (the usual mistake),
MoCo enqueues only its own keys, DINO centres on its own crops.
"""
import sys
from argparse import Namespace
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import byol  # noqa: E402
import common  # noqa: E402
import dino  # noqa: E402
import mae  # noqa: E402
import moco  # noqa: E402
import rotation  # noqa: E402
import simclr  # noqa: E402
import simsiam  # noqa: E402
import supervised  # noqa: E402

METHODS = ["simclr", "moco", "byol", "simsiam", "dino", "mae", "supervised", "rotation"]
B, S, STEPS = 8, 8, 2                                          # batch, image side, steps


def no_batchnorm(module):
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            no_batchnorm(child)
    return module


def resnet():
    return common.build_backbone("resnet18", S, width=4)


def build(method):
    """(model, optimizer, step(model, optimizer, batch, shard)) for a method, seeded."""
    torch.manual_seed(0)
    fp32 = common.FP32
    if method == "simclr":
        model = simclr.SimCLR(resnet(), 32, 16)
        step = lambda m, o, b, s: simclr.train_step(m, o, b["x1"][s], b["x2"][s], 0.2, fp32)
        opt = "lars"
    elif method == "moco":
        model = moco.MoCo(resnet(), 32, 16, queue_size=48)
        args = Namespace(symmetric=True, temperature=0.2)
        step = lambda m, o, b, s: moco.train_step(m, o, b["x1"][s], b["x2"][s], 0.9, args, fp32)
        opt = "sgd"
    elif method == "byol":
        model = byol.BYOL(resnet(), 32, 16, 32)
        step = lambda m, o, b, s: byol.train_step(m, o, b["x1"][s], b["x2"][s], 0.9, fp32)
        opt = "lars"
    elif method == "simsiam":
        model = simsiam.SimSiam(resnet(), 32, 16, 8)
        step = lambda m, o, b, s: simsiam.train_step(m, o, b["x1"][s], b["x2"][s], True, fp32)
        opt = "sgd"
    elif method == "dino":
        model = dino.DINO(resnet(), 32, 16, 64, head_layers=2, head_bn=True)
        args = Namespace(student_temp=0.1, center_momentum=0.9, clip_grad=3.0)
        step = lambda m, o, b, s: dino.train_step(
            m, o, torch.cat([b["x1"][s], b["x2"][s]]), b["local"][:, s].flatten(0, 1), 0.04, 0.9, args, fp32)
        opt = "sgd"
    elif method == "mae":
        vit = common.build_backbone("vit_mini", S, patch_size=4, depth=1)
        model = mae.MAE(vit, 16, 1, 2)
        args = Namespace(mask_ratio=0.5, patch_size=4, norm_pix_loss=True)

        def step(m, o, b, s):                                  # the masks drawn for the whole batch
            with mock.patch.object(mae.torch, "rand", lambda *shape, **kw: b["noise"][s]):
                return mae.train_step(m, o, b["x1"][s], args, fp32)
        opt = "sgd"                                            # (AdamW turns float noise in near-zero
        # gradients into whole steps of lr: the comparison would measure Adam, not the processes)
    elif method == "supervised":
        model = supervised.Supervised(resnet(), 10)
        step = lambda m, o, b, s: supervised.train_step(m, o, b["x1"][s], b["y"][s], 0.1, fp32)
        opt = "sgd"
    elif method == "rotation":
        model = rotation.Rotation(resnet())
        step = lambda m, o, b, s: rotation.train_step(m, o, rotation.rotate(b["x1"][s], b["r"][s]), b["r"][s], fp32)
        opt = "sgd"
    model = no_batchnorm(model)
    optimizer = common.make_optimizer(common.param_groups(model, 1e-4), opt, 0.05)
    return model, optimizer, step


def batches():
    """STEPS batches of fixed views, the same on every process."""
    g = torch.Generator().manual_seed(1)
    L = (S // 4) ** 2
    return [{"x1": torch.randn(B, 3, S, S, generator=g), "x2": torch.randn(B, 3, S, S, generator=g),
             "local": torch.randn(2, B, 3, S // 2, S // 2, generator=g), "noise": torch.rand(B, L, generator=g),
             "y": torch.randint(0, 10, (B,), generator=g), "r": torch.randint(0, 4, (B,), generator=g)}
            for _ in range(STEPS)]


def train(method):
    """The method's state after STEPS steps, as this process sees it (its shard on N processes)."""
    model, optimizer, step = build(method)
    n, r = B // common.world_size(), common.rank()
    shard = slice(r * n, (r + 1) * n)                          # rank r's rows of every batch
    net = common.distribute(model, torch.device("cpu"))
    for batch in batches():
        step(net, optimizer, batch, shard)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def plain_gather(x):
    """The usual mistake: all_gather, then this process's own rows put back with their gradient.
    The other processes' losses then never reach these rows."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


if __name__ == "__main__":
    torch.set_num_threads(1)
    common.init_distributed("cpu")
    if sys.argv[2:] == ["broken"]:
        common.gather_with_grad, common.gather, common.all_mean = plain_gather, lambda x: x, lambda x: x
    states = {m: train(m) for m in METHODS}
    if common.is_main():
        torch.save(states, sys.argv[1])
    common.end_distributed()
