"""Every page of the built site, read in headless Chromium as a newcomer would.

The site of ``tests/docs_site.py`` is served on 127.0.0.1 (a free port) and every page is
loaded at 1280 px wide (a desktop) and at 390 px wide (a phone) through Playwright
driving Debian's ``chromium``. A page fails, at either width, on:

* a KaTeX error, or TeX left unrendered in the text;
* an equation number that overlaps its formula;
* a table or code block wider than the page's column that is not a scroll box, or a page
  that scrolls sideways;
* an image that did not load, or any request of the page that failed;
* a console error or an uncaught exception;
* text that mentions an issue number or a session (the pages speak of the project only).

The kernel tutorial fails without a ``@triton.jit`` kernel in a code block of its page.

One full-page screenshot per page and width is kept in ``build/docs/screenshots`` (or in
``$LAZYATTENTION_DOCS_SCREENSHOTS``), named after the page's path and the width
(``home-1280.png``, ``home-390.png``), and one of the home page on the dark theme
(``home-dark.png``).

Chromium: when ``/usr/bin/chromium`` is missing and the tests run as root, it is installed
with ``apt-get`` (a fresh CI machine has none). Playwright is the Python package of the
``docs`` extra; its own browser download is not used. When the browser cannot be had the
test is skipped with the reason, except in CI (``CI`` set), where that is a failure: a
green CI always means the pages were rendered.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.docs_site import BUILD, BuildError, built_site

CHROMIUM = "/usr/bin/chromium"
#: The machine's network is closed: without these Chromium's background services fail to
#: connect and report it on the console of the page.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: A desktop and a phone (an iPhone 12 to 15 is 390 CSS pixels wide).
WIDTHS = (1280, 390)
#: The tutorial that teaches the kernel: its page must show one.
KERNEL_TUTORIAL = "tutorials/05_triton_kernel/"
#: An issue number ("issue 4", "issue #12", "#12 ") or a session, in any case.
FORBIDDEN_TEXT = re.compile(r"\bissues?\s*#?\d+|(?<![\w&#/])#\d{1,4}\b|\bsessions?\b", re.I)


def _no_browser(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"the browser check cannot run in CI: {reason}")
    pytest.skip(reason)


def _chromium() -> str:
    """Path of Debian's chromium, installed with apt-get when missing and allowed."""
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
        _no_browser("chromium is not installed and cannot be installed here (needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0 and cmd[1] == "install":
            _no_browser(f"apt-get install chromium failed: {result.stderr[-500:]}")
    if not Path(CHROMIUM).is_file():
        _no_browser("chromium still not found after apt-get install")
    return CHROMIUM


class _Server:
    """``http.server`` on 127.0.0.1 (a free port) serving ``root`` quietly."""

    def __init__(self, root: Path):
        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, format, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


#: Run in the page after it loaded: what a reader would see go wrong.
INSPECT = """() => {
  const article = document.querySelector("article.md-content__inner") || document.body;
  const column = (document.querySelector(".md-content") || article).getBoundingClientRect();
  // A scroll box inside the page's column (Material's table wrapper reaches into the padding).
  const scrolls = (el) => {
    for (let e = el; e && e !== article.parentElement; e = e.parentElement) {
      const o = getComputedStyle(e).overflowX;
      if ((o === "auto" || o === "scroll") && e.getBoundingClientRect().right <= column.right + 1) return true;
    }
    return false;
  };
  const overflowing = [];
  for (const el of article.querySelectorAll("table, pre")) {
    const r = el.getBoundingClientRect();
    // Against the column, not the article: on a phone, code blocks bleed into its padding.
    const wide = r.right > column.right + 1 || el.scrollWidth > el.clientWidth + 1;
    if (wide && !scrolls(el)) {
      overflowing.push(el.tagName.toLowerCase() + ": " + el.innerText.slice(0, 60).replace(/\\s+/g, " "));
    }
  }
  const images = [...document.images]
    .filter((img) => !img.complete || img.naturalWidth === 0)
    .map((img) => img.getAttribute("src"));
  // An equation number (KaTeX's .katex-tag) that overlaps the formula it numbers.
  const overlapping = [];
  for (const tag of article.querySelectorAll(".katex-display .katex-tag")) {
    const t = tag.getBoundingClientRect();
    const html = tag.closest(".katex-html");
    for (const base of html.querySelectorAll(":scope > .katex-base")) {
      const b = base.getBoundingClientRect();
      const apart = t.right <= b.left + 0.5 || t.left >= b.right - 0.5
        || t.bottom <= b.top + 0.5 || t.top >= b.bottom - 0.5;
      if (!apart) {
        overlapping.push(tag.textContent.trim());
        break;
      }
    }
  }
  // A page that scrolls sideways: something is wider than the screen.
  const sideways = document.documentElement.scrollWidth > document.documentElement.clientWidth + 1;
  const kernels = [...article.querySelectorAll("pre code")].filter((c) => c.textContent.includes("@triton.jit")).length;
  const clone = article.cloneNode(true);
  clone.querySelectorAll("annotation, pre, code, script").forEach((e) => e.remove());
  return {
    katexErrors: [...document.querySelectorAll(".katex-error")].map((e) => e.textContent.slice(0, 80)),
    rawTex: (clone.textContent.match(/\\\\\\(|\\\\\\[|\\$\\$/g) || []).length,
    mathSpans: document.querySelectorAll(".arithmatex").length,
    rendered: document.querySelectorAll(".arithmatex .katex").length,
    overflowing: overflowing,
    overlapping: overlapping,
    sideways: sideways,
    kernels: kernels,
    images: images,
    text: article.innerText,
  };
}"""


def _issues(found: dict, events: list[str]) -> list[str]:
    """What went wrong on one page, from :data:`INSPECT`'s findings and the page's events."""
    issues = list(events)
    issues += [f"KaTeX error: {e}" for e in found["katexErrors"]]
    if found["rawTex"]:
        issues.append(f"{found['rawTex']} TeX delimiters left unrendered")
    if found["rendered"] < found["mathSpans"]:
        issues.append(f"{found['mathSpans']} math spans but {found['rendered']} rendered")
    issues += [f"equation number {tag} overlaps its formula" for tag in found["overlapping"]]
    if found["sideways"]:
        issues.append("the page scrolls sideways: something is wider than the screen")
    issues += [f"wider than the page, no scroll box: {e}" for e in found["overflowing"]]
    issues += [f"image did not load: {src}" for src in found["images"]]
    issues += [f"mentions {m!r}" for m in sorted({m.group(0) for m in FORBIDDEN_TEXT.finditer(found["text"])})]
    return issues


def _pages(site: Path) -> list[str]:
    """Every page of the site, as a path relative to its root ("" is the home page)."""
    pages = []
    for index in sorted(site.rglob("index.html")):
        rel = index.parent.relative_to(site).as_posix()
        if rel.startswith(("assets", "search")):
            continue
        pages.append("" if rel == "." else rel + "/")
    return pages


@pytest.fixture(scope="module")
def screenshots() -> Path:
    folder = Path(os.environ.get("LAZYATTENTION_DOCS_SCREENSHOTS") or BUILD / "screenshots")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def test_every_page_renders_cleanly(screenshots: Path):
    try:
        site, build_seconds = built_site()
    except BuildError as exc:
        pytest.fail(str(exc))
    chromium = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _no_browser(f"the Playwright package is not installed (the docs extra has it): {exc}")

    pages = _pages(site)
    assert len(pages) >= 20, f"only {len(pages)} pages built: {pages}"
    problems: dict[str, list[str]] = {}
    start = time.perf_counter()
    with _Server(site) as server, sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        browser = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=chromium,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": WIDTHS[0], "height": 900},
        )
        tab = browser.new_page()
        events: list[str] = []
        tab.on("console", lambda msg: events.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
        tab.on("pageerror", lambda exc: events.append(f"uncaught: {exc}"))
        # A request the browser aborts (the search worker's, when the next page loads) is
        # cancelled, not missing; a missing file answers HTTP 404, caught below.
        tab.on(
            "requestfailed",
            lambda req: (
                None
                if "ERR_ABORTED" in (req.failure or "")
                else events.append(f"request failed: {req.url} ({req.failure})")
            ),
        )
        tab.on("response", lambda res: events.append(f"HTTP {res.status}: {res.url}") if res.status >= 400 else None)
        for width in WIDTHS:
            tab.set_viewport_size({"width": width, "height": 900})
            for page in pages:
                events.clear()
                tab.goto(server.url + page, wait_until="load")
                found = tab.evaluate(INSPECT)
                name = page.strip("/").replace("/", "__") or "home"
                tab.screenshot(path=str(screenshots / f"{name}-{width}.png"), full_page=True)
                issues = _issues(found, events)
                if page == KERNEL_TUTORIAL and not found["kernels"]:
                    issues.append("no @triton.jit kernel in a code block: the kernel tutorial must show one")
                if issues:
                    problems[f"{page or '/'} at {width} px"] = issues
        # The home page on the dark theme too: the picture of the idea must read there.
        tab.set_viewport_size({"width": WIDTHS[0], "height": 900})
        tab.goto(server.url, wait_until="load")
        tab.evaluate("() => document.body.setAttribute('data-md-color-scheme', 'slate')")
        tab.screenshot(path=str(screenshots / "home-dark.png"), full_page=True)
        browser.close()
    seconds = time.perf_counter() - start
    print(
        f"\n{len(pages)} pages at {len(WIDTHS)} widths in {seconds:.1f} s (site built in {build_seconds:.1f} s); "
        f"screenshots: {screenshots}"
    )
    assert not problems, "\n".join(f"{page}:\n  " + "\n  ".join(issues) for page, issues in problems.items())
