"""Draw the idea of deferred positional encoding: ``docs/assets/idea-copy.svg`` and
``docs/assets/idea-lazy.svg``, two panels side by side on a wide page, one above the
other on a phone.

Run: ``python docs/figures/make_idea_svg.py`` (rewrites the committed files; a test checks
that the committed files are what this script writes).

Both panels hold the same cache: two documents prefilled once, alone, keys stored at
their own positions 0..L-1, and two requests that place them in opposite orders.

* *Copy and re-rotate* (Block-Attention): every request gets its own copy of each
  document's blocks, every key rewritten by ``R(δ)``.
* *Lazy*: every request's block table points at the one shared copy (an arrow from every
  block of every request), with a shift ``δ`` per block; the kernel turns the query by
  ``R(p − δ)`` and never writes a key.

Each panel is about 420 units wide with text of 15 units and more, so that on a phone
(a column of about 350 CSS pixels) the smallest label still shows at about 12 px. Text
takes the page's colour (``currentColor``) and the fills are mid-tones with white labels,
so the panels read on the light and the dark theme alike.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"

WIDTH, HEIGHT = 420, 400
BLOCK_W, BLOCK_H, GAP = 72, 40, 8
TOKENS = 64  # tokens per block in the picture
COLORS = {"A": "#4e79a7", "B": "#e15759"}
DOCS = {"A": 2, "B": 1}  # blocks per document
#: Each request: its name and (document, logical start) in order. Request 1 is drawn
#: above the cache, request 2 below it, so that every arrow is short and none crosses a row.
REQUESTS = (("Req 1", (("A", 0), ("B", 2 * TOKENS))), ("Req 2", (("B", 0), ("A", TOKENS))))
LABEL_X, BLOCKS_X = 16, 96
ROW_Y = (66, 274)  # the requests' rows
PHYS_Y = 170
ROTATE_RED = "#c0392b"


def _text(x: float, y: float, s: str, size: int = 15, anchor: str = "start", weight: str = "normal",
          extra: str = "") -> str:  # fmt: skip
    return (
        f'<text x="{x:g}" y="{y:g}" font-size="{size}" text-anchor="{anchor}" font-weight="{weight}"{extra}>{s}</text>'
    )


def _block(x: float, y: float, color: str, label: str, dashed: bool = False) -> str:
    """A cache block (solid, white label) or a block-table entry (dashed outline, label in the doc's colour)."""
    if dashed:
        return (
            f'<rect x="{x:g}" y="{y:g}" width="{BLOCK_W}" height="{BLOCK_H}" rx="5" fill="none" '
            f'stroke="{color}" stroke-width="2" stroke-dasharray="5 4"/>'
            + _text(x + BLOCK_W / 2, y + BLOCK_H / 2 + 5.5, label, 16, "middle", "bold", f' fill="{color}"')
        )
    return f'<rect x="{x:g}" y="{y:g}" width="{BLOCK_W}" height="{BLOCK_H}" rx="5" fill="{color}"/>' + _text(
        x + BLOCK_W / 2, y + BLOCK_H / 2 + 5.5, label, 16, "middle", "bold", ' fill="#fff"'
    )


def _physical_x(doc: str, block: int) -> float:
    before = sum(DOCS[d] for d in DOCS if list(DOCS).index(d) < list(DOCS).index(doc))
    return BLOCKS_X + (before + block) * (BLOCK_W + GAP)


def _request_blocks(placements) -> list[tuple[str, int, int, float]]:
    """(document, block, shift, x) of each logical block of a request."""
    out, x = [], BLOCKS_X
    for doc, start in placements:
        for b in range(DOCS[doc]):
            out.append((doc, b, start, x))
            x += BLOCK_W + GAP
    return out


def _arrow(x0: float, y0: float, x1: float, y1: float, color: str, marker: str) -> str:
    bend = (y0 - y1) * 0.45
    return (
        f'<path d="M{x0:g},{y0:g} C{x0:g},{y0 - bend:g} {x1:g},{y1 + bend:g} {x1:g},{y1:g}" fill="none" '
        f'stroke="{color}" stroke-width="2" stroke-opacity="0.8" marker-end="url(#{marker})"/>'
    )


def _svg(name: str, title: str, description: str, body: list[str]) -> str:
    markers = "".join(
        f'<marker id="{name}-arrow-{doc}" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="6" markerHeight="6" '
        f'orient="auto-start-reverse"><path d="M0,0 L8,4 L0,8 z" fill="{color}"/></marker>'
        for doc, color in COLORS.items()
    )
    head = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-labelledby="{name}-title" font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif" '
        f'fill="currentColor" class="idea-panel">',
        f'<title id="{name}-title">{description}</title>',
        f"<defs>{markers}</defs>",
        _text(LABEL_X, 28, title, 18, weight="bold"),
    ]
    return "\n".join(head + body + ["</svg>"]) + "\n"


def _cache_row() -> list[str]:
    parts = [_text(LABEL_X, PHYS_Y + BLOCK_H / 2 + 5, "cache", 16, weight="bold", extra=' opacity="0.75"')]
    for doc, n in DOCS.items():
        parts += [_block(_physical_x(doc, b), PHYS_Y, COLORS[doc], f"{doc}{b}") for b in range(n)]
    return parts


def _rows():
    """Each request's (name, blocks, row top, y of the labels beside the blocks, toward the cache?)."""
    for (name, placements), y in zip(REQUESTS, ROW_Y, strict=True):
        above = y < PHYS_Y
        label_y = y - 9 if above else y + BLOCK_H + 21
        yield name, _request_blocks(placements), y, label_y, above


def _footer(first: str, second: str, color: str = "") -> list[str]:
    extra = f' fill="{color}"' if color else ""
    return [_text(LABEL_X, HEIGHT - 36, first, 15, weight="bold", extra=extra), _text(LABEL_X, HEIGHT - 12, second, 15)]


def copy_panel() -> str:
    """Block-Attention: a re-rotated copy of every document block per request."""
    body = _cache_row()
    for r, (name, blocks, y, label_y, above) in enumerate(_rows()):
        body.append(_text(LABEL_X, y + BLOCK_H / 2 + 5, name, 16, weight="bold"))
        for doc, b, shift, x in blocks:
            body.append(_block(x, y, COLORS[doc], f"{doc}{b}{'′' * (r + 1)}"))
            body.append(_text(x + BLOCK_W / 2, label_y, f"R({shift}) k", 15, "middle", extra=f' fill="{ROTATE_RED}"'))
            px = _physical_x(doc, b) + BLOCK_W / 2
            src = PHYS_Y - 2 if above else PHYS_Y + BLOCK_H + 2
            dst = y + BLOCK_H + 4 if above else y - 4
            body.append(_arrow(px, src, x + BLOCK_W / 2, dst, COLORS[doc], f"copy-arrow-{doc}"))
    body += _footer("a copy per request, every key rewritten", "keys re-rotated to where the request puts them")
    return _svg(
        "copy",
        "Copy and re-rotate",
        "Copy and re-rotate (Block-Attention): each request gets its own copy of every document block, "
        "its keys rotated by the block's shift delta",
        body,
    )


def lazy_panel() -> str:
    """Lazy: every block of every request's block table points at the one shared copy."""
    body = _cache_row()
    for name, blocks, y, label_y, above in _rows():
        body.append(_text(LABEL_X, y + BLOCK_H / 2 + 5, name, 16, weight="bold"))
        for doc, b, shift, x in blocks:
            body.append(_block(x, y, COLORS[doc], f"{doc}{b}", dashed=True))
            body.append(_text(x + BLOCK_W / 2, label_y, f"δ = {shift}", 15, "middle"))
            px = _physical_x(doc, b) + BLOCK_W / 2
            src = y + BLOCK_H + 4 if above else y - 4
            dst = PHYS_Y - 2 if above else PHYS_Y + BLOCK_H + 2
            body.append(_arrow(x + BLOCK_W / 2, src, px, dst, COLORS[doc], f"lazy-arrow-{doc}"))
    body += _footer("one copy; the query turned by R(p − δ)", "dashed: block-table entries, not copies", ROTATE_RED)
    return _svg(
        "lazy",
        "Lazy: one shared copy",
        "Lazy (deferred) encoding: both requests' block tables point at the one shared copy of each document, "
        "each block with its shift delta; the kernel rotates the query by p minus delta and never writes a key",
        body,
    )


def idea_panels() -> dict[str, str]:
    """The two panels, by file name under ``docs/assets``."""
    return {"idea-copy.svg": copy_panel(), "idea-lazy.svg": lazy_panel()}


def main() -> None:
    for name, svg in idea_panels().items():
        (ASSETS / name).write_text(svg, encoding="utf-8")
        print(f"wrote {ASSETS / name}")


if __name__ == "__main__":
    main()
