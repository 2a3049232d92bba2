"""A tiny random-weight Llama and a word-level tokenizer over the generated questions.

Built once per session (seconds); its answers are meaningless, but every equivalence and
every gradient property holds on it exactly as on a real model.
"""

import pytest

from lazyattention.integrations.transformers.pretrained import tiny_random
from lazyattention.integrations.transformers.qa import PROSE, wiki_set
from lazyattention.integrations.transformers.rag import INSTRUCTION


def texts(items) -> list[str]:
    """Every text a tiny tokenizer must know to encode ``items`` and their prompts."""
    return [f"{INSTRUCTION} Question: Answer:"] + [t for it in items for t in (it.question, it.answer, *it.documents)]


@pytest.fixture(scope="session")
def train_items():
    return wiki_set(12, "train", seed=0, passages=3)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, train_items):
    """``(folder, model, tokenizer)``: the tiny Llama, float32, eval mode."""
    items = train_items + wiki_set(6, "heldout", seed=0, passages=3) + list(PROSE)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = tiny_random(folder, texts(items))
    return folder, model, tokenizer
