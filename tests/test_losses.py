"""info_nce against independent oracles: a naive loop, a closed form, and invariances."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from simclr import info_nce


def naive_info_nce(z1, z2, tau):
    """Loop over the 2N anchors; -log softmax of the positive among the 2N-1 others."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = len(z)
    N = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + N) % n2
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n2) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / tau) / denom)
    return total / n2


@given(N=st.integers(1, 9), D=st.integers(1, 16), tau=st.floats(0.05, 2.0), seed=st.integers(0, 10**6))
def test_info_nce_matches_naive_loop(N, D, tau, seed):
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    assert math.isclose(info_nce(z1, z2, tau).item(), naive_info_nce(z1, z2, tau), rel_tol=1e-4, abs_tol=1e-4)


@given(N=st.integers(1, 9), D=st.integers(2, 16), tau=st.floats(0.05, 2.0), seed=st.integers(0, 10**6))
def test_info_nce_equals_logsumexp_form(N, D, tau, seed):
    """The same loss as -s_pos/tau + logsumexp over the other 2N-1 views, per anchor."""
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(N, D, generator=g).double(), torch.randn(N, D, generator=g).double()
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    s = z @ z.T / tau
    per_anchor = []
    for i in range(2 * N):
        others = torch.cat([s[i, :i], s[i, i + 1:]])
        per_anchor.append(-s[i, (i + N) % (2 * N)] + torch.logsumexp(others, 0))
    expected = torch.stack(per_anchor).mean().item()
    assert math.isclose(info_nce(z1.float(), z2.float(), tau).item(), expected, rel_tol=1e-4, abs_tol=1e-4)


@given(N=st.integers(1, 8), D=st.integers(2, 16), c=st.floats(0.01, 100.0), seed=st.integers(0, 10**6))
def test_info_nce_invariant_to_rescaling(N, D, c, seed):
    """Cosine similarity ignores the length of z, so the loss does too."""
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    scale = torch.rand(N, 1, generator=g) * c + 1e-3          # a different positive scale per row
    assert torch.allclose(info_nce(z1, z2, 0.5), info_nce(z1 * scale, z2 * c, 0.5), atol=1e-5)


@given(N=st.integers(1, 32), D=st.integers(1, 8), tau=st.floats(0.05, 2.0))
def test_info_nce_of_identical_embeddings_is_log_2n_minus_1(N, D, tau):
    """All views equal: every candidate is as likely as the positive, so -log(1/(2N-1))."""
    z = torch.ones(N, D)
    assert math.isclose(info_nce(z, z.clone(), tau).item(), math.log(2 * N - 1), rel_tol=1e-5, abs_tol=1e-6)


def test_info_nce_rewards_matching_views():
    """Views that agree (z2 = z1) give a lower loss than unrelated ones."""
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(64, 32, generator=g)
    assert info_nce(z1, z1, 0.2) < info_nce(z1, torch.randn(64, 32, generator=g), 0.2) - 1.0


# --- every loss is computed in fp32, whatever autocast the caller runs under ------------------

def loss_cases():
    import byol
    import dino
    import mae
    import moco
    import simsiam
    import supervised
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)
    mask = (torch.rand(4, 16, generator=g) < 0.75).float()
    k = r(32, 64)                                              # queries close to their keys: large logits
    return {
        "info_nce": lambda: info_nce(r(32, 64), r(32, 64), 0.2),
        "moco_loss": lambda: moco.moco_loss(k + 0.3 * r(32, 64), k, torch.cat([k + 0.5 * r(32, 64), r(480, 64)]), 0.07),
        "byol_loss": lambda: byol.byol_loss(r(32, 64), r(32, 64)),
        "simsiam_loss": lambda: simsiam.simsiam_loss(r(32, 64), r(32, 64)),
        "dino_loss": lambda: dino.dino_loss(r(4, 16, 512), r(2, 16, 512), r(512) * 0.1, 0.1, 0.04),
        "mae_loss": lambda: mae.mae_loss(r(4, 16, 48), r(4, 16, 48), mask),
        "supervised_loss": lambda: supervised.supervised_loss(r(32, 10) * 3, torch.arange(32) % 10),
    }


@pytest.mark.parametrize("name", list(loss_cases()))
def test_loss_is_the_same_under_bf16_autocast(name):
    """bf16 keeps 8 bits of mantissa: a matmul inside autocast, divided by a temperature of
    0.04, moves the loss in its third digit. Each loss switches autocast off for itself."""
    fp32 = loss_cases()[name]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss_cases()[name]()
    assert mixed.dtype == torch.float32
    assert abs(mixed.item() - fp32.item()) <= 1e-5 * max(1.0, abs(fp32.item()))
