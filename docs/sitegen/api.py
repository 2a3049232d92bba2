"""The API pages, and the API names the other pages cite.

* ``api/reference.md`` and ``api/fast.md``: mkdocstrings pages of every public name,
  grouped by the module that defines it;
* :func:`check_api_names`: every ``lazyattention.PACKAGE.NAME`` a page names exists (a
  missing one is a warning, which ``strict`` turns into a failed build);
* :func:`link_api_names`: a code span that names a public object links to its entry.
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

from . import ROOT

log = logging.getLogger("mkdocs.hooks.lazyattention")

FAST_INIT = ROOT / "fast" / "__init__.py"
SHARED_NAMES = ("plan_sharing", "shared_decode", "SharingPlan", "SharedSegment")
API_NAME = re.compile(
    r"lazyattention\.(reference|fast|serving|integrations)\.([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?"
)
SPHINX_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|obj|exc):(<code>)")

_cache: dict[str, object] = {}


REFERENCE_INTRO = """# lazyattention.reference

The pure-PyTorch definition of deferred positional encoding: runs on any device PyTorch
runs on and never imports Triton. Equation numbers refer to [The math](../concepts/math.md).
Every public name of the package (its `__all__`) is on this page, grouped by the module
that defines it.
"""

FAST_INTRO = """# lazyattention.fast

The Triton backend: the same public attention functions, with the same names and
signatures, as [`lazyattention.reference`](reference.md). Swap the module to swap the
backend (see [Choose a backend](../howto/backend.md)).
"""

#: Sections of the reference API page: (title, defining module), in reading order.
REFERENCE_SECTIONS = (
    ("Attention", "attention"),
    ("RoPE", "rope"),
    ("Layout", "layout"),
    ("Paged cache", "cache"),
    ("Tolerance rule", "tolerance"),
    ("Model", "model"),
    ("Engine", "engine"),
    ("Workload", "workload"),
)


def static_all(path: Path) -> list[str] | None:
    """A module's ``__all__`` read without importing it (None if not a literal list).

    Static on purpose: documenting ``lazyattention.fast`` must not import Triton.
    """
    if not path.exists():
        return None
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            if ast.unparse(node.value) == "list(ATTENTION_API)":  # the attention API's one name list
                import lazyattention.reference as ref  # never imports Triton

                return list(ref.ATTENTION_API)
            try:
                return list(ast.literal_eval(node.value))
            except ValueError:
                return None
    return None


def _objects(paths: list[str]) -> str:
    return "\n\n".join(f"::: {path}" for path in paths)


def reference_api_markdown() -> str:
    """The reference API page: the package docstring, then every public name by module.

    A name the package exports is documented at ``lazyattention.reference.NAME``, the
    path users import; the other public names of a module (its ``__all__``) at
    ``lazyattention.reference.MODULE.NAME``.
    """
    import lazyattention.reference as ref  # the docs build needs the package installed

    public = list(ref.__all__)
    parts = [
        REFERENCE_INTRO,
        "::: lazyattention.reference\n    options:\n      members: false\n      show_root_heading: false",
    ]
    placed: set[str] = set()
    for title, module in REFERENCE_SECTIONS:
        names = static_all(ROOT / "reference" / f"{module}.py")
        if not names:
            continue
        paths = [
            f"lazyattention.reference.{name}" if name in public else f"lazyattention.reference.{module}.{name}"
            for name in names
        ]
        parts += [f"## {title}", f"`lazyattention.reference.{module}`", _objects(paths)]
        placed.update(names)
    rest = [n for n in public if n not in placed]
    if rest:
        parts += ["## Package constants", _objects([f"lazyattention.reference.{n}" for n in rest])]
    return "\n\n".join(parts) + "\n"


def fast_api_markdown() -> str:
    """The fast API page: the package docstring, every name of its ``__all__``, and the
    shared-segment decode module."""
    names = static_all(FAST_INIT)
    parts = [FAST_INTRO, "::: lazyattention.fast\n    options:\n      members: false\n      show_root_heading: false"]
    if names:
        parts.append(_objects([f"lazyattention.fast.{name}" for name in names]))
    else:
        parts = [FAST_INTRO, "::: lazyattention.fast"]
    parts += ["## Shared-segment decode", "::: lazyattention.fast.shared\n    options:\n      members: false",
              _objects([f"lazyattention.fast.shared.{name}" for name in SHARED_NAMES])]  # fmt: skip
    return "\n\n".join(parts) + "\n"


def _reference_names() -> set[str]:
    if "reference" not in _cache:
        import lazyattention.reference as ref  # the docs build needs the package installed

        _cache["reference"] = set(dir(ref))
    return _cache["reference"]


def _fast_names() -> set[str]:
    """``lazyattention.fast.__all__`` read statically (no Triton import)."""
    return set(static_all(FAST_INIT) or ())


def _defined_names(path: Path) -> set[str]:
    """Top-level names a module file defines (functions, classes, assignments, imports)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def check_api_names(markdown: str, page_uri: str) -> None:
    """Warn (a strict-build failure) for each ``lazyattention.PACKAGE.NAME[.ATTR]`` that
    does not exist (``PACKAGE``: reference, fast, serving, integrations). ``NAME`` may be a
    submodule, then ``ATTR`` is checked in it (or is a submodule of a package ``NAME``)."""
    for package, name, attr in set(API_NAME.findall(markdown)):
        folder = ROOT / package if package in ("reference", "fast") else ROOT / "lazyattention" / package
        if (folder / f"{name}.py").exists() or (folder / name / "__init__.py").exists():
            module = folder / f"{name}.py" if (folder / f"{name}.py").exists() else folder / name / "__init__.py"
            submodule = module.name == "__init__.py" and (module.parent / f"{attr}.py").exists()
            if attr and attr not in _defined_names(module) and not submodule:
                log.warning("%s names lazyattention.%s.%s.%s, which does not exist", page_uri, package, name, attr)
            continue
        if package in ("serving", "integrations"):
            init = folder / "__init__.py"
            if not init.exists() or name not in _defined_names(init):
                log.warning("%s names lazyattention.%s.%s, which does not exist", page_uri, package, name)
            continue
        known = _reference_names() if package == "reference" else _fast_names()
        if name not in known:
            log.warning("%s names lazyattention.%s.%s, which does not exist", page_uri, package, name)


# A code span that is not already the text of a link (`[`x`](url)` or `[`x`][id]`).
INLINE_CODE = re.compile(
    r"(?<![`\\\[])`(?:lazyattention\.(reference|fast)\.)?([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?`"
    r"(?![`\]])"
)
FENCE = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n.*?^[ \t]*\1[ \t]*$", re.S | re.M)


def api_index() -> dict[str, tuple[str, object]]:
    """Public name -> (its identifier on the API pages, the object).

    Package exports map to ``lazyattention.reference.NAME``; the other public names of a
    reference module (its ``__all__``) to ``lazyattention.reference.MODULE.NAME``.
    """
    if "index" not in _cache:
        import importlib

        import lazyattention.reference as ref

        index = {name: (f"lazyattention.reference.{name}", getattr(ref, name)) for name in ref.__all__}
        for _, module in REFERENCE_SECTIONS:
            names = static_all(ROOT / "reference" / f"{module}.py") or []
            mod = importlib.import_module(f"lazyattention.reference.{module}") if names else None
            for name in names:
                index.setdefault(name, (f"lazyattention.reference.{module}.{name}", getattr(mod, name)))
        _cache["index"] = index
    return _cache["index"]


def link_api_names(markdown: str, page_uri: str) -> str:
    """Turn `` `name` `` and `` `Class.member` `` into links to the API page.

    Outside code blocks and headings only. A `` `Class.member` `` whose class is public
    but has no such member is a warning (a strict-build failure): the docs drifted.
    """
    index = api_index()

    def replace(match: re.Match) -> str:
        package, name, member = match.groups()
        if package is None and name == "lazyattention" and member in ("reference", "fast"):
            return f"[{match.group(0)}][lazyattention.{member}]"
        if package == "fast":
            if name in _fast_names() and member is None:
                return f"[{match.group(0)}][lazyattention.fast.{name}]"
            return match.group(0)
        if name not in index:
            return match.group(0)
        identifier, obj = index[name]
        if package == "reference" and identifier != f"lazyattention.reference.{name}":
            return match.group(0)  # a submodule name under the package path: checked elsewhere
        if member is not None:
            if not isinstance(obj, type):
                return match.group(0)
            if not hasattr(obj, member) and member not in getattr(obj, "__dataclass_fields__", {}):
                log.warning("%s names %s.%s, which does not exist", page_uri, name, member)
                return match.group(0)
        return f"[{match.group(0)}][{identifier}]"

    def outside_code(text: str) -> str:
        lines = []
        for line in text.split("\n"):
            lines.append(line if line.lstrip().startswith("#") else INLINE_CODE.sub(replace, line))
        return "\n".join(lines)

    out, last = [], 0
    for fence in FENCE.finditer(markdown):
        out.append(outside_code(markdown[last : fence.start()]))
        out.append(fence.group(0))
        last = fence.end()
    out.append(outside_code(markdown[last:]))
    return "".join(out)
