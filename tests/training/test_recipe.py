"""The recipe: documents cannot see each other, the loss falls, an adapter reloads exactly."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyattention.integrations.transformers.pretrained import load_pretrained
from lazyattention.integrations.transformers.rag import LazyRAG
from lazyattention.training import LoraSettings, TrainSettings, train
from lazyattention.training.examples import Placement, block_example, collate, full_example
from lazyattention.training.lora import add_lora, load_adapter, merged, save_adapter
from lazyattention.training.recipe import example_at, learning_rate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _segments(rag, item, placement):
    """Token ranges of each segment of the example (the chat head, if any, then documents)."""
    request = rag.request(item.question, list(item.documents), offset=placement.offset, starts=placement.starts)
    bounds, pos = [], 0
    for seg in request.segments:
        bounds.append((pos, pos + len(seg)))
        pos += len(seg)
    return bounds


@settings(max_examples=4, deadline=None)
@given(st.integers(0, 11), st.integers(0, 2**20 + 5), st.permutations([0, 1, 2]))
def test_no_gradient_flows_between_documents(tiny, train_items, index, offset, order):
    """The loss on one document's tokens gets no gradient from another document's tokens
    in a block example, and does in a full one (the control)."""
    _, model, tokenizer = tiny
    rag = LazyRAG(model, tokenizer, num_blocks=1)
    item = train_items[index]
    lengths = [len(rag.encode(d + "\n\n")) for d in item.documents]
    starts, pos = [0, 0, 0], 0
    for d in order:
        starts[d] = pos
        pos += lengths[d] + 3
    placement = Placement(offset, tuple(starts))
    bounds = _segments(rag, item, placement)
    (a0, a1), (b0, b1) = bounds[-1], bounds[-2]  # the last two documents in sequence order
    for example, expect_zero in (
        (block_example(rag, item.question, item.documents, placement, item.answer), True),
        (full_example(rag, item.question, item.documents, item.answer), False),
    ):
        batch = collate([example], torch.float32, "cpu", pad_id=0)
        embeds = model.model.embed_tokens(batch["input_ids"]).detach().requires_grad_(True)
        logits = model(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits
        logits[0, a0:a1].logsumexp(-1).sum().backward()
        into_b = embeds.grad[0, b0:b1].abs().max()
        assert embeds.grad[0, a0:a1].abs().max() > 0
        assert (into_b == 0) if expect_zero else (into_b > 0), example.mode


def test_examples_depend_on_seed_and_index_only(tiny, train_items):
    _, model, tokenizer = tiny
    rag = LazyRAG(model, tokenizer, num_blocks=1)
    first = [example_at(rag, train_items, 3, 0.5, i) for i in range(16)]
    again = [example_at(rag, train_items, 3, 0.5, i) for i in reversed(range(16))][::-1]
    assert [e.tokens for e in first] == [e.tokens for e in again]
    assert [e.positions for e in first] == [e.positions for e in again]
    assert {e.mode for e in first} == {"block", "full"}
    other = [example_at(rag, train_items, 4, 0.5, i) for i in range(16)]
    assert [e.positions for e in first] != [e.positions for e in other]


def test_learning_rate_warms_up_then_decays():
    rates = [learning_rate(s, 100, 1e-3, 10) for s in range(100)]
    assert rates[0] < rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))
    assert rates[-1] == pytest.approx(1e-4, rel=0.01)


def test_the_loss_falls_and_the_adapter_reloads_to_the_same_logits(tiny, train_items, tmp_path):
    folder, _, tokenizer = tiny
    model, _ = load_pretrained(folder)  # a fresh copy: training wraps it
    run = TrainSettings(steps=20, batch_size=4, learning_rate=1e-2, warmup=2, lora=LoraSettings(rank=8, alpha=16))
    peft_model, history = train(model, tokenizer, train_items[:4], run, log=lambda line: None)
    losses = history["loss"]
    assert history["steps_run"] == 20 and len(losses) == 20
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, losses
    assert history["trainable_parameters"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)

    save_adapter(peft_model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    reloaded = load_adapter(load_pretrained(folder)[0], tmp_path / "adapter")
    rag = LazyRAG(reloaded.get_base_model(), tokenizer, num_blocks=1)
    item = train_items[0]
    batch = collate(
        [block_example(rag, item.question, item.documents, Placement(5, None), item.answer)],
        torch.float32,
        "cpu",
        pad_id=0,
    )
    with torch.no_grad():
        trained = peft_model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        again = reloaded(**{k: v for k, v in batch.items() if k != "labels"}).logits
        base = load_pretrained(folder)[0](**{k: v for k, v in batch.items() if k != "labels"}).logits
        folded = merged(reloaded)(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.equal(trained, again)
    torch.testing.assert_close(folded, again, rtol=1e-4, atol=1e-4)
    assert (trained - base).abs().max() > 1e-3, "training changed nothing"


def test_a_missing_adapter_names_the_missing_file(tiny, tmp_path):
    _, model, _ = tiny
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        load_adapter(model, tmp_path)


def test_a_fresh_adapter_changes_nothing(tiny):
    folder = tiny[0]
    model, _ = load_pretrained(folder)
    ids = torch.arange(2, 20)[None]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        after = add_lora(model, LoraSettings(rank=4, alpha=8), seed=0)(input_ids=ids).logits
    assert torch.equal(before, after)


def test_adapters_are_initialised_from_the_seed(tiny):
    folder = tiny[0]

    def lora_a(seed):
        wrapped = add_lora(load_pretrained(folder)[0], LoraSettings(rank=4, alpha=8), seed=seed)
        return [p.detach().clone() for name, p in wrapped.named_parameters() if "lora_A" in name]

    first, again, other = lora_a(7), lora_a(7), lora_a(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
