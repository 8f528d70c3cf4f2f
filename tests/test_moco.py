"""moco.py against independent oracles: a naive loop over candidates, a Python deque for
the queue, per-group BatchNorm for the split BatchNorm; the script end to end."""
import collections
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, strategies as st

import common
import moco
from conftest import TINY, assert_fp32_under_autocast, one_epoch, run_script

SMALL = ["--proj-hidden", "64", "--proj-dim", "32", "--queue-size", "200", "--bn-splits", "4"]


def unit(t):
    return t / t.norm(dim=1, keepdim=True)


def naive_moco_loss(q, k, queue, tau):
    """For each query, -log softmax of candidate 0 among [k+, queue_1, ..., queue_K]."""
    q, k, queue = unit(q.double()), unit(k.double()), unit(queue.double())
    total = 0.0
    for i in range(len(q)):
        candidates = [k[i]] + list(queue)
        logits = [float(q[i] @ c) / tau for c in candidates]
        total += -logits[0] + math.log(sum(math.exp(x) for x in logits))
    return total / len(q)


@given(N=st.integers(1, 8), D=st.integers(1, 12), K=st.integers(1, 20), tau=st.floats(0.05, 1.0),
       seed=st.integers(0, 10**6))
def test_moco_loss_matches_naive_loop(N, D, K, tau, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, queue = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g), torch.randn(K, D, generator=g)
    got = moco.moco_loss(q, k, queue, tau).item()
    assert math.isclose(got, naive_moco_loss(q, k, queue, tau), rel_tol=1e-4, abs_tol=1e-4)


@given(K=st.integers(1, 50), D=st.integers(2, 8))
def test_moco_loss_when_everything_is_equal_is_log_k_plus_1(K, D):
    """One point for queries, keys and queue: K+1 equally likely candidates."""
    v = torch.ones(1, D)
    assert math.isclose(moco.moco_loss(v, v, v.repeat(K, 1), 0.2).item(), math.log(K + 1), rel_tol=1e-5)


def oldest_first(model):
    """The queue read as a FIFO, oldest key first."""
    K = model.queue.shape[0]
    return model.queue[(model.queue_ptr + torch.arange(K)) % K]


@given(K=st.integers(1, 12), sizes=st.lists(st.integers(1, 30), min_size=1, max_size=8), seed=st.integers(0, 1000))
def test_queue_is_a_fifo_like_a_deque(K, sizes, seed):
    """Push batches of drawn sizes (smaller, equal and larger than K, wrapping around);
    the queue read oldest-first must equal a deque(maxlen=K) fed the same keys."""
    torch.manual_seed(seed)
    D = 3
    backbone = nn.Identity()
    backbone.dim = 2                                           # only the queue matters here
    model = moco.MoCo(backbone, 4, D, K)
    fifo = collections.deque((row.clone() for row in model.queue), maxlen=K)
    for n in sizes:
        keys = F.normalize(torch.randn(n, D), dim=1)
        model.push(keys)
        fifo.extend(keys)
        assert torch.allclose(oldest_first(model), torch.stack(list(fifo)), atol=1e-6)
        assert 0 <= model.queue_ptr.item() < K


def test_queue_lives_in_the_state_dict():
    """The queue and its pointer are buffers: a state_dict round trip carries them."""
    a = moco.MoCo(common.build_backbone("resnet18", 16, width=8), 32, 16, 10)
    a.push(torch.randn(7, 16))
    b = moco.MoCo(common.build_backbone("resnet18", 16, width=8), 32, 16, 10)
    assert not torch.equal(a.queue, b.queue)
    b.load_state_dict(a.state_dict())
    assert b.queue_ptr.item() == 7 and torch.equal(b.queue, a.queue)


def test_moco_projector_has_no_batchnorm():
    model = moco.MoCo(common.build_backbone("resnet18", 16, width=8), 32, 16, 10)
    assert [type(m) for m in model.encoder_q[1]] == [nn.Linear, nn.ReLU, nn.Linear]


def test_moco_projector_with_proj_bn_has_a_split_batchnorm():
    model = moco.MoCo(common.build_backbone("resnet18", 16, width=8), 32, 16, 10, proj_bn=True)
    assert [type(m) for m in model.encoder_q[1]] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    model = moco.split_batchnorm(model, 2)
    assert isinstance(model.encoder_q[1][1], moco.SplitBatchNorm)
    assert isinstance(model.encoder_k[1][1], moco.SplitBatchNorm)


@given(G=st.sampled_from([1, 2, 4]), n=st.integers(2, 5), seed=st.integers(0, 1000), image=st.booleans())
def test_split_batchnorm_equals_batchnorm_per_group(G, n, seed, image):
    """Training output: each group of rows normalised by its own statistics, exactly what
    G separate BatchNorms on G devices would give. Running stats: the mean over groups.
    image: a BatchNorm2d on (N, C, 4, 4), else a BatchNorm1d on (N, C) (the projector's)."""
    torch.manual_seed(seed)
    C = 3
    BN, shape, dims = (nn.BatchNorm2d, (4, 4), (0, 2, 3)) if image else (nn.BatchNorm1d, (), (0,))
    x = torch.randn(G * n, C, *shape) * 3 + 1
    bn = BN(C)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    split = moco.split_batchnorm(nn.Sequential(bn), G)[0]
    assert isinstance(split, moco.SplitBatchNorm)
    y = split(x)
    means, vars_ = [], []
    for chunk, y_chunk in zip(x.chunk(G), y.chunk(G)):
        ref = BN(C)
        ref.load_state_dict(bn.state_dict())
        assert torch.allclose(y_chunk, ref(chunk), atol=1e-5)
        means.append(chunk.mean(dims))
        vars_.append(chunk.var(dims, unbiased=True))
    assert torch.allclose(split.running_mean, 0.1 * torch.stack(means).mean(0), atol=1e-5)
    assert torch.allclose(split.running_var, 0.9 + 0.1 * torch.stack(vars_).mean(0), atol=1e-5)
    split.eval()
    ref = BN(C)
    ref.load_state_dict(split.state_dict())
    assert torch.allclose(split(x), ref.eval()(x), atol=1e-6)


def test_split_batchnorm_keeps_channels_last_and_loads_into_plain_resnet():
    net = moco.split_batchnorm(common.build_backbone("resnet18", 16, width=8), 2)
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    bn_out = net.stem[1](net.stem[0](x))
    assert bn_out.is_contiguous(memory_format=torch.channels_last)
    plain = common.build_backbone("resnet18", 16, width=8)
    plain.load_state_dict(net.state_dict())                    # same names, same buffers


def test_random_init_bars_of_a_split_batchnorm_encoder_with_an_uneven_last_batch():
    """refresh_batchnorm's batch need not split into the G groups (a data set smaller than its
    batch): such a batch, never one in training, is normalised whole instead of failing."""
    torch.manual_seed(0)
    bn = moco.SplitBatchNorm(4, 8).train()
    x = torch.randn(12, 4, 3, 3)
    assert torch.allclose(bn(x), F.batch_norm(x, None, None, bn.weight, bn.bias, True), atol=1e-6)
    y = torch.arange(100) % 3
    images = torch.randint(0, 256, (100, 3, 16, 16), dtype=torch.uint8)   # one batch of 100 = 8 * 12 + 4
    data = common.Dataset(images, y, images[:30], y[:30], ["a", "b", "c"], "toy")
    net = moco.split_batchnorm(common.build_backbone("resnet18", 16, width=8), 8)
    bars = common.random_init_bars(net, data, data.mean_std())
    assert 0 <= bars["knn_top1_init_bn"] <= 1


def tiny_moco(splits=2):
    model = moco.MoCo(common.build_backbone("resnet18", 16, width=8), 32, 16, 32)
    return moco.split_batchnorm(model, splits) if splits > 1 else model


def test_moco_key_encoder_gets_no_gradient_and_moves_by_ema():
    torch.manual_seed(0)
    model = tiny_moco()
    args = moco.make_parser().parse_args(["--temperature", "0.2"])
    opt = common.make_optimizer(common.param_groups(model, 0.0), "sgd", 0.1)
    assert all(id(p) not in {id(q) for g in opt.param_groups for q in g["params"]} for p in model.encoder_k.parameters())
    k_before = [p.detach().clone() for p in model.encoder_k.parameters()]
    q_before = [p.detach().clone() for p in model.encoder_q.parameters()]

    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    loss, q = moco.train_step(model, opt, x1, x2, 0.9, args, common.FP32)
    assert torch.isfinite(loss) and q.shape == (4, 16)
    for p, kb, qb in zip(model.encoder_k.parameters(), k_before, q_before):
        assert p.grad is None and not p.requires_grad
        assert torch.allclose(p, 0.9 * kb + 0.1 * qb, atol=1e-6)     # EMA of the pre-step query weights
    assert model.queue_ptr.item() == 8                         # symmetric: both views' keys enqueued
    assert any(p.grad is not None for p in model.encoder_q.parameters())


def test_moco_keys_are_unshuffled_and_normalised_within_their_shuffled_group():
    """In eval mode (no batch statistics) the shuffle must be invisible: k equals the key
    encoder applied to x in order. In train mode, replay the same permutation and encode
    each half of the shuffled batch on its own, as two GPUs would: same keys, same order."""
    torch.manual_seed(0)
    model = tiny_moco(splits=2).eval()
    x = torch.randn(8, 3, 16, 16)
    _, k = model(x, x)
    assert torch.allclose(k, model.encoder_k(x), atol=1e-5)

    model.train()
    torch.manual_seed(1)
    _, k = model(x, x)
    torch.manual_seed(1)
    perm = torch.randperm(8)                                   # the draw forward() made
    for m in model.encoder_k.modules():
        if isinstance(m, moco.SplitBatchNorm):
            m.groups = 1                                       # plain BatchNorm from here on
    with torch.no_grad():
        shuffled_keys = torch.cat([model.encoder_k(half) for half in x[perm].chunk(2)])
    expected = torch.empty_like(shuffled_keys)
    expected[perm] = shuffled_keys                             # row perm[j] of x gave row j
    assert torch.allclose(k, expected, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(k, model.encoder_k(x), atol=1e-3)   # whole-batch BN differs


def test_moco_queue_survives_resume(tmp_path, monkeypatch):
    """Interrupt after epoch 1, resume to epoch 2: the weights and the queue (contents and
    pointer) equal those of an uninterrupted two-epoch run (with the projector's split
    BatchNorm, whose statistics must survive too)."""
    args = TINY + SMALL + ["--epochs", "2", "--eval-every", "0", "--proj-bn"]
    straight, interrupted = tmp_path / "a", tmp_path / "b"
    moco.main(args + ["--out", str(straight)])

    real_save = common.save_atomic

    def save_then_interrupt(state, path):
        real_save(state, path)
        raise KeyboardInterrupt
    monkeypatch.setattr(common, "save_atomic", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        moco.main(args + ["--out", str(interrupted)])
    monkeypatch.setattr(common, "save_atomic", real_save)
    first = torch.load(interrupted / "checkpoint.pt", weights_only=True)
    assert first["epoch"] == 1 and first["model"]["queue"].shape == (200, 32)
    assert first["model"]["queue_ptr"] == (4 * 2 * 64) % 200      # 4 steps of 2x64 keys, wrapped
    moco.main(["--resume", str(interrupted / "checkpoint.pt"), "--epochs", "2"])

    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(interrupted / "checkpoint.pt", weights_only=True)
    assert not torch.equal(first["model"]["queue"], b["model"]["queue"])   # it did move in epoch 2
    for k in a["model"]:                                       # the queue and its pointer included
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_moco_loss_is_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(32, 64, generator=g)                       # queries close to keys and to some negatives
    queue = torch.cat([k + 0.5 * torch.randn(32, 64, generator=g), torch.randn(480, 64, generator=g)])
    q = k + 0.3 * torch.randn(32, 64, generator=g)
    assert_fp32_under_autocast(lambda: moco.moco_loss(q, k, queue, 0.07))


@pytest.mark.parametrize("extra", [[], ["--no-symmetric", "--bn-splits", "1"]])
def test_one_epoch_writes_every_output(tmp_path, extra):
    out = one_epoch("moco.py", tmp_path, *SMALL, *extra)
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == "moco" and 0 <= s["knn_top1"] <= 1
    common.build_backbone("resnet18", 16, width=8).load_state_dict(torch.load(out / "encoder.pt", weights_only=True))


@pytest.mark.parametrize("args,needle", [
    (["--momentum", "1.5"], "--momentum"),
    (["--bn-splits", "5"], "--bn-splits"),
    (["--queue-size", "0"], "--queue-size"),
])
def test_bad_flags_give_clear_errors(tmp_path, args, needle):
    r = run_script("moco.py", *TINY, "--out", str(tmp_path / "o"), *args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()                       # nothing written
