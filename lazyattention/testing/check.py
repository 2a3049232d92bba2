"""``lazyattention check``: the backend's properties on this machine, with Hypothesis.

For each attention function it draws cases (layouts, offsets, block sizes, heads,
RoPE variants, dtypes) and holds the chosen backend to the project's properties
(:mod:`lazyattention.testing.properties`): the differential one against the reference
and the float64 definition, and the metamorphic shift invariance. On a GPU the cases are
serving-sized; on a CPU (the Triton kernels under ``TRITON_INTERPRET=1``) they are
small. It prints a progress line per function and a one-screen summary: examples run,
the worst error as a fraction of its bound, and any falsifying example as a call that
reproduces it.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, field

from lazyattention.backends import BACKENDS, get_backend, interpreted

PROFILES = {"ci": 10, "nightly": 200}
DTYPE_NAMES = ("float16", "bfloat16", "float32")

__all__ = ["PROFILES", "Summary", "run_check"]


@dataclass
class Summary:
    """What one function's check found."""

    function: str
    examples: int = 0
    worst: float = 0.0
    where: str = ""
    failure: str | None = None
    reproduce: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _prepare(device: str | None, backend: str) -> str:
    """The device to use; on a CPU, for the Triton kernels, the interpreter (set before Triton loads)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if interpreted(backend, device) and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            raise RuntimeError("checking on the CPU needs TRITON_INTERPRET=1 set before Triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
    return device


def check_function(backend_name: str, name: str, examples: int, device: str, derandomize: bool, say) -> Summary:
    """Run both properties of ``backend_name``'s ``name`` over ``examples`` drawn cases."""
    import torch
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from .properties import differential, shift_invariance
    from .strategies import kernel_cases

    backend = get_backend(backend_name).ops
    realistic = device != "cpu"
    summary = Summary(name)
    last: dict = {}
    start = time.perf_counter()

    cases = kernel_cases(name.endswith("decode"), realistic)

    # Shrinking a failure costs many more calls than finding it: only the nightly profile
    # shrinks; the ci profile reports the first falsifying example it meets.
    phases = [p for p in Phase if derandomize is False or p != Phase.shrink]

    @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize, print_blob=False,
              suppress_health_check=list(HealthCheck), phases=phases)  # fmt: skip
    @given(case=cases, dtype=st.sampled_from(DTYPE_NAMES), shift=st.sampled_from((0, 1, 70_000)))
    def prop(case, dtype, shift):
        last.update(case=case, dtype=dtype, shift=shift)
        dt = getattr(torch, dtype)
        if shift:
            ratio = shift_invariance(backend, name, case, dt, device, shift)
        else:
            ratio = differential(backend, name, case, dt, device)
        summary.examples += 1
        if ratio > summary.worst:
            summary.worst, summary.where = ratio, f"{dtype}, shift {shift}"
        if summary.examples % max(1, examples // 5) == 0:
            say(f"  {name}: {summary.examples} examples, worst error/bound {summary.worst:.3f}")

    # Warnings raised while checking (numpy's integer-overflow warnings of the Triton
    # interpreter among them) are collected and named once in the summary, not printed
    # between the progress lines.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            prop()
        except Exception as exc:  # the falsifying example: shrunk, the last one run
            summary.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            summary.reproduce = _reproduce(backend_name, name, last, device)
    kinds = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:120]}" for w in caught})
    summary.notes += [f"{len(caught)} warning(s) while checking; {k}" for k in kinds[:1]] + kinds[1:3]
    summary.seconds = time.perf_counter() - start
    return summary


def _reproduce(backend_name: str, name: str, last: dict, device: str) -> str:
    prop = "shift_invariance" if last.get("shift") else "differential"
    extra = f", shift={last['shift']}" if last.get("shift") else ""
    return (
        "import torch, lazyattention." + backend_name + " as backend\n"
        "from lazyattention.testing.properties import " + prop + "\n"
        "from lazyattention.testing.strategies import Case, DocSpec, RequestSpec, SegmentSpec\n"
        "from lazyattention.reference import RopeConfig, NoScaling, LinearScaling, Llama3Scaling, YarnScaling\n"
        f"{prop}(backend, {name!r}, {last.get('case')!r}, torch.{last.get('dtype')}, {device!r}{extra})"
    )


def run_check(
    backend: str = "fast",
    profile: str = "ci",
    functions: list[str] | None = None,
    device: str | None = None,
    say=print,
) -> int:
    """Check ``backend``'s attention functions on this machine; return 0 when all hold.

    Args:
        backend: a name of :data:`~lazyattention.backends.BACKENDS`.
        profile: ``"ci"`` (10 examples per function, derandomized, failures reported
            unshrunk) or ``"nightly"`` (200, failures shrunk to a small example).
        functions: names out of :data:`~lazyattention.testing.properties.FUNCTIONS` (default: all).
        device: a torch device (default: CUDA when there is one, else the CPU).
        say: where progress and the summary go.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    try:
        import hypothesis  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("lazyattention check needs Hypothesis: pip install 'lazyattention[testing]'") from exc
    device = _prepare(device, backend)
    from .properties import FUNCTIONS

    chosen = list(functions or FUNCTIONS)
    unknown = [f for f in chosen if f not in FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown function {unknown[0]!r}; choose from {', '.join(FUNCTIONS)}")
    examples = PROFILES[profile]
    sizes = "serving-sized" if device != "cpu" else "small"
    if interpreted(backend, device):
        sizes += ", Triton interpreter"
    say(f"lazyattention check: backend={backend} profile={profile} device={device} ({sizes} cases), "
        f"{examples} examples per function")  # fmt: skip
    summaries = []
    for name in chosen:
        say(f"{name} ...")
        summaries.append(check_function(backend, name, examples, device, profile == "ci", say))
    say("")
    say(f"{'function':16} {'examples':>8} {'worst err/bound':>16}  {'where':20} {'time':>7}  verdict")
    for s in summaries:
        verdict = "FAIL" if s.failure else "ok"
        say(f"{s.function:16} {s.examples:8d} {s.worst:16.3f}  {s.where:20} {s.seconds:6.1f}s  {verdict}")
    for s in summaries:
        for line in s.notes:
            say(f"  {s.function}: {line}")
    failed = [s for s in summaries if s.failure]
    for s in failed:
        say("")
        say(f"{s.function}: {s.failure}")
        say("reproduce with:")
        say(s.reproduce)
    say("")
    say(f"{len(summaries) - len(failed)} of {len(summaries)} functions hold their properties")
    return 1 if failed else 0
