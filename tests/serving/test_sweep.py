"""The sweep's dry run and hit-ratio table, against the real engine."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

from lazyattention.reference.layout import ceil_div
from lazyattention.serving.config import ModelConfig
from lazyattention.serving.engine import STRATEGIES, Engine, blocks_needed
from lazyattention.serving.model import Model
from lazyattention.serving.sweep import PAPER_HIT_RATIO, dry_run, hit_ratio_table, kv_block_bytes
from lazyattention.serving.workload import WorkloadConfig, make_workload

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLOCK = 4


def _workload(seed: int, alpha: float):
    return make_workload(
        WorkloadConfig(
            num_requests=8,
            num_documents=5,
            doc_len_mean=9,
            doc_len_min=2,
            doc_len_max=20,
            docs_per_request=2,
            zipf_alpha=alpha,
            query_len=3,
            output_len=3,
            vocab_size=64,
            seed=seed,
        )
    )


def _fits(workload, strategy) -> int:
    return max(
        blocks_needed(strategy, BLOCK, r.query, workload.request_documents(r), r.max_new_tokens)
        for r in workload.requests
    )


@settings(max_examples=8)
@given(
    strategy=st.sampled_from(STRATEGIES),
    alpha=st.sampled_from([0.0, 1.1, 2.1]),
    spare=st.integers(0, 12),
    max_num_seqs=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_a_dry_run_counts_what_the_real_engine_counts(strategy, alpha, spare, max_num_seqs, seed):
    workload = _workload(seed, alpha)
    num_blocks = _fits(workload, strategy) + spare  # tight budgets preempt and evict
    note(f"{strategy=} {num_blocks=}")
    model = Model(ModelConfig.tiny(vocab_size=64, num_layers=1)).init_random(seed)
    engine = Engine(model, strategy, num_blocks=num_blocks, block_size=BLOCK, max_num_seqs=max_num_seqs,
                    max_batch_tokens=32)  # fmt: skip
    for r in workload.requests:
        engine.add_request(r.query, workload.request_documents(r), r.max_new_tokens)
    engine.run_until_done()
    counted = dry_run(workload, strategy, num_blocks, BLOCK, max_num_seqs, max_batch_tokens=32).stats
    real = engine.stats
    fields = ("hits", "lookups", "preemptions", "peak_blocks", "steps", "decode_steps")
    assert {f: getattr(counted, f) for f in fields} == {f: getattr(real, f) for f in fields}
    assert counted.hit_ratio == real.hit_ratio
    assert (counted.bytes_copied > 0) == (real.bytes_copied > 0)  # bytes of another model's cache


def test_dry_run_records_each_decode_steps_batch_and_longest_table():
    workload = _workload(0, 1.1)
    shapes = dry_run(workload, "lazy", 200, BLOCK, max_num_seqs=3).decode_shapes
    assert shapes and all(1 <= b <= 3 for b, _ in shapes)
    widest = max(
        sum(ceil_div(len(d), BLOCK) for d in workload.request_documents(r))
        + ceil_div(len(r.query) + r.max_new_tokens - 1, BLOCK)
        for r in workload.requests
    )
    assert max(m for _, m in shapes) <= widest


def test_kv_block_bytes_is_the_caches():
    for cfg, dtype in ((ModelConfig.tiny(), torch.float32), (ModelConfig.tiny(num_layers=3), torch.bfloat16)):
        model = Model(cfg).to(dtype)
        assert kv_block_bytes(cfg, dtype, 16) == model.new_cache(4, 16).bytes_per_block


def test_hit_ratio_table_rows_and_the_budgets_that_do_not_fit():
    base = _workload(3, 1.1).config
    cfg = ModelConfig.tiny(vocab_size=64, num_layers=1)
    block_bytes = kv_block_bytes(cfg, torch.float32, BLOCK)
    workload = make_workload(base)
    lazy_fits, block_fits = _fits(workload, "lazy"), _fits(workload, "block_attention")
    assert lazy_fits < block_fits
    budgets = [b * block_bytes / 2**30 for b in (lazy_fits, block_fits + 10)]
    rows = hit_ratio_table(base, [1.1, 2.1], budgets, block_bytes, block_size=BLOCK, max_num_seqs=2)
    assert len(rows) == 2 * 2 * 3
    for row in rows:
        assert row["num_blocks"] == math.floor(row["budget_gib"] * 2**30 / block_bytes)
        skewed = make_workload(replace(base, zipf_alpha=row["alpha"]))
        fits = row["num_blocks"] >= _fits(skewed, row["strategy"])
        assert row["fits"] == fits and (row["hit_ratio"] is None) == (not fits)
        if fits:
            counted = dry_run(skewed, row["strategy"], row["num_blocks"], BLOCK, max_num_seqs=2).stats
            assert row["hit_ratio"] == counted.hit_ratio and 0 <= row["hit_ratio"] <= 1
    assert not next(r for r in rows if r["strategy"] == "block_attention" and r["num_blocks"] == lazy_fits)["fits"]
    assert set(PAPER_HIT_RATIO) >= {"alpha", "budget_gib", "prefix_cache", "block_attention", "lazy"}
