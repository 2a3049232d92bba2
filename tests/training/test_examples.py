"""Training examples are what LazyRAG serves: same tokens, positions, mask, and logits."""

import itertools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyattention.integrations.transformers.baselines import block_diagonal_mask
from lazyattention.integrations.transformers.rag import LazyRAG, RAGRequest
from lazyattention.training.examples import (
    IGNORE,
    Placement,
    answer_ids,
    block_example,
    collate,
    draw_placement,
    full_example,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=12), st.integers(0, 2**32 - 1))
def test_placements_are_valid_and_users_kinds(lengths, seed):
    p = draw_placement(random.Random(seed), lengths)
    assert 0 <= p.offset < 1 << 21
    if p.starts is not None:
        spans = sorted((s, s + n) for s, n in zip(p.starts, lengths, strict=True))
        assert spans[0][0] >= 0
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), "documents overlap"


def test_placements_cover_orders_gaps_and_offsets_past_2_20():
    rng = random.Random(0)
    lengths = [5, 7, 3, 9]
    drawn = [draw_placement(rng, lengths) for _ in range(300)]
    assert any(p.offset > 1 << 20 for p in drawn) and any(p.offset == 0 for p in drawn)
    assert any(p.starts is None for p in drawn)
    orders = [p.starts for p in drawn if p.starts is not None]
    assert any(list(s) != sorted(s) for s in orders), "no document order other than the given one"
    packed = {tuple(sorted(s)) for s in orders}
    assert any(max(s) + 9 > sum(lengths) for s in packed), "no gaps"


def _rag(tiny):
    _, model, tokenizer = tiny
    return LazyRAG(model, tokenizer, backend="reference", num_blocks=256, block_size=16)


def test_a_block_example_is_the_served_request_with_its_answer(tiny, train_items):
    rag = _rag(tiny)
    item = train_items[3]
    placement = Placement((1 << 20) + 12_345, (40, 0, 900))
    example = block_example(rag, item.question, item.documents, placement, item.answer)
    served = rag.request(item.question, list(item.documents), offset=placement.offset, starts=placement.starts)
    target = answer_ids(rag, item.answer)
    whole = RAGRequest(served.segments, served.starts, served.own + tuple(target), served.own_start)
    tokens, positions = whole.tokens_and_positions()
    assert example.tokens == tokens
    assert example.positions == [p - min(positions) for p in positions]
    assert torch.equal(example.visible, block_diagonal_mask(whole, torch.float32, "cpu")[0, 0] == 0)
    assert example.labels[-len(target) :] == target
    assert set(example.labels[: -len(target)]) == {IGNORE}


def test_training_logits_equal_what_lazyrag_serves(tiny, train_items):
    """The training forward (mask, shifted positions) gives LazyRAG's lazy logits for the
    question and answer tokens, at an offset past 2^20, documents reordered with gaps."""
    _, model, _ = tiny
    rag = _rag(tiny)
    item = train_items[5]
    placement = Placement((1 << 20) + 777, (300, 0, 120))
    example = block_example(rag, item.question, item.documents, placement, item.answer)
    served = rag.request(item.question, list(item.documents), offset=placement.offset, starts=placement.starts)
    whole = RAGRequest(
        served.segments, served.starts, served.own + tuple(answer_ids(rag, item.answer)), served.own_start
    )
    lazy = rag.own_logits(whole, "lazy")
    batch = collate([example], torch.float32, "cpu", pad_id=0)
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits[0, len(example.tokens) - len(whole.own) : len(example.tokens)]
    torch.testing.assert_close(logits, lazy, rtol=1e-4, atol=1e-4)


def test_a_full_example_is_full_attentions_prompt(tiny, train_items):
    rag = _rag(tiny)
    item = train_items[0]
    example = full_example(rag, item.question, item.documents, item.answer)
    prompt, _ = rag.request(item.question, list(item.documents)).tokens_and_positions()
    assert example.tokens == prompt + answer_ids(rag, item.answer)
    assert example.positions == list(range(len(example.tokens)))
    assert torch.equal(example.visible, torch.ones_like(example.visible).tril())


@pytest.mark.parametrize("left", [False, True])
def test_padding_changes_no_real_row(tiny, train_items, left):
    """A padded batch gives each example the logits it has alone."""
    _, model, _ = tiny
    rag = _rag(tiny)
    examples = [
        block_example(rag, it.question, it.documents, Placement(70_000, None), it.answer) for it in train_items[:3]
    ]
    with torch.no_grad():
        batch = collate(examples, torch.float32, "cpu", pad_id=0, left=left)
        together = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits
        width = batch["input_ids"].shape[1]
        for i, e in enumerate(examples):
            one = collate([e], torch.float32, "cpu", pad_id=0)
            alone = model(
                input_ids=one["input_ids"], attention_mask=one["attention_mask"], position_ids=one["position_ids"]
            ).logits[0, : len(e.tokens)]
            rows = slice(width - len(e.tokens), width) if left else slice(0, len(e.tokens))
            torch.testing.assert_close(together[i, rows], alone, rtol=1e-5, atol=1e-5)
