"""The benchmark pages in docs/ are generated from the committed result files.

A page edited by hand, or a result file committed without regenerating its page,
fails here: every figure a reader sees comes from a measured JSON.
"""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _load(script: str):
    spec = importlib.util.spec_from_file_location(script, ROOT / "benchmarks" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _notes(result: Path) -> str | None:
    notes = result.with_suffix(".notes.md")
    return notes.read_text() if notes.exists() else None


def test_engine_page_is_generated_from_its_result():
    result = RESULTS / "engine_h100.json"
    page = _load("engine_page").render(result)
    assert (ROOT / "docs" / "benchmarks" / "engine.md").read_text() == page, (
        "docs/benchmarks/engine.md is stale: run python benchmarks/engine_page.py benchmarks/results/engine_h100.json"
    )


def test_kernel_page_is_generated_from_its_result():
    pytest.importorskip("matplotlib")
    result = RESULTS / "kernels_h200.json"
    page = _load("plot_kernels").page(json.loads(result.read_text()), result.stem, "kernels_h200.png", _notes(result))
    assert (ROOT / "docs" / "benchmarks" / "kernels.md").read_text() == page, (
        "docs/benchmarks/kernels.md is stale: run "
        "python benchmarks/plot_kernels.py benchmarks/results/kernels_h200.json"
    )


def test_every_device_result_marks_its_targets():
    results = sorted(RESULTS.glob("*_h[0-9]00.json"))
    assert results, "no committed device result files"
    for result in results:
        targets = json.loads(result.read_text()).get("targets")
        assert targets, f"{result.name} has no targets"
        for target in targets:
            assert isinstance(target.get("pass"), bool), (result.name, target)
