"""Definitional tests of ``lazyattention.reference.attention``.

The three forms of one function must agree (eqs. 8, 9, 10):

* lazy: keys stored rotated at their stored positions, the query rotated by ``p − δ``;
* raw: keys stored unrotated, rotated at their logical positions when attended;
* eager: every key re-rotated by ``δ`` to its logical position, the query at ``p``.

In float64 they must agree to the float64 floor. In float32/float16/bfloat16 each is
held to the project's tolerance rule against the float64 oracle (the eager form run
in float64 on the very same rounded inputs), with the eager run in that dtype as the
reference.
"""

import pytest
import torch
from hypothesis import example, given, note, target

from lazyattention.reference import (
    assert_close,
    eager_attention,
    lazy_decode,
    lazy_prefill,
    raw_decode,
    raw_prefill,
)
from tests.strategies import build, cases, edge_cases

EDGES = edge_cases()
F64 = torch.float64


def pin_edges(test):
    """Pin every named edge case of :func:`tests.strategies.edge_cases` with ``@example``."""
    for case in EDGES.values():
        test = example(case=case)(test)
    return test


def run_all(inputs, rope, decode):
    """``(lazy, raw, eager)`` outputs and log-sum-exps for one built case."""
    lazy, raw = (lazy_decode, raw_decode) if decode else (lazy_prefill, raw_prefill)
    args = (inputs.v_cache, inputs.layout, rope)
    return {
        "lazy": lazy(inputs.q, inputs.k_cache, *args, return_lse=True),
        "raw": raw(inputs.q, inputs.raw_k_cache, *args, return_lse=True),
        "eager": eager_attention(inputs.q, inputs.k_cache, *args, return_lse=True),
    }


@pin_edges
@given(case=cases())
def test_prefill_lazy_raw_eager_agree_in_fp64(case):
    note(case.describe())
    results = run_all(build(case, F64), case.rope, decode=False)
    out_e, lse_e = results["eager"]
    worst = 0.0
    for name in ("lazy", "raw"):
        out, lse = results[name]
        worst = max(worst, assert_close(out, out_e, None, F64, f"{name}_prefill out"))
        assert_close(lse, lse_e, None, F64, f"{name}_prefill lse")
    target(worst, label="fp64 prefill error vs eager")


@pin_edges
@given(case=cases(decode=True))
def test_decode_lazy_raw_eager_agree_in_fp64(case):
    note(case.describe())
    results = run_all(build(case, F64), case.rope, decode=True)
    out_e, lse_e = results["eager"]
    worst = 0.0
    for name in ("lazy", "raw"):
        out, lse = results[name]
        worst = max(worst, assert_close(out, out_e, None, F64, f"{name}_decode out"))
        assert_close(lse, lse_e, None, F64, f"{name}_decode lse")
    target(worst, label="fp64 decode error vs eager")


@given(case=cases(decode=True))
def test_decode_equals_prefill_of_one_query(case):
    """Decode is prefill with one query per request: bit for bit the same here."""
    note(case.describe())
    inputs = build(case, F64)
    args = (inputs.q, inputs.k_cache, inputs.v_cache, inputs.layout, case.rope)
    assert torch.equal(lazy_decode(*args), lazy_prefill(*args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@example(case=EDGES["past_65536"])
@example(case=EDGES["gqa_4"])
@given(case=cases())
def test_low_precision_within_tolerance_of_fp64_oracle(dtype, case):
    note(case.describe())
    oracle_in = build(case, F64, values_dtype=dtype)  # the same numbers, held in fp64
    oracle, oracle_lse = eager_attention(
        oracle_in.q, oracle_in.k_cache, oracle_in.v_cache, oracle_in.layout, case.rope, return_lse=True
    )
    results = run_all(build(case, dtype), case.rope, decode=case.decode)
    reference, reference_lse = results["eager"]
    assert reference.dtype == dtype
    worst = 0.0
    for name in ("lazy", "raw"):
        out, lse = results[name]
        assert out.dtype == dtype
        worst = max(worst, assert_close(out, oracle, reference, dtype, f"{name} out ({dtype})"))
        assert_close(lse, oracle_lse, reference_lse, dtype, f"{name} lse ({dtype})")
    target(worst, label=f"{dtype} error vs fp64 oracle")


def test_explicit_scale_is_used():
    """``scale`` multiplies every score: a doubled scale equals doubled queries."""
    case = EDGES["not_multiple_of_block"]
    inputs = build(case, F64)
    args = (inputs.k_cache, inputs.v_cache, inputs.layout, case.rope)
    d = case.rope.head_dim
    doubled = lazy_prefill(inputs.q, *args, scale=2.0 / d**0.5)
    expected = eager_attention(2.0 * inputs.q, *args)
    assert_close(doubled, expected, None, F64, "scale")
    assert not torch.allclose(doubled, lazy_prefill(inputs.q, *args))
