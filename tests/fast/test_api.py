"""The fast path mirrors the reference's attention API, name for name, signature for
signature, and fails the same way on bad input."""

import inspect

import pytest
import torch

import lazyattention.fast as fast
import lazyattention.reference as reference
from lazyattention.fast import buffers
from tests.strategies import build, edge_cases

from .strategies import DEVICE


def test_all_is_the_reference_attention_api():
    assert tuple(fast.__all__) == reference.ATTENTION_API


@pytest.mark.parametrize("name", reference.ATTENTION_API)
def test_signatures_match(name):
    ours, theirs = getattr(fast, name), getattr(reference, name)
    assert inspect.signature(ours) == inspect.signature(theirs), name
    assert str(inspect.signature(ours)) == str(inspect.signature(theirs)), name
    assert ours.__doc__, f"lazyattention.fast.{name} has no docstring"


def test_outputs_are_poisoned_in_these_tests():
    """The NaN allocator of conftest.py is in force: an unwritten element cannot pass."""
    assert torch.isnan(buffers.empty((3,), torch.float32, DEVICE)).all()


def _inputs(dtype):
    case = edge_cases()["not_multiple_of_block"]
    return case, build(case, dtype, device=DEVICE)


def test_float64_raises_naming_the_case():
    case, x = _inputs(torch.float64)
    with pytest.raises(NotImplementedError, match="float64"):
        fast.lazy_prefill(x.q, x.k_cache, x.v_cache, x.layout, case.rope)
    with pytest.raises(NotImplementedError, match="float64"):
        zero = torch.zeros(1, dtype=torch.int64, device=DEVICE)
        fast.write_kv(x.q[:1, :1], x.q[:1, :1], x.k_cache, x.v_cache, zero, zero, case.rope)


@pytest.mark.parametrize("name", ["lazy_prefill", "raw_prefill", "eager_attention", "lazy_decode", "raw_decode"])
def test_bad_input_fails_as_in_the_reference(name):
    case, x = _inputs(torch.float16)
    bad_q = x.q[:, :, :-2]  # head dim mismatch
    errors = []
    for module in (reference, fast):
        with pytest.raises(ValueError) as info:
            getattr(module, name)(bad_q, x.k_cache, x.v_cache, x.layout, case.rope)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


def test_write_positions_outside_the_int32_range_raise():
    case, x = _inputs(torch.float16)
    k = torch.zeros(1, case.num_kv_heads, case.rope.head_dim, dtype=torch.float16, device=DEVICE)
    slot = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="positions must lie in"):
        fast.write_kv(k, k, x.k_cache, x.v_cache, slot, slot + 2**31, case.rope)


@pytest.mark.parametrize("module", [reference, fast], ids=["reference", "fast"])
def test_write_kv_validate_false_skips_only_the_value_checks(module):
    """``validate=False`` drops the checks that read ``slots`` and ``positions`` (a host
    synchronisation on a GPU); shapes, dtypes and devices are still checked."""
    case, x = _inputs(torch.float16)
    k = torch.zeros(2, case.num_kv_heads, case.rope.head_dim, dtype=torch.float16, device=DEVICE)
    twice = torch.zeros(2, dtype=torch.int64, device=DEVICE)  # two tokens into slot 0
    with pytest.raises(ValueError, match="slots must be distinct"):
        module.write_kv(k, k, x.k_cache, x.v_cache, twice, twice, case.rope)
    with pytest.raises(ValueError, match="slots must be an int32/int64 tensor of shape"):
        module.write_kv(k, k, x.k_cache, x.v_cache, twice[:1], twice, case.rope, validate=False)
    distinct = torch.arange(2, device=DEVICE)
    module.write_kv(k, k, x.k_cache, x.v_cache, distinct, distinct, case.rope, validate=False)
