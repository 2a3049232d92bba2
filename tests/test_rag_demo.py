"""The real-text demo: its data, and (when SmolLM2 is installed) the whole run."""

import pytest

from lazyattention import rag_demo
from lazyattention.integrations.transformers.pretrained import SMOLLM2_PACKAGE, smollm2_available


def test_questions_reuse_documents_at_new_orders_and_far_offsets():
    offsets = [offset for _, _, offset, _ in rag_demo.QUESTIONS]
    assert max(offsets) > 2**20 and any(2**16 < o < 2**20 for o in offsets) and 0 in offsets
    orders = {picks for _, picks, _, _ in rag_demo.QUESTIONS}
    assert len(orders) == len(rag_demo.QUESTIONS)
    for _, picks, _, expected in rag_demo.QUESTIONS:
        assert all(0 <= i < len(rag_demo.DOCUMENTS) for i in picks)
        assert sum(expected in rag_demo.DOCUMENTS[i] for i in picks) == 1, "the answer is in one of its documents"


@pytest.mark.skipif(not smollm2_available(), reason=f"SmolLM2 is not installed ({SMOLLM2_PACKAGE})")
def test_the_demo_shows_documents_marks_answers_and_ends_with_a_table(capsys):
    assert rag_demo.run_rag_demo("reference", "cpu") == 0
    out = capsys.readouterr().out
    assert "lazy = Block-Attention, token for token, on every question." in out
    assert "expected: Marta Silva" in out
    assert f"[0] {rag_demo.DOCUMENTS[0][:40]}" in out
    assert "✓" in out or "✗" in out
    assert f"Right answers out of {len(rag_demo.QUESTIONS)}:" in out and "base SmolLM2" in out
