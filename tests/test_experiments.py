"""The experiment scripts' plotting on small synthetic results."""
import sys

from PIL import Image

from conftest import ROOT

sys.path.insert(0, str(ROOT / "experiments"))
import collapse  # noqa: E402
import common  # noqa: E402


def test_collapse_plot_from_synthetic_logs(tmp_path):
    def log(stds, knns):
        return [{"epoch": e + 1, "emb_std": s / 16, "emb_std_ref": 1 / 16, **({"knn_top1": k} if k is not None else {})}
                for e, (s, k) in enumerate(zip(stds, knns))]
    results = {"SimSiam": log([0.9, 0.8, 0.85], [0.2, 0.3, 0.35]),
               "SimSiam, no stop-grad": log([0.6, 0.1, 0.01], [0.15, None, 0.1])}
    path = tmp_path / "collapse.png"
    collapse.plot(results, path)
    img = Image.open(path)
    assert img.size == (840, 300)
    # Both series are drawn: the palette's first two colours appear in the picture.
    colors = {c for _, c in img.getcolors(1 << 16)}
    assert all(tuple(c) in colors for c in common.PALETTE[:2])
