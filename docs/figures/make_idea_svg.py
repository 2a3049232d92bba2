"""Draw the idea of deferred positional encoding as ``docs/assets/idea.svg``.

Run: ``python docs/figures/make_idea_svg.py`` (rewrites the committed file; a test checks
that the committed file is what this script writes).

The picture: two documents in the paged cache, one physical copy each, keys stored at
their own positions 0..L-1; two requests that place them in opposite orders, each block
of a request pointing at a physical block and carrying its shift δ; the query rotated by
p − δ once per run of blocks. Text takes the page's colour (``currentColor``) and the
fills are mid-tones, so the figure reads on the light and the dark theme alike.
"""

from __future__ import annotations

from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "assets" / "idea.svg"

WIDTH, HEIGHT = 800, 390
BLOCK_W, BLOCK_H, GAP = 62, 34, 6
BLOCK = 64  # tokens per block in the picture
COLORS = {"A": "#4e79a7", "B": "#e15759", "own": "#8c8c8c"}
DOCS = {"A": 3, "B": 2}  # blocks per document
#: Each request: (document, logical start) in order, then its own tokens' start.
REQUESTS = (
    ("Request 1", (("A", 0), ("B", 3 * BLOCK)), 5 * BLOCK),
    ("Request 2", (("B", 0), ("A", 2 * BLOCK)), 5 * BLOCK),
)
PHYS_X, PHYS_Y = 150, 70
REQ_X, REQ_Y, REQ_DY = 150, 200, 100


def _text(x: float, y: float, s: str, size: int = 13, anchor: str = "start", weight: str = "normal", cls="") -> str:
    klass = f' class="{cls}"' if cls else ""
    return (
        f'<text x="{x:g}" y="{y:g}" font-size="{size}" text-anchor="{anchor}" font-weight="{weight}"{klass}>{s}</text>'
    )


def _block(x: float, y: float, color: str, label: str, dashed: bool = False) -> str:
    dash = ' stroke-dasharray="4 3"' if dashed else ""
    return (
        f'<rect x="{x:g}" y="{y:g}" width="{BLOCK_W}" height="{BLOCK_H}" rx="4" fill="{color}" '
        f'stroke="currentColor" stroke-opacity="0.35"{dash}/>'
        f'<text x="{x + BLOCK_W / 2:g}" y="{y + BLOCK_H / 2 + 4.5:g}" font-size="13" text-anchor="middle" '
        f'fill="#fff">{label}</text>'
    )


def _physical_x(doc: str, block: int) -> float:
    """x of a document's physical block (documents side by side, then own-token blocks)."""
    before = sum(n for d, n in DOCS.items() if list(DOCS).index(d) < list(DOCS).index(doc))
    return PHYS_X + (before + block) * (BLOCK_W + GAP) + (list(DOCS).index(doc)) * 14


def idea_svg() -> str:
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" role="img" '
        'aria-labelledby="idea-title" font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif" '
        'fill="currentColor" class="idea-figure">',
        '<title id="idea-title">Deferred positional encoding: one physical copy of each document, '
        "placed by several requests at different logical positions; the query is rotated by p minus delta "
        "per block</title>",
        '<defs><marker id="idea-arrow" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L8,4 L0,8 z" fill="currentColor" fill-opacity="0.55"/>'
        "</marker></defs>",
        "<style>.idea-figure .idea-muted{opacity:.7}"
        ".idea-figure .idea-accent{font-style:italic;font-weight:600}</style>",
        _text(20, 28, "Paged KV cache: one physical copy of each document", 15, weight="bold"),
        _text(20, 48, "prefilled alone, keys stored rotated at their own positions 0 … L−1, never written again", 12),
        _text(20, PHYS_Y + BLOCK_H / 2 + 4, "physical", 12, cls="idea-muted"),
    ]
    for doc, n in DOCS.items():
        for b in range(n):
            parts.append(_block(_physical_x(doc, b), PHYS_Y, COLORS[doc], f"{doc}{b}"))
        first, last = _physical_x(doc, 0), _physical_x(doc, n - 1) + BLOCK_W
        parts.append(_text((first + last) / 2, PHYS_Y + BLOCK_H + 16, f"stored at 0 … {n * BLOCK - 1}", 11, "middle"))
    own_x = _physical_x("B", DOCS["B"] - 1) + BLOCK_W + GAP + 14
    for r in range(len(REQUESTS)):
        parts.append(_block(own_x + r * (BLOCK_W + GAP), PHYS_Y, COLORS["own"], f"own {r + 1}"))
    parts.append(
        _text(own_x + (2 * BLOCK_W + GAP) / 2, PHYS_Y + BLOCK_H + 16, "each request's own tokens", 11, "middle")
    )

    for r, (name, placements, own_start) in enumerate(REQUESTS):
        y = REQ_Y + r * REQ_DY
        parts.append(_text(20, y + BLOCK_H / 2 + 4, name, 13, weight="bold"))
        x = REQ_X
        for doc, start in placements:
            for b in range(DOCS[doc]):
                parts.append(_block(x, y, COLORS[doc], f"{doc}{b}", dashed=True))
                # The block table: this logical block reads that physical block.
                px = _physical_x(doc, b) + BLOCK_W / 2
                parts.append(
                    f'<path d="M{x + BLOCK_W / 2:g},{y - 2:g} C{x + BLOCK_W / 2:g},{y - 40:g} {px:g},{PHYS_Y + 80:g} '
                    f'{px:g},{PHYS_Y + BLOCK_H + 22:g}" fill="none" stroke="{COLORS[doc]}" stroke-width="1.3" '
                    f'stroke-opacity="0.7" marker-end="url(#idea-arrow)"/>'
                    if r == 0
                    else ""
                )
                x += BLOCK_W + GAP
            span = DOCS[doc] * (BLOCK_W + GAP) - GAP
            left = x - span - GAP
            parts.append(
                _text(
                    left + span / 2,
                    y + BLOCK_H + 16,
                    f"at {start} … {start + DOCS[doc] * BLOCK - 1}, δ = {start}",
                    11,
                    "middle",
                )
            )
            parts.append(
                _text(
                    left + span / 2,
                    y + BLOCK_H + 30,
                    f"query: R(p − {start})",
                    11,
                    "middle",
                    cls="idea-accent",
                )
            )
        x += 18
        parts.append(_block(x, y, COLORS["own"], f"own {r + 1}"))
        parts.append(_text(x + BLOCK_W / 2, y + BLOCK_H + 16, f"queries at {own_start} …", 11, "middle"))
    parts.append(_text(560, 160, "block table: physical block + shift δ", 12, cls="idea-muted"))
    parts.append(
        _text(
            WIDTH / 2,
            HEIGHT - 12,
            "Dashed blocks are entries of a block table (physical id, shift δ), not copies: the kernel rotates the "
            "query, never a key.",
            12,
            "middle",
        )
    )
    parts.append("</svg>")
    return "\n".join(p for p in parts if p) + "\n"


def main() -> None:
    OUT.write_text(idea_svg(), encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
