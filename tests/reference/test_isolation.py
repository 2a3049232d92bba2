"""``lazyattention.reference`` never imports Triton, and the install exposes no
top-level ``reference`` or ``fast`` module. Each check runs a fresh interpreter, so
nothing this test session imported can hide a leak."""

import subprocess
import sys
import textwrap

import pytest


def run_python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_importing_reference_does_not_import_triton(tmp_path):
    result = run_python(
        """
        import sys
        import lazyattention.reference as ref
        ref.lazy_prefill, ref.SegmentStore, ref.assert_close
        leaked = sorted(m for m in sys.modules if m == "triton" or m.startswith("triton."))
        assert not leaked, leaked
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr


def test_reference_works_with_triton_blocked(tmp_path):
    """A meta-path finder that refuses Triton: the reference still imports and runs."""
    result = run_python(
        """
        import sys

        class NoTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError(f"triton is blocked in this test: {name}")
                return None

        sys.meta_path.insert(0, NoTriton())
        import torch
        import lazyattention.reference as ref

        rope = ref.RopeConfig(head_dim=8)
        layout = ref.Layout([ref.RequestLayout((), ref.Placement((0,), 2, 0), 2)], block_size=2)
        k = v = torch.zeros(1, 2, 1, 8)
        out = ref.lazy_prefill(torch.ones(2, 1, 8), k, v, layout, rope)
        assert out.shape == (2, 1, 8)
        try:
            import triton
        except ImportError as e:
            assert "blocked" in str(e)
        else:
            raise AssertionError("the blocker did not block")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["reference", "fast"])
def test_no_top_level_module_leaks_into_site_packages(tmp_path, name):
    """From an empty directory (so the checkout is not on ``sys.path``), only
    ``lazyattention.<name>`` exists."""
    result = run_python(
        f"""
        import importlib.util
        assert importlib.util.find_spec({name!r}) is None, importlib.util.find_spec({name!r})
        assert importlib.util.find_spec("lazyattention.{name}") is not None
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
