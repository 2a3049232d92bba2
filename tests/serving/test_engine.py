"""The engine: invariants under random request streams, reuse, strategies, aborts,
preemption, bad input.

The stateful property (Hypothesis): draw a strategy, a block size, a document pool
(empty documents included), a few request shapes over it (documents in random orders)
and a KV budget barely above the largest of them, then add requests, step the engine
and abort requests in any interleaving. The budget is tight, so running requests run
out of blocks mid-decode and are preempted. After every rule the bookkeeping must hold
(``Engine.check_invariants``: no leaked block, exact reference counts, every segment a
running request uses still cached and referenced, nothing it reads evicted, request
blocks never inside a sealed segment, waiting requests holding nothing). At the end
every request that was not aborted has completed, with the tokens and first-token
logits of the same request served alone on an empty engine.

The model runs in float64: batching changes matmul shapes, and a preempted request
recomputes in a prefill what it had computed in decodes; in float32 such rounding
differences can flip a greedy near-tie, in float64 they stay ~1e-15, far below any gap
between the top two logits of a random model.

The same machine runs on the fast backend with shared-segment decode on (its threshold
drawn; under ``TRITON_INTERPRET=1`` in a fresh process without CUDA), in float32 (the
kernels' widest dtype), against the same request served alone through the per-request
decode: fewer examples outside the nightly profile, since the interpreter is slow.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from hypothesis import event, note, settings, target
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from lazyattention.reference.cache import content_key
from lazyattention.reference.tolerance import assert_close
from lazyattention.serving.engine import STRATEGIES, Engine, blocks_needed
from lazyattention.serving.model import Model, ModelConfig
from lazyattention.serving.quality import quality_check
from lazyattention.serving.request import RequestStatus

VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(dtype=torch.float64, seed=0, num_layers=1) -> Model:
    return Model(ModelConfig.tiny(vocab_size=VOCAB, num_layers=num_layers)).init_random(seed, std=0.1).to(dtype)


MODEL64 = _model()


def _tokens(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


_ALONE: dict = {}


def _serve_alone(strategy, block_size, query, docs, new, model=MODEL64):
    """The request served alone on an empty engine with room for everything (cached:
    the engine is deterministic)."""
    key = (id(model), str(strategy), block_size, tuple(query), tuple(map(tuple, docs)), new)
    if key not in _ALONE:
        engine = Engine(model, strategy, num_blocks=256, block_size=block_size, keep_logits=True)
        req = engine.add_request(query, docs, new)
        engine.run_until_done()
        assert engine.stats.preemptions == 0
        _ALONE[key] = req
    return _ALONE[key]


#: What a machine's ``setup`` draws (a machine may draw its strategy from fewer).
_SETUP = dict(
    strategy=st.sampled_from(STRATEGIES),
    block_size=st.sampled_from([1, 2, 4]),
    doc_lengths=st.lists(st.integers(0, 10), min_size=1, max_size=4),
    shapes=st.lists(
        st.tuples(
            st.lists(st.integers(0, 3), max_size=3),  # documents by index, in this order
            st.integers(1, 4),  # query length
            st.integers(1, 5),  # new tokens
        ),
        min_size=1,
        max_size=4,
    ),
    slack=st.integers(0, 3),  # blocks above the largest request
    max_num_seqs=st.integers(1, 4),
    max_batch_tokens=st.sampled_from([1, 8, 64]),
    seed=st.integers(0, 2**16),
    threshold=st.integers(1, 3),  # shared-segment decode's (the shared-decode machine)
)


class EngineMachine(RuleBasedStateMachine):
    """Requests added, stepped and aborted in any interleaving, under a tight budget."""

    model = MODEL64

    def options(self, strategy: str, threshold: int) -> dict:
        """Engine options besides the budget (the shared-decode machine adds its own)."""
        return {}

    @initialize(**_SETUP)
    def setup(self, strategy, block_size, doc_lengths, shapes, slack, max_num_seqs, max_batch_tokens, seed, threshold):
        g = torch.Generator().manual_seed(seed)
        docs = [_tokens(g, n) for n in doc_lengths]
        self.shapes = [(_tokens(g, q), [docs[i % len(docs)] for i in order], new) for order, q, new in shapes]
        self.strategy, self.block_size = strategy, block_size
        biggest = max(blocks_needed(strategy, block_size, *shape) for shape in self.shapes)
        self.engine = Engine(
            self.model,
            strategy,
            num_blocks=biggest + slack,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_batch_tokens=max_batch_tokens,
            debug=True,  # every layer checks its cache write
            keep_logits=True,
            **self.options(strategy, threshold),
        )
        self.requests = []  # (request, shape) in the order they were added
        note(f"{strategy} S={block_size} budget={biggest + slack} docs={doc_lengths} shapes={shapes}")
        note(f"options: {self.options(strategy, threshold)}")

    @rule(i=st.integers(0, 3))
    def add(self, i):
        shape = self.shapes[i % len(self.shapes)]
        self.requests.append((self.engine.add_request(*shape), shape))

    @rule()
    def step(self):
        self.engine.step()

    @rule(pick=st.integers(0, 7), by_id=st.booleans())
    def abort(self, pick, by_id):
        live = [r for r, _ in self.requests if r.status in _LIVE]
        if not live:
            return
        req = live[pick % len(live)]
        held = [seg.key for seg in req.entries]
        assert self.engine.abort(req.id if by_id else req) is req
        assert req.status is RequestStatus.ABORTED
        others = {seg.key for r in self.engine.running for seg in r.entries}
        for key in held:  # a segment another request uses stays cached
            assert key not in others or key in self.engine.store
        with pytest.raises(ValueError, match="cannot abort"):
            self.engine.abort(req)

    @invariant()
    def consistent(self):
        self.engine.check_invariants()

    def teardown(self):
        engine = self.engine
        steps = 0
        while engine.has_work():
            engine.step()
            engine.check_invariants()
            steps += 1
            assert steps < 1000, "the engine stopped making progress"
        assert engine.pool.num_used == engine.store.num_evictable_blocks  # only cached documents remain
        assert engine.stats.preemptions == sum(r.preemptions for r, _ in self.requests)
        event(f"preempted: {engine.stats.preemptions > 0}")
        target(float(engine.stats.preemptions), label="preemptions")
        worst = 0.0
        for req, shape in self.requests:
            if req.status is RequestStatus.ABORTED:
                continue
            assert req.status is RequestStatus.FINISHED
            alone = _serve_alone(self.strategy, self.block_size, *shape, model=self.model)
            assert req.output == alone.output, f"request {req.id}: batched {req.output} != alone {alone.output}"
            dtype = self.model.dtype
            first, alone_first = req.first_logits, alone.first_logits
            worst = max(worst, assert_close(first, alone_first, None, dtype, f"request {req.id} logits"))
        target(worst, label="batched vs alone logits")


_LIVE = (RequestStatus.WAITING, RequestStatus.RUNNING)
EngineMachine.TestCase.settings = settings(settings(), stateful_step_count=30)
test_engine_under_adds_steps_and_aborts = EngineMachine.TestCase

FAST_HERE = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
NIGHTLY = os.environ.get("HYPOTHESIS_PROFILE") == "nightly"


def _fast_model() -> Model:
    """``MODEL64``'s weights on the fast backend, in float32 (on CUDA where there is one)."""
    model = Model(MODEL64.cfg, backend="fast")
    model.load_state_dict(MODEL64.state_dict())
    return model.to(device="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.float32)


class SharedDecodeMachine(EngineMachine):
    """The machine on the fast backend in float32, shared-segment decode on (threshold
    1 to 3 requests), under the strategies whose requests can share a segment."""

    model = _fast_model() if FAST_HERE else None

    # Only what can share a segment in decode: the strategies whose requests read one
    # cached copy of it (Block-Attention's copies are each request's own, ``raw_cache``
    # has no shared decode, ``recompute`` caches no segment), requests that read a
    # document and decode (two new tokens or more: the first comes from the prefill).
    # The base machine draws the rest.
    @initialize(
        **{
            **_SETUP,
            "strategy": st.sampled_from(["lazy", "prefix_cache"]),
            "doc_lengths": st.lists(st.integers(1, 10), min_size=1, max_size=4),
            "shapes": st.lists(
                st.tuples(st.lists(st.integers(0, 3), min_size=1, max_size=3), st.integers(1, 4), st.integers(2, 5)),
                min_size=1,
                max_size=4,
            ),
        }
    )
    def setup(self, **drawn):
        super().setup(**drawn)

    def options(self, strategy, threshold):
        return {"shared_decode_min_requests": threshold}

    def teardown(self):
        super().teardown()
        event(f"shared steps: {self.engine.runner.steps_shared > 0}")
        target(float(self.engine.runner.steps_shared), label="shared decode steps")  # steer towards sharing


SharedDecodeMachine.TestCase.settings = settings(
    settings(), stateful_step_count=20, max_examples=settings().max_examples if NIGHTLY else 4
)
test_shared_decode_engine_under_adds_steps_and_aborts = pytest.mark.skipif(
    not FAST_HERE, reason="the fast backend needs CUDA or TRITON_INTERPRET=1 (the next test runs it so)"
)(SharedDecodeMachine.TestCase)


@pytest.mark.skipif(FAST_HERE, reason="the test above runs here")
def test_shared_decode_engine_under_the_interpreter():
    """Without CUDA, the shared-decode machine in a fresh process with
    ``TRITON_INTERPRET=1`` (set before Triton is imported)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    test = f"{__file__}::test_shared_decode_engine_under_adds_steps_and_aborts"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]


def test_the_host_runs_one_step_ahead():
    """``overlap=True`` (the default): a step's tokens land in ``output`` one step
    later (pending until then, and counted), with the tokens, first-token logits and
    finishing order of an engine that waits for every step's tokens."""
    docs = _docs(seed=9, lengths=(9, 14, 5, 11))
    runs = []
    for overlap in (False, True):
        engine = Engine(MODEL64, "lazy", num_blocks=64, block_size=4, keep_logits=True, overlap=overlap)
        reqs = [engine.add_request([i + 1, 2], docs[i:] + docs[:i], 3 + i) for i in range(3)]
        assert engine.step() == []  # the prefills: nothing finishes
        landed = [(len(r.output), r.pending) for r in reqs]
        assert landed == ([(0, 1)] * 3 if overlap else [(1, 0)] * 3), landed
        assert all(r.num_own == len(r.query) + 1 for r in reqs)
        finished = []
        while engine.has_work():
            finished += [r.id for r in engine.step()]
            engine.check_invariants()
        assert all(not r.pending and r.finish_time is not None for r in reqs)
        runs.append(([r.output for r in reqs], [r.first_logits for r in reqs], finished))
    (outputs, logits, order), (outputs_ahead, logits_ahead, order_ahead) = runs
    assert outputs == outputs_ahead and order == order_ahead
    for a, b in zip(logits, logits_ahead, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", ["lazy", "block_attention"])
def test_a_reset_engine_serves_as_a_new_one(strategy):
    """``reset`` empties the engine (no cached document, every block free, counters at
    zero) and keeps its cache and runner: the same requests then give a new engine's
    tokens, hits and steps. A busy engine refuses to reset."""
    docs = _docs(seed=4, lengths=(9, 14, 5, 11))

    def serve(engine):
        reqs = [engine.add_request([i + 1, 2], docs[i:] + docs[:i], 2 + i) for i in range(3)]
        engine.run_until_done()
        engine.check_invariants()
        return [r.output for r in reqs], replace(engine.stats)

    engine = Engine(MODEL64, strategy, num_blocks=48, block_size=4, max_num_seqs=2)
    first = serve(engine)
    cache, runner = engine.cache, engine.runner
    engine.add_request([7], docs[:1], 2)
    with pytest.raises(ValueError, match="reset needs an idle engine"):
        engine.reset()
    engine.run_until_done()
    engine.reset()
    assert engine.pool.num_used == 0 and not engine.finished and engine.stats.steps == 0
    assert engine.cache is cache and engine.runner is runner
    assert serve(engine) == first == serve(Engine(MODEL64, strategy, num_blocks=48, block_size=4, max_num_seqs=2))


def _docs(seed=0, lengths=(9, 14, 5)):
    g = torch.Generator().manual_seed(seed)
    return [_tokens(g, n) for n in lengths]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_empty_document_contributes_nothing(strategy):
    a, b, _ = _docs()
    query = [3, 4, 5]
    base = _serve_alone(strategy, 4, query, [a, b], 4)
    for docs in ([a, [], b], [[], a, b, []], [a, b, []]):
        got = _serve_alone(strategy, 4, query, docs, 4)
        assert got.output == base.output
        assert_close(got.first_logits, base.first_logits, None, torch.float64, f"{strategy} with empty documents")
    only_empty = _serve_alone(strategy, 4, query, [[]], 3)
    no_docs = _serve_alone(strategy, 4, query, [], 3)
    assert only_empty.output == no_docs.output


def test_documents_are_prefilled_once_and_reused_zero_copy():
    a, b, c = _docs()
    engine = Engine(MODEL64, "lazy", num_blocks=64, block_size=4)
    engine.generate([1], documents=[a, b], max_new_tokens=2)
    engine.generate([2], documents=[b, c, a], max_new_tokens=2)
    engine.generate([3], documents=[c, a, b], max_new_tokens=2)
    assert engine.stats.segment_prefill_tokens == len(a) + len(b) + len(c)
    assert (engine.stats.hits, engine.stats.lookups) == (5, 8)
    assert engine.stats.bytes_copied == 0
    block = Engine(MODEL64, "block_attention", num_blocks=64, block_size=4)
    block.generate([2], documents=[b, c, a], max_new_tokens=2)
    cfg = MODEL64.cfg
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 8  # K and V, float64
    assert block.stats.bytes_copied == (len(a) + len(b) + len(c)) * per_token


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lazy_matches_block_attention_under_the_tolerance_rule(dtype):
    """Lazy (zero copy) vs Block-Attention (copy + re-rotate) compute the same function:
    lazy in ``dtype`` is as close to the float64 Block-Attention oracle as
    Block-Attention itself in ``dtype``, under the tolerance rule."""
    docs = _docs(seed=3, lengths=(20, 7, 31))
    query = [7, 8, 9, 10]
    model = _model(torch.float64, num_layers=2)

    def first_logits(strategy, m):
        engine = Engine(m, strategy, num_blocks=64, block_size=4, keep_logits=True)
        engine.generate([5], documents=[docs[2], docs[0]], max_new_tokens=1)  # cached at other offsets first
        req = engine.add_request(query, docs, 1)
        engine.run_until_done()
        return req.first_logits

    oracle = first_logits("block_attention", model)
    low = model.to(dtype)
    reference = first_logits("block_attention", low)
    for strategy in ("lazy", "raw_cache"):
        assert_close(first_logits(strategy, low), oracle, reference, dtype, f"{strategy} in {dtype}")
    model.to(torch.float64)


def test_full_attention_strategies_match_the_model():
    docs = _docs(seed=4)
    query = [1, 2, 3]
    seq = [t for d in docs for t in d] + query
    expected = []
    for _ in range(4):
        expected.append(int(MODEL64.logits(torch.tensor(seq + expected))[-1].argmax()))
    for strategy in ("recompute", "prefix_cache"):
        engine = Engine(MODEL64, strategy, num_blocks=64, block_size=4)
        engine.generate([9], documents=docs[:2], max_new_tokens=1)  # prefix_cache: a shared prefix
        assert engine.generate(query, docs, 4) == expected, strategy
    assert engine.stats.hits == 2  # the two-document prefix was reused exactly


def test_prefix_cache_misses_reordered_documents():
    a, b, c = _docs(seed=5)
    engine = Engine(MODEL64, "prefix_cache", num_blocks=64, block_size=4)
    engine.generate([1], documents=[a, b, c], max_new_tokens=1)
    engine.generate([1], documents=[b, a, c], max_new_tokens=1)
    assert (engine.stats.hits, engine.stats.lookups) == (0, 6)
    lazy = Engine(MODEL64, "lazy", num_blocks=64, block_size=4)
    lazy.generate([1], documents=[a, b, c], max_new_tokens=1)
    lazy.generate([1], documents=[b, a, c], max_new_tokens=1)
    assert (lazy.stats.hits, lazy.stats.lookups) == (3, 6)


def test_lru_eviction_keeps_segments_in_use():
    docs = _docs(seed=6, lengths=(8, 8, 8, 8))
    engine = Engine(MODEL64, "lazy", num_blocks=8, block_size=4, max_num_seqs=4)
    first = engine.add_request([1], documents=docs[:2], max_new_tokens=3)
    engine.step()  # first is running and holds documents 0 and 1
    second = engine.add_request([2], documents=docs[2:], max_new_tokens=3)  # needs 5 blocks: must wait
    engine.step()
    engine.check_invariants()
    assert second in engine.waiting and first in engine.running
    engine.run_until_done()
    engine.check_invariants()
    assert first.done and second.done
    # second was admitted by evicting the least recently used unreferenced document only
    assert [content_key(d) in engine.store for d in docs] == [False, True, True, True]


def test_bad_input_is_refused_with_clear_errors():
    with pytest.raises(ValueError, match=r"unknown strategy 'fastest'.*lazy"):
        Engine(MODEL64, "fastest")
    engine = Engine(MODEL64, "lazy", num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match=r"needs 6 KV blocks.*budget is 4 blocks"):
        engine.add_request([1], documents=[[1] * 20], max_new_tokens=1)
    with pytest.raises(ValueError, match=r"query: token id 64 is outside the vocabulary \[0, 64\)"):
        engine.add_request([1, 64], max_new_tokens=1)
    with pytest.raises(ValueError, match="document 1: token id -1"):
        engine.add_request([1], documents=[[2], [-1]], max_new_tokens=1)
    with pytest.raises(TypeError, match="integers"):
        engine.add_request([1.5], max_new_tokens=1)
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_request([], max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.add_request([1], max_new_tokens=0)
    assert not engine.has_work() and engine.pool.num_used == 0  # nothing was queued


def test_tensor_inputs_are_accepted():
    docs = _docs(seed=7)
    as_lists = Engine(MODEL64, "lazy", num_blocks=64, block_size=4).generate([1, 2], docs, 3)
    as_tensors = Engine(MODEL64, "lazy", num_blocks=64, block_size=4).generate(
        torch.tensor([1, 2]), [torch.tensor(d) for d in docs], 3
    )
    assert as_lists == as_tensors


def test_quality_check_reports_rounding_only_between_lazy_and_block_attention():
    docs = _docs(seed=8, lengths=(12, 20))
    report = quality_check(_model(num_layers=2), [([1, 2], docs), ([3], docs[::-1])], max_new_tokens=4)
    assert report.dtype == "float64" and report.requests == 2
    assert report.lazy_vs_block_logits < 1e-10
    assert report.lazy_vs_block_agreement == 1.0
    assert report.lazy_vs_full_logits > 1e-4  # documents that see each other: another function
    assert math.isclose(report.block_vs_full_logits, report.lazy_vs_full_logits, rel_tol=1e-6)


FAST_SCRIPT = """
import torch
from lazyattention.serving.engine import STRATEGIES, Engine
from lazyattention.serving.model import Model, ModelConfig
from lazyattention.reference.tolerance import assert_close

torch.set_num_threads(1)
cfg = ModelConfig.tiny(vocab_size=64, num_layers=2)
base = Model(cfg).init_random(0, std=0.1)

def clone(backend, dtype):
    model = Model(cfg, backend=backend)
    model.load_state_dict(base.state_dict())
    return model.to(dtype)

g = torch.Generator().manual_seed(0)
docs = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (21, 0, 9, 16)]
requests = [([1, 2, 3], docs[:3]), ([4], [docs[2], docs[1], docs[0], docs[3]])]

def serve(model, strategy):
    engine = Engine(model, strategy, num_blocks=48, block_size=8, keep_logits=True, debug=True)
    engine.generate([5], [docs[3], docs[0]], 1)
    reqs = [engine.add_request(q, d, 3) for q, d in requests]
    engine.run_until_done()
    engine.check_invariants()
    return reqs

for strategy in STRATEGIES:
    oracle = serve(clone("reference", torch.float64), strategy)
    reference = serve(clone("reference", torch.float32), strategy)
    fast = serve(clone("fast", torch.float32), strategy)
    for f, r, o in zip(fast, reference, oracle):
        assert f.output == r.output, (strategy, f.output, r.output)
        assert_close(f.first_logits, o.first_logits, r.first_logits, torch.float32, strategy)
print("ok")
"""


def test_fast_backend_serves_like_the_reference():
    """The model and engine through ``lazyattention.fast`` (its Triton kernels on the
    CPU under ``TRITON_INTERPRET=1``, set in a fresh process before Triton loads):
    every strategy, an empty document included, gives the reference's tokens and
    first-token logits within the tolerance rule (oracle: the reference in float64)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", FAST_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


SHARED_SCRIPT = """
import torch
from lazyattention.serving.engine import Engine
from lazyattention.serving.model import Model, ModelConfig

torch.set_num_threads(1)
cfg = ModelConfig.tiny(vocab_size=64, num_layers=1)
base = Model(cfg).init_random(0, std=0.1)
model = Model(cfg, backend="fast")
model.load_state_dict(base.state_dict())

g = torch.Generator().manual_seed(1)
docs = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (21, 9, 16)]
# Three requests over the same documents in different orders (each at its own offsets),
# running together: their decode steps share segments.
requests = [([1, 2], [docs[0], docs[1]]), ([3], [docs[1], docs[0], docs[2]]), ([4, 5, 6], [docs[2], docs[0]])]

def serve(threshold):
    engine = Engine(model, "lazy", num_blocks=64, block_size=8, debug=True, shared_decode_min_requests=threshold)
    reqs = [engine.add_request(q, d, 3) for q, d in requests]
    engine.run_until_done()
    engine.check_invariants()
    return [r.output for r in reqs], engine.runner.steps_shared, engine.stats.decode_steps

plain, none, _ = serve(None)
shared, used, decodes = serve(2)
assert none == 0 and used == decodes > 0, (used, decodes)
assert shared == plain, (shared, plain)
print("ok", used)
"""


def test_shared_decode_serves_the_same_tokens():
    """``Engine(shared_decode_min_requests=N)`` (fast backend under ``TRITON_INTERPRET=1``, in a fresh
    process): decode steps whose requests share documents run shared-segment decode
    and give the tokens of the per-request decode."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", SHARED_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_shared_decode_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="shared_decode_min_requests needs the fast backend"):
        Engine(MODEL64, "lazy", shared_decode_min_requests=2)
    with pytest.raises(ValueError, match="strategy 'raw_cache' stores keys unrotated"):
        Engine(MODEL64, "raw_cache", shared_decode_min_requests=2)
    with pytest.raises(ValueError, match="shared_decode_min_requests must be None or an int >= 1"):
        Engine(MODEL64, "lazy", shared_decode_min_requests=0)


def test_block_attention_rerotates_without_the_yarn_attention_factor():
    """Re-rotating an encoded key is a pure rotation R(δ) (eq. 9): YaRN's attention
    factor, already in the stored key, must not be applied twice."""
    from lazyattention.reference.rope import RopeConfig, YarnScaling

    rope = RopeConfig(head_dim=16, scaling=YarnScaling(factor=4.0, original_max_position=64))
    assert rope.attention_scaling != 1.0
    model = Model(replace(ModelConfig.tiny(), rope=rope)).init_random(0, std=0.1).to(torch.float64)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (37, 16, 20)]
    report = quality_check(model, [([1, 2, 3], docs), ([4], docs[::-1])], max_new_tokens=4)
    assert report.lazy_vs_block_logits <= 1e-9
    assert report.lazy_vs_block_agreement == 1.0
