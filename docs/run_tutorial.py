"""Run a tutorial cell by cell and record what each code cell shows.

Usage: ``python docs/run_tutorial.py tutorials/NN_name.py OUT.json [NAME ...]``.

The tutorial (jupytext percent format) runs as a notebook would: every code cell in one
namespace, in order. For each code cell the JSON keeps what it printed and the
matplotlib figures it left open (PNG, base64, in the docs' plot style with the legends
moved under the figure), then closes them. ``NAME``s are top-level
variables to keep as well (JSON-serialisable tables, e.g. the numerics tables). A cell
that raises stops the run; the JSON then carries the traceback. ``docs/hooks.py`` runs
this in a fresh process per tutorial, so no tutorial sees another's state.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import linecache
import sys
import time
import traceback
from pathlib import Path


def _legends_below(fig) -> None:
    """Move the legends drawn inside axes to one legend under the figure, so that none
    covers a line (``loc="best"`` avoids data points, not the segments between them)."""
    seen: dict[str, object] = {}
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
        legend.remove()
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="upper center", bbox_to_anchor=(0.5, 0), ncol=min(5, len(seen)))


def _figures() -> list[str]:
    """The open figures as PNGs for the page. A figure wider than the page's column has
    its text enlarged in proportion, so that it reads at the size the page shows it."""
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from lazyattention.plot_style import DPI, PAGE_WIDTH

    images = []
    for number in plt.get_fignums():
        fig = plt.figure(number)
        _legends_below(fig)
        scale = max(1.0, fig.get_figwidth() / PAGE_WIDTH)
        for text in fig.findobj(Text):
            text.set_fontsize(text.get_fontsize() * scale)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
        images.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    plt.close("all")
    return images


def run(path: Path, keep: list[str]) -> dict:
    import jupytext
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lazyattention.plot_style import page_style

    plt.rcParams.update(page_style())  # the docs' look: legible fonts, white card

    plt.show = lambda *args, **kwargs: None  # figures are collected after each cell instead
    notebook = jupytext.reads(path.read_text(encoding="utf-8"), fmt="py:percent")
    namespace = {"__name__": "__main__", "__file__": str(path)}
    cells, error = [], None
    start = time.perf_counter()
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        stdout = io.StringIO()
        filename = f"{path.name} (cell {index})"
        # The cell's source where `inspect` looks for it: `@triton.jit` reads a kernel's source.
        linecache.cache[filename] = (len(cell.source), None, cell.source.splitlines(keepends=True), filename)
        try:
            with contextlib.redirect_stdout(stdout):
                exec(compile(cell.source, filename, "exec"), namespace)
        except BaseException:
            error = traceback.format_exc(limit=-8)
        cells.append({"index": index, "stdout": stdout.getvalue(), "figures": _figures()})
        if error:
            break
    tables = {name: namespace[name] for name in keep if name in namespace}
    return {"cells": cells, "tables": tables, "error": error, "seconds": time.perf_counter() - start}


def main() -> None:
    path, out, *keep = sys.argv[1:]
    Path(out).write_text(json.dumps(run(Path(path).resolve(), keep)), encoding="utf-8")


if __name__ == "__main__":
    main()
