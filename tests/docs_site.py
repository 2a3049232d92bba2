"""The documentation site, built once per test run for the tests that read it.

``tests/test_docs.py`` (the build and its HTML) and ``tests/test_docs_browser.py`` (every
page in headless Chromium) share one ``mkdocs build --strict`` through :func:`built_site`.
The site goes to ``build/docs/site`` and the browser's screenshots to
``build/docs/screenshots`` (``build/`` is git-ignored): artifacts to look at after a run.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "docs"
MKDOCS = Path(sys.executable).with_name("mkdocs")


class BuildError(RuntimeError):
    """``mkdocs build --strict`` failed; the message carries the tail of its log."""


@functools.cache
def built_site() -> tuple[Path, float]:
    """Build the site with ``mkdocs build --strict``; return its folder and the seconds it took."""
    out = BUILD / "site"
    if out.exists():
        shutil.rmtree(out)
    # The tutorials run during the build; at the test suite's small size here, as in
    # tests/test_tutorials.py (the pages say which size their output comes from).
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", LAZYATTENTION_TUTORIAL_SMALL="1")
    start = time.perf_counter()
    result = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise BuildError(f"mkdocs build --strict failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return out, seconds
