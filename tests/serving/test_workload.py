"""The workload generator and the serving metrics."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from lazyattention.serving.engine import Engine, Request
from lazyattention.serving.model import Model, ModelConfig
from lazyattention.serving.workload import (
    WorkloadConfig,
    make_workload,
    run_workload,
    summarize,
    zipf_probabilities,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_zipf_probabilities():
    assert torch.allclose(zipf_probabilities(4, 0.0), torch.full((4,), 0.25, dtype=torch.float64))
    p = zipf_probabilities(3, 1.0)
    assert torch.allclose(p, torch.tensor([1, 1 / 2, 1 / 3], dtype=torch.float64) / (11 / 6))


@given(
    num_documents=st.integers(1, 12),
    k=st.integers(1, 4),
    alpha=st.sampled_from([0.0, 0.5, 1.0, 1.5]),
    rate=st.sampled_from([math.inf, 5.0, 200.0]),
    seed=st.integers(0, 2**16),
)
def test_workload_structure(num_documents, k, alpha, rate, seed):
    k = min(k, num_documents)
    cfg = WorkloadConfig(
        num_requests=20,
        num_documents=num_documents,
        doc_len_mean=30,
        doc_len_sigma=0.8,
        doc_len_min=4,
        doc_len_max=60,
        docs_per_request=k,
        zipf_alpha=alpha,
        rate=rate,
        vocab_size=50,
        seed=seed,
    )
    note(cfg)
    w = make_workload(cfg)
    assert w == make_workload(cfg), "a seed fixes the workload"
    assert len(w.documents) == num_documents
    assert all(4 <= len(d) <= 60 and all(1 <= t < 50 for t in d) for d in w.documents)
    arrivals = [r.arrival for r in w.requests]
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals)
    if math.isinf(rate):
        assert set(arrivals) == {0.0}
    for r in w.requests:
        assert len(set(r.documents)) == k and all(0 <= i < num_documents for i in r.documents)
        assert len(r.query) == cfg.query_len and r.max_new_tokens == cfg.output_len


def test_skew_orders_and_rates_are_drawn_as_configured():
    uniform = make_workload(WorkloadConfig(num_requests=400, num_documents=10, docs_per_request=1, zipf_alpha=0.0))
    skewed = make_workload(WorkloadConfig(num_requests=400, num_documents=10, docs_per_request=1, zipf_alpha=1.2))
    top = lambda w: Counter(r.documents[0] for r in w.requests)[0] / len(w.requests)  # noqa: E731
    assert top(uniform) < 0.2 < 0.3 < top(skewed)  # expected 0.10 and 0.39
    orders = make_workload(WorkloadConfig(num_requests=50, num_documents=4, docs_per_request=4, zipf_alpha=1.0))
    assert len({tuple(r.documents) for r in orders.requests}) > 5, "documents come in random orders"
    timed = make_workload(WorkloadConfig(num_requests=400, rate=50.0))
    mean_gap = timed.requests[-1].arrival / (len(timed.requests) - 1)
    assert abs(mean_gap - 1 / 50) < 0.2 / 50
    equal = make_workload(WorkloadConfig(num_documents=5, doc_len_mean=20, doc_len_sigma=0.0, doc_len_min=1))
    assert {len(d) for d in equal.documents} == {20}
    assert make_workload(WorkloadConfig(seed=1)) != make_workload(WorkloadConfig(seed=2))


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="docs_per_request"):
        WorkloadConfig(num_documents=2, docs_per_request=3)
    with pytest.raises(ValueError, match="doc_len"):
        WorkloadConfig(doc_len_mean=4, doc_len_min=8)
    with pytest.raises(ValueError, match="rate"):
        WorkloadConfig(rate=0.0)
    with pytest.raises(ValueError, match="zipf_alpha"):
        WorkloadConfig(zipf_alpha=-1.0)


def _request(arrival, first, finish, docs, query, outputs):
    r = Request(id=0, query=[1] * query, documents=[[1] * n for n in docs], max_new_tokens=outputs, arrival=arrival)
    r.output, r.first_token_time, r.finish_time = [2] * outputs, first, finish
    return r


def test_summarize_computes_the_metrics_as_defined():
    engine = Engine(Model(ModelConfig.tiny()), "block_attention", num_blocks=8, block_size=4)
    engine.stats.hits, engine.stats.lookups, engine.stats.bytes_copied, engine.stats.peak_blocks = 3, 4, 100, 7
    engine.stats.schedule_seconds, engine.stats.launch_seconds, engine.stats.land_seconds = 0.25, 0.5, 0.125
    engine.stats.wait_seconds = 2.0
    requests = [
        _request(0.0, 1.0, 3.0, docs=[10, 5], query=2, outputs=5),  # TTFT 1, TPOT 0.5
        _request(1.0, 2.0, 4.0, docs=[10], query=3, outputs=1),  # TTFT 1, no TPOT
        _request(2.0, 5.0, 6.0, docs=[], query=4, outputs=3),  # TTFT 3, TPOT 0.5
    ]
    m = summarize(engine, requests, start=0.0)
    assert m.ttft_p50 == 1.0 and math.isclose(m.ttft_p99, 1.0 + 2.0 * 0.98)
    assert m.tpot_mean == 0.5 and m.makespan == 6.0 and m.requests_per_s == 0.5
    assert m.tokens_per_s == (15 + 2 + 5 + 10 + 3 + 1 + 4 + 3) / 6.0  # each request's documents once
    assert (m.hit_ratio, m.bytes_copied, m.peak_blocks, m.strategy) == (0.75, 100, 7, "block_attention")
    assert (m.host_s, m.wait_s) == (0.875, 2.0)
    with pytest.raises(ValueError, match="finished"):
        summarize(engine, [Request(id=1, query=[1], documents=[], max_new_tokens=1, arrival=0.0)], 0.0)


@pytest.mark.parametrize("strategy", ["lazy", "block_attention", "recompute"])
def test_run_workload_serves_everything(strategy):
    model = Model(ModelConfig.tiny(vocab_size=64, num_layers=1)).init_random(0)
    w = make_workload(
        WorkloadConfig(
            num_requests=10,
            num_documents=4,
            doc_len_mean=12,
            docs_per_request=2,
            query_len=3,
            output_len=2,
            rate=2000.0,
            vocab_size=64,
        )
    )
    engine = Engine(model, strategy, num_blocks=40, block_size=4, max_num_seqs=3)
    calls = []
    m = run_workload(engine, w, progress=lambda done, total: calls.append((done, total)))
    assert m.requests == 10 and calls[-1] == (10, 10)
    assert all(len(r.output) == 2 for r in engine.finished)
    assert m.ttft_p50 > 0 and m.ttft_p99 >= m.ttft_p50 and m.requests_per_s > 0
    assert (m.bytes_copied > 0) == (strategy == "block_attention")
    assert (m.hit_ratio > 0) == (strategy != "recompute")  # 4 documents, 20 uses: some reuse
    assert m.peak_blocks <= 40
    # the host's time in the engine's steps, by phase, within the run's wall time
    stats = engine.stats
    phases = (stats.schedule_seconds, stats.launch_seconds, stats.wait_seconds, stats.land_seconds)
    assert all(t >= 0 for t in phases) and stats.launch_seconds > 0
    assert m.host_s == stats.host_seconds == stats.schedule_seconds + stats.launch_seconds + stats.land_seconds
    assert m.wait_s == stats.wait_seconds and m.host_s + m.wait_s <= m.makespan
    with pytest.raises(ValueError, match="fresh engine"):
        run_workload(engine, w)


@given(rate=st.sampled_from([5.0, 200.0]), seed=st.integers(0, 2**16))
def test_a_rate_changes_the_arrivals_and_nothing_else(rate, seed):
    burst = make_workload(WorkloadConfig(num_requests=12, num_documents=6, docs_per_request=2, seed=seed))
    timed = make_workload(replace(burst.config, rate=rate))
    assert timed.documents == burst.documents
    assert [(r.query, r.documents) for r in timed.requests] == [(r.query, r.documents) for r in burst.requests]
    assert {r.arrival for r in burst.requests} == {0.0} and len({r.arrival for r in timed.requests}) > 1
