"""The evaluation: batched greedy decoding equals transformers' own runs, and the whole
before/after study runs end to end at a tiny size."""

import json

import pytest
import torch

from lazyattention.integrations.transformers.baselines import block_diagonal, full_attention
from lazyattention.integrations.transformers.qa import PROSE
from lazyattention.integrations.transformers.rag import LazyRAG, Sampling
from lazyattention.training import evaluate as ev
from lazyattention.training import run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def heldout(tiny):
    from lazyattention.integrations.transformers.qa import wiki_set

    return wiki_set(6, "heldout", seed=0, passages=3)


def test_batched_greedy_equals_full_attention_and_recompute(tiny, heldout):
    _, model, tokenizer = tiny
    rag = LazyRAG(model, tokenizer, num_blocks=1)
    items = heldout[:4]
    sampling = Sampling(max_new_tokens=5)
    full = ev.greedy(rag, ev.prompts(rag, items, "full"), 5, batch_size=3)
    recompute = ev.greedy(rag, ev.prompts(rag, items, "recompute"), 5, batch_size=3)
    for i, it in enumerate(items):
        request = rag.request(it.question, list(it.documents), offset=ev.placement_of(i).offset)
        assert full[i] == full_attention(model, tokenizer, request, sampling).tokens
        assert recompute[i] == block_diagonal(model, tokenizer, request, sampling).tokens


def test_kl_is_zero_for_one_document_and_positive_for_several(tiny, heldout):
    """With one document, block-diagonal and full attention are one function (KL 0);
    with three they are not."""
    _, model, tokenizer = tiny
    rag = LazyRAG(model, tokenizer, num_blocks=1)
    one = [type(it)(it.question, it.answer, it.documents[:1], (0,), it.relation, it.split) for it in heldout[:2]]
    assert ev.answer_kl(rag, one)["kl_max"] < 1e-8
    several = ev.answer_kl(rag, heldout[:2])
    assert several["kl_mean"] > 1e-6 and several["steps"] > 2


def test_scores_and_targets():
    items = list(PROSE[:3])
    replies = [f"It is {items[0].answer}.", "no idea", None]
    score = ev.score(replies, items)
    assert score["questions"] == 2 and score["em_all"] == 0.5
    rows = [
        {"answer": "Oslo", "base/full": "Oslo", "block_ft/full": "Oslo", "block_ft/lazy": "in Oslo"},
        {"answer": "Rome", "base/full": "Paris", "block_ft/full": "Rome", "block_ft/lazy": "Paris"},
    ]
    identity = {"block_ft": {"questions": 2, "compared": 2, "lazy_equals_block": 1}}
    marks = {t["target"]: t for t in ev.targets({"answers": rows, "identity": identity})}
    assert marks["block-FT lazy EM >= block-FT full attention EM - 3"]["pass"] is False  # 50 < 100 - 3
    assert marks["block-FT lazy EM >= base full attention EM"]["pass"] is True  # 50 >= 50
    assert marks["block-FT full attention EM >= base full attention EM - 2"]["pass"] is True
    same = next(t for t in marks.values() if t["target"].startswith("block_ft: lazy = Block-Attention"))
    assert same["pass"] is False and same["value"] == 1


def test_the_study_runs_end_to_end_at_a_tiny_size(tmp_path):
    args = ["--out", str(tmp_path), "--tiny", "--device", "cpu", "--train-questions", "12", "--eval-questions", "3"]
    args += ["--passages", "2", "--steps", "3", "--batch-size", "2", "--max-new-tokens", "3", "--lazy-batch", "2"]
    args += ["--lazy-chunk", "2", "--attention-questions", "1", "--generate-batch", "2", "--num-blocks", "256"]
    assert run.main(args) == 0
    adapter = tmp_path / "adapter"
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "training.json"}
    record = json.loads((adapter / "training.json").read_text())
    assert record["steps_run"] == 3 and record["seed"] == 0 and len(record["loss"]) == 3
    result = json.loads((tmp_path / "block_ft_eval.json").read_text())
    assert "errors" not in result
    n = result["settings"]["questions"] + result["settings"]["prose_questions"]
    assert len(result["answers"]) == n
    for name in ("base", "block_ft"):
        same = result["identity"][name]
        assert same["compared"] == same["questions"] == 3
        assert same["lazy_equals_block"] == same["lazy_equals_recompute"] == 3
        assert 0 <= result["head_attention"][name]["block"] <= 1
    assert {(r["model"], r["strategy"]) for r in result["summary"]} == {
        (m, s) for m in ("base", "block_ft") for s in ("full", "lazy", "block", "recompute")
    }
    assert len(result["targets"]) == 5
    run.plot_loss(record, adapter / "loss.png")
    assert (adapter / "loss.png").stat().st_size > 0
    assert torch.cuda.is_available() or result["environment"]["device"] == "cpu"
