"""The plot style of the docs: one legend under the axes, covering no data; stable colours."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from lazyattention.plot_style import PAGE_WIDTH, color, legend_below, page_style


def test_the_legend_sits_under_every_axes_and_names_each_line_once():
    with plt.rc_context(page_style()):
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(PAGE_WIDTH, 5), layout="constrained")
        for ax in (top, bottom):
            ax.plot([0, 1], [0, 1], label="lazy", color=color("lazy"))
        bottom.plot([0, 1], [1, 0], label="materialise", color=color("materialise"))
        legend_below(fig)
        fig.canvas.draw()
        (legend,) = fig.legends
        assert [t.get_text() for t in legend.get_texts()] == ["lazy", "materialise"]
        box = legend.get_window_extent()
        assert all(box.y1 <= ax.get_window_extent().y0 for ax in (top, bottom)), "the legend overlaps an axes"
    plt.close(fig)


def test_colours_are_fixed_per_name():
    assert color("lazy") == color("lazy") != color("sdpa_flash")
    assert color("flashinfer_fa2") == color("flashinfer")
    assert color("some_new_provider").startswith("#")
