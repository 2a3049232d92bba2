"""The tutorials as pages: each ``tutorials/NN_name.py`` (jupytext percent format) is run
cell by cell, each in a process of its own (``docs/run_tutorial.py``, several at once),
and rendered as the page ``tutorials/NN_name.md``: markdown cells as prose, code cells
as Python blocks, each followed by what it printed and the figures it drew. A tutorial
that fails is a warning, so the strict build fails. ``tests/test_tutorials.py`` runs
them too.
"""

from __future__ import annotations

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

from . import ROOT

log = logging.getLogger("mkdocs.hooks.lazyattention")

TUTORIALS = ROOT / "tutorials"
RUNNER = ROOT / "docs" / "run_tutorial.py"
#: Top-level tables of ``tutorials/07_numerics.py`` that the numerics page shows.
NUMERICS_TABLES = ("ANGLE_ERRORS", "SCORE_ERRORS", "ATTENTION_ERRORS")


def tutorial_paths() -> list[Path]:
    """Every tutorial, in reading order."""
    return sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))


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
        title, learn = tutorial_summary(TUTORIALS / (Path(uri).stem + ".py"))
        parts.append(f"**[{title}]({Path(uri).name})**: {learn}")
    return "\n\n".join(parts) + "\n"
