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
import posixpath
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


def _sitegen(monkeypatch, results: Path | None = None):
    """The modules of ``docs/sitegen`` (as ``docs/hooks.py`` imports them), the result
    files read from ``results`` when given."""
    monkeypatch.syspath_prepend(str(ROOT / "docs"))
    import sitegen.api
    import sitegen.results
    import sitegen.source
    import sitegen.tutorials

    if results is not None:
        monkeypatch.setattr(sitegen.results, "RESULTS", results)
    return sitegen


def test_headline_figures_come_from_result_files(monkeypatch, tmp_path: Path, caplog):
    results = _sitegen(monkeypatch, tmp_path).results
    with caplog.at_level("WARNING", logger="mkdocs.hooks.lazyattention"):
        results.headline_table()
    assert caplog.records, "no result file must fail the strict build"

    (tmp_path / "engine_h100.json").write_text(
        '{"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-24", "versions": {"torch": "2.13.0"},'
        ' "headline": [{"name": "TTFT p50 block/lazy", "value": 1.52, "unit": "x", "pass": true}]}'
    )
    (tmp_path / "kernels_h100.json").write_text(
        '{"environment": {"device": "NVIDIA H100", "date": "2026-11-24T01:00:00+00:00"},'
        ' "targets": [{"target": "decode >= 85% of copy bandwidth", "pass": false, "worst": 0.81, "where": "B=16"}]}'
    )
    table = results.headline_table()
    assert "From `benchmarks/results/engine_h100.json`, measured on **NVIDIA H100 80GB HBM3**, 2026-11-24" in table
    assert "| TTFT p50 block/lazy | 1.52 x | PASS |" in table
    assert "| decode >= 85% of copy bandwidth (worst at B=16) | 0.81 | **MISS** |" in table
    assert "torch 2.13.0" in results.results_table()
    (tmp_path / "engine_h100.png").write_bytes(b"\x89PNG")
    assert "![engine_h100](results/engine_h100.png)" in results.plots_markdown()

    # A newer GPU run of a kind replaces the older one: listed as earlier, shown nowhere.
    (tmp_path / "engine_h200.json").write_text(
        '{"device": "NVIDIA H200", "date": "2026-12-01", "headline": [{"name": "TTFT", "value": 1.8}]}'
    )
    (tmp_path / "engine_h200.png").write_bytes(b"\x89PNG")
    table = results.headline_table()
    assert "engine_h200.json" in table and "engine_h100.json" not in table
    assert "earlier run, other kernels and engine code; replaced by `engine_h200.json`" in results.results_table()
    assert "engine_h100.png" not in results.plots_markdown() and "engine_h200.png" in results.plots_markdown()
    # A CPU result, or one naming no device, stands beside a GPU one of its kind.
    (tmp_path / "engine_cpu.json").write_text('{"device": "CPU (x86_64)", "date": "2026-12-05"}')
    (tmp_path / "engine_dry_run.json").write_text('{"date": "2026-12-07"}')
    assert "engine_h200.json" in results.headline_table()
    assert results.newest("engine")[0] == "engine_h200.json"


def test_drifted_api_names_are_caught(monkeypatch, caplog):
    """A page naming an API that does not exist warns, which fails the strict build."""
    api = _sitegen(monkeypatch).api
    with caplog.at_level("WARNING", logger="mkdocs.hooks.lazyattention"):
        api.check_api_names("see `lazyattention.reference.lazy_prefill`", "page.md")
        linked = api.link_api_names("`lazy_prefill` and `RopeConfig.attention_scaling`", "page.md")
    assert not caplog.records
    assert "[`lazy_prefill`][lazyattention.reference.lazy_prefill]" in linked
    assert "[`RopeConfig.attention_scaling`][lazyattention.reference.RopeConfig]" in linked

    with caplog.at_level("WARNING", logger="mkdocs.hooks.lazyattention"):
        api.check_api_names("see `lazyattention.reference.lazy_prefil`", "page.md")
        api.check_api_names("see `lazyattention.serving.engine.Engin`", "page.md")
        api.link_api_names("`RopeConfig.attention_scale`\n```python\n`RopeConfig.inside_code`\n```", "page.md")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert "lazy_prefil" in messages[0] and "Engin" in messages[1] and "attention_scale" in messages[2]


def test_source_links_land_on_the_named_lines(monkeypatch, caplog):
    """``source:NAME[#TEXT]`` links resolve to the line of the definition (or of the text
    inside it) on the source page, from the code as it is; a name that nothing defines
    fails the build."""
    source = _sitegen(monkeypatch).source
    path = next(p for p in source.source_files() if "def _merge_kernel" in p.read_text(encoding="utf-8"))
    lines = path.read_text(encoding="utf-8").splitlines()
    jit = next(i for i, line in enumerate(lines, 1) if line.startswith("def _merge_kernel")) - 1
    assert lines[jit - 1].startswith("@triton.jit")
    linked = source.link_source("[merge](source:_merge_kernel) [top](source:fast/rope.py)", "tutorials/05_x.md")
    page = posixpath.relpath(source.page_uri(path), "tutorials")
    assert f"[merge]({page}#__codelineno-0-{jit})" in linked
    assert "[top](../source/fast/rope.md)" in linked
    inside = source.link_source("[x](source:_merge_kernel#tl.store(lse_ptr)", "index.md")
    number = int(inside.rsplit("-", 1)[1].rstrip(")"))
    assert "tl.store(lse_ptr" in lines[number - 1]
    with caplog.at_level("WARNING", logger="mkdocs.hooks.lazyattention"):
        source.link_source("[x](source:_no_such_kernel) [y](source:_merge_kernel#no such text)", "index.md")
    assert len(caplog.records) == 2


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
    results = _sitegen(monkeypatch, tmp_path).results
    (tmp_path / "kernels_h100.json").write_text(json.dumps(_kernels_result("H100", "2026-11-24T02:00:00", False)))
    table = results.peers_kernels()
    assert "Measured on **H100**, 2026-11-24 (`benchmarks/results/kernels_h100.json`)" in table
    assert "| 16k | 512 | **400** | 350 |" in table and "| 16k | 512 | 1 |" not in table
    assert "*FlashInfer: not measured on H100.*" in table
    assert "| 16 | 16k | — | **3.00** (75%) | 1.00 (25%) |" in table
    assert "PASS" not in table and "MISS" not in table  # verdicts stay on the benchmark pages

    (tmp_path / "kernels_h200.json").write_text(json.dumps(_kernels_result("H200", "2026-12-01T10:00:00", True)))
    table = results.peers_kernels()
    assert "on **H200**, 2026-12-01" in table and "FlashInfer |" in table
    assert "| 16k | 512 | 400 | **410** | 350 |" in table
    assert "FlashInfer: not measured" not in table.split("**Decode**")[0]
    assert "*FlashInfer: not measured on H200.*" in table.split("**Decode**")[1]
    assert "*SDPA cuDNN, pre-rotated keys: not measured on H200.*" in table  # SDPA flash is not cuDNN
    data = _kernels_result("H200", "2026-12-01T10:00:00", False) | {"flashinfer_decode": [{"us": 9.0}]}
    (tmp_path / "kernels_h200.json").write_text(json.dumps(data))
    assert "FlashInfer is in this result in a form this table does not read" in results.peers_kernels()


def test_engine_ratios_are_medians_of_each_runs_ratio(monkeypatch, tmp_path: Path):
    """The home page's engine ratios are the statistic of the engine page's targets: the
    median over the runs of each run's ratio, not the ratio of the medians."""
    results = _sitegen(monkeypatch, tmp_path).results
    runs, medians = [], []
    for repeat, (lazy_ttft, block_ttft) in enumerate([(1.0, 3.0), (2.0, 2.0), (1.0, 1.2)]):
        for strategy, ttft in (("lazy", lazy_ttft), ("block_attention", block_ttft)):
            runs.append({"alpha": 1.0, "budget_fraction": 1.0, "repeat": repeat, "strategy": strategy,
                         "ttft_p50": ttft, "requests_per_s": 10.0 / ttft, "bytes_copied": 2e9})  # fmt: skip
    for strategy, ttft in (("lazy", 1.0), ("block_attention", 2.0)):  # medians of each strategy's runs
        medians.append({"alpha": 1.0, "budget_fraction": 1.0, "strategy": strategy, "ttft_p50": ttft,
                        "requests_per_s": 10.0 / ttft, "bytes_copied": 2e9})  # fmt: skip
    data = {"device": "H200", "date": "2026-12-01", "model": "m", "burst": runs, "burst_medians": medians}
    (tmp_path / "engine_h200.json").write_text(json.dumps(data))
    engine = results.peers_engine()
    # each run's ratio: 3.0, 1.0, 1.2 -> median 1.2 (the ratio of the medians would be 2.0)
    assert "| skewed documents (Zipf α = 1), KV budget 100% | 3 | 1000 / 2000 ms | **1.20×** |" in engine
    assert "| 2.00 GB |" in engine and "1.37×" in engine and "1.40×" in engine
    assert "median over the runs of each run's ratio" in engine


def test_home_page_quality_table_is_the_cpu_study(monkeypatch):
    """The home page's quality table reads the committed CPU study, float32, every offset."""
    table = _sitegen(monkeypatch).results.peers_quality()
    data = json.loads((ROOT / "benchmarks" / "results" / "quality_cpu.json").read_text())
    lazy = [r for r in data["rows"] if r["dtype"] == "float32" and r["strategy"] == "lazy"]
    for row in lazy:
        assert f"{row['logit_error_max']:.1e}" in table
    assert "What this table does not say" in table and "not fine-tuned" in table


def test_the_committed_idea_figure_is_what_its_script_draws():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_idea_svg", ROOT / "docs" / "figures" / "make_idea_svg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, svg in module.idea_panels().items():
        committed = (ROOT / "docs" / "assets" / name).read_text(encoding="utf-8")
        assert committed == svg, f"docs/assets/{name} is stale: run python docs/figures/make_idea_svg.py"
        assert "currentColor" in committed and 'fill="#fff"' in committed  # reads on light and dark pages
        # Readable on a phone: no text smaller than 15 units in a panel about 420 wide.
        sizes = [int(size) for size in re.findall(r'font-size="(\d+)"', committed)]
        assert min(sizes) >= 15 and 'viewBox="0 0 420 ' in committed
    copy, lazy = (module.idea_panels()[name] for name in ("idea-copy.svg", "idea-lazy.svg"))
    # Lazy: an arrow from every block of every request to the shared copy; copy: one per copied block.
    blocks = sum(module.DOCS.values()) * len(module.REQUESTS)
    assert lazy.count("lazy-arrow-") - len(module.COLORS) == blocks
    assert copy.count("copy-arrow-") - len(module.COLORS) == blocks


def test_a_tutorial_page_shows_what_its_cells_print(monkeypatch, tmp_path: Path):
    """The build runs each tutorial cell by cell: prints and figures land under their cell."""
    tutorials = _sitegen(monkeypatch).tutorials
    script = tmp_path / "01_tiny.py"
    script.write_text(
        '# %% [markdown]\n# # Tiny\n\n# %%\nprint("hello from a cell")\n\n'
        "# %%\nimport matplotlib.pyplot as plt\nplt.plot([0, 1])\nplt.show()\n"
    )
    monkeypatch.setattr(tutorials, "ROOT", tmp_path)
    run = tutorials.run_tutorial(script, tutorials._tutorial_environment(1))
    assert run["error"] is None, run["error"]
    page, figures = tutorials.tutorial_markdown(script, run)
    assert "```text\nhello from a cell\n```" in page
    assert len(figures) == 1 and figures[0][1][:4] == b"\x89PNG"
    assert f"](figures/{figures[0][0]})" in page
