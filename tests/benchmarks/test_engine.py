"""``benchmarks/engine.py`` end to end on the CPU at tiny sizes, and its pieces.

No speed is claimed here (nothing is timed against a threshold): the run has to go
through every section, keep what it measured when it is cut off, and count the targets
and the hit ratios the way its docstring says.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import statistics
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

from lazyattention.serving.config import ModelConfig
from lazyattention.serving.engine import STRATEGIES, Engine
from lazyattention.serving.model import Model
from lazyattention.serving.sweep import dry_run
from lazyattention.serving.workload import WorkloadConfig, make_workload
from lazyattention.steps import graph_bucket

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[2]


def _load():
    name = "benchmarks_engine"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "engine.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve their annotations through it
        spec.loader.exec_module(module)
    return sys.modules[name]


bench = _load()

# the tiny preset, smaller still: a run of every section in a few seconds
SMALL = ["--tiny", "--backend", "reference", "--name", "e", "--requests", "5", "--strategies", "lazy,block_attention",
         "--many", "6", "--skip-quality"]  # fmt: skip


def test_a_tiny_run_goes_through_every_section(tmp_path, capsys):
    assert bench.main([*SMALL, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "e_tiny.json").read_text())
    assert result["complete"] and not result["skipped"] and result["preset"] == "tiny"
    points = {r["point"] for r in result["burst"]}
    assert points == {"skew 1, budget 1× the pool", "skew 2.1, budget 0.5× the pool", "skew 0, budget 1× the pool"}
    assert {r["strategy"] for r in result["burst"]} == {"lazy", "block_attention"}
    assert result["decode"]["batch"] == 4 and result["decode"]["steps"] >= 1
    assert {r["strategy"] for r in result["poisson"]} == {"lazy", "block_attention"}
    assert [r["requests"] for r in result["many"]] == [6, 6]
    assert result["quality"] == [] and any("--skip-quality" in n for n in result["notes"])
    assert any("lazy+shared not run" in n for n in result["notes"])  # the reference has no shared decode
    assert set(result["setup_seconds"]) >= {"parity gate", "model", "warm-up", "dry run", "graph capture"}
    assert 0 < result["timed_seconds"] < result["seconds"]
    assert (tmp_path / "e_tiny.png").stat().st_size > 10_000
    assert result["engine"]["gpu_profile"] is False  # no CUDA device: no torch.profiler, no GPU busy time
    for r in result["burst"]:  # the host's shares of each run's wall time
        host, wait = r["host_fraction"], r["wait_fraction"]
        assert host > 0 and wait >= 0 and host + wait <= 1
    # every target printed with its mark, the device named; the ones a CPU cannot measure say so
    assert f"targets on {result['device']}" in out
    for t in result["targets"]:
        assert f"{t['mark']:>5}  {t['target']}" in out
    marks = {t["target"]: t["mark"] for t in result["targets"]}
    assert marks["lazy gpu_busy_fraction >= 0.85 (skew 1)"] == "MISS (not measured)"
    assert marks["skew 1: throughput lazy+shared/lazy >= 1.3"] == "MISS (not measured)"
    measured = [t for t in result["targets"] if t["per_repeat"]]
    assert len(measured) == 4 and all(t["mark"] in ("PASS", "MISS") for t in measured)


def test_the_host_profile_is_one_more_run_of_each_strategy_kept_out_of_the_results(tmp_path, capsys):
    args = [*SMALL, "--out", str(tmp_path), "--rates", "", "--extra-points", "", "--many", "0"]
    assert bench.main([*args, "--profile-host"]) == 0
    profile = (tmp_path / "e_tiny_host_profile.txt").read_text()
    sections = profile.split("# ")[1:]
    assert [s.split(" at ")[0] for s in sections] == ["lazy", "block_attention"]
    for section in sections:
        assert "host: schedule" in section and "Ordered by: internal time" in section
        assert "Ordered by: cumulative time" in section and "run_workload" in section
    result = json.loads((tmp_path / "e_tiny.json").read_text())
    assert len([r for r in result["burst"] if r["point"] == bench.SKEW1.label]) == 2  # one repeat of each
    assert result["setup_seconds"]["host profile"] > 0 and result["complete"]


def test_a_run_cut_off_before_any_timed_section_keeps_its_setup_and_draws_nothing(tmp_path, capsys):
    bench.main([*SMALL, "--out", str(tmp_path), "--max-seconds", "0"])
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "e_tiny.json").read_text())
    assert not result["complete"] and result["burst"] == [] and "decode" not in result
    assert result["skipped"] and "reached --max-seconds 0" in out
    assert result["timed_seconds"] == 0 and result["setup_seconds"]["warm-up"] > 0
    assert all(t["mark"] == "MISS (not measured)" for t in result["targets"])
    assert "nothing measured to plot" in out and not (tmp_path / "e_tiny.png").exists()


def test_a_sigterm_ends_the_run_with_what_it_measured_saved(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM))  # as `timeout` ends a run
    timer.start()
    try:
        with pytest.raises(SystemExit) as exit_info:
            bench.main([*SMALL, "--out", str(tmp_path), "--repeats", "1000"])
    finally:
        timer.cancel()
    assert exit_info.value.code == 128 + signal.SIGTERM
    result = json.loads((tmp_path / "e_tiny.json").read_text())
    assert not result["complete"] and "targets" in result
    assert (tmp_path / "e_tiny.png").exists() == bool(result["burst"])  # what it measured is also drawn
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the run's only


def _medians(strategy, **values):
    row = {"strategy": strategy, "point": bench.SKEW1.label, "repeats": 3, "rate": 1.0}
    for key, value in values.items():
        row |= {key: value, f"{key}_min": value * 0.9, f"{key}_max": value * 1.1}
    return row


def test_the_plot_draws_a_row_of_panels_per_section_measured(tmp_path):
    import matplotlib.image

    burst = [_medians(s, ttft_p50=0.1, requests_per_s=5.0) for s in ("lazy", "block_attention")]
    rates = [{**_medians("lazy", ttft_p50=0.05, requests_per_s=r), "rate": r} for r in (1.0, 2.0)]
    heights = {}
    for name, result in (("burst", {"burst_medians": burst}), ("poisson", {"poisson_medians": rates}),
                         ("both", {"burst_medians": burst, "poisson_medians": rates})):  # fmt: skip
        assert bench.plot(result, tmp_path / f"{name}.png", "title")
        heights[name] = matplotlib.image.imread(tmp_path / f"{name}.png").shape[0]
    assert heights["both"] > 1.5 * max(heights["burst"], heights["poisson"])
    assert bench.plot({}, tmp_path / "none.png", "title") is False  # cut off before any section
    assert not (tmp_path / "none.png").exists()


def _run(strategy, rep, ttft, tput, busy=None, point=bench.SKEW1):
    return {"strategy": strategy, "repeat": rep, "point": point.label, "ttft_p50": ttft, "requests_per_s": tput,
            "gpu_busy_fraction": busy}  # fmt: skip


@given(
    lazy=st.lists(st.floats(0.5, 20.0), min_size=1, max_size=4),
    block=st.lists(st.floats(0.5, 20.0), min_size=4, max_size=4),
    parity=st.booleans(),
)
def test_targets_are_the_median_of_every_repeat(lazy, block, parity):
    point = bench.Point.parse("skew2.1@1GiB")
    burst = []
    for rep, (a, b) in enumerate(zip(lazy, block, strict=False)):
        burst += [_run("lazy", rep, 1 / a, a, busy=a / 20), _run("block_attention", rep, 1 / b, b)]
        burst += [_run("lazy+shared", rep, 1 / (2 * a), 2 * a), _run("lazy", rep, 1.0, 1.0, point=point)]
        burst += [_run("block_attention", rep, 1.0, 1.0, point=point)]
    result = {"parity": {"passed": parity}, "burst": burst, "decode": {"batch": 16}}
    marked = {t["target"]: t for t in bench.targets(result, bench.GOALS["heavy"], [point])}
    note(marked)
    ratios = [a / b for a, b in zip(lazy, block, strict=False)]
    tput = marked["skew 1: throughput lazy/block_attention >= 2"]
    ttft = marked["skew 1: TTFT p50 block_attention/lazy >= 2"]
    for t in (tput, ttft):
        assert t["per_repeat"] == pytest.approx(ratios) and t["value"] == pytest.approx(statistics.median(ratios))
        assert t["mark"] == ("PASS" if t["value"] >= 2 and parity else "MISS (parity failed)" if t["value"] >= 2
                             else "MISS")  # fmt: skip
    shared = marked["skew 1: throughput lazy+shared/lazy >= 1.3"]
    assert shared["per_repeat"] == pytest.approx([2.0] * len(lazy))
    busy = marked["lazy gpu_busy_fraction >= 0.85 (skew 1)"]
    assert busy["per_repeat"] == pytest.approx([a / 20 for a in lazy])
    assert marked[f"{point.label}: throughput lazy/block_attention >= 1.4"]["per_repeat"] == [1.0] * len(lazy)
    decode = [t for t in marked.values() if "decode" in t["target"] or "TPOT" in t["target"]]
    assert len(decode) == 2 and all(t["mark"] == "MISS (not measured)" for t in decode)


def test_points_parse_and_an_unknown_one_is_named():
    assert bench.Point.parse("skew0") == bench.Point(0.0)
    assert bench.Point.parse("budget0.35") == bench.Point(1.0, 0.35)
    assert bench.Point.parse("skew2.1@0.5") == bench.Point(2.1, 0.5)
    assert bench.Point.parse("skew2.1@1GiB") == bench.Point(2.1, 1.0, gib=True)
    assert bench.Point(1.0).sweep == "skew" and bench.Point(2.1, 1.0, gib=True).sweep == "budget"
    with pytest.raises(ValueError, match="unknown point 'tight'"):
        bench.Point.parse("tight")


def test_presets_set_every_option_and_the_command_line_overrides_them():
    _, presets = bench.parse(["--preset", "default,heavy", "--repeats", "5"])
    (name, default), (_, heavy) = presets
    assert name == "default" and default.repeats == heavy.repeats == 5
    shape = (heavy.requests, heavy.documents, heavy.docs_per_request, heavy.doc_len, heavy.output_len)
    assert shape == (96, 96, 8, 1024, 64)
    assert heavy.points == "skew2.1@1GiB" and heavy.shared_decode_min_requests == 2
    assert set(bench.PRESETS["default"]) == set(bench.PRESETS["heavy"]) == set(bench.PRESETS["tiny"])
    (_, profiled), (_, unprofiled) = (bench.parse(flags)[1][0] for flags in ([], ["--no-gpu-profile"]))
    assert not profiled.no_gpu_profile and unprofiled.no_gpu_profile
    with pytest.raises(SystemExit, match="unknown preset huge"):
        bench.parse(["--preset", "huge"])


def _tiny_workload(seed, alpha=1.1, rate=math.inf):
    return make_workload(
        WorkloadConfig(num_requests=8, num_documents=5, doc_len_mean=20, doc_len_min=4, doc_len_max=60,
                       docs_per_request=2, zipf_alpha=alpha, query_len=3, output_len=5, vocab_size=64, seed=seed,
                       rate=rate)
    )  # fmt: skip


@settings(max_examples=10)
@given(strategy=st.sampled_from(STRATEGIES), max_num_seqs=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_a_burst_meets_only_decode_shapes_that_poisson_capture_covers(strategy, max_num_seqs, seed):
    workload = _tiny_workload(seed)
    met = dry_run(workload, strategy, 400, bench.BLOCK_SIZE, max_num_seqs).decode_shapes
    note(sorted(met))
    assert met <= bench.possible_decode_shapes(workload, strategy, max_num_seqs)


def test_bucket_steps_reach_their_buckets_and_leave_the_engine_serving_as_a_fresh_one():
    workload = _tiny_workload(7)
    shapes = bench.possible_decode_shapes(workload, "lazy", 5)
    steps = bench.bucket_steps(shapes, 64, raw=False)
    buckets = [graph_bucket(s.decode.batch_size, s.decode.max_blocks) for _, s in steps]
    assert len(set(buckets)) == len(buckets) and set(buckets) == {graph_bucket(b, m) for b, m in shapes}
    model = Model(ModelConfig.tiny(vocab_size=64, num_layers=1)).init_random(0)

    def serve(warm: bool):
        engine = Engine(model, "lazy", num_blocks=64, block_size=bench.BLOCK_SIZE, max_num_seqs=5)
        if warm:  # what capture_graphs runs on CUDA, run eagerly here through the same runner
            for ids, step in steps:
                assert engine.runner.run(ids, step).shape == (step.decode.batch_size, 64)
            assert engine.pool.num_used == 0 and not engine.has_work()
        reqs = [engine.add_request(r.query, workload.request_documents(r), r.max_new_tokens) for r in workload.requests]
        engine.run_until_done()
        engine.check_invariants()
        return [r.output for r in reqs]

    assert serve(warm=True) == serve(warm=False)


def test_hit_ratio_mode_writes_the_table_with_the_papers_row(tmp_path, capsys):
    assert bench.main(["--hit-ratio", "--preset", "tiny", "--out", str(tmp_path), "--name", "e"]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "e_tiny_hit_ratio.json").read_text())
    options = bench.PRESETS["tiny"]
    alphas, budgets = bench._floats(options["hit_alphas"]), bench._floats(options["hit_budgets"])
    assert len(result["rows"]) == len(alphas) * len(budgets) * 3
    assert {r["strategy"] for r in result["rows"]} == {"prefix_cache", "block_attention", "lazy"}
    assert not all(r["fits"] for r in result["rows"]), "the smallest budget holds no Block-Attention request"
    ((_, tiny),) = bench.parse(["--tiny"])[1]
    base = replace(bench._workload_config(tiny), zipf_alpha=alphas[0])
    first = next(r for r in result["rows"] if r["fits"] and r["alpha"] == alphas[0])
    expected = dry_run(make_workload(base), first["strategy"], first["num_blocks"], bench.BLOCK_SIZE,
                       options["max_num_seqs"], options["max_batch_tokens"]).stats.hit_ratio  # fmt: skip
    assert first["hit_ratio"] == expected
    assert "paper 2.1" in out and "13.57%" in out and "7.27%" in out and "no fit" in out
    assert result["paper"]["lazy"] == 0.1357
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "e_tiny_hit_ratio.png").stat().st_size > 0
