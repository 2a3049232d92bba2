"""``run_bench``: the sweep's table, JSON and plot, and its output checks, at tiny sizes."""

from __future__ import annotations

import json
import sys

import pytest

from lazyattention.bench import output_paths, run_bench
from lazyattention.serving.engine import STRATEGIES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(requests=4, documents=4, doc_len=12, docs_per_request=2, query_len=3, output_len=2, progress=False)


def test_writes_table_json_and_plot(tmp_path, capsys):
    result = run_bench(tmp_path, alphas=[0.0, 1.0], budgets=[0.5], **TINY)
    out = capsys.readouterr().out
    assert "vs skew" in out and "vs budget" in out
    assert json.loads((tmp_path / "engine.json").read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "engine.png").stat().st_size > 10_000
    assert len(result["runs"]) == 3 * len(STRATEGIES)
    assert {r["strategy"] for r in result["runs"]} == set(STRATEGIES)
    assert result["environment"]["backend"] == "sdpa" and result["workload"]["rate"] is None  # the CPU's default
    for r in result["runs"]:
        assert r["requests"] == 4 and r["requests_per_s"] > 0


def test_without_matplotlib_the_plot_is_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as after a plain `pip install lazyattention`
    run_bench(tmp_path, name="plain", alphas=[1.0], budgets=[1.0], strategies=["lazy"], **TINY)
    out = capsys.readouterr().out
    assert "matplotlib is not installed: plain.png will be skipped (pip install lazyattention[plot])" in out
    assert (tmp_path / "plain.json").is_file() and not (tmp_path / "plain.png").exists()


def test_output_paths_are_checked_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"cannot create the folder .*a-file/x"):
        output_paths(blocker / "x", "engine")
    (tmp_path / "taken.json").mkdir()
    with pytest.raises(ValueError, match=r"cannot write .*taken\.json"):
        run_bench(tmp_path, name="taken", **TINY)
    json_path, plot_path = output_paths(tmp_path / "new" / "folder", "engine")
    assert json_path.parent.is_dir() and not json_path.exists() and not plot_path.exists()  # nothing left behind


def test_a_bad_dtype_names_it(tmp_path):
    with pytest.raises(ValueError, match="unknown dtype 'float64'"):
        run_bench(tmp_path, dtype="float64", **TINY)
