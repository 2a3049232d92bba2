"""Every tutorial runs, and asserts what it claims.

Each ``tutorials/NN_name.py`` is executed in its own Python process, as a reader would
run it, with ``LAZYATTENTION_TUTORIAL_SMALL=1`` (tutorials may shrink their sizes under
it) and, on a machine without CUDA, ``TRITON_INTERPRET=1`` so Triton kernels run on the
CPU. A tutorial passes when it exits with status 0: its ``assert`` statements are the
checks. The tutorials are also rendered in the docs (``docs/hooks.py``), so they must be
jupytext percent-format files that say what the reader will learn.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))

#: Tutorials 1-4 and 7 run in seconds; the limit only stops a hung run.
TIMEOUT_S = 300


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["LAZYATTENTION_TUTORIAL_SMALL"] = "1"
    env.setdefault("MPLBACKEND", "Agg")
    env.setdefault("PYTHONHASHSEED", "0")
    if "TRITON_INTERPRET" not in env:
        import torch

        if not torch.cuda.is_available():
            env["TRITON_INTERPRET"] = "1"
    return env


def test_tutorials_exist():
    names = {path.stem[:2] for path in TUTORIALS}
    assert {"01", "02", "03", "04", "07"} <= names, f"missing tutorials, found {sorted(names)}"


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_is_a_teaching_page(path: Path):
    notebook = jupytext.reads(path.read_text(encoding="utf-8"), fmt="py:percent")
    first = notebook.cells[0]
    assert first.cell_type == "markdown" and first.source.lstrip().startswith("# "), (
        f"{path.name}: the first cell must be markdown with a '# Title'"
    )
    assert "you will learn" in first.source.lower(), f"{path.name}: the first cell must say what you will learn"
    code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    assert "assert " in code, f"{path.name}: a tutorial must assert what it claims"


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path: Path, tmp_path: Path):
    # Run from a scratch directory so a tutorial that writes files cannot dirty the tree.
    result = subprocess.run(
        [sys.executable, str(path)],
        cwd=tmp_path,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if result.returncode != 0:
        pytest.fail(
            f"{path.name} exited with {result.returncode}\n--- stdout (tail)\n{result.stdout[-3000:]}"
            f"\n--- stderr (tail)\n{result.stderr[-5000:]}"
        )
