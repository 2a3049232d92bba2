"""The quality study runs end to end at a tiny size, and its measures mean what they say.

A tiny random-weight Llama (no SmolLM2 needed) stands in: accuracy is meaningless there,
but lazy and Block-Attention must agree with the float64 run exactly in float32, the
no-shift control must not, and the table and the plot must be produced.
"""

import importlib.util
from pathlib import Path

import pytest

from lazyattention.integrations.transformers.pretrained import tiny_random
from lazyattention.integrations.transformers.qa import is_correct, qa_set

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _quality():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_qa_set_is_deterministic_and_answerable():
    items = qa_set(12, seed=3)
    assert items == qa_set(12, seed=3) and items != qa_set(12, seed=4)
    for item in items:
        assert item.answer in item.documents[item.gold]
        assert len(set(item.documents)) == len(item.documents)
        assert is_correct(f"It was {item.answer.upper()}.", item.answer)
    assert {item.fact for item in items} == {"city", "founder", "year"}


def test_study_at_a_tiny_size(tmp_path):
    quality = _quality()
    items = qa_set(2)
    tiny_random(tmp_path / "model", [t for item in items for t in (item.question, *item.documents)])
    result = quality.run_study(
        tmp_path / "model", 2, offsets=(0, 70_000), dtypes=("float32",), max_new_tokens=3, log=lambda line: None
    )
    rows = {(r["offset"], r["strategy"]): r for r in result["rows"]}
    assert len(rows) == 2 * len(quality.STRATEGIES)
    for offset in (0, 70_000):
        for strategy in ("lazy", "block"):
            assert rows[offset, strategy]["agreement"] == 1.0
            assert rows[offset, strategy]["logit_error_max"] < 1e-4
        assert rows[offset, "no_shift"]["logit_error_max"] > 100 * rows[offset, "lazy"]["logit_error_max"]
    assert result["flips"] == []
    assert "| float32 | 70,000 |" in quality.format_table(result["rows"])
    result["environment"] = quality.environment("cpu", "reference")
    quality.plot(result, tmp_path / "quality.png")
    assert (tmp_path / "quality.png").stat().st_size > 0


def test_the_quality_page_is_generated_from_its_results():
    sources = ("benchmarks/results/quality_cpu.json", "benchmarks/results/quality_h200.json")
    page = _quality().render_page(*sources)
    assert (ROOT / "docs" / "concepts" / "quality.md").read_text() == page, (
        f"docs/concepts/quality.md is stale: run python benchmarks/quality.py --render {' '.join(sources)}"
    )
