"""The source of the kernels and of the reference as pages, and links into them.

Every ``fast/*.py`` and ``reference/*.py`` is published as ``source/<folder>/<file>.md``:
the file with numbered lines, each line an anchor. A page links into them by name,
never by line number, so the links follow the code when it moves or is split:

* ``[text](source:NAME)``: the line where the function or class ``NAME`` starts (its
  first decorator, so a kernel's link shows its ``@triton.jit``), in whichever file
  defines it;
* ``[text](source:NAME#TEXT)``: the first line inside ``NAME`` that contains ``TEXT``;
* ``[text](source:fast/attend.py)``: the top of a file.

A name that no file defines, or a text not found, is a warning: the strict build fails.
"""

from __future__ import annotations

import ast
import logging
import posixpath
import re
from pathlib import Path

from . import ROOT

log = logging.getLogger("mkdocs.hooks.lazyattention")

FOLDERS = ("fast", "reference")
INDEX = "source/index.md"
LINK = re.compile(r"\]\(source:([^)#\s]+)(?:#([^)]*))?\)")


def source_files() -> list[Path]:
    """The published source files, folder by folder."""
    return [path for folder in FOLDERS for path in sorted((ROOT / folder).glob("*.py"))]


def page_uri(path: Path) -> str:
    """The page of a source file: ``fast/attend.py`` -> ``source/fast/attend.md``."""
    return "source/" + path.relative_to(ROOT).with_suffix(".md").as_posix()


def line_anchor(line: int) -> str:
    """The anchor of a line on a source page (pymdownx.highlight's, the page's one block)."""
    return f"__codelineno-0-{line}"


def source_markdown(path: Path) -> str:
    rel = path.relative_to(ROOT).as_posix()
    text = path.read_text(encoding="utf-8").rstrip("\n")
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return (
        f"# {rel}\n\nThe file `{rel}` as this site was built, lines numbered. "
        "The [tutorials](../../tutorials/index.md) link here by name.\n\n"
        f'{ticks}python linenums="1"\n{text}\n{ticks}\n'
    )


def index_markdown() -> str:
    lines = [
        "# Source",
        "The kernels (`fast/`) and the definition they are checked against (`reference/`), as this site "
        "was built, with numbered lines. Tutorial 5 walks through the attention kernel; its links land on "
        "the lines it discusses.",
    ]
    for folder in FOLDERS:
        files = [p for p in source_files() if p.parent.name == folder]
        lines.append(f"## {folder}/\n\n" + "\n".join(f"* [`{p.name}`]({folder}/{p.stem}.md)" for p in files))
    return "\n\n".join(lines) + "\n"


def _definitions() -> dict[str, tuple[Path, ast.AST]]:
    """Every function and class of the published files: name -> (file, node). A name
    defined at the top level wins over a nested one, and ``fast/`` over ``reference/``
    (the pages link to the kernels)."""
    top_level: dict[str, tuple[Path, ast.AST]] = {}
    nested: dict[str, tuple[Path, ast.AST]] = {}
    for path in source_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                (top_level if id(node) in top else nested).setdefault(node.name, (path, node))
    return nested | top_level


def resolve(target: str, text: str | None) -> tuple[str, str | None] | None:
    """``(page uri, anchor)`` of ``source:TARGET[#TEXT]``, or None when it names nothing."""
    if target.endswith(".py"):
        path = ROOT / target
        return (page_uri(path), None) if path in source_files() and text is None else None
    definition = _definitions().get(target)
    if definition is None:
        return None
    path, node = definition
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    if text is None:
        return page_uri(path), line_anchor(first)
    lines = path.read_text(encoding="utf-8").splitlines()
    for number in range(node.lineno, node.end_lineno + 1):
        if text in lines[number - 1]:
            return page_uri(path), line_anchor(number)
    return None


def link_source(markdown: str, page_uri_: str) -> str:
    """Replace every ``](source:…)`` link of a page by a link to its source line."""

    def replace(match: re.Match) -> str:
        target, text = match.group(1), match.group(2)
        found = resolve(target, text)
        if found is None:
            log.warning("%s links to source:%s%s, which no file under %s defines", page_uri_, target,
                        f"#{text}" if text else "", "/".join(FOLDERS))  # fmt: skip
            return match.group(0)
        uri, anchor = found
        rel = posixpath.relpath(uri, posixpath.dirname(page_uri_) or ".")
        return f"]({rel}{'#' + anchor if anchor else ''})"

    return LINK.sub(replace, markdown)
