"""The analysis figures are written as PNGs; every figure is saved through plots.save_figure, at the dpi asked."""
import struct

import numpy as np
from matplotlib.figure import Figure

from jaxpoison.analysis import plots


def _png_size(path):
    b = open(path, "rb").read(24)
    assert b[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", b[16:24])


def test_the_figures_are_written(tmp_path):
    rng = np.random.default_rng(1)
    files = [
        plots.linf_histograms({"0 %": {"a": rng.random(300), "b": rng.random(40)},
                           "100 %": {"a": rng.random(300) + 0.2, "b": rng.random(40)}}, tmp_path / "h.png"),
        plots.layer_profiles({"q/fro": rng.random((6, 5)), "q/erank": rng.random((6, 5)), "lm_head/fro": rng.random(6)},
                         ["clean"] * 3 + ["poisoned"] * 3, tmp_path / "p.png"),
        plots.roc_plot({"logistic": ([0, 0, 1], [0, 1, 1], 1.0), "distance": ([0, 1], [0, 1], None)}, tmp_path / "r.png"),
        plots.mitigation_heatmaps([0.02, 0.04, 0.06], [0.04, 0.08, 0.16], rng.random((3, 3)), rng.random((3, 3)),
                              tmp_path / "m.png"),
    ]
    for f in files:
        assert min(_png_size(f)) > 100


def test_save_figure_renders_at_the_dpi_asked_and_returns_the_path(tmp_path):
    def figure():
        fig = Figure(figsize=(4, 3))
        fig.subplots().plot([0, 1], [1, 0])
        return fig

    low = plots.save_figure(figure(), tmp_path / "low.png", dpi=50)
    high = plots.save_figure(figure(), tmp_path / "high.png", dpi=200)
    assert low == str(tmp_path / "low.png") and high == str(tmp_path / "high.png")
    (w_low, h_low), (w_high, h_high) = _png_size(low), _png_size(high)
    assert abs(w_high / w_low - 4) < 0.2 and abs(h_high / h_low - 4) < 0.2
