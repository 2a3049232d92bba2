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
    apply_rope,
    assert_close,
    eager_attention,
    lazy_decode,
    lazy_prefill,
    raw_decode,
    raw_prefill,
)
from tests.strategies import Built, Case, build, cases, edge_cases

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


def naive_attention(case: Case, inputs: Built) -> torch.Tensor:
    """Eqs. (5), (7), (11) straight from the :class:`Case`, one query and head at a
    time, with no cache, no layout and no metadata: the keys are the pre-RoPE keys
    the builder drew, rotated at their logical positions. Independent of everything
    the three implementations share (gathering, masks, GQA expansion).

    Returns:
        ``[Tq, H, D]`` float64.
    """
    rope, group = case.rope, case.num_heads // case.num_kv_heads
    outs, row = [], 0
    for r, spec in enumerate(case.requests):
        keys, values, own_index = [], [], []
        for seg in spec.segments:
            length = case.docs[seg.doc].length
            keys.append(apply_rope(inputs.keys[f"doc{seg.doc}"], torch.arange(length) + seg.start, rope))
            values.append(inputs.values[f"doc{seg.doc}"])
            own_index += [-1] * length  # segment tokens: visible to every query
        keys.append(apply_rope(inputs.keys[f"own{r}"], torch.arange(spec.own_length) + spec.own_start, rope))
        values.append(inputs.values[f"own{r}"])
        own_index += list(range(spec.own_length))
        k, v = torch.cat(keys), torch.cat(values)
        for i in range(spec.own_length - spec.num_queries, spec.own_length):
            q = apply_rope(inputs.q[row][None], torch.tensor([spec.own_start + i]), rope)[0]
            heads = []
            for h in range(case.num_heads):
                visible = [j for j, o in enumerate(own_index) if o <= i]
                scores = torch.stack([q[h] @ k[j, h // group] for j in visible]) / rope.head_dim**0.5
                weights = torch.softmax(scores, dim=0)
                heads.append(sum(w * v[j, h // group] for w, j in zip(weights, visible, strict=True)))
            outs.append(torch.stack(heads))
            row += 1
    return torch.stack(outs)


@pin_edges
@given(case=cases(max_requests=2, max_segments=2, max_doc_length=5, max_own_length=4, head_dims=(64,)))
def test_eager_equals_a_naive_per_token_definition(case):
    """Guards against a mistake all three implementations share (a mask, the GQA
    head mapping, the gathering of blocks)."""
    note(case.describe())
    inputs = build(case, F64)
    expected = naive_attention(case, inputs)
    out = eager_attention(inputs.q, inputs.k_cache, inputs.v_cache, inputs.layout, case.rope)
    target(assert_close(out, expected, None, F64, "eager vs naive definition"), label="error vs naive")


def _check_lazy_raw_eager_agree(case, decode: bool) -> None:
    """lazy == raw == eager in fp64 (outputs and LSE); the search climbs the worst error."""
    note(case.describe())
    kind = "decode" if decode else "prefill"
    results = run_all(build(case, F64), case.rope, decode=decode)
    out_e, lse_e = results["eager"]
    worst = 0.0
    for name in ("lazy", "raw"):
        out, lse = results[name]
        worst = max(worst, assert_close(out, out_e, None, F64, f"{name}_{kind} out"))
        assert_close(lse, lse_e, None, F64, f"{name}_{kind} lse")
    target(worst, label=f"fp64 {kind} error vs eager")


@pin_edges
@given(case=cases())
def test_prefill_lazy_raw_eager_agree_in_fp64(case):
    _check_lazy_raw_eager_agree(case, decode=False)


@pin_edges
@given(case=cases(decode=True))
def test_decode_lazy_raw_eager_agree_in_fp64(case):
    _check_lazy_raw_eager_agree(case, decode=True)


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
