"""``benchmarks/host_step.py`` on the CPU at tiny sizes (in a fresh process: it sets
``TRITON_INTERPRET=1`` before Triton is imported).

Nothing is timed against a threshold: the engine has to serve the whole burst with the
device's work left out, its decode steps through the graph path, shared segments
included, and every step counted as prefill or decode.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("shared", [0, 2])
def test_the_burst_is_served_with_every_step_counted(shared):
    pytest.importorskip("triton")
    profile = ["--profile"] if shared else []  # the profiled run is the timed one
    command = [sys.executable, str(ROOT / "benchmarks" / "host_step.py"), "--tiny", "--shared-decode-min-requests",
               str(shared), *profile]  # fmt: skip
    result = subprocess.run(command, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                            timeout=600, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    sharing = re.search(rf"shared decode {shared or 'off'} \((\d+) steps with shared segments\)", result.stdout)
    assert sharing and (int(sharing[1]) > 0) == (shared > 0), result.stdout
    counts = {kind: int(n) for kind, n in re.findall(r"(prefill|decode): +(\d+) steps", result.stdout)}
    assert counts.keys() == {"prefill", "decode"} and min(counts.values()) > 0, result.stdout
    assert ("Ordered by: cumulative time" in result.stdout) == bool(profile) and (
        "host: schedule" in result.stdout
    ) == bool(profile)
