"""Differential tests of the fast attention kernels.

Each fast function is held to the project's tolerance rule (``reference/tolerance.py``)
against the float64 oracle — the reference eager definition (eq. 9) run in float64 on
the very same rounded inputs — with the reference's function of the same name, run in
the dtype under test, as the yardstick. Outputs and log-sum-exps are compared by name.

The cases (``tests/strategies.py``) cover offsets 0, small, past 65,536 and near 2^20;
reordered, gapped and overlapping segments; query lengths down to 1; lengths that are
not multiples of the block size; block sizes below, equal to and above the key tile;
GQA ratios; head dims 64–256; partial rotary; both styles; every scaling. Unwritten
cache slots hold NaN and every output starts as NaN (conftest.py), so a kernel that
reads past a block's valid length or leaves an element unwritten fails.
"""

import dataclasses

import pytest
import torch
from hypothesis import example, given, note, settings, target
from hypothesis import strategies as st

import lazyattention.fast as fast
from lazyattention.fast import attend as _attend
from lazyattention.fast import plan as _plan
from lazyattention.reference import RopeConfig, assert_close
from lazyattention.reference.layout import ceil_div
from lazyattention.testing import properties
from tests.strategies import Case, DocSpec, RequestSpec, SegmentSpec, build, edge_cases

from .strategies import DEVICE, DTYPES, examples, fast_cases, fast_edge_cases

EDGES = {**edge_cases(), **fast_edge_cases()}


def oracle(case, dtype, scale=None):
    """The float64 eager definition on the inputs of ``build(case, dtype)``."""
    return properties.oracle(case, dtype, DEVICE, scale)


def check(name, case, dtype, scale=None):
    """The differential property of ``fast.name`` (``lazyattention.testing.properties``);
    returns the worst error ÷ bound."""
    return properties.differential(fast, name, case, dtype, DEVICE, scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["lazy_prefill", "raw_prefill", "eager_attention"])
@settings(max_examples=examples(15, 4))
@given(case=fast_cases())
def test_prefill_within_tolerance(name, dtype, case):
    note(case.describe())
    target(check(name, case, dtype), label=f"{name} {dtype} error")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["lazy_decode", "raw_decode", "eager_attention"])
@settings(max_examples=examples(15, 4))
@given(case=fast_cases(decode=True))
def test_decode_within_tolerance(name, dtype, case):
    note(case.describe())
    target(check(name, case, dtype), label=f"{name} {dtype} error")


@pytest.mark.parametrize("edge", sorted(EDGES))
@pytest.mark.parametrize("name", ["lazy_prefill", "raw_prefill", "eager_attention", "lazy_decode", "raw_decode"])
def test_pinned_edges(name, edge):
    """Every named edge through every function, in half precision (bf16 for odd names)."""
    dtype = torch.float16 if len(edge) % 2 == 0 else torch.bfloat16
    check(name, EDGES[edge], dtype)


@pytest.mark.parametrize("block_size", [16, 5], ids=["tile_in_block", "tile_across_blocks"])
@pytest.mark.parametrize("name", ["lazy_prefill", "raw_prefill", "eager_attention"])
def test_causal_diagonal_across_tiles(name, block_size):
    """Many queries of one KV head (G = 1, so a query tile holds many tokens): the
    diagonal crosses key-tile boundaries inside a query tile, where a kernel that
    skipped the causal mask on a tile some but not all of its queries may see would
    pass every case with short own runs."""
    request = RequestSpec((SegmentSpec(0, 0),), 50, 20, 20, 50)
    case = Case((DocSpec(20),), (request,), block_size, 2, 2, RopeConfig(head_dim=64), seed=3)
    check(name, case, torch.float16)


@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
@pytest.mark.parametrize("name", ["lazy", "raw"])
def test_runs_of_exactly_the_scan_width(name, decode):
    """Segments of 63, 64, 65 and 128 one-token blocks: the run scan reads 64 blocks'
    shifts at a time, and a run that ends exactly at a chunk boundary once lost its
    last block (found on the H100 by the benchmark's parity check)."""
    docs = (DocSpec(63), DocSpec(64), DocSpec(65), DocSpec(128))
    segments = (SegmentSpec(1, 0), SegmentSpec(3, 70), SegmentSpec(0, 200), SegmentSpec(2, 300))
    request = RequestSpec(segments, 4, 400, 400, 1 if decode else 4)
    case = Case(docs, (request,), 1, 2, 1, RopeConfig(head_dim=64), seed=5)
    check(f"{name}_{'decode' if decode else 'prefill'}", case, torch.bfloat16)


#: A peaky softmax: 16 queries over 3 documents, logits of standard deviation ~10.
PEAKY = Case(
    (DocSpec(40), DocSpec(23), DocSpec(9)),
    (RequestSpec((SegmentSpec(0, 70_000), SegmentSpec(1, 5), SegmentSpec(2, 70_000)), 16, 70_100, 70_100, 16),),
    16,
    8,
    2,
    RopeConfig(head_dim=64),
    seed=11,
)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["lazy_prefill", "raw_prefill", "eager_attention"])
@settings(max_examples=examples(2, 3))
@example(case=PEAKY, sharpness=10.0)
@given(case=fast_cases(), sharpness=st.sampled_from((3.0, 10.0)))
def test_peaky_softmax_within_tolerance(name, dtype, case, sharpness):
    """Logits of order 10 (``scale = sharpness / sqrt(D)``): a 16-bit rounding of the
    rotated operands shows up here first — the softmax amplifies a score error by the
    logits' size, and the log-sum-exp carries it unattenuated. Found compiled on the H200
    for the raw kernel in float16 and bfloat16 (docs/concepts/numerics.md)."""
    note(case.describe())
    check(name, case, dtype, scale=sharpness / case.rope.head_dim**0.5)


@settings(max_examples=examples(10, 4))
@example(case=EDGES["past_65536"])
@given(case=fast_cases())
def test_lazy_equals_eager_of_the_fast_path(case):
    """Deferred and materialised keys give the same scores (eq. 4): the two fast forms
    agree with each other as closely as each agrees with the oracle."""
    note(case.describe())
    dtype = torch.float16
    x = build(case, dtype, device=DEVICE)
    args = (x.q, x.k_cache, x.v_cache, x.layout, case.rope)
    want, _ = oracle(case, dtype)
    lazy, eager = fast.lazy_prefill(*args), fast.eager_attention(*args)
    assert_close(lazy, want, eager, dtype, "fast lazy vs fast eager")


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("name", ["lazy_prefill", "raw_prefill", "eager_attention"])
def test_prefill_split_over_keys(name, splits, monkeypatch):
    """Prefill with each request's keys split among ``splits`` programs per query tile,
    the partials merged by log-sum-exp (eq. 12): the path a GPU takes when the grid is
    smaller than its SMs (one short query over long context), forced here. Splits cut
    runs of one shift and the causal own blocks; some splits of a tile see no key."""
    plan = _attend.plan
    monkeypatch.setattr(_attend, "plan", lambda *args, **kwargs: plan(*args, **kwargs)._replace(splits=splits))
    check(name, PEAKY, torch.bfloat16)
    check(name, EDGES["past_65536"], torch.float16)


@settings(max_examples=examples(4, 4))
@given(case=fast_cases(), shift=st.sampled_from((1, 70_000)), name=st.sampled_from(["lazy_prefill", "raw_prefill"]))
def test_common_shift_changes_nothing(case, shift, name):
    """Every logical position moved by one shift: the same attention (eq. 4), held to the
    tolerance rule against the oracle of the unshifted case."""
    note(case.describe())
    properties.shift_invariance(fast, name, case, torch.bfloat16, DEVICE, shift)


#: Runs of one shift that meet at full-block boundaries (documents of 32 and 48 tokens in
#: blocks of 16), at partly filled blocks (40 and 23 tokens) and past 65,536; one query
#: per request (decode), or ``num_queries`` own tokens (prefill).
def runs_case(num_queries: int = 1) -> Case:
    own = max(20, num_queries)
    return Case(
        (DocSpec(40), DocSpec(23), DocSpec(32), DocSpec(48)),
        (
            RequestSpec((SegmentSpec(0, 70_000), SegmentSpec(1, 5), SegmentSpec(2, 100), SegmentSpec(3, 132)), own,
                        200, 200, num_queries),
            RequestSpec((SegmentSpec(2, 0), SegmentSpec(3, 32), SegmentSpec(0, 80)), max(3, num_queries), 120, 120,
                        num_queries),
        ),
        16,
        8,
        2,
        RopeConfig(head_dim=64),
        seed=13,
    )  # fmt: skip


#: (function, direct, flat): the query rotated inside the attention kernel (``direct``,
#: decode) or in two steps (the query kernel, then ``R(−δ)`` per run), its keys walked in
#: a loop per run or in one flat loop across runs.
KEY_LOOPS = [("lazy_decode", True, False), ("lazy_decode", True, True), ("lazy_decode", False, True),
             ("lazy_prefill", False, False), ("lazy_prefill", False, True)]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("name", "direct", "flat"), KEY_LOOPS, ids=lambda v: str(v))
@pytest.mark.parametrize("splits", [1, 3])
def test_key_loops(name, direct, flat, splits, dtype, monkeypatch):
    """Every form of the key loop the plan can take, whole or split, forced here: the
    flat loop re-rotates the query where a key tile's shift changes (inside the loop),
    the loop per run at each run's start."""
    plan = _attend.plan

    def forced(*args, **kwargs):
        pl = plan(*args, **kwargs)
        assert pl.tma, "the flat loop needs key tiles inside one block"
        return pl._replace(direct=direct, flat=flat, splits=splits)

    monkeypatch.setattr(_attend, "plan", forced)
    check(name, _with_tma_blocks(runs_case(1 if name.endswith("decode") else 19)), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stages", [4, 5, 7])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_pipeline_depths(stages, splits, dtype, monkeypatch):
    """Decode at each pipeline depth its plan takes at head dim 128 (one, two and three
    key and value buffers), whole or split, forced here: requests of fewer key tiles than
    buffers, and the flat loop's re-rotation where a tile's shift changes."""
    plan = _attend.plan

    def forced(*args, **kwargs):
        pl = plan(*args, **kwargs)
        assert pl.tma and pl.dp == 128 and pl.flat
        return pl._replace(num_stages=stages, splits=splits)

    monkeypatch.setattr(_attend, "plan", forced)
    check("lazy_decode", dataclasses.replace(_with_tma_blocks(runs_case()), rope=RopeConfig(head_dim=128)), dtype)


#: (B, keys) -> (stages, splits) of the fastest variant timed on the H200 at that shape
#: (bf16, 32 / 8 heads, D = 128, S = 64; ``benchmarks/sweeps/tune_stages_h200.json``, and
#: 256 requests of 9 key tiles and of one, the shared-segment benchmark's ``per_request``
#: and rest launch, before and after: ``benchmarks/sweeps/shared_decode_4_stages_h200.json``).
DECODE_PIPELINES = {(1, 1024): (4, 8), (1, 4096): (4, 32), (1, 16384): (7, 16), (16, 4096): (7, 1),
                    (64, 4096): (5, 1), (256, 576): (5, 1), (256, 64): (4, 1)}  # fmt: skip


@pytest.mark.parametrize(("shape", "want"), DECODE_PIPELINES.items(), ids=str)
def test_decode_plan_follows_the_h200_sweep(shape, want, monkeypatch):
    """The decode plan of a 132-SM GPU picks, at the shapes the sweep timed, the pipeline
    depth and split count that ran fastest there."""
    batch, keys = shape
    monkeypatch.setattr(_plan, "multiprocessors", lambda device: 132)
    pl = _plan.plan(32, 8, 128, 64, torch.bfloat16, torch.device("cuda"), True, batch * 8, keys)
    assert (pl.num_stages, pl.splits) == want


#: block size -> (key tile, stages, splits) of the fastest variant timed on the H100 at
#: head dim 64 (bf16, 32 / 8 heads; the engine benchmark's decode step, 16 requests over
#: 120k keys: ``benchmarks/sweeps/tune_engine_decode_h100.json``).
DECODE_D64 = {16: (16, 5, 4), 32: (32, 5, 4), 64: (64, 4, 3)}


@pytest.mark.parametrize(("block_size", "want"), DECODE_D64.items())
def test_head_dim_64_decode_plan_follows_the_engine_sweep(block_size, want, monkeypatch):
    """At head dim 64 the decode plan of a 132-SM GPU loads one block a key tile by bulk
    tensor copies and picks the depth and split count that ran fastest there."""
    monkeypatch.setattr(_plan, "multiprocessors", lambda device: 132)
    keys = 565 * 16  # the sweep's longest block table, in keys
    pl = _plan.plan(32, 8, 64, block_size, torch.bfloat16, torch.device("cuda"), True, 16 * 8, keys)
    assert (pl.block_n, pl.num_stages, pl.splits) == want
    assert pl.tma and pl.direct


@settings(max_examples=examples(25, 25))
@given(
    head_dim=st.sampled_from((64, 128)),
    block_size=st.sampled_from((16, 32, 64)),
    batch=st.integers(1, 256),
    blocks=st.integers(1, 600),
    cap=st.integers(1, 64),
)
def test_a_decode_split_by_a_cap_walks_at_most_the_cap(head_dim, block_size, batch, blocks, cap):
    """``max_split_tiles`` splits a decode finer, never coarser, than its plan: no split
    of the longest request walks more key tiles than the cap, unless the splits are at
    their most; the tiles are the plan's, at 4 stages where a head-dim-128 decode over
    bulk tensor copies (whose depth follows its split) is split finer."""
    args = (32, 8, head_dim, block_size, torch.bfloat16, torch.device("cuda"), True, batch * 8, blocks * block_size)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_plan, "multiprocessors", lambda device: 132)
        own, capped = _plan.plan(*args), _plan.plan(*args, max_split_tiles=cap)
    key_tiles = ceil_div(blocks * block_size, own.block_n)
    assert capped.splits >= own.splits
    assert ceil_div(key_tiles, capped.splits) <= cap or capped.splits == _plan.MAX_DECODE_SPLITS
    assert capped._replace(splits=own.splits, num_stages=own.num_stages) == own
    finer_pipelined = capped.splits > own.splits and own.tma and head_dim == 128
    assert capped.num_stages == (4 if finer_pipelined else own.num_stages)


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [("lazy_prefill", {"direct": True}, "direct query rotation needs one token per query tile"),
     ("lazy_decode", {"flat": True, "block_n": 48}, "flat key loop needs key tiles inside one block")],
)  # fmt: skip
def test_plans_the_kernel_cannot_run_raise(name, change, message, monkeypatch):
    """A plan (e.g. a sweep's) that the kernel cannot run raises and names the case,
    rather than running another form of the kernel."""
    plan = _attend.plan
    monkeypatch.setattr(_attend, "plan", lambda *args, **kwargs: plan(*args, **kwargs)._replace(**change))
    case = runs_case(1 if name.endswith("decode") else 19)
    x = build(case, torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        getattr(fast, name)(x.q, x.k_cache, x.v_cache, x.layout, case.rope)


def _with_tma_blocks(case: Case) -> Case:
    """``case`` at a block size whose key tiles lie inside one block: under the
    interpreter (16-key tiles) as it is; compiled, at 64 tokens a block, where the plans'
    key tiles are 64 keys (at 16 they are 128-key row gathers)."""
    if DEVICE.type == "cpu":
        return case
    return dataclasses.replace(case, block_size=64)
