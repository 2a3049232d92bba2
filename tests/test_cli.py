"""The ``lazyattention`` command end to end, at tiny sizes on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lazyattention.cli import main
from lazyattention.serving.engine import STRATEGIES


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_demo_runs_and_shows_every_part(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "1. One cached copy, many placements" in out
    assert "largest difference over all placements" in out
    for strategy in STRATEGIES:
        assert strategy in out
    assert "requests served in" in out  # progress while it works
    worst = float(out.split("largest difference over all placements: ")[1].split()[0])
    assert worst < 1e-5, "lazy and eager RoPE must agree to float32 rounding"


def test_bench_writes_table_json_and_plot(tmp_path, capsys):
    args = [
        "bench",
        "--requests",
        "6",
        "--documents",
        "4",
        "--doc-len",
        "12",
        "--docs-per-request",
        "2",
        "--query-len",
        "3",
        "--output-len",
        "2",
        "--alphas",
        "0,1",
        "--budgets",
        "0.5",
        "--out",
        str(tmp_path),
        "--quiet",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "vs skew" in out and "vs budget" in out
    result = json.loads((tmp_path / "engine.json").read_text())
    assert (tmp_path / "engine.png").stat().st_size > 10_000
    assert len(result["runs"]) == 3 * len(STRATEGIES)
    assert {r["strategy"] for r in result["runs"]} == set(STRATEGIES)
    assert result["environment"]["backend"] == "reference" and result["workload"]["rate"] is None
    for r in result["runs"]:
        assert r["requests"] == 6 and r["requests_per_s"] > 0


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "lazyattention.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout and "bench" in result.stdout


def test_bad_input_gives_clear_errors(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--strategies", "lazy,nope"])
    assert exc.value.code == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--alphas", "a,b"])
    assert "comma-separated numbers" in capsys.readouterr().err
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert main(["demo", "--backend", "fast"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
