"""Temperature tau reshapes the gradient landscape: SimCLR's kNN accuracy against tau.

InfoNCE divides the cosine similarities by tau before the softmax. A small tau makes the
softmax peaky: the gradient goes almost entirely to the hardest negatives (the most similar
other images), and the embedding spreads them apart; a large tau weights every negative
alike, which is gentler but separates near-duplicates less. The SimCLR paper finds
a middle value best; the solo-learn CIFAR recipe uses 0.2. One SimCLR run per tau, everything
else equal. Writes results/temperature.png, .json and .md.

The landscape itself needs no training (gradient_landscape): the weight each negative gets in
the gradient of simclr.info_nce, against its cosine similarity to the anchor, for every tau,
by autograd through info_nce on a synthetic batch. Written first, and again on every call,
cached runs or not: results/temperature_landscape.png and .json (--landscape-only: just that).

    python experiments/temperature.py --epochs 10 --data shapes -- --image-size 16 --width 16
    python experiments/temperature.py --epochs 100 --data cifar10-jpg.tar.gz      # on a GPU
"""
import math
from pathlib import Path

import torch

import harness
from harness import common
import simclr  # noqa: E402  (harness put the repository on the path)

TAUS = [0.05, 0.1, 0.2, 0.5, 1.0]


def plot(results, path, knn_init=None):
    """results: {tau: list of log.jsonl records}. Final kNN against tau on a log axis, and
    the kNN curves over epochs; knn_init (the untrained encoder's kNN) as a flat line."""
    taus = sorted(results)
    final = [100 * results[t][-1]["knn_top1"] for t in taus]
    xs = [math.log10(t) for t in taus]
    curves = {}
    for t in taus:
        pts = [(r["epoch"], 100 * r["knn_top1"]) for r in results[t] if "knn_top1" in r]
        curves[f"tau {t:g}"] = ([e for e, _ in pts], [a for _, a in pts])
    sweep = {"kNN top-1 after training": (xs, final)}
    if knn_init is not None:
        sweep["random init"] = ([xs[0], xs[-1]], [100 * knn_init] * 2)
    common.line_plot([
        dict(title="SimCLR: kNN top-1 against temperature", xlabel="temperature tau (log scale)",
             ylabel="top-1 %", series=sweep, xticks=[(x, f"{t:g}") for x, t in zip(xs, taus)]),
        dict(title="kNN accuracy over training", xlabel="epoch", ylabel="top-1 %", series=curves),
    ], path)


# --- the gradient landscape: no training --------------------------------------------------

def circle_batch(n, c=0.1):
    """A synthetic batch for info_nce: z1, z2 (n, 2 + 2n). View i of the 2n (z1's rows, then
    z2's) sits at angle 2 pi i / n on a circle, so views i and i + n coincide: the positive
    pair. Each view also has a private dimension of weight c, so that the similarity of two
    distinct views is (1 - c^2) cos(2 pi (i - j) / n), from near 1 down to near -1, and
    nudging the anchor (view 0) along view k's private direction moves s_0k and nothing else.
    Every view sees the same similarities to the others (the Gram matrix is circulant), so
    every row of the softmax has the same normaliser: w_0k = w_k0, which makes the two roles
    of a pair in the symmetric loss equal (see gradient_landscape)."""
    i = torch.arange(2 * n, dtype=torch.float64)
    angle = 2 * math.pi * i / n
    circle = math.sqrt(1 - c * c) * torch.stack([angle.cos(), angle.sin()], 1)   # (2n, 2)
    z = torch.cat([circle, c * torch.eye(2 * n, dtype=torch.float64)], 1)        # (2n, 2 + 2n), unit rows
    return z[:n], z[n:]


def gradient_landscape(tau, n=36, c=0.1):
    """The weight w_0k of each negative k in the InfoNCE gradient of anchor 0, by autograd
    through simclr.info_nce: returns (similarities s_0k, weights w_0k), negatives only.

    The closed form (the slide's): d l_0 / d s_0k = w_0k / tau, with w_0k the softmax over the
    anchor's candidates of s_0j / tau. Here the anchor's row of z1 is moved by t_k along view
    k's private direction (weight c), which moves s_0k = s_k0 by c t_k; info_nce averages over
    all 2n anchors, and the pair enters twice (anchor 0 seeing k, anchor k seeing 0), so
    dL/dt_k = c (w_0k + w_k0) / (2n tau) = c w_0k / (n tau) on this circulant batch."""
    z1, z2 = circle_batch(n, c)
    t = torch.zeros(2 * n, dtype=torch.float64, requires_grad=True)
    private = torch.cat([torch.zeros(2 * n, 2, dtype=torch.float64), torch.eye(2 * n, dtype=torch.float64)], 1)
    z1 = torch.cat([z1[:1] + t @ private, z1[1:]])             # (n, D): the anchor moved along t
    loss = simclr.info_nce(z1, z2, tau)
    (grad,) = torch.autograd.grad(loss, t)                     # (2n,)
    z = torch.cat([z1, z2]).detach()
    negatives = [k for k in range(1, 2 * n) if k != n]         # not the anchor itself, not its positive
    sims = z[0] @ z[negatives].T                               # (2n - 2,) cosine: unit rows
    weights = grad[negatives] * n * tau / c
    return sims, weights


def landscape(taus):
    """{tau: (similarities, weights)}, one point per distinct similarity, sorted by similarity."""
    out = {}
    for tau in taus:
        sims, weights = gradient_landscape(tau)
        order = sims.argsort()
        s, w = sims[order].tolist(), weights[order].tolist()
        keep = [i for i in range(len(s)) if i == 0 or abs(s[i] - s[i - 1]) > 1e-9]   # equal ones weigh alike
        out[tau] = ([s[i] for i in keep], [w[i] for i in keep], len(sims))
    return out


def plot_landscape(points, path):
    """Two panels against the cosine similarity of the negative to the anchor: each negative's
    weight relative to an even split (log10 of K times it, K negatives; 0 = all weigh alike), and
    relative to the hardest negative's."""
    log_rel = {f"tau {t:g}": (s, [math.log10(v * k) for v in w]) for t, (s, w, k) in points.items()}
    rel_max = {f"tau {t:g}": (s, [v / max(w) for v in w]) for t, (s, w, k) in points.items()}
    common.line_plot([
        dict(title="each negative's weight in the gradient", xlabel="cosine similarity to the anchor",
             ylabel="log10 (K x weight)", series=log_rel),
        dict(title="the same, relative to the hardest negative", xlabel="cosine similarity to the anchor",
             ylabel="weight / largest weight", series=rel_max, ymin=0.0),
    ], path, panel_size=(480, 320))


def write_landscape(args):
    points = landscape(TAUS)
    plot_landscape(points, Path(args.results) / "temperature_landscape.png")
    harness.write_results(args, "temperature_landscape", {
        "taus": TAUS, "negatives": next(iter(points.values()))[2],
        "similarity": {f"{t:g}": s for t, (s, w, k) in points.items()},
        "weight": {f"{t:g}": w for t, (s, w, k) in points.items()}})


def main(argv=None):
    p = harness.make_parser(__doc__.splitlines()[0])
    p.add_argument("--landscape-only", action="store_true",
                   help="draw the gradient landscape (no training: a second) and stop")
    args = harness.parse(p, argv)
    write_landscape(args)
    if args.landscape_only:
        return
    runs = {tau: harness.train("simclr.py", ["--temperature", str(tau)], args, f"SimCLR tau {tau}") for tau in TAUS}
    results = {tau: harness.read_log(run_dir) for tau, run_dir in runs.items()}
    knn_init = harness.read_summary(runs[TAUS[0]])["knn_top1_init"]   # the same seed: the same init for all
    plot(results, Path(args.results) / "temperature.png", knn_init)
    rows = [(f"{tau:g}", harness.pct(log[-1]["knn_top1"]), f"{log[-1]['loss']:.3f}") for tau, log in results.items()]
    table = harness.markdown_table(["tau", "kNN top-1 %", "final loss"], rows)
    harness.write_results(args, "temperature", {
        "taus": TAUS, "knn_top1_init": knn_init, "knn_top1": [results[t][-1]["knn_top1"] for t in TAUS],
        "final_loss": [results[t][-1]["loss"] for t in TAUS],
        "knn_curves": {f"{t:g}": [[r["epoch"], r["knn_top1"]] for r in results[t] if "knn_top1" in r] for t in TAUS},
    }, table)


if __name__ == "__main__":
    common.run_main(main)
