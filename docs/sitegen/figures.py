"""The figures of the concept pages that are not benchmark results: the picture of the
idea (two panels in ``docs/assets/``, drawn by ``docs/figures/make_idea_svg.py``) and the
tables of measured rounding errors from the build's run of ``tutorials/07_numerics.py``."""

from __future__ import annotations

import logging

from . import ROOT

log = logging.getLogger("mkdocs.hooks.lazyattention")

IDEA_PANELS = (ROOT / "docs" / "assets" / "idea-copy.svg", ROOT / "docs" / "assets" / "idea-lazy.svg")
#: The identity under the panels: the lazy score (left) is the copy's score (right), eq. (8).
IDEA_IDENTITY = (
    "<i>R</i>(<i>p</i> − <i>δ</i>)<i>q</i> · <i>k</i> &nbsp;=&nbsp; <i>R</i>(<i>p</i>)<i>q</i> · "
    "<i>R</i>(<i>δ</i>)<i>k</i>"
)


def idea_figure() -> str:
    """The two panels inlined (their text takes the page's colour, dark theme too), side by
    side on a wide page and stacked on a phone, over the one-line identity that makes them equal."""
    svgs = [path.read_text(encoding="utf-8").strip() for path in IDEA_PANELS]
    panels = "\n".join(f'<div class="idea-cell">\n{svg}\n</div>' for svg in svgs)
    caption = (
        f'<figcaption><span class="idea-identity">{IDEA_IDENTITY}</span><br>'
        "The query turned back by the block's shift meets the key as stored (left side) exactly as the "
        "query at its own position meets a re-rotated copy (right side): rotations compose (eq. 8 of the "
        "math page).</figcaption>"
    )
    return f'<figure class="idea" markdown="0">\n<div class="idea-panels">\n{panels}\n</div>\n{caption}\n</figure>'


def markdown_table(rows: list[dict]) -> str:
    from .results import fmt

    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in cols) + " |" for row in rows]
    return "\n".join(lines)


def numerics_table(tables: dict, which: str) -> str:
    """One table that ``tutorials/07_numerics.py`` measured (``tables``: its run's tables)."""
    table = tables.get(which)
    if not table:
        log.warning("tutorials/07_numerics.py defines no non-empty table %r", which)
        return f"*(table {which!r} missing)*"
    return markdown_table(table)
