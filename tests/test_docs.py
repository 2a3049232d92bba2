"""The documentation site builds strictly and stays true to the code.

* ``mkdocs build --strict`` succeeds (broken links, unknown API names, docstrings that
  disagree with signatures and bad figure files all fail it; see ``docs/hooks.py``);
* every public name of ``lazyattention.reference`` (and of ``lazyattention.fast`` once
  it exists) has an entry on its API page; every tutorial has a page, with the output of
  its cells; the math page carries the equation numbers the code cites;
* the examples included in the pages run;
* the built site needs no network.

``tests/test_docs_browser.py`` renders every page of the same build in headless Chromium.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lazyattention.reference import ATTENTION_API
from tests.docs_site import BuildError, built_site

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
EQUATIONS = ["1", "2a", "2b", "2c", *map(str, range(3, 13))]


@pytest.fixture(scope="module")
def site() -> Path:
    """The site, built once per test run with ``mkdocs build --strict`` (``tests/docs_site.py``)."""
    try:
        return built_site()[0]
    except BuildError as exc:
        pytest.fail(str(exc))


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
    # The included examples are on their pages (pymdownx.snippets ran, not a formatter).
    assert "eager_attention</span>" in (site / "index.html").read_text(encoding="utf-8")
    assert "load_model</span>" in (site / "howto" / "hf-checkpoint" / "index.html").read_text(encoding="utf-8")


def test_api_pages_render_examples_as_code(site: Path):
    """Doctest examples are code blocks (a ``>>>`` outside an ``Examples:`` section becomes
    nested blockquotes), and no reST escape is left in the text."""
    for page in ("reference", "fast"):
        html = (site / "api" / page / "index.html").read_text(encoding="utf-8")
        assert "<blockquote" not in html, f"api/{page}: a docstring example rendered as a blockquote"
        assert "`\\ " not in html and "\\ ed" not in html, f"api/{page}: a reST escape shows"
    assert "&gt;&gt;&gt;" in (site / "api" / "reference" / "index.html").read_text(encoding="utf-8")


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
        # The page is the file, run: its code and, under the cells, what they printed.
        html = page.read_text(encoding="utf-8")
        assert "assert" in html
        assert 'class="tutorial-output"' in html, f"{path.name}: no cell output on its page"


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


def _kernels_result(device: str, date: str, flashinfer: bool) -> dict:
    extra = {"flashinfer_fa3": 410.0} if flashinfer else {}
    return {
        "environment": {"device": device, "date": date},
        "ceilings": {"copy_tb_per_s": 4.0},
        "heads": 32,
        "kv_heads": 8,
        "prefill": [
            {"head_dim": 128, "Tk": 16384, "segment": 512, "tflops": {"lazy": 400.0, "sdpa_flash": 350.0, **extra}},
            {"head_dim": 64, "Tk": 16384, "segment": 512, "tflops": {"lazy": 1.0}},  # D=64: not on the home page
        ],
        "decode": [{"batch": 16, "Tk": 16384, "tb_per_s": {"lazy": 3.0, "materialise": 1.0}}],
    }


def test_home_page_compares_with_peers_from_the_newest_result(monkeypatch, tmp_path: Path):
    hooks = _hooks(monkeypatch, tmp_path)
    assert "not yet measured" in hooks.peers_kernels()
    assert "not yet measured" in hooks.peers_engine()
    assert "Not yet measured" in hooks.peers_quality()

    (tmp_path / "kernels_h100.json").write_text(json.dumps(_kernels_result("H100", "2026-11-24T02:00:00", False)))
    table = hooks.peers_kernels()
    assert "Measured on **H100**, 2026-11-24 (`benchmarks/results/kernels_h100.json`)" in table
    assert "| 16k | 512 | **400** | 350 |" in table and "| 16k | 512 | 1 |" not in table
    assert "*FlashInfer: not yet measured on H100.*" in table
    assert "| 16 | 16k | — | **3.00** (75%) | 1.00 (25%) |" in table
    assert "PASS" not in table and "MISS" not in table  # verdicts stay on the benchmark pages

    (tmp_path / "kernels_h200.json").write_text(json.dumps(_kernels_result("H200", "2026-12-01T10:00:00", True)))
    table = hooks.peers_kernels()
    assert "on **H200**, 2026-12-01" in table and "FlashInfer |" in table
    assert "| 16k | 512 | 400 | **410** | 350 |" in table
    assert "FlashInfer: not yet measured" not in table.split("**Decode**")[0]
    assert "*FlashInfer: not yet measured on H200.*" in table.split("**Decode**")[1]
    assert "*SDPA cuDNN, pre-rotated keys: not yet measured on H200.*" in table  # SDPA flash is not cuDNN
    data = _kernels_result("H200", "2026-12-01T10:00:00", False) | {"flashinfer_decode": [{"us": 9.0}]}
    (tmp_path / "kernels_h200.json").write_text(json.dumps(data))
    assert "FlashInfer is in this result in a form this table does not read" in hooks.peers_kernels()

    row = {"ttft_p50": 1.0, "requests_per_s": 10.0, "bytes_copied": 0}
    medians = [
        {"alpha": 1.0, "budget_fraction": 1.0, "strategy": "lazy", **row},
        {
            **row,
            "alpha": 1.0,
            "budget_fraction": 1.0,
            "strategy": "block_attention",
            "ttft_p50": 1.5,
            "bytes_copied": 2e9,
        },
    ]
    (tmp_path / "engine_h200.json").write_text(
        json.dumps({"device": "H200", "date": "2026-12-01", "model": "m", "medians": medians})
    )
    engine = hooks.peers_engine()
    assert "| skewed documents (Zipf α = 1), KV budget 100% | 1000 / 1500 ms | **1.50×** |" in engine
    assert "| 2.00 GB |" in engine and "1.37×" in engine and "1.40×" in engine

    (tmp_path / "quality_llama.json").write_text(
        json.dumps({"device": "H200", "date": "2026-12-01", "model": "llama", "table": [{"task": "qa", "lazy": 0.5}]})
    )
    quality = hooks.peers_quality()
    assert "Model: `llama`" in quality and "| qa | 0.5 |" in quality


def test_optional_pages_have_stand_ins(monkeypatch, tmp_path: Path):
    hooks = _hooks(monkeypatch, tmp_path)
    for uri in ("concepts/quality.md", "howto/vllm.md", "benchmarks/kernels.md", "benchmarks/engine.md"):
        assert hooks.placeholder_markdown(uri).startswith("# "), uri
    assert "tutorials/08_huggingface_lazily.py" in hooks.placeholder_markdown("tutorials/08_huggingface_lazily.md")
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for uri in ("concepts/quality.md", "howto/vllm.md", "tutorials/08_huggingface_lazily.md"):
        assert uri in nav, f"{uri} is not in the nav"


def test_the_committed_idea_figure_is_what_its_script_draws():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_idea_svg", ROOT / "docs" / "figures" / "make_idea_svg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (ROOT / "docs" / "assets" / "idea.svg").read_text(encoding="utf-8")
    assert committed == module.idea_svg(), "docs/assets/idea.svg is stale: run python docs/figures/make_idea_svg.py"
    assert "currentColor" in committed and 'fill="#fff"' in committed  # reads on light and dark pages


def test_a_tutorial_page_shows_what_its_cells_print(monkeypatch, tmp_path: Path):
    """The build runs each tutorial cell by cell: prints and figures land under their cell."""
    hooks = _hooks(monkeypatch, tmp_path)
    script = tmp_path / "01_tiny.py"
    script.write_text(
        '# %% [markdown]\n# # Tiny\n\n# %%\nprint("hello from a cell")\n\n'
        "# %%\nimport matplotlib.pyplot as plt\nplt.plot([0, 1])\nplt.show()\n"
    )
    monkeypatch.setattr(hooks, "ROOT", tmp_path)
    run = hooks.run_tutorial(script, hooks._tutorial_environment(1))
    assert run["error"] is None, run["error"]
    page, figures = hooks.tutorial_markdown(script, run)
    assert "```text\nhello from a cell\n```" in page
    assert len(figures) == 1 and figures[0][1][:4] == b"\x89PNG"
    assert f"](figures/{figures[0][0]})" in page
