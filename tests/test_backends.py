"""The backend objects: the registry, each backend's capabilities, and the errors.

The fast backend is loaded in a subprocess with ``TRITON_INTERPRET=1`` (the
interpreter is chosen when Triton is imported, and this module must not decide that
for the rest of the suite).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lazyattention.reference as reference
from lazyattention.backends import BACKENDS, Backend, Capabilities, default_backend, get_backend, interpreted
from lazyattention.reference import ATTENTION_API

ROOT = Path(__file__).resolve().parents[1]


def test_reference_backend():
    backend = get_backend("reference")
    assert backend.name == "reference"
    for name in ATTENTION_API:
        assert getattr(backend.ops, name) is getattr(reference, name)
    caps = backend.capabilities
    assert not caps.cuda_graphs and not caps.shared_decode and caps.raw_cache
    assert torch.float64 in caps.dtypes and "cpu" in caps.devices
    assert not backend.captures_on("cuda") and backend.sharing is None
    with pytest.raises(ValueError, match="backend 'reference' does not"):
        backend.shared()


def test_get_backend_passes_an_object_through_and_names_the_choices():
    backend = get_backend("reference")
    assert get_backend(backend) is backend
    assert get_backend("reference") == backend, "a backend is a value: loading it twice gives an equal one"
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'; choose one of 'reference', ") as exc:
        get_backend("cuda")
    assert all(repr(name) in str(exc.value) for name in BACKENDS)


def test_default_backend_on_the_cpu_is_the_vectorised_one():
    assert default_backend("cpu").name == "sdpa"
    assert default_backend(torch.device("cpu")).name == "sdpa"
    assert default_backend("meta").name == "reference"


def test_interpreted_is_the_triton_backends_on_the_cpu():
    """Known before loading (loading ``fast`` imports Triton, which fixes the interpreter)."""
    assert interpreted("fast", "cpu") and interpreted("fast", torch.device("cpu"))
    assert not interpreted("fast", "cuda") and not interpreted("fast", "cuda:1")
    assert not any(interpreted(name, "cpu") for name in BACKENDS if name != "fast")


def test_a_backend_is_checked_when_it_is_made():
    caps = get_backend("reference").capabilities
    with pytest.raises(ValueError, match=r"capabilities\.shared_decode=True but sharing is None"):
        Backend("broken", reference, Capabilities(caps.devices, False, True, True, caps.dtypes))
    with pytest.raises(ValueError, match="does not provide write_kv"):
        Backend("broken", sys.modules[__name__], caps)


def _run(code: str, **env: str) -> dict:
    """``code`` in a fresh interpreter without CUDA; its last stdout line as JSON."""
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ.update(CUDA_VISIBLE_DEVICES="", **env)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environ,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fast_backend_under_the_interpreter():
    report = _run(
        """
        import json, torch
        import lazyattention.fast as fast
        import lazyattention.fast.shared as shared
        from lazyattention.backends import default_backend, get_backend
        from lazyattention.reference import ATTENTION_API

        b = get_backend("fast")
        caps = b.capabilities
        print(json.dumps({
            "ops": b.ops is fast,
            "api": all(getattr(b.ops, n) is getattr(fast, n) for n in ATTENTION_API),
            "sharing": [b.shared().plan_sharing is shared.plan_sharing,
                        b.shared().shared_decode is shared.shared_decode,
                        b.shared().shared_tiles is shared.shared_tiles],
            "devices": list(caps.devices),
            "graphs": [caps.cuda_graphs, b.captures_on("cuda"), b.captures_on("cpu")],
            "float64": torch.float64 in caps.dtypes,
            "default_cpu": default_backend("cpu").name,
        }))
        """,
        TRITON_INTERPRET="1",
    )
    assert report == {
        "ops": True,
        "api": True,
        "sharing": [True, True, True],
        "devices": ["cuda", "cpu"],
        "graphs": [True, True, False],
        "float64": False,
        "default_cpu": "sdpa",
    }


def test_fast_backend_refuses_what_is_missing():
    report = _run(
        """
        import json, sys
        from lazyattention.backends import get_backend

        errors = []
        for blocked in (False, True):
            if blocked:
                import os
                os.environ["TRITON_INTERPRET"] = "1"
                sys.modules["triton"] = None  # as if Triton were not installed
            try:
                get_backend("fast")
            except RuntimeError as exc:
                errors.append(str(exc))
        print(json.dumps({"errors": errors, "triton": "triton" in sys.modules and sys.modules["triton"] is not None}))
        """
    )
    no_gpu, no_triton = report["errors"]
    assert "needs a CUDA GPU" in no_gpu and "TRITON_INTERPRET=1" in no_gpu
    assert "needs Triton" in no_triton and "pip install lazyattention[fast]" in no_triton
    assert not report["triton"], "a refused fast backend imports nothing of Triton"


def test_choosing_the_reference_never_imports_triton():
    report = _run(
        """
        import json, sys
        from lazyattention.backends import default_backend, get_backend

        get_backend("reference"), default_backend("cpu")
        print(json.dumps({"triton": sorted(m for m in sys.modules if m.split(".")[0] == "triton")}))
        """
    )
    assert report["triton"] == []


def test_no_module_outside_backends_tests_a_backend_name():
    """The backend is chosen in one place: nothing else compares a name to a backend's."""
    names = "|".join(BACKENDS)
    pattern = rf"""backend(\.name)?\s*(==|!=|\bin\b|\bnot in\b)\s*[\(\[]?\s*["']({names})["']"""
    offenders = []
    for folder in ("lazyattention", "fast", "reference"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "backends.py" or path.is_symlink():
                continue
            text = path.read_text(encoding="utf-8")
            offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert offenders == []
