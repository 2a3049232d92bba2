"""``lazyattention check`` (``lazyattention/testing/check.py``): it passes a correct
backend, and for a wrong one it prints a falsifying example as a call that reproduces
the failure."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lazyattention.fast as fast
from lazyattention.testing.check import run_check


def test_the_fast_backend_holds_its_properties():
    lines = []
    assert run_check("fast", "ci", ["lazy_decode"], say=lines.append) == 0
    assert any(line.startswith("lazy_decode") and line.endswith("ok") for line in lines), lines
    assert lines[-1] == "1 of 1 functions hold their properties"


def test_a_wrong_backend_fails_with_a_reproducible_call(monkeypatch):
    right = fast.lazy_decode

    def wrong(*args, **kwargs):
        out, lse = right(*args, **kwargs)
        return out * 1.5, lse

    monkeypatch.setattr(fast, "lazy_decode", wrong)
    lines = []
    assert run_check("fast", "ci", ["lazy_decode"], say=lines.append) == 1
    call = lines[lines.index("reproduce with:") + 1]
    with pytest.raises(AssertionError, match="exceeds the bound"):
        exec(call, {})


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="profile"):
        run_check("fast", "weekly")
    with pytest.raises(ValueError, match="unknown function 'lazy'"):
        run_check("fast", "ci", ["lazy"])
