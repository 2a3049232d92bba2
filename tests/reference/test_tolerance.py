"""Tests of the one tolerance rule (``reference/tolerance.py``, DESIGN §5):
``max|actual − oracle| ≤ 2·max|reference − oracle| + FLOOR[dtype]``."""

import pytest
import torch

from lazyattention.reference import assert_close
from lazyattention.reference.tolerance import FLOOR, error, tolerance

ORACLE = torch.zeros(4, dtype=torch.float64)


def at(value, dtype=torch.float32):
    return torch.tensor([0.0, value, 0.0, 0.0], dtype=dtype)


def test_bound_is_twice_the_reference_error_plus_the_floor():
    reference = at(1e-3)
    assert tolerance(reference, ORACLE, torch.float16) == pytest.approx(2e-3 + FLOOR[torch.float16])
    assert tolerance(None, ORACLE, torch.float64) == FLOOR[torch.float64]
    bound = 2e-3 + FLOOR[torch.float16]
    assert assert_close(at(0.999 * bound), ORACLE, reference, torch.float16) == pytest.approx(0.999 * bound, rel=1e-6)
    with pytest.raises(AssertionError, match=r"max\|actual − oracle\| = 3.0.*exceeds the bound"):
        assert_close(at(1.001 * bound), ORACLE, reference, torch.float16, "out")


@pytest.mark.parametrize("dtype", list(FLOOR), ids=str)
def test_floor_alone_when_the_reference_is_exact(dtype):
    floor = FLOOR[dtype]
    assert_close(at(floor / 2, torch.float64), ORACLE, ORACLE, dtype)
    with pytest.raises(AssertionError, match=f"floor {floor:.0e}"):
        assert_close(at(2 * floor, torch.float64), ORACLE, ORACLE, dtype)


def test_nan_anywhere_fails():
    assert error(at(float("nan")), ORACLE) == float("inf")
    with pytest.raises(AssertionError, match="inf exceeds"):
        assert_close(at(float("nan")), ORACLE, at(1.0), torch.float32)


def test_shape_mismatch_and_unknown_dtype():
    with pytest.raises(AssertionError, match=r"shape \(3,\) != oracle shape \(4,\)"):
        assert_close(torch.zeros(3), ORACLE, None, torch.float32)
    with pytest.raises(ValueError, match=r"no tolerance floor for dtype torch\.int32"):
        tolerance(None, ORACLE, torch.int32)
    assert error(torch.zeros(0), torch.zeros(0)) == 0.0


def test_floors_are_the_documented_ones():
    """Never loosen FLOOR: this pins the numbers."""
    assert {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3} == FLOOR


def test_a_non_finite_reference_or_oracle_gives_no_bound():
    """Otherwise ``2·inf + floor`` would accept anything, NaN included."""
    nan = at(float("nan"), torch.float64)
    with pytest.raises(AssertionError, match="not finite"):
        assert_close(nan, ORACLE, nan, torch.float32)
    with pytest.raises(AssertionError, match="not finite"):
        assert_close(nan, nan, nan, torch.float32)
