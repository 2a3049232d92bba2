"""Scheduling: prefill steps apart from decode steps, blocks on demand, preemption and
resumption, aborts. Float64 model, as in ``test_engine.py`` (a resumed request's
recomputing prefill must give its decodes' tokens exactly)."""

from __future__ import annotations

import pytest
import torch

from lazyattention.reference.cache import content_key
from lazyattention.reference.tolerance import assert_close
from lazyattention.serving.engine import STRATEGIES, Engine, blocks_needed
from lazyattention.serving.request import RequestStatus
from lazyattention.serving.strategies import get_strategy
from tests.serving.test_engine import MODEL64, _serve_alone

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOC = [11, 12, 13]
A = ([1, 2], [DOC], 6)  # query, documents, new tokens
B = ([3], [DOC], 6)


def _tight_engine(strategy, *shapes, slack=1, **kwargs):
    """An engine one block above the largest request: two of them cannot both finish
    without one giving its blocks back."""
    need = max(blocks_needed(strategy, 2, *shape) for shape in shapes)
    return Engine(MODEL64, strategy, num_blocks=need + slack, block_size=2, keep_logits=True, debug=True, **kwargs)


def _run_checked(engine, steps):
    """Step to the end, checking the bookkeeping after every step; record every step's
    inputs."""
    run = engine.runner.run

    def recording(ids, step, carried=None):
        steps.append(step)
        return run(ids, step, carried)

    engine.runner.run = recording
    while engine.has_work():
        engine.step()
        engine.check_invariants()
        assert len(steps) < 200, "no progress"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_preempted_request_resumes_and_matches_serving_alone(strategy):
    engine = _tight_engine(strategy, A, B)
    a, b = engine.add_request(*A), engine.add_request(*B)
    steps = []
    _run_checked(engine, steps)
    assert engine.stats.preemptions >= 1 and b.preemptions >= 1 and a.preemptions == 0  # the newest gives way
    assert engine.stats.preemptions == a.preemptions + b.preemptions
    for req, shape in ((a, A), (b, B)):
        alone = _serve_alone(strategy, 2, *shape)
        assert req.output == alone.output, f"{strategy}: request {req.id} {req.output} != alone {alone.output}"
        assert_close(req.first_logits, alone.first_logits, None, torch.float64, "first logits")  # the first prefill's
    assert engine.stats.hits + (strategy != "recompute") == engine.stats.lookups  # counted once per request
    assert engine.pool.num_used == engine.store.num_evictable_blocks


def test_steps_are_prefill_steps_or_decode_steps():
    """A decode step holds the decode layout, slots, positions and logit rows only;
    prefill steps (resumed requests and Block-Attention's copies included) no decode."""
    engine = _tight_engine("block_attention", A, B)
    engine.add_request(*A)
    engine.add_request(*B)
    steps = []
    _run_checked(engine, steps)
    decodes = [s for s in steps if s.decode is not None]
    prefills = [s for s in steps if s.prefill is not None]
    assert len(decodes) == engine.stats.decode_steps and len(decodes) + len(prefills) == len(steps)
    for s in decodes:
        assert s.prefill is None and s.copy_src is None and s.copy_dst is None and s.copy_shift is None
        b = s.decode.batch_size
        assert s.slots.shape == s.positions.shape == (b,) and s.logit_rows.tolist() == list(range(b))
    assert sum(s.copy_src is not None for s in prefills) == len(prefills) == 1 + engine.stats.preemptions


def test_blocks_are_taken_as_decoding_proceeds():
    engine = Engine(MODEL64, "lazy", num_blocks=16, block_size=2)
    req = engine.add_request([1, 2, 3], [DOC], 5)
    engine.step()  # prefill: the document's 2 blocks, 2 blocks for the 3 query tokens
    assert len(req.own_blocks) == 2 and engine.pool.num_used == 4
    owned = []
    while not req.done:
        owned.append(len(req.own_blocks))
        engine.step()
    assert owned == [2, 2, 3, 3]  # own tokens 4, 5, 6, 7 written: a block every second token


def test_abort_gives_back_everything():
    d1, d2 = [5, 6, 7, 8, 9], [21, 22, 23]
    engine = Engine(MODEL64, "lazy", num_blocks=32, block_size=2, max_num_seqs=2)
    a = engine.add_request([1], [d1, d2], 4)
    b = engine.add_request([2], [d2], 4)
    c = engine.add_request([3], [d1], 4)  # waits: two running at most
    engine.step()
    assert a.status is b.status is RequestStatus.RUNNING and c.status is RequestStatus.WAITING
    assert engine.abort(a) is a and a.status is RequestStatus.ABORTED
    assert engine.store.get(content_key(d1)).refs == 0 and engine.store.get(content_key(d2)).refs == 1
    engine.check_invariants()
    assert engine.abort(c.id) is c and c not in engine.waiting  # by id, while waiting
    engine.abort(b)
    engine.check_invariants()
    assert not engine.has_work() and engine.pool.num_used == engine.store.num_evictable_blocks == 5
    assert engine.stats.aborts == 3
    for gone, state in ((a, "aborted"), (b, "aborted")):
        with pytest.raises(ValueError, match=rf"cannot abort request {gone.id}: .*\({state}\)"):
            engine.abort(gone)
    with pytest.raises(ValueError, match=r"cannot abort request 99: .*\(unknown\)"):
        engine.abort(99)
    done = engine.add_request([4], [d1], 1)
    engine.run_until_done()
    with pytest.raises(ValueError, match=r"\(finished\)"):
        engine.abort(done)
    other = Engine(MODEL64, "lazy", num_blocks=32, block_size=2).add_request([4], [], 1)  # same id, another engine
    with pytest.raises(ValueError, match="cannot abort"):
        engine.abort(other)


@pytest.mark.parametrize("strategy", ["lazy", "block_attention", "prefix_cache"])
def test_abort_leaves_a_shared_document_and_the_other_request_intact(strategy):
    engine = Engine(MODEL64, strategy, num_blocks=32, block_size=2)
    a, b = engine.add_request([1, 2], [DOC], 5), engine.add_request([3], [DOC], 5)
    engine.step()
    engine.step()
    engine.abort(a)
    engine.check_invariants()
    assert content_key(DOC) in engine.store or strategy == "prefix_cache"
    engine.run_until_done()
    assert b.output == _serve_alone(strategy, 2, *B[:2], 5).output
    assert engine.stats.segment_prefill_tokens == len(DOC)  # never prefilled again
    assert engine.pool.num_used == engine.store.num_evictable_blocks


def test_a_request_that_must_wait_evicts_nothing():
    """Admission is checked before anything is taken: a request that does not fit yet
    leaves the cached documents of others where they are."""
    d1, d2, big = [5, 6, 7, 8], [9, 10, 11, 12], list(range(20, 32))
    engine = Engine(MODEL64, "lazy", num_blocks=12, block_size=2)
    engine.generate([1], [d1], 1)
    engine.generate([1], [d2], 1)  # d1 and d2 cached, unreferenced: 4 evictable blocks
    running = engine.add_request([2], [big], 3)  # 6 + 1 blocks
    engine.step()
    waiting = engine.add_request([3], [big[:8], [40, 41]], 3)  # 4 + 1 + 1 blocks: 1 free + 4 evictable is short
    engine.step()
    assert waiting.status is RequestStatus.WAITING and running.status is RequestStatus.RUNNING
    assert content_key(d1) in engine.store and content_key(d2) in engine.store
    engine.run_until_done()
    assert waiting.done and engine.stats.preemptions == 0


def test_a_preempted_request_whose_document_was_evicted_prefills_it_again():
    long = ([1, 2], [], 8)  # its own tokens grow to 5 blocks of 2
    short = ([3], [[31, 32, 33, 34]], 4)
    engine = _tight_engine("lazy", long, short)  # 6 blocks: both fit only until `long` grows
    a, b = engine.add_request(*long), engine.add_request(*short)
    _run_checked(engine, [])
    assert b.preemptions == 1 and a.preemptions == 0
    assert engine.stats.segment_prefill_tokens == 2 * 4  # evicted while `short` waited, prefilled again
    assert b.output == _serve_alone("lazy", 2, *short).output and a.output == _serve_alone("lazy", 2, *long).output


@pytest.mark.parametrize("strategy", ["lazy", "block_attention", "prefix_cache"])
def test_a_requests_document_keys_are_hashed_once_however_long_it_waits(strategy):
    """The keys are computed when the request is queued and kept on it: admission tries
    a waiting request every step, and a preempted one is admitted again."""
    counted = type(get_strategy(strategy))  # the strategy's class, its segment_keys counted
    calls = []

    class Counting(counted):
        def segment_keys(self, documents):
            calls.append(len(documents))
            return super().segment_keys(documents)

    engine = _tight_engine(Counting(), A, B)
    calls.clear()  # sizing the budget hashed them
    a, b = engine.add_request(*A), engine.add_request(*B)
    steps = []
    _run_checked(engine, steps)
    assert b.preemptions >= 1  # b waited and was admitted again
    assert calls == [1, 1]  # once per request, at add_request
    assert a.segment_keys == get_strategy(strategy).segment_keys(A[1])
