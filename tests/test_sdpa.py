"""The CPU-speed backend against the definition.

Every function of :mod:`lazyattention.sdpa` is held to the one tolerance rule against
the float64 oracle, with the reference in the dtype under test as the yardstick
(``lazyattention.testing.properties``, the same properties ``tests/fast`` uses), in
both of its ways — block-wise and part-wise — so neither hides behind the size rule
that picks one. Unwritten cache slots hold NaN (``build`` poisons them), so a way that
reads past a block's valid length fails.
"""

import inspect
from contextlib import contextmanager

import pytest
import torch
from hypothesis import example, given, note, settings, target
from hypothesis import strategies as st

import lazyattention.reference as reference
import lazyattention.sdpa as sdpa
from lazyattention.testing import properties
from tests.strategies import build, cases, edge_cases

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PREFILL = ("lazy_prefill", "raw_prefill", "eager_attention")
DECODE = ("lazy_decode", "raw_decode", "eager_attention")
EDGES = edge_cases()

pytestmark = pytest.mark.usefixtures("one_torch_thread")


WAYS = ("blockwise", "partwise")


@contextmanager
def only(way: str):
    """Run the block in one way: every lazy call block-wise, or every call part-wise."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sdpa, "BLOCKWISE_MAX_ELEMENTS", 1 << 62 if way == "blockwise" else -1)
        yield


def test_all_is_the_reference_attention_api():
    assert tuple(sdpa.__all__) == reference.ATTENTION_API


@pytest.mark.parametrize("name", reference.ATTENTION_API)
def test_signatures_match(name):
    ours, theirs = getattr(sdpa, name), getattr(reference, name)
    assert str(inspect.signature(ours)) == str(inspect.signature(theirs)), name
    assert ours.__doc__, f"lazyattention.sdpa.{name} has no docstring"


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=10)
@given(case=cases(), data=st.data())
def test_prefill_within_tolerance(way, dtype, case, data):
    name = data.draw(st.sampled_from(PREFILL), label="function")
    note(case.describe())
    with only(way):
        target(properties.differential(sdpa, name, case, dtype, "cpu"), label=f"{way} {name} {dtype}")


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=10)
@given(case=cases(decode=True), data=st.data())
def test_decode_within_tolerance(way, dtype, case, data):
    name = data.draw(st.sampled_from(DECODE), label="function")
    note(case.describe())
    with only(way):
        target(properties.differential(sdpa, name, case, dtype, "cpu"), label=f"{way} {name} {dtype}")


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("edge", sorted(EDGES))
def test_pinned_edges(way, edge):
    """Every named edge (one token, offsets past 2^16 and near 2^20, equal starts,
    lengths off the block size …) through the lazy functions, in half precision."""
    case = EDGES[edge]
    dtype = torch.float16 if len(edge) % 2 == 0 else torch.bfloat16
    names = ("lazy_prefill", "lazy_decode") if all(r.num_queries == 1 for r in case.requests) else ("lazy_prefill",)
    for name in names:
        with only(way):
            properties.differential(sdpa, name, case, dtype, "cpu")


@pytest.mark.parametrize("way", WAYS)
@settings(max_examples=10)
@example(case=EDGES["near_2_20"], shift=1 << 20)
@given(case=cases(), shift=st.integers(1, 1 << 20))
def test_a_common_shift_changes_nothing(way, case, shift):
    """Metamorphic (eq. 4): every logical position moved by one shift, same attention."""
    note(case.describe())
    with only(way):
        properties.shift_invariance(sdpa, "lazy_prefill", case, torch.float32, "cpu", shift)


@settings(max_examples=10)
@given(case=cases())
def test_both_ways_agree(case):
    """Block-wise and part-wise on the same batch: the same output and log-sum-exp to
    float32 rounding (the two differ only in the order of their sums)."""
    note(case.describe())
    x = build(case, torch.float32, device="cpu")
    results = []
    for way in WAYS:
        with only(way):
            results.append(sdpa.lazy_prefill(x.q, x.k_cache, x.v_cache, x.layout, case.rope, return_lse=True))
    (out_a, lse_a), (out_b, lse_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_a, lse_b, rtol=1e-5, atol=1e-5)


def test_the_size_rule_picks_block_wise_for_decode_and_part_wise_for_long_prefill():
    """A decode step is block-wise; a 4,000-token document's own prefill is part-wise
    (one fused causal call, no [Tq, Tk] matrix)."""
    from lazyattention.reference import Layout, Placement, RequestLayout

    def layout(num_queries, length):
        own = Placement(tuple(range(-(-length // 16))), length, 0)
        return Layout([RequestLayout((), own, num_queries)], block_size=16)

    q = torch.empty(1, 9, 64)
    assert sdpa._blockwise_fits(q, layout(1, 1000))
    assert not sdpa._blockwise_fits(torch.empty(4000, 9, 64), layout(4000, 4000))


def test_bad_input_fails_as_in_the_reference():
    case = EDGES["not_multiple_of_block"]
    x = build(case, torch.float32, device="cpu")
    errors = []
    for module in (reference, sdpa):
        with pytest.raises(ValueError) as info:
            module.lazy_prefill(x.q[:, :, :-2], x.k_cache, x.v_cache, x.layout, case.rope)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


def test_a_long_prefill_off_the_cpu_raises_naming_the_case():
    """The part-wise way's fused kernel is PyTorch's CPU flash attention: elsewhere it
    raises instead of computing something else."""
    case = EDGES["not_multiple_of_block"]
    x = build(case, torch.float32, device="cpu")
    q, k_cache, v_cache = (t.to("meta") for t in (x.q, x.k_cache, x.v_cache))
    with only("partwise"), pytest.raises(NotImplementedError, match="CPU flash attention"):
        sdpa.lazy_prefill(q, k_cache, v_cache, x.layout, case.rope)
