"""MkDocs hooks of the lazyattention site (registered in ``mkdocs.yml``).

At build time, from the repository only (no network), with the work done by the
modules of ``docs/sitegen/``, one job each:

* ``on_files`` runs every tutorial and adds its page (:mod:`sitegen.tutorials`), the
  API pages (:mod:`sitegen.api`), the source pages (:mod:`sitegen.source`) and the plots
  committed beside the result files;
* ``on_page_markdown`` fills the markers ``<!-- figures:NAME -->`` with tables and
  figures built from committed files (:data:`FIGURES`: never typed by hand), resolves
  ``source:NAME`` links, checks every API name a page cites, and links code spans to
  the API pages;
* ``on_page_content`` tidies the API pages' HTML.

A tutorial that fails, an unknown marker, an API name or source link that names
nothing: each is a warning, which ``strict: true`` turns into a failed build.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sitegen import api, figures, results, source, tutorials

MARKER = re.compile(r"<!--\s*figures:([a-z0-9-]+)\s*-->")

#: The tutorials' runs of this build (``on_files``), for the figures that read them.
_runs: dict[str, dict] = {}


def _numerics(which: str) -> str:
    if "07_numerics" not in _runs:  # outside a build (the tests): run it now
        _runs.update(tutorials.run_tutorials([tutorials.TUTORIALS / "07_numerics.py"]))
    return figures.numerics_table(_runs["07_numerics"].get("tables", {}), which)


FIGURES = {
    "idea": figures.idea_figure,
    "peers-kernels": results.peers_kernels,
    "peers-engine": results.peers_engine,
    "peers-quality": results.peers_quality,
    "benchmark-pages": results.benchmark_pages,
    "plots": results.plots_markdown,
    "headline": results.headline_table,
    "results": results.results_table,
    "speed": results.speed_tables,
    "numerics-angles": lambda: _numerics("ANGLE_ERRORS"),
    "numerics-scores": lambda: _numerics("SCORE_ERRORS"),
    "numerics-attention": lambda: _numerics("ATTENTION_ERRORS"),
}


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


def on_files(files, config):
    paths = tutorials.tutorial_paths()
    _runs.clear()
    _runs.update(tutorials.run_tutorials(paths))
    for path in paths:
        page, drawn = tutorials.tutorial_markdown(path, _runs[path.stem])
        files.append(File.generated(config, f"tutorials/{path.stem}.md", content=page))
        for name, png in drawn:
            files.append(File.generated(config, f"tutorials/figures/{name}", content=png))
    tutorial_uris = [u for u in _nav_uris(config["nav"]) if u.startswith("tutorials/") and u != "tutorials/index.md"]
    index = tutorials.tutorials_index_markdown(tutorial_uris)
    files.append(File.generated(config, "tutorials/index.md", content=index))
    # Plots committed beside the result files are published at benchmarks/results/NAME.png,
    # so benchmark pages can show them (docs/benchmarks/*.md: ![...](results/NAME.png)).
    for plot in sorted(results.RESULTS.glob("*.png")):
        files.append(File.generated(config, f"benchmarks/results/{plot.name}", abs_src_path=str(plot)))
    files.append(File.generated(config, "api/reference.md", content=api.reference_api_markdown()))
    files.append(File.generated(config, "api/fast.md", content=api.fast_api_markdown()))
    files.append(File.generated(config, source.INDEX, content=source.index_markdown()))
    for path in source.source_files():
        files.append(File.generated(config, source.page_uri(path), content=source.source_markdown(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    uri = page.file.src_uri
    if uri.startswith("source/"):
        return markdown

    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name not in FIGURES:
            api.log.warning("%s: unknown figures marker %r", uri, name)
            return match.group(0)
        return FIGURES[name]()

    markdown = MARKER.sub(fill, markdown)
    markdown = source.link_source(markdown, uri)
    api.check_api_names(markdown, uri)
    if not uri.startswith("api/"):
        markdown = api.link_api_names(markdown, uri)
    return markdown


def on_page_content(html, page, config, files):
    # Docstrings use Sphinx roles (:func:`x`); mkdocstrings' Google parser keeps the
    # role as text. Drop the role, keep the code span.
    if page.file.src_uri.startswith("api/"):
        html = api.SPHINX_ROLE.sub(r"\1", html)
    return html
