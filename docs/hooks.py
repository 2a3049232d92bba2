"""MkDocs hooks of the lazyattention site (registered in ``mkdocs.yml``).

What they do, at build time and from the repository only (no network):

* run every ``tutorials/NN_name.py`` (jupytext percent format) cell by cell, each in a
  process of its own (``docs/run_tutorial.py``, several at once), and render it as the
  page ``tutorials/NN_name.md``: markdown cells as prose, code cells as Python blocks,
  each followed by what it printed and the figures it drew. A tutorial that fails is a
  warning, so the strict build fails. ``tests/test_tutorials.py`` runs them too.
* write ``api/fast.md``: the mkdocstrings page of ``lazyattention.fast`` once
  ``fast/__init__.py`` exists, a short "being written" page until then.
* stand in for the optional pages whose source does not exist yet (a tutorial, a
  benchmark page, the quality page, the vLLM how-to: ``OPTIONAL_DOCS``) with a short
  "being written" page, so the nav and every link stay valid and ``mkdocs build
  --strict`` stays green while the project grows. Any other missing page still fails
  the strict build.
* fill the markers ``<!-- figures:NAME -->`` in pages with tables built from committed
  files: ``benchmarks/results/*.json`` (the newest file of each kind, with its device
  and date) and the build's run of ``tutorials/07_numerics.py`` (measured rounding
  errors); ``<!-- figures:idea -->`` inlines ``docs/assets/idea.svg`` so that it takes
  the page's colours. Figures are never typed by hand.
* check that every ``lazyattention.reference.X`` / ``lazyattention.fast.X`` a page names
  exists; a missing name is a warning, which ``strict`` turns into a failed build.
"""

from __future__ import annotations

import ast
import base64
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jupytext
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.lazyattention")

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
RESULTS = ROOT / "benchmarks" / "results"
FAST_INIT = ROOT / "fast" / "__init__.py"
FAST_SHARED = ROOT / "fast" / "shared.py"
SHARED_NAMES = ("plan_sharing", "shared_decode", "SharingPlan", "SharedSegment")

#: Nav pages written by other parts of the project, and the stand-in each gets while absent
#: (tutorials, also optional, get theirs from ``placeholder_markdown``).
OPTIONAL_DOCS = {
    "benchmarks/kernels.md": (
        "# Kernels\n\n*Not yet measured.* This page is written from the committed kernel results "
        "under `benchmarks/results/` when they land; the [benchmarks overview](index.md) lists what "
        "is there now.\n"
    ),
    "benchmarks/engine.md": (
        "# Serving engine\n\n*Not yet measured.* This page is written from the committed engine "
        "results under `benchmarks/results/` when they land; the [benchmarks overview](index.md) "
        "lists what is there now.\n"
    ),
    "concepts/quality.md": (
        "# Quality on a real model\n\n*Not yet measured.* This page reports the lazy and "
        "Block-Attention outputs of a real checkpoint side by side, from the committed "
        "`benchmarks/results/quality_*.json`, when that run lands.\n"
    ),
    "howto/vllm.md": (
        "# Serve with vLLM\n\n*Being written.* This page explains the vLLM plugin "
        "(`lazyattention.integrations`) once it lands.\n"
    ),
}
RUNNER = ROOT / "docs" / "run_tutorial.py"
#: Top-level tables of ``tutorials/07_numerics.py`` that the numerics page shows.
NUMERICS_TABLES = ("ANGLE_ERRORS", "SCORE_ERRORS", "ATTENTION_ERRORS")

MARKER = re.compile(r"<!--\s*figures:([a-z0-9-]+)\s*-->")
API_NAME = re.compile(
    r"lazyattention\.(reference|fast|serving|integrations)\.([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?"
)
SPHINX_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|obj|exc):(<code>)")

_cache: dict[str, object] = {}


# --------------------------------------------------------------------------- pages still to come


def _nav_uris(nav) -> list[str]:
    """Every page path named in the nav, depth first."""
    uris = []
    for item in nav or []:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            uris += _nav_uris(value)
        elif isinstance(value, str):
            uris.append(value)
    return uris


def placeholder_markdown(uri: str) -> str:
    """The stand-in for an optional page whose source does not exist yet.

    A stand-in rather than a gap keeps the nav complete and every link to the page
    valid (other pages and tutorials link to these before they land).
    """
    if uri in OPTIONAL_DOCS:
        return OPTIONAL_DOCS[uri]
    stem = Path(uri).stem
    return (
        f"# {stem[:2].lstrip('0')}. {stem[3:].replace('_', ' ').capitalize()}\n\n"
        f"*Being written.* This page is rendered from `tutorials/{stem}.py` as soon as "
        "that file exists.\n"
    )


# --------------------------------------------------------------------------- generated pages


def _tutorial_environment(workers: int) -> dict[str, str]:
    """The environment a tutorial runs in during the build: as ``tests/test_tutorials.py``
    runs it (Triton's interpreter without CUDA), with the CPU shared among ``workers``."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    if "TRITON_INTERPRET" not in env:
        import torch

        if not torch.cuda.is_available():
            env["TRITON_INTERPRET"] = "1"
    return env


def run_tutorial(path: Path, env: dict[str, str]) -> dict:
    """Run one tutorial in a fresh process (``docs/run_tutorial.py``); its cells' outputs."""
    keep = list(NUMERICS_TABLES) if path.stem == "07_numerics" else []
    with tempfile.TemporaryDirectory() as scratch:  # a tutorial that writes files leaves no trace
        out = Path(scratch) / "run.json"
        result = subprocess.run(
            [sys.executable, str(RUNNER), str(path), str(out), *keep],
            cwd=scratch,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        if result.returncode != 0 or not out.exists():
            return {"cells": [], "tables": {}, "seconds": 0.0, "error": result.stderr[-4000:] or "no output"}
        return json.loads(out.read_text(encoding="utf-8"))


def run_tutorials(paths: list[Path]) -> dict[str, dict]:
    """Every tutorial's run, several at once; a failed one is a warning (a strict failure)."""
    workers = max(1, min(len(paths), os.cpu_count() or 1, 4))
    env = _tutorial_environment(workers)
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        runs = dict(zip((p.stem for p in paths), pool.map(lambda p: run_tutorial(p, env), paths), strict=True))
    for stem, run in runs.items():
        if run["error"]:
            log.warning("tutorials/%s.py failed while the docs were built:\n%s", stem, run["error"])
        else:
            log.info("tutorials/%s.py ran in %.1f s", stem, run["seconds"])
    log.info("%d tutorials ran in %.1f s (%d at a time)", len(paths), time.perf_counter() - start, workers)
    return runs


def _fence(text: str, lang: str) -> str:
    """``text`` in a fenced block longer than any run of backticks inside it."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{lang}\n{text}\n{ticks}"


def _output_block(markdown: str) -> str:
    """A cell's output, set apart from the code above it (``.tutorial-output`` in extra.css)."""
    return f'<div class="tutorial-output" markdown>\n\n{markdown}\n\n</div>'


def _device_words() -> str:
    import torch

    return "a CUDA GPU" if torch.cuda.is_available() else "a CPU (Triton kernels under its interpreter)"


def tutorial_markdown(path: Path, run: dict | None = None) -> tuple[str, list[tuple[str, bytes]]]:
    """A tutorial ``.py`` (jupytext percent format) as a markdown page, and its figures.

    With ``run`` (from :func:`run_tutorial`), each code cell is followed by what it
    printed and by the figures it drew, returned as ``(file name, PNG bytes)`` for the
    page's ``figures/`` folder.
    """
    notebook = jupytext.reads(path.read_text(encoding="utf-8"), fmt="py:percent")
    rel = path.relative_to(ROOT).as_posix()
    outputs = {cell["index"]: cell for cell in (run or {}).get("cells", [])}
    size = (
        "the small size of the test suite"
        if os.environ.get("LAZYATTENTION_TUTORIAL_SMALL") == "1"
        else "its default size"
    )
    parts, figures = [], []
    for i, cell in enumerate(notebook.cells):
        source = cell.source.strip("\n")
        if not source.strip():
            continue
        if cell.cell_type == "markdown":
            parts.append(source)
        else:
            parts.append(_fence(source, "{.python .tutorial-code}"))
            output = outputs.get(i)
            if output and output["stdout"].strip():
                parts.append(_output_block(_fence(output["stdout"].rstrip("\n"), "text")))
            for k, png in enumerate(output["figures"] if output else []):
                name = f"{path.stem}-{i}-{k}.png"
                figures.append((name, base64.b64decode(png)))
                parts.append(_output_block(f"![Figure drawn by the cell above](figures/{name})"))
        if i == 0:
            ran = (
                f" The output under each cell was produced by running it when this site was built, at {size}, "
                f"on {_device_words()}: {run['seconds']:.0f} s."
                if run and not run.get("error")
                else ""
            )
            parts.append(
                '!!! example "Run it"\n'
                f"    This page is the file `{rel}`, rendered. Run it with "
                f"`.venv/bin/python {rel}`: it asserts every claim it makes. The test suite runs "
                f"it too (`tests/test_tutorials.py`), at a small size.{ran}"
            )
    return "\n\n".join(parts) + "\n", figures


def tutorial_summary(path: Path) -> tuple[str, str]:
    """A tutorial's title and the first thing it says you will learn."""
    first = jupytext.reads(path.read_text(encoding="utf-8"), fmt="py:percent").cells[0].source
    lines = first.splitlines()
    title = next((line[2:].strip() for line in lines if line.startswith("# ")), path.stem)
    bullet: list[str] = []
    for line in lines[next((i for i, line in enumerate(lines) if "you will learn" in line.lower()), len(lines)) :]:
        if line.startswith(("* ", "- ")):
            if bullet:
                break
            bullet.append(line[2:].strip())
        elif bullet and line.startswith("  ") and line.strip():
            bullet.append(line.strip())
        elif bullet:
            break
    return title, " ".join(bullet).rstrip(" ;,") + "."


def tutorials_index_markdown(uris: list[str]) -> str:
    """The tutorials overview: each tutorial's title and what it teaches first."""
    parts = [
        "# Tutorials",
        "Runnable Python files in `tutorials/` (jupytext percent format: open them as notebooks "
        "with `jupytext --to notebook`, or run them as scripts). Each one asserts what it "
        "claims, and the test suite runs them all. Read them in order: from the rotation itself "
        "to the kernel and the engine.",
    ]
    for uri in uris:
        path = TUTORIALS / (Path(uri).stem + ".py")
        if path.exists():
            title, learn = tutorial_summary(path)
            parts.append(f"**[{title}]({Path(uri).name})**: {learn}")
        else:
            parts.append(f"**[{Path(uri).stem[:2].lstrip('0')}. …]({Path(uri).name})** (being written)")
    return "\n\n".join(parts) + "\n"


FAST_PLACEHOLDER = """# lazyattention.fast

The Triton backend is being written: this page fills itself in from the docstrings of
`lazyattention.fast` as soon as the package has its `fast/__init__.py`.

Its public attention functions have the same names and signatures as those of
[`lazyattention.reference`](reference.md) (`ATTENTION_API`); a test enforces it.
"""

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
#: A module that does not exist (yet) is skipped.
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
    if not FAST_INIT.exists():
        return FAST_PLACEHOLDER
    names = static_all(FAST_INIT)
    parts = [FAST_INTRO, "::: lazyattention.fast\n    options:\n      members: false\n      show_root_heading: false"]
    if names:
        parts.append(_objects([f"lazyattention.fast.{name}" for name in names]))
    else:
        parts = [FAST_INTRO, "::: lazyattention.fast"]
    if FAST_SHARED.exists():  # beyond the attention API: its own module
        parts += ["## Shared-segment decode", "::: lazyattention.fast.shared\n    options:\n      members: false",
                  _objects([f"lazyattention.fast.shared.{name}" for name in SHARED_NAMES])]  # fmt: skip
    return "\n\n".join(parts) + "\n"


def on_files(files, config):
    paths = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
    _cache["runs"] = run_tutorials(paths)
    for path in paths:
        page, figures = tutorial_markdown(path, _cache["runs"][path.stem])
        files.append(File.generated(config, f"tutorials/{path.stem}.md", content=page))
        for name, png in figures:
            files.append(File.generated(config, f"tutorials/figures/{name}", content=png))
    tutorial_uris = [u for u in _nav_uris(config["nav"]) if u.startswith("tutorials/") and u != "tutorials/index.md"]
    files.append(File.generated(config, "tutorials/index.md", content=tutorials_index_markdown(tutorial_uris)))
    for uri in _nav_uris(config["nav"]):
        if (uri.startswith("tutorials/") or uri in OPTIONAL_DOCS) and files.get_file_from_path(uri) is None:
            log.info("%s does not exist yet: a stand-in page takes its place", uri)
            files.append(File.generated(config, uri, content=placeholder_markdown(uri)))
    # Plots committed beside the result files are published at benchmarks/results/NAME.png,
    # so benchmark pages can show them (docs/benchmarks/*.md: ![...](results/NAME.png)).
    for plot in sorted(RESULTS.glob("*.png")) if RESULTS.is_dir() else []:
        files.append(File.generated(config, f"benchmarks/results/{plot.name}", abs_src_path=str(plot)))
    files.append(File.generated(config, "api/reference.md", content=reference_api_markdown()))
    files.append(File.generated(config, "api/fast.md", content=fast_api_markdown()))
    return files


# --------------------------------------------------------------------------- figures


def _load_results() -> list[tuple[str, dict]]:
    """Every committed ``benchmarks/results/*.json`` as ``(name, data)``, sorted by name."""
    out = []
    for path in sorted(RESULTS.glob("*.json")) if RESULTS.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            log.warning("benchmarks/results/%s is not valid JSON: %s", path.name, exc)
            continue
        out.append((path.name, data if isinstance(data, dict) else {"data": data}))
    return out


def _find(data: dict, *keys: str):
    """The first of ``keys`` found at the top level or one level down (``meta``, ``env``…)."""
    for key in keys:
        if key in data:
            return data[key]
    for value in data.values():
        if isinstance(value, dict):
            for key in keys:
                if key in value:
                    return value[key]
    return None


def describe_device(data: dict) -> str:
    device = _find(data, "device", "gpu", "device_name")
    if isinstance(device, dict):
        device = device.get("name") or device.get("device") or json.dumps(device, sort_keys=True)
    return str(device) if device else "device not recorded"


def _date(data: dict) -> str:
    value = _find(data, "date", "timestamp", "time", "created")
    return str(value) if value else "date not recorded"


def _fmt(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _headline_items(name: str, data: dict) -> list[dict]:
    """A result file's headline figures: its ``headline`` list, else its ``targets``.

    ``headline`` items are ``{"name", "value", "unit"}`` (``"target"``, ``"pass"``
    optional); ``targets`` items are ``{"target", "pass"}`` with the measured figure in
    ``"value"`` or ``"worst"`` (and ``"where"`` it was worst).
    """
    items = []
    if data.get("headline"):
        for item in data["headline"]:
            if not isinstance(item, dict) or "name" not in item or "value" not in item:
                log.warning("benchmarks/results/%s: a headline item needs 'name' and 'value': %r", name, item)
                continue
            items.append(item)
        return items
    for item in data.get("targets") or []:
        if not isinstance(item, dict) or "target" not in item or "pass" not in item:
            log.warning("benchmarks/results/%s: a target needs 'target' and 'pass': %r", name, item)
            continue
        value = item.get("value", item.get("worst"))
        where = f" (worst at {item['where']})" if item.get("where") else ""
        items.append(
            {"name": f"{item['target']}{where}", "value": "n/a" if value is None else value, "pass": item["pass"]}
        )
    return items


def headline_table() -> str:
    """Every result file's headline figures: one table per file, under its device and date.

    Convention for ``benchmarks/results/*.json``: a top-level ``"headline"`` list (or a
    ``"targets"`` list, see :func:`_headline_items`), and the run's ``"device"`` and
    ``"date"`` (top level or one level down).
    """
    blocks = []
    for name, data in _load_results():
        rows = []
        for item in _headline_items(name, data):
            target = item.get("target", "")
            verdict = {True: "PASS", False: "**MISS**"}.get(item.get("pass"), "")
            measured = f"{_fmt(item['value'])} {item.get('unit', '')}".strip()
            rows.append(f"| {item['name']} | {measured} | {f'{target} ' if target else ''}{verdict} |")
        if rows:
            blocks.append(
                f"From `benchmarks/results/{name}`, measured on **{describe_device(data)}**, {_date(data)}:\n\n"
                "| figure | measured | verdict |\n|---|---|---|\n" + "\n".join(rows)
            )
    if not blocks:
        return (
            "*Not yet measured.* No committed file under `benchmarks/results/` carries headline "
            "figures yet; this table fills itself in from those files when they land."
        )
    return "\n\n".join(blocks)


def results_table() -> str:
    """One row per committed result file: device, date, what it holds."""
    results = _load_results()
    if not results:
        return "*Not yet measured.* No result file is committed under `benchmarks/results/` yet."
    rows = []
    for name, data in results:
        versions = _find(data, "versions", "torch", "software")
        if isinstance(versions, dict):
            versions = ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
        keys = ", ".join(f"`{k}`" for k in list(data)[:8])
        rows.append(f"| `{name}` | {describe_device(data)} | {_date(data)} | {versions or 'not recorded'} | {keys} |")
    head = "| file | device | date | versions | contents |\n|---|---|---|---|---|"
    return head + "\n" + "\n".join(rows)


def _numerics() -> dict:
    """The measured tables of this build's run of ``tutorials/07_numerics.py``."""
    if "runs" not in _cache:  # outside a build (the tests): run it now
        _cache["runs"] = run_tutorials([TUTORIALS / "07_numerics.py"])
    return _cache["runs"].get("07_numerics", {}).get("tables", {})


def _markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def numerics_table(which: str) -> str:
    namespace = _numerics()
    table = namespace.get(which)
    if not table:
        log.warning("tutorials/07_numerics.py defines no non-empty table %r", which)
        return f"*(table {which!r} missing)*"
    return _markdown_table(table)


def plots_markdown() -> str:
    """Every plot committed under ``benchmarks/results/``, for the benchmarks overview."""
    plots = sorted(RESULTS.glob("*.png")) if RESULTS.is_dir() else []
    if not plots:
        return "*No plot committed under `benchmarks/results/` yet.*"
    return "\n\n".join(f"![{p.stem}](results/{p.name})\n\n`benchmarks/results/{p.name}`" for p in plots)


BENCHMARK_PAGES = (
    (
        "kernels.md",
        "Kernels",
        "the lazy prefill and decode kernels beside the same kernels without rotation, FlashInfer "
        "(where measured), PyTorch SDPA and the copy-and-re-rotate (Block-Attention) path, with the "
        "targets each had to meet.",
    ),
    (
        "engine.md",
        "Serving engine",
        "the document workload under every reuse strategy: TTFT, throughput, hit ratio and KV "
        "memory against popularity skew and KV budget.",
    ),
    (
        "shared-decode.md",
        "Shared-segment decode",
        "documents read by many requests of one decode batch, read once for all of them at their "
        "own offsets, against the per-request decode.",
    ),
)


def benchmark_pages() -> str:
    """Links to the benchmark pages, saying which are still to be measured."""
    lines = []
    for name, title, what in BENCHMARK_PAGES:
        status = "" if (ROOT / "docs" / "benchmarks" / name).exists() else " (not yet measured)"
        lines.append(f"* [{title}]({name}){status}: {what}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the home page's figures

IDEA_SVG = ROOT / "docs" / "assets" / "idea.svg"


def idea_figure() -> str:
    """``docs/assets/idea.svg`` inlined, so that its text takes the page's colour (dark theme too)."""
    svg = IDEA_SVG.read_text(encoding="utf-8").strip()
    return f'<figure class="idea" markdown="0">\n{svg}\n</figure>'


def _kind(name: str) -> str:
    """The kind of a result file: ``kernels_h200.json`` is a ``kernels`` result."""
    return name.split("_", 1)[0].removesuffix(".json")


def newest(kind: str) -> tuple[str, dict] | None:
    """The committed result of that kind with the latest recorded date (then name)."""
    found = [(name, data) for name, data in _load_results() if _kind(name) == kind]
    return max(found, key=lambda item: (_date(item[1]), item[0]), default=None)


def _source(name: str, data: dict) -> str:
    return f"Measured on **{describe_device(data)}**, {_date(data)[:10]} (`benchmarks/results/{name}`)."


def _best_bold(values: list[float | None], fmt: str) -> list[str]:
    best = max((v for v in values if v is not None), default=None)
    cells = []
    for v in values:
        text = "—" if v is None else format(v, fmt)
        cells.append(f"**{text}**" if v is not None and v == best else text)
    return cells


def _provider(rows: list[dict], field: str, *candidates: str) -> str | None:
    """The first provider among ``candidates`` (a name, or ``~part`` for any name holding
    ``part``) that some row measured in ``field``."""
    names = {n for r in rows for n, v in (r.get(field) or {}).items() if v}
    for cand in candidates:
        match = sorted(n for n in names if (cand[1:] in n if cand.startswith("~") else n == cand))
        if match:
            return match[0]
    return None


#: The kernel rows a newcomer can place: (column title, providers to look for).
PREFILL_PEERS = (
    ("lazy (ours)", ("lazy",)),
    ("FlashInfer", ("~flashinfer",)),
    ("SDPA flash, pre-rotated keys", ("sdpa_flash",)),
    ("SDPA cuDNN, pre-rotated keys", ("sdpa_cudnn",)),
    ("materialise: copy + re-rotate first", ("materialise_sdpa", "materialise")),
)
DECODE_PEERS = (
    ("lazy (ours)", ("lazy",)),
    ("FlashInfer", ("flashinfer", "~flashinfer")),
    ("FlashInfer tensor-core decode", ("flashinfer_tc",)),
    ("materialise: copy + re-rotate", ("materialise",)),
)
OFFICIAL_KERNELS = (
    "The official LazyAttention kernels (a patch layer over vLLM 0.9.2: Llama only, NeoX RoPE, "
    "rotation math in bf16) have no published kernel-level throughput that we know of to set in these "
    "tables; the paper reports end-to-end serving figures, which stand beside the engine's below."
)


def _peer_table(rows: list[dict], field: str, peers, key_cols, fmt: str, extra=None) -> tuple[str, list[tuple]]:
    """A table of ``field`` per provider, one row per shape; also the peers not measured,
    as ``(title, provider names)``."""
    chosen = [(title, _provider(rows, field, *cands)) for title, cands in peers]
    present = [(title, name) for title, name in chosen if name]
    missing = [(title, cands) for (title, cands), (_, name) in zip(peers, chosen, strict=True) if not name]
    head = [title for title, _ in key_cols] + [title for title, _ in present]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        values = [(r.get(field) or {}).get(name) for _, name in present]
        cells = _best_bold(values, fmt)
        if extra:
            cells = [c if v is None else f"{c} {extra(v)}" for c, v in zip(cells, values, strict=True)]
        keys = [describe(r) for _, describe in key_cols]
        lines.append("| " + " | ".join(keys + cells) + " |")
    return "\n".join(lines), missing


def _missing_peer(peer: tuple[str, tuple[str, ...]], data: dict, device: str, other: str) -> str:
    """The line for a peer ``(title, provider names)`` a table could not show: unmeasured,
    or one of its providers measured in another form somewhere in the result other than
    the ``other`` table."""
    title, cands = peer
    rest = json.dumps({k: v for k, v in data.items() if k != other}).lower()
    if any(f'"{c.lstrip("~")}' in rest for c in cands):
        return (
            f"*{title} is in this result in a form this table does not read: see the "
            "[kernels page](benchmarks/kernels.md).*"
        )
    return f"*{title}: not yet measured on {device}.*"


def peers_kernels() -> str:
    """Lazy against FlashInfer, SDPA on pre-rotated keys and materialise, from the newest
    kernel result; a line for every peer that file did not measure."""
    found = newest("kernels")
    if found is None:
        return (
            "*Kernels not yet measured on a GPU*: no kernel result is committed under `benchmarks/results/`.\n\n"
            + OFFICIAL_KERNELS
        )
    name, data = found
    device = describe_device(data)
    parts = [_source(name, data)]
    prefill = [r for r in data.get("prefill") or [] if r.get("head_dim", 128) == 128 and r.get("tflops")]
    if prefill:
        table, missing = _peer_table(
            prefill,
            "tflops",
            PREFILL_PEERS,
            [
                ("requests", lambda r: str(r.get("batch", 1))),
                ("query tokens", lambda r: str(r.get("Tq", "—"))),
                ("keys", lambda r: f"{r.get('Tk', 0) // 1024}k"),
                ("document length", lambda r: str(r.get("segment", "—"))),
            ],
            ".0f",
        )
        parts += [
            f"**Prefill**, TFLOP/s (higher is better; best in bold): {data.get('heads', '?')} query heads over "
            f"{data.get('kv_heads', '?')} KV heads, head dim 128, bf16, new query tokens per request after the "
            "documents were cached once. SDPA and FlashInfer read the documents' keys already rotated where they "
            "sit, contiguous: their best case, since neither can shift a cached document.",
            table,
        ]
        parts += [_missing_peer(m, data, device, "decode") for m in missing]
    else:
        parts.append(f"*Prefill not yet measured on {device}.*")
    decode = [r for r in data.get("decode") or [] if r.get("Tk", 0) >= 4096 and r.get("tb_per_s")]
    copy_bw = (data.get("ceilings") or {}).get("copy_tb_per_s")
    if decode:
        table, missing = _peer_table(
            decode,
            "tb_per_s",
            DECODE_PEERS,
            [
                ("requests", lambda r: str(r.get("batch", "—"))),
                ("keys", lambda r: f"{r.get('Tk', 0) // 1024}k"),
                ("document length", lambda r: str(r.get("segment", "—"))),
            ],
            ".2f",
            extra=(lambda v: f"({v / copy_bw:.0%})") if copy_bw else None,
        )
        ceiling = (
            f" and, in brackets, the fraction of the device's copy bandwidth ({copy_bw:.2f} TB/s)" if copy_bw else ""
        )
        parts += [f"**Decode**, one query per request: TB/s of keys and values read{ceiling}.", table]
        parts += [_missing_peer(m, data, device, "prefill") for m in missing]
    else:
        parts.append(f"*Decode not yet measured on {device}.*")
    parts.append(OFFICIAL_KERNELS)
    return "\n\n".join(parts)


#: The paper's headline (the official implementation, on its own hardware), for the engine table.
PAPER_ENGINE = {"TTFT p50": 1.37, "throughput": 1.40}


def peers_engine() -> str:
    """The engine's lazy against Block-Attention, per workload setting, beside the paper's figures."""
    found = newest("engine")
    if found is None:
        return "*The serving engine is not yet measured on a GPU*: no engine result is committed."
    name, data = found
    # the offline burst's medians (``burst_medians``; older results: ``medians`` or ``runs``)
    medians = data.get("burst_medians") or data.get("medians") or data.get("runs") or []
    by_setting: dict[tuple, dict] = {}
    for row in medians:
        key = (row.get("alpha"), row.get("budget_fraction"))
        by_setting.setdefault(key, {}).setdefault(row.get("strategy"), row)
    head = (
        "| workload | TTFT p50: lazy / Block-Attention | lazy lower by | throughput: lazy / Block-Attention "
        "| lazy higher by | KV copied by Block-Attention |\n|---|---|---|---|---|---|"
    )
    lines = []
    for (alpha, budget), rows in by_setting.items():
        lazy, block = rows.get("lazy"), rows.get("block_attention")
        if not lazy or not block:
            continue
        skew = "uniform documents (α = 0)" if alpha == 0 else f"skewed documents (Zipf α = {alpha:g})"
        lines.append(
            f"| {skew}, KV budget {budget:.0%} | {lazy['ttft_p50'] * 1e3:.0f} / {block['ttft_p50'] * 1e3:.0f} ms | "
            f"**{block['ttft_p50'] / lazy['ttft_p50']:.2f}×** | "
            f"{lazy['requests_per_s']:.1f} / {block['requests_per_s']:.1f} requests/s | "
            f"**{lazy['requests_per_s'] / block['requests_per_s']:.2f}×** | "
            f"{block.get('bytes_copied', 0) / 1e9:.2f} GB |"
        )
    if not lines:
        return _source(name, data) + "\n\n*This result holds no lazy and Block-Attention rows side by side.*"
    lines.append(
        "| the paper: skewed documents, the official implementation on its own hardware | — | "
        f"{PAPER_ENGINE['TTFT p50']:.2f}× | — | {PAPER_ENGINE['throughput']:.2f}× | — |"
    )
    workload = data.get("workload") or {}
    what = (
        f"A model of the `{data.get('model', '?')}` shape, {data.get('dtype', '?')}; "
        f"{workload.get('num_requests', '?')} requests of {workload.get('docs_per_request', '?')} documents "
        f"(about {workload.get('doc_len_mean', '?')} tokens each) in random order, "
        f"arrivals {data.get('arrivals') or ('all at t = 0' if 'burst_medians' in data else 'not recorded')}; "
        "medians of the repeats."
    )
    return "\n\n".join([_source(name, data) + " " + what, head + "\n" + "\n".join(lines)])


def _table_rows(data: dict) -> list[dict] | None:
    for key in ("table", "rows", "results", "quality"):
        rows = data.get(key)
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            return rows
    return None


def peers_quality() -> str:
    """The real-model quality table of the newest ``quality_*.json``."""
    found = newest("quality")
    if found is None:
        return (
            "*Not yet measured.* The comparison of lazy and Block-Attention outputs on a real checkpoint "
            "is written from `benchmarks/results/quality_*.json` once that run is committed; see "
            "[Quality on a real model](concepts/quality.md)."
        )
    name, data = found
    rows = _table_rows(data)
    model = _find(data, "model", "checkpoint")
    intro = _source(name, data) + (f" Model: `{model}`." if isinstance(model, str) else "")
    if rows is None:
        return intro + "\n\n*This result holds no table this page can read.*"
    return "\n\n".join([intro, _markdown_table(rows), "More on [Quality on a real model](concepts/quality.md)."])


FIGURES = {
    "idea": idea_figure,
    "peers-kernels": peers_kernels,
    "peers-engine": peers_engine,
    "peers-quality": peers_quality,
    "benchmark-pages": benchmark_pages,
    "plots": plots_markdown,
    "headline": headline_table,
    "results": results_table,
    "numerics-angles": lambda: numerics_table("ANGLE_ERRORS"),
    "numerics-scores": lambda: numerics_table("SCORE_ERRORS"),
    "numerics-attention": lambda: numerics_table("ATTENTION_ERRORS"),
}


# --------------------------------------------------------------------------- API names


def _reference_names() -> set[str]:
    if "reference" not in _cache:
        import lazyattention.reference as ref  # the docs build needs the package installed

        _cache["reference"] = set(dir(ref))
    return _cache["reference"]


def _fast_names() -> set[str] | None:
    """``lazyattention.fast.__all__`` read statically (no Triton import), or None."""
    names = static_all(FAST_INIT)
    return None if names is None else set(names)


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
        if package == "reference":
            known = _reference_names()
        else:
            fast = _fast_names()
            # Until fast/ exists, it must offer what reference's ATTENTION_API promises.
            import lazyattention.reference as ref

            known = fast if fast is not None else set(ref.ATTENTION_API)
        if name not in known:
            log.warning("%s names lazyattention.%s.%s, which does not exist", page_uri, package, name)


# --------------------------------------------------------------------------- links to the API

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
            documented = member == "reference" or FAST_INIT.exists()  # else the page is a stand-in
            return f"[{match.group(0)}][lazyattention.{member}]" if documented else match.group(0)
        if package == "fast":
            fast = _fast_names() or set()
            if name in fast and member is None:
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


# --------------------------------------------------------------------------- page hooks


def on_page_markdown(markdown, page, config, files):
    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name not in FIGURES:
            log.warning("%s: unknown figures marker %r", page.file.src_uri, name)
            return match.group(0)
        return FIGURES[name]()

    markdown = MARKER.sub(fill, markdown)
    check_api_names(markdown, page.file.src_uri)
    if not page.file.src_uri.startswith("api/"):
        markdown = link_api_names(markdown, page.file.src_uri)
    return markdown


def on_page_content(html, page, config, files):
    # Docstrings use Sphinx roles (:func:`x`); mkdocstrings' Google parser keeps the
    # role as text. Drop the role, keep the code span.
    if page.file.src_uri.startswith("api/"):
        html = SPHINX_ROLE.sub(r"\1", html)
    return html
