"""Pictures (common.py, section 6): ticks, plots and grids, drawn with pillow."""
import math

import torch
from hypothesis import given, strategies as st

import common


@given(lo=st.floats(-1e4, 1e4), span=st.floats(1e-3, 1e4))
def test_nice_ticks_cover_range_with_round_steps(lo, span):
    ticks = common.nice_ticks(lo, lo + span)
    assert ticks[0] <= lo + 1e-9 * abs(lo) and ticks[-1] >= lo + span - 1e-9 * abs(lo + span)
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-6
    assert 3 <= len(ticks) <= 13


def test_line_plot_and_grid_write_pngs(tmp_path):
    from PIL import Image
    common.line_plot([dict(title="t", xlabel="x", ylabel="y", series={"a": ([0, 1, 2], [1.0, 0.5, 0.2]),
                                                                     "b": ([0, 2], [0.1, float("nan")])}),
                      dict(title="empty", xlabel="x", ylabel="y", series={})], tmp_path / "p.png")
    img = Image.open(tmp_path / "p.png")
    assert img.size == (840, 300)
    assert len(img.getcolors(10000)) > 3                         # something was drawn
    common.save_grid(torch.randint(0, 255, (2, 3, 3, 8, 8), dtype=torch.uint8), tmp_path / "g.png", scale=2)
    assert Image.open(tmp_path / "g.png").size == ((3 * 10 + 2) * 2, (2 * 10 + 2) * 2)
