"""One look for the project's plots, sized for a page of the docs.

The docs column is about 800 CSS pixels wide: a figure ``PAGE_WIDTH`` inches wide,
saved at ``DPI``, shows at that width with its text at about the size of the page's
small print. Legends go outside the axes (:func:`legend_below`), so they never cover a
line. Figures keep an opaque white background and mid-tone colours: on the dark theme
the docs show them as a light card (``docs/assets/extra.css``).

Use::

    import matplotlib.pyplot as plt
    from lazyattention.plot_style import PAGE_WIDTH, color, legend_below, page_style

    with plt.rc_context(page_style()):
        fig, ax = plt.subplots(figsize=(PAGE_WIDTH, 3.6), layout="constrained")
        ax.plot(x, y, label="lazy", color=color("lazy"))
        legend_below(fig)
        fig.savefig(path)

matplotlib is imported by the caller, not here: this module does no work at import.
"""

from __future__ import annotations

#: Inches: the width of the docs column at ``DPI`` / 2 (the page shows figures at half
#: their pixel width, sharp on high-density screens).
PAGE_WIDTH = 8.0
DPI = 160

#: One colour per provider or strategy, the same in every plot (Tableau 10: mid-tones
#: that read on white and stay apart for colour-blind readers).
COLORS = {
    "lazy": "#4e79a7",
    "norot": "#f28e2b",
    "raw": "#59a14f",
    "raw_cache": "#59a14f",
    "sdpa_flash": "#e15759",
    "sdpa_cudnn": "#b07aa1",
    "materialise": "#9c755f",
    "materialise_sdpa": "#ff9da7",
    "block_attention": "#9c755f",
    "prefix_cache": "#edc948",
    "recompute": "#bab0ac",
    "flashinfer": "#76b7b2",
}
_FALLBACK = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7")


def color(name: str) -> str:
    """The colour of a provider or strategy (names holding ``flashinfer`` share one)."""
    if name in COLORS:
        return COLORS[name]
    if "flashinfer" in name:
        return COLORS["flashinfer"]
    return _FALLBACK[sum(map(ord, name)) % len(_FALLBACK)]


def page_style() -> dict:
    """``matplotlib`` rc settings for a docs figure: legible fonts, light grid, white card."""
    return {
        "figure.dpi": DPI,
        "savefig.dpi": DPI,
        "savefig.bbox": "tight",
        "savefig.pad_inches": 0.08,
        "figure.facecolor": "white",
        "savefig.facecolor": "white",
        "axes.facecolor": "white",
        "font.size": 10.5,
        "axes.titlesize": 11.5,
        "axes.labelsize": 10.5,
        "xtick.labelsize": 9,
        "ytick.labelsize": 9.5,
        "legend.fontsize": 9.5,
        "legend.frameon": False,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "lines.linewidth": 1.8,
        "lines.markersize": 4.5,
    }


def legend_below(fig, axes=None, ncol: int = 2) -> None:
    """One legend for the whole figure, under its axes, outside the data: it can never hide
    a line. Labels repeated across ``axes`` (default: all of them) appear once. The figure
    must use ``layout="constrained"``, which makes room for it."""
    seen: dict[str, object] = {}
    for ax in axes if axes is not None else fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncol=ncol)
