"""The documentation site builds strictly, stays true to the code, and renders.

* ``mkdocs build --strict`` succeeds (broken links, unknown API names, docstrings that
  disagree with signatures and bad figure files all fail it; see ``docs/hooks.py``);
* every public name of ``lazyattention.reference`` (and of ``lazyattention.fast`` once
  it exists) has an entry on its API page; every tutorial has a page; the math page
  carries the equation numbers the code cites;
* the examples included in the pages run;
* the built site needs no network, and headless Chromium renders the home page, a
  concept page with math and a tutorial page: KaTeX output present, no TeX left raw,
  no console error, no missing file. Screenshots are written too (kept in
  ``$LAZYATTENTION_DOCS_SCREENSHOTS`` when that is set).

Chromium is Debian's ``chromium``; when it is missing and the tests run as root it is
installed with apt-get. When it cannot be had the browser test is skipped with the reason,
except in CI (``CI`` set), where that is a failure.
"""

from __future__ import annotations

import ast
import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lazyattention.reference import ATTENTION_API

ROOT = Path(__file__).resolve().parent.parent
MKDOCS = Path(sys.executable).with_name("mkdocs")
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
EQUATIONS = ["1", "2a", "2b", "2c", *map(str, range(3, 13))]

#: Pages the browser test renders: home, a concept page with math, a tutorial page.
BROWSER_PAGES = {
    "home": "",
    "math": "concepts/math/",
    "tutorial": "tutorials/03_deferred_rope_in_pytorch/",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once for this module with ``mkdocs build --strict``."""
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        pytest.fail(f"mkdocs build --strict failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return out


def _static_all(path: Path) -> list[str]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            if ast.unparse(node.value) == "list(ATTENTION_API)":  # the attention API's one name list
                return list(ATTENTION_API)
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"{path} has no literal __all__")


# --------------------------------------------------------------------------- the build


def test_strict_build(site: Path):
    assert (site / "index.html").is_file()
    assert (site / "assets" / "katex" / "katex.min.js").is_file()
    assert not (site / "hooks.py").exists() and not (site / "snippets").exists(), "build inputs were published"
    # The included example is on the home page (pymdownx.snippets ran).
    assert "eager_attention</span>" in (site / "index.html").read_text(encoding="utf-8")


def test_reference_api_page_lists_every_public_name(site: Path):
    import lazyattention.reference as ref

    html = (site / "api" / "reference" / "index.html").read_text(encoding="utf-8")
    missing = [name for name in ref.__all__ if f'id="lazyattention.reference.{name}"' not in html]
    assert not missing, f"not on the API page: {missing}"


def test_fast_api_page(site: Path):
    html = (site / "api" / "fast" / "index.html").read_text(encoding="utf-8")
    init = ROOT / "fast" / "__init__.py"
    if not init.exists():
        assert "being written" in html
        return
    missing = [name for name in _static_all(init) if f'id="lazyattention.fast.{name}"' not in html]
    assert not missing, f"not on the fast API page: {missing}"


def test_math_page_carries_the_equation_numbers(site: Path):
    source = (ROOT / "docs" / "concepts" / "math.md").read_text(encoding="utf-8")
    for eq in EQUATIONS:
        assert source.count(f"\\tag{{{eq}}}") == 1, f"equation ({eq}) must be tagged exactly once"
        assert f'<span id="eq-{eq}"></span>' in source, f"equation ({eq}) needs its anchor"
    assert len(re.findall(r"\\tag\{", source)) == len(EQUATIONS)


def test_every_tutorial_has_a_page_in_the_nav(site: Path):
    home = (site / "index.html").read_text(encoding="utf-8")
    for path in TUTORIALS:
        page = site / "tutorials" / path.stem / "index.html"
        assert page.is_file(), f"no page for {path.name}"
        assert f"tutorials/{path.stem}/" in home, f"{path.name} is not in the nav"
        # The page is the file: its first code cell is on the page.
        assert "assert" in page.read_text(encoding="utf-8")


def test_figures_come_from_files(site: Path):
    """The figure markers were all replaced (an unknown one fails the build)."""
    for page in site.rglob("index.html"):
        assert "figures:" not in page.read_text(encoding="utf-8"), page


def test_no_nested_links(site: Path):
    """Auto-linked API names never nest a link inside a link."""
    nested = [str(p.relative_to(site)) for p in site.rglob("*.html") if "</a></a>" in p.read_text("utf-8")]
    assert not nested, nested


def test_no_math_in_navigation(site: Path):
    """Math in a heading reaches the table of contents as raw TeX: keep headings plain."""
    nav_text = re.compile(r'class="md-ellipsis">(.*?)</span>', re.S)
    offenders = []
    for page in site.rglob("index.html"):
        for text in nav_text.findall(page.read_text(encoding="utf-8")):
            if "\\(" in text or "$" in text:
                offenders.append(f"{page.relative_to(site)}: {text.strip()}")
    assert not offenders, f"headings with math: {sorted(set(offenders))[:5]}"


def test_site_needs_no_network(site: Path):
    """No page loads a script, style sheet or font from another host."""
    remote = re.compile(r"""<(?:script|link|img)[^>]+(?:src|href)=["'](?:https?:)?//""")
    offenders = [str(p.relative_to(site)) for p in site.rglob("*.html") if remote.search(p.read_text("utf-8"))]
    assert not offenders, f"pages loading remote resources: {offenders[:5]}"
    css = (site / "assets" / "katex" / "katex.min.css").read_text(encoding="utf-8")
    for font in re.findall(r"url\((fonts/[^)]+\.woff2)\)", css):
        assert (site / "assets" / "katex" / font).is_file(), font


# --------------------------------------------------------------------------- examples


def _run(path: Path, tmp_path: Path, **env: str) -> None:
    result = subprocess.run(
        [sys.executable, str(path)],
        cwd=tmp_path,
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{path.name}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


@pytest.mark.parametrize("name", ["quickstart.py", "hf_checkpoint.py"])
def test_included_examples_run(name: str, tmp_path: Path):
    _run(ROOT / "docs" / "snippets" / name, tmp_path)


def test_quickstart_runs_on_the_fast_backend(tmp_path: Path):
    """The home page says: swap the import and it runs on the Triton kernels."""
    source = (ROOT / "docs" / "snippets" / "quickstart.py").read_text(encoding="utf-8")
    swapped = source.replace("import lazyattention.reference as la", "import lazyattention.fast as la", 1)
    assert swapped != source
    script = tmp_path / "quickstart_fast.py"
    script.write_text(swapped, encoding="utf-8")
    import torch

    env = {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}
    _run(script, tmp_path, **env)


# --------------------------------------------------------------------------- browser


def _no_browser(reason: str):
    """Skip on a developer's machine; in CI (``CI`` set) a missing browser is a failure,
    so a green CI always means the pages were rendered."""
    if os.environ.get("CI"):
        pytest.fail(f"the browser check cannot run in CI: {reason}")
    pytest.skip(reason)


def _chromium() -> str:
    """Path of Debian's chromium, installing it when missing and allowed."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
        _no_browser("chromium is not installed and cannot be installed here (needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0 and cmd[1] == "install":
            _no_browser(f"apt-get install chromium failed: {result.stderr[-500:]}")
    found = shutil.which("chromium")
    if not found:
        _no_browser("chromium still not found after apt-get install")
    return found


class _Server:
    """``http.server`` on 127.0.0.1 serving ``root``, recording every request and status."""

    def __init__(self, root: Path):
        self.log: list[tuple[str, int]] = []
        log = self.log

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_request(self, code="-", size="-"):
                log.append((self.path, int(code) if str(code).isdigit() else 0))

            def log_message(self, format, *args):  # keep the test output quiet
                pass

        handler = functools.partial(Handler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _browse(chromium: str, url: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=10000",
        "--window-size=1280,1600",
        *args,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _math_left_raw(dom: str) -> list[str]:
    """TeX delimiters still in the page text (KaTeX keeps the source in <annotation>)."""
    text = re.sub(r"<annotation[^>]*>.*?</annotation>", "", dom, flags=re.S)
    text = re.sub(r"<(pre|code)[^>]*>.*?</\1>", "", text, flags=re.S)
    return re.findall(r"\\\(|\\\[|\$\$", text)


@pytest.fixture(scope="module")
def screenshots_dir(tmp_path_factory) -> Path:
    keep = os.environ.get("LAZYATTENTION_DOCS_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        return Path(keep)
    return tmp_path_factory.mktemp("screenshots")


def test_pages_render_in_headless_chromium(site: Path, screenshots_dir: Path):
    chromium = _chromium()
    with _Server(site) as server:
        for name, page in BROWSER_PAGES.items():
            dom_run = _browse(chromium, server.url + page, "--dump-dom")
            assert dom_run.returncode == 0, f"{name}: chromium failed: {dom_run.stderr[-2000:]}"
            dom = dom_run.stdout
            assert "<h1" in dom, f"{name}: no heading rendered"
            math_spans = len(re.findall(r'class="arithmatex"', dom))
            rendered = len(re.findall(r'class="katex"', dom)) + len(re.findall(r'class="katex-display"', dom))
            if name != "home" or math_spans:
                assert math_spans > 0, f"{name}: expected math on this page"
                assert rendered >= math_spans, f"{name}: {math_spans} math spans but {rendered} KaTeX renderings"
            assert "katex-error" not in dom, f"{name}: KaTeX reported a parse error"
            assert not _math_left_raw(dom), f"{name}: TeX left unrendered: {_math_left_raw(dom)[:5]}"
            console = [line for line in dom_run.stderr.splitlines() if ":CONSOLE" in line]
            errors = [line for line in console if re.search(r"Uncaught|Error|Failed", line)]
            assert not errors, f"{name}: console errors: {errors}"

            shot = screenshots_dir / f"{name}.png"
            shot_run = _browse(chromium, server.url + page, f"--screenshot={shot}")
            assert shot_run.returncode == 0 and shot.stat().st_size > 10_000, f"{name}: no screenshot"
    missing = [(path, code) for path, code in server.log if code >= 400 and not path.startswith("/favicon.ico")]
    assert not missing, f"requests that failed: {missing}"
    assert any(path.endswith("katex.min.js") and code == 200 for path, code in server.log)
    assert any(path.endswith(".woff2") and code == 200 for path, code in server.log), "KaTeX fonts never loaded"


# --------------------------------------------------------------------------- figures from files


def _hooks(monkeypatch, results: Path):
    """``docs/hooks.py`` as a module, reading result files from ``results``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lazyattention_docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    monkeypatch.setattr(hooks, "RESULTS", results)
    return hooks


def test_headline_figures_come_from_result_files(monkeypatch, tmp_path: Path):
    hooks = _hooks(monkeypatch, tmp_path)
    assert "Not yet measured" in hooks.headline_table()
    assert "Not yet measured" in hooks.results_table()

    (tmp_path / "engine.json").write_text(
        '{"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-24", "versions": {"torch": "2.13.0"},'
        ' "headline": [{"name": "TTFT p50 block/lazy", "value": 1.52, "unit": "x", "pass": true}]}'
    )
    (tmp_path / "kernels.json").write_text(
        '{"environment": {"device": "NVIDIA H100", "date": "2026-11-24T01:00:00+00:00"},'
        ' "targets": [{"target": "decode >= 85% of copy bandwidth", "pass": false, "worst": 0.81, "where": "B=16"}]}'
    )
    table = hooks.headline_table()
    assert "From `benchmarks/results/engine.json`, measured on **NVIDIA H100 80GB HBM3**, 2026-11-24" in table
    assert "| TTFT p50 block/lazy | 1.52 x | PASS |" in table
    assert "measured on **NVIDIA H100**, 2026-11-24T01:00:00+00:00" in table
    assert "| decode >= 85% of copy bandwidth (worst at B=16) | 0.81 | **MISS** |" in table
    assert "torch 2.13.0" in hooks.results_table()

    assert "No plot" in hooks.plots_markdown()
    (tmp_path / "engine.png").write_bytes(b"\x89PNG")
    assert "![engine](results/engine.png)" in hooks.plots_markdown()


def test_drifted_api_names_are_caught(monkeypatch, tmp_path: Path, caplog):
    """A page naming an API that does not exist warns, which fails the strict build."""
    hooks = _hooks(monkeypatch, tmp_path)
    with caplog.at_level("WARNING", logger="mkdocs.hooks.lazyattention"):
        hooks.check_api_names("see `lazyattention.reference.lazy_prefill`", "page.md")
        linked = hooks.link_api_names("`lazy_prefill` and `RopeConfig.attention_scaling`", "page.md")
    assert not caplog.records
    assert "[`lazy_prefill`][lazyattention.reference.lazy_prefill]" in linked
    assert "[`RopeConfig.attention_scaling`][lazyattention.reference.RopeConfig]" in linked

    with caplog.at_level("WARNING", logger="mkdocs.hooks.lazyattention"):
        hooks.check_api_names("see `lazyattention.reference.lazy_prefil`", "page.md")
        hooks.check_api_names("see `lazyattention.serving.engine.Engin`", "page.md")
        hooks.link_api_names("`RopeConfig.attention_scale`\n```python\n`RopeConfig.inside_code`\n```", "page.md")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert "lazy_prefil" in messages[0] and "Engin" in messages[1] and "attention_scale" in messages[2]
