"""Shared-segment decode (``fast/shared.py``): one read of a segment for every request
of the batch that places it, at whatever offset.

* Differential: :func:`shared_decode` against the float64 oracle under the tolerance
  rule, with ``reference.lazy_decode`` (which has no special path: it defines the result)
  as the yardstick, output and log-sum-exp, on Hypothesis-drawn sharing patterns
  (:func:`~tests.fast.strategies.sharing_cases`) and pinned edges.
* Metamorphic: the shared path is as close to the oracle as the per-request
  ``fast.lazy_decode``; permuting the requests permutes the outputs.
* :func:`plan_sharing`: what is grouped, what is left to the rest, ``None`` when nothing
  is shared enough; bad input.

Every output is poisoned with NaN (conftest.py) and unwritten cache slots hold NaN, so
an unwritten partial or a key read past a segment's valid length fails.
"""

import pytest
import torch
from hypothesis import example, given, note, settings, target
from hypothesis import strategies as st

import lazyattention.fast as fast
import lazyattention.reference as reference
from lazyattention.fast import plan as _plan
from lazyattention.fast import shared
from lazyattention.fast.shared import SharingPlan, plan_sharing, shared_decode
from lazyattention.reference import Layout, Placement, RequestLayout, RopeConfig, assert_close
from lazyattention.reference.tolerance import error, tolerance
from lazyattention.testing import properties
from tests.strategies import Case, DocSpec, RequestSpec, SegmentSpec, build

from .strategies import DEVICE, DTYPES, examples, sharing_cases


def _req(segments, own_length, own_start, stored=None):
    return RequestSpec(
        tuple(SegmentSpec(d, s) for d, s in segments), own_length, own_start, own_start if stored is None else stored, 1
    )


#: Edges: one document at four offsets (two past 65,536, one near 2^20), a partial
#: last block, one request placing it twice; keys stored near 2^31 and placed at 0 (p − δ
#: past int32); a rest of requests of 1 to 218 blocks; a group of 3 (padded rows); more
#: members than one program's tile (G = 1).
EDGES = {
    "offsets": (
        Case(
            (DocSpec(37), DocSpec(11)),
            (
                _req([(0, 0), (1, 40)], 3, 60),
                _req([(1, 0), (0, 70_000)], 2, 70_100),
                _req([(0, 2**20 - 7), (0, 5)], 4, 2**20 + 40),
                _req([(0, 65_536)], 1, 65_600),
            ),
            5,
            4,
            2,
            RopeConfig(head_dim=64),
            seed=3,
        ),
        2,
    ),
    "shift_past_int32": (
        Case(
            (DocSpec(19, stored_start=2**31 - 100),),
            (_req([(0, 0)], 2, 30), _req([(0, 3)], 1, 40)),
            4,
            6,
            2,
            RopeConfig(head_dim=96),
            seed=4,
        ),
        2,
    ),
    "ragged_rest": (
        Case(
            (DocSpec(20), DocSpec(40), DocSpec(70)),
            (_req([(0, 0), (1, 20)], 3, 60), _req([(2, 0), (0, 70)], 800, 90), _req([(0, 5)], 1, 25)),
            4,
            4,
            2,
            RopeConfig(head_dim=64),
            seed=6,
        ),
        2,
    ),
    "many_members": (
        Case(
            (DocSpec(33), DocSpec(4)),
            tuple(_req([(0, 7 * r), (1, 300)] if r % 3 else [(0, 7 * r)], 2, 400 + r) for r in range(19)),
            16,
            2,
            2,
            RopeConfig(head_dim=64, style="interleaved"),
            seed=5,
        ),
        3,
    ),
}


def _run(case: Case, dtype: torch.dtype, min_requests: int, scale=None):
    x = build(case, dtype, device=DEVICE)
    sharing = plan_sharing(x.layout, min_requests)
    assert sharing is not None  # the strategies make document 0 shared
    args = (x.q, x.k_cache, x.v_cache, x.layout, case.rope, scale)
    out, lse = shared_decode(*args, return_lse=True, sharing=sharing)
    return x, sharing, (out, lse), args


def _within_rule(got, want, yardstick, dtype, what) -> float:
    """Output and lse of ``got`` against the oracle ``want``, the bound drawn from
    ``yardstick``; returns the worst error ÷ bound."""
    ratio = 0.0
    for part, actual, oracle, ref in zip(("out", "lse"), got, want, yardstick, strict=True):
        assert actual.shape == oracle.shape, f"{what} {part}"
        assert_close(actual, oracle, ref, dtype, f"{what} {part} ({dtype})")
        ratio = max(ratio, error(actual, oracle) / tolerance(ref, oracle, dtype))
    return ratio


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=examples(4, 6))
@example(drawn=EDGES["offsets"])
@given(drawn=sharing_cases())
def test_shared_decode_within_tolerance(dtype, drawn):
    case, min_requests = drawn
    note(case.describe())
    _, sharing, got, args = _run(case, dtype, min_requests)
    note(repr(sharing))
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    want = properties.oracle(case, dtype, DEVICE)
    ref = reference.lazy_decode(*args, return_lse=True)
    target(_within_rule(got, want, ref, dtype, "shared_decode"), label=f"shared_decode {dtype} error")


@pytest.mark.parametrize("edge", sorted(EDGES))
def test_pinned_edges(edge):
    case, min_requests = EDGES[edge]
    dtype = torch.bfloat16 if len(edge) % 2 else torch.float16
    _, _, got, args = _run(case, dtype, min_requests)
    _within_rule(got, properties.oracle(case, dtype, DEVICE), reference.lazy_decode(*args, return_lse=True), dtype,
                 edge)  # fmt: skip


@settings(max_examples=examples(4, 5))
@given(drawn=sharing_cases())
def test_shared_path_as_close_as_the_per_request_path(drawn):
    """Metamorphic: reading a segment once for many requests instead of once per
    request changes nothing beyond rounding, judged against the per-request kernel's
    own error."""
    case, min_requests = drawn
    note(case.describe())
    dtype = torch.float16
    _, _, got, args = _run(case, dtype, min_requests)
    per_request = fast.lazy_decode(*args, return_lse=True)
    _within_rule(got, properties.oracle(case, dtype, DEVICE), per_request, dtype, "shared vs per-request")


@settings(max_examples=examples(3, 4))
@given(drawn=sharing_cases(), data=st.data())
def test_permuting_requests_permutes_outputs(drawn, data):
    case, min_requests = drawn
    note(case.describe())
    dtype = torch.bfloat16
    perm = data.draw(st.permutations(range(len(case.requests))))
    x = build(case, dtype, device=DEVICE)
    layout = Layout([x.layout.requests[i] for i in perm], case.block_size)
    q = x.q[list(perm)]
    out, lse = shared_decode(q, x.k_cache, x.v_cache, layout, case.rope, return_lse=True,
                             sharing=plan_sharing(layout, min_requests))  # fmt: skip
    ref = reference.lazy_decode(q, x.k_cache, x.v_cache, layout, case.rope, return_lse=True)
    want_out, want_lse = properties.oracle(case, dtype, DEVICE)
    _within_rule((out, lse), (want_out[list(perm)], want_lse[list(perm)]), ref, dtype, "permuted")


@pytest.mark.parametrize("cap", [1, 2])
def test_the_rest_split_by_a_cap_on_its_key_tiles(cap, monkeypatch):
    """The rest's decode split so that no program walks more than ``cap`` key tiles
    (``REST_SPLIT_TILES``), finer than the plan's own split, where its requests hold 1 to
    218 blocks (the short ones' later splits have no key): the same result under the
    tolerance rule. (Every other test here runs the rest at the default cap.)"""
    case, min_requests = EDGES["ragged_rest"]
    dtype = torch.float16
    x = build(case, dtype, device=DEVICE)
    m = plan_sharing(x.layout, min_requests).rest.metadata(DEVICE).block_table.shape[1]
    plan_args = (case.num_heads, case.num_kv_heads, 64, case.block_size, dtype, DEVICE, True,
                 len(case.requests) * case.num_kv_heads, m * case.block_size)  # fmt: skip
    assert _plan.plan(*plan_args, max_split_tiles=cap).splits > _plan.plan(*plan_args).splits
    monkeypatch.setattr(shared, "REST_SPLIT_TILES", cap)
    _, _, got, args = _run(case, dtype, min_requests)
    _within_rule(got, properties.oracle(case, dtype, DEVICE), reference.lazy_decode(*args, return_lse=True), dtype,
                 f"rest split every {cap} key tiles")  # fmt: skip


def test_key_split_and_member_tiles_are_crossed_under_the_interpreter():
    """The tests above reach both: a segment of more than two key tiles is split in
    two, and more members than one program holds make several member tiles."""
    case, min_requests = EDGES["many_members"]
    x = build(case, torch.float16, device=DEVICE)
    sharing = plan_sharing(x.layout, min_requests)
    tiles = shared.shared_tiles(case.num_heads, case.num_kv_heads, 64, case.block_size, torch.float16, DEVICE)
    meta = sharing.metadata(DEVICE, tiles, case.num_kv_heads)
    doc0 = next(seg for seg in sharing.segments if seg.length == 33)
    assert len(doc0.members) == 19 and meta.slots == 1 + sum(meta.splits)
    if DEVICE.type == "cpu":  # compiled tiles are larger: the GPU suite's batches cross them
        assert tiles.block_q < 19 and meta.splits[sharing.segments.index(doc0)] == 2


# --------------------------------------------------------------------------- plan_sharing


def _layout(*requests, block_size=4):
    return Layout([RequestLayout(tuple(segs), own, 1) for segs, own in requests], block_size)


DOC = Placement((0, 1), 7, start=0)
OTHER = Placement((2,), 3, start=0)


def _own(b, start=20):
    return Placement((10 + b,), 2, start=start)


def test_plan_sharing_groups_by_blocks_length_and_stored_start():
    moved = Placement(DOC.blocks, DOC.length, start=50)  # same tokens, another offset
    prefix = Placement((0,), 4, start=9)  # a prefix of DOC's blocks: other tokens
    layout = _layout(([DOC, OTHER], _own(0)), ([moved, prefix], _own(1)), ([OTHER, moved, DOC], _own(2, 90)))
    plan = plan_sharing(layout)
    assert isinstance(plan, SharingPlan) and plan.layout is layout
    by_length = {seg.length: seg for seg in plan.segments}
    assert set(by_length) == {7, 3}  # the prefix is read by one request only
    assert by_length[7].members == ((0, 0), (1, 50), (2, 50), (2, 0))
    assert by_length[7].requests == 3
    assert plan.rest.requests[1].segments == (prefix,)
    assert all(rest.segments == () for rest in (plan.rest.requests[0], plan.rest.requests[2]))
    assert [r.own for r in plan.rest.requests] == [r.own for r in layout.requests]
    assert plan.read_tokens == 4 * 7 + 2 * 3 and plan.unique_tokens == 10


def test_plan_sharing_none_when_nothing_is_shared_enough():
    layout = _layout(([DOC], _own(0)), ([OTHER], _own(1)), ([], _own(2)))
    assert plan_sharing(layout) is None
    assert plan_sharing(_layout(([DOC], _own(0)), ([DOC], _own(1))), min_requests=3) is None
    twice = _layout(([DOC, Placement(DOC.blocks, 7, start=30)], _own(0)), ([OTHER], _own(1)))
    assert plan_sharing(twice) is None  # one request placing it twice is one request
    assert len(plan_sharing(twice, min_requests=1).segments) == 2
    empty = Placement((), 0, start=3)
    assert plan_sharing(_layout(([empty], _own(0)), ([empty], _own(1)))) is None


def test_plan_sharing_refuses_bad_input():
    layout = _layout(([DOC], _own(0)), ([DOC], _own(1)))
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(ValueError, match="min_requests"):
            plan_sharing(layout, bad)
    with pytest.raises(TypeError, match="Layout"):
        plan_sharing([DOC])
    prefill = Layout([RequestLayout((DOC,), Placement((9,), 3, start=7), 2)], 4)
    with pytest.raises(ValueError, match=r"decode layout .* requests \[0\]"):
        plan_sharing(prefill)


# --------------------------------------------------------------------------- bad input


def _shared_inputs(dtype=torch.float16):
    case, _ = EDGES["shift_past_int32"]
    return case, build(case, dtype, device=DEVICE)


def test_bad_input_fails_as_in_the_reference():
    case, x = _shared_inputs()
    errors = []
    for fn in (reference.lazy_decode, shared_decode):
        with pytest.raises(ValueError) as info:
            fn(x.q[:, :, :-2], x.k_cache, x.v_cache, x.layout, case.rope)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


def test_unsupported_or_mismatched_sharing_raises_naming_it():
    case, x = _shared_inputs()
    args = (x.q, x.k_cache, x.v_cache, x.layout, case.rope)
    with pytest.raises(ValueError, match="another layout"):
        shared_decode(*args, sharing=plan_sharing(Layout(x.layout.requests, case.block_size)))
    with pytest.raises(TypeError, match="SharingPlan"):
        shared_decode(*args, sharing="all")
    alone = Layout(x.layout.requests[:1], case.block_size)
    with pytest.raises(ValueError, match=r"no segment .* 2 or more requests"):
        shared_decode(x.q[:1], x.k_cache, x.v_cache, alone, case.rope)
    case64, x64 = _shared_inputs(torch.float64)
    with pytest.raises(NotImplementedError, match="float64"):
        shared_decode(x64.q, x64.k_cache, x64.v_cache, x64.layout, case64.rope)


def test_too_many_shared_segments_per_request_raises_naming_the_limit():
    docs = [Placement((b,), 1, start=b) for b in range(shared.MAX_SLOTS)]
    layout = _layout((docs, Placement((100,), 1, start=200)), (docs, Placement((101,), 1, start=200)), block_size=1)
    plan = plan_sharing(layout)
    tiles = shared.shared_tiles(2, 1, 64, 1, torch.float16, DEVICE)
    limit = shared.MAX_SLOTS
    with pytest.raises(NotImplementedError, match=f"needs {limit + 1} partials .* at most {limit} are merged"):
        plan.metadata(DEVICE, tiles, 1)
