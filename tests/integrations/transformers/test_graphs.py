"""LazyRAG's steps from CUDA graphs: what a bucket computes is what the step computes.

Requests are drawn (batch, documents in any order and at any starts, question
lengths), so decode steps pad to their batch bucket and the questions' prefills to
their batch and token bucket. Without a CUDA device the buckets' static steps run eagerly
(``capture=False``) under the Triton interpreter: the padding, the scratch blocks and
the static metadata are what is tested. On CUDA the graphs are captured and replayed.
Either way the greedy tokens equal those of the same requests run eagerly, and the
first logits meet the tolerance rule against them.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyattention.backends import get_backend
from lazyattention.integrations.transformers import LazyRAG, RAGRequest, Sampling
from lazyattention.integrations.transformers.graphs import StepGraphs
from lazyattention.reference import assert_close

from .models import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DOCS = ((5, 6, 7, 8, 9, 10), (12, 13, 14), tuple(range(30, 51)))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("graphs"), "llama", dtype=torch.float32).to(DEVICE)


def _rag(model, graphs: bool) -> LazyRAG:
    rag = LazyRAG(model, None, backend="fast", num_blocks=64, block_size=16, cuda_graphs=graphs and CUDA)
    if graphs and not CUDA:  # the buckets' static steps, run eagerly
        rag.graphs = StepGraphs(rag._run_model, rag.cache, rag.support.rotation, rag.backend, capture=False)
    return rag


@st.composite
def requests(draw):
    batch = draw(st.integers(1, 3))
    out = []
    for _ in range(batch):
        order = draw(st.permutations(range(len(DOCS))))[: draw(st.integers(1, len(DOCS)))]
        starts = [draw(st.integers(0, 3000)) for _ in order]
        own = draw(st.lists(st.integers(1, 60), min_size=1, max_size=20))
        end = max(s + len(DOCS[d]) for d, s in zip(order, starts, strict=True))
        out.append(RAGRequest(tuple(DOCS[d] for d in order), tuple(starts), tuple(own), end + draw(st.integers(0, 5))))
    return out


@settings(max_examples=6 if CUDA else 3, deadline=None)
@given(batch=requests(), new=st.integers(1, 4))
def test_steps_from_buckets_give_the_eager_tokens(model, batch, new):
    sampling = Sampling(max_new_tokens=new, ignore_eos=True)
    eager = _rag(model, graphs=False).generate_batch(batch, "lazy", sampling)
    graphed = _rag(model, graphs=True)
    got = graphed.generate_batch(batch, "lazy", sampling)
    assert [a.tokens for a in got] == [a.tokens for a in eager]
    for a, b in zip(got, eager, strict=True):
        assert_close(a.first_logits.cpu(), b.first_logits.cpu(), b.first_logits.cpu(), torch.float32, "first logits")
    kinds = {key[0] for key in graphed.graphs.graphs}
    assert "decode" in kinds or new == 1
    if any(len(r.own) >= 2 for r in batch):
        assert "prefill" in kinds


def test_a_single_request_prefills_and_decodes_from_buckets(model):
    """Three documents prefilled together (three requests of 30 tokens: batch bucket 4,
    32 rows), a question of five tokens (batch 1, 16 rows: the filler in the scratch
    blocks), then its decode (batch bucket 1)."""
    request = RAGRequest(DOCS[::-1], (40, 0, 9), (20, 21, 22, 23, 24), 70)
    sampling = Sampling(max_new_tokens=5, ignore_eos=True)
    eager = _rag(model, graphs=False).generate(request, "lazy", sampling)
    graphed = _rag(model, graphs=True)
    got = graphed.generate(request, "lazy", sampling)
    assert got.tokens == eager.tokens
    assert sorted(graphed.graphs.graphs) == [("decode", 1, 16), ("prefill", 1, 16, 16), ("prefill", 4, 32, 16)]
    if CUDA:
        assert graphed.graphs.replays == 6  # two prefills and four decode steps


def test_questions_longer_than_the_widest_bucket_prefill_in_groups_of_requests(model):
    """Three questions of 30 tokens, buckets of at most 64 rows: the first two prefill
    together (2 requests, 64 rows), the third alone (32 rows); nothing runs eagerly.
    (The three documents' first prefill is the bucket of 4 requests and 32 rows.)"""
    batch = [RAGRequest((DOCS[k],), (0,), tuple(range(1 + k, 31 + k)), len(DOCS[k])) for k in range(3)]
    sampling = Sampling(max_new_tokens=2, ignore_eos=True)
    eager = _rag(model, graphs=False).generate_batch(batch, "lazy", sampling)
    graphed = _rag(model, graphs=False)
    graphed.graphs = StepGraphs(graphed._run_model, graphed.cache, graphed.support.rotation, graphed.backend,
                                capture=CUDA, max_prefill_tokens=64)  # fmt: skip
    got = graphed.generate_batch(batch, "lazy", sampling)
    assert [a.tokens for a in got] == [a.tokens for a in eager]
    assert sorted(k[:3] for k in graphed.graphs.graphs) == [
        ("decode", 4, 16),
        ("prefill", 1, 32),
        ("prefill", 2, 64),
        ("prefill", 4, 32),
    ]


def test_cuda_graphs_need_a_backend_that_captures_here(model):
    if CUDA:
        with pytest.raises(ValueError, match="cuda_graphs=True needs a backend that captures"):
            LazyRAG(model, None, backend="reference", cuda_graphs=True)
    else:
        with pytest.raises(ValueError, match="cuda_graphs=True needs a backend that captures"):
            LazyRAG(model, None, backend="fast", cuda_graphs=True)
    rag = LazyRAG(model, None, backend="reference", num_blocks=16)
    assert rag.graphs is None
    assert (LazyRAG(model, None, backend="fast", num_blocks=16).graphs is not None) == CUDA  # the default
    with pytest.raises(ValueError, match="backend 'reference' does not"):
        StepGraphs(rag._run_model, rag.cache, rag.support.rotation, get_backend("reference"))


def test_the_scratch_blocks_lie_outside_the_pool(model):
    rag = _rag(model, graphs=True)
    assert rag.cache.scratch[0] == rag.cache.pool.num_blocks
    assert rag.cache.kv.k[0].shape[0] == rag.cache.pool.num_blocks + len(rag.cache.scratch)
