"""The ``lazyattention`` command: bad flags refused in one line, help, version, smoke runs.

Most cases run in process (``main([...])``); the ones that depend on the machine (no
CUDA, no Triton, ``TRITON_INTERPRET``) run in one fresh interpreter with CUDA hidden,
so they give the same answer on a GPU machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import lazyattention
from lazyattention.bench import check_size
from lazyattention.cli import BENCH_DEFAULTS, main, parse_args
from lazyattention.serving.engine import STRATEGIES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = [
    "--requests",
    "3",
    "--documents",
    "3",
    "--doc-len",
    "8",
    "--docs-per-request",
    "2",
    "--query-len",
    "2",
    "--output-len",
    "2",
    "--alphas",
    "1",
    "--budgets",
    "1",
    "--strategies",
    "lazy,block_attention",
]


def assert_one_line_error(err: str, command: str, flag: str, value: str) -> None:
    """One line on stderr: ``lazyattention <command>: error: argument <flag>: ... <value> ...``."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lazyattention {command}: error: argument {flag}"), lines[0]
    assert value in lines[0], lines[0]


BAD_FLAGS = [
    # (argv, flag named, value shown)
    (["bench", "--block-size", "0"], "--block-size", "'0'"),
    (["bench", "--block-size", "-16"], "--block-size", "'-16'"),
    (["bench", "--max-num-seqs", "0"], "--max-num-seqs", "'0'"),
    (["bench", "--max-batch-tokens", "x"], "--max-batch-tokens", "'x'"),
    (["bench", "--requests", "1.5"], "--requests", "'1.5'"),
    (["bench", "--doc-len", "0"], "--doc-len", "'0'"),
    (["bench", "--query-len", "-1"], "--query-len", "'-1'"),
    (["bench", "--output-len", "0"], "--output-len", "'0'"),
    (["bench", "--budgets", "-0.5"], "--budgets", "'-0.5'"),
    (["bench", "--budgets", "0.5,0"], "--budgets", "'0'"),
    (["bench", "--budget", "0"], "--budget", "'0'"),
    (["bench", "--budget", "inf"], "--budget", "'inf'"),
    (["bench", "--alphas", "", "--budgets", ""], "--alphas", "''"),
    (["bench", "--budgets", ""], "--budgets", "''"),
    (["bench", "--alphas", "a,b"], "--alphas", "'a'"),
    (["bench", "--alphas", "0,,1"], "--alphas", "'0,,1'"),
    (["bench", "--skew", "-1"], "--skew", "'-1'"),
    (["bench", "--rate", "0"], "--rate", "'0'"),
    (["bench", "--rate", "nan"], "--rate", "'nan'"),
    (["bench", "--strategies", "lazy,nope"], "--strategies", "'nope'"),
    (["bench", "--strategies", ""], "--strategies", "''"),
    (["bench", "--docs-per-request", "5", "--documents", "3"], "--docs-per-request", "5"),
    (["bench", "--name", "a/b"], "--name", "'a/b'"),
    (["bench", "--model", "gpt"], "--model", "'gpt'"),
    (["bench", "--dtype", "float64"], "--dtype", "'float64'"),
    (["demo", "--backend", "nope"], "--backend", "'nope'"),
    (["demo", "--device", "mps"], "--device", "'mps'"),
    (["demo", "--seed", "-1"], "--seed", "'-1'"),
    (["demo", "--seed", "99999999999999999999999"], "--seed", "'99999999999999999999999'"),
    (["bench", "--seed", str(2**63)], "--seed", f"'{2**63}'"),
]


@pytest.mark.parametrize(("argv", "flag", "value"), BAD_FLAGS, ids=[" ".join(a) for a, _, _ in BAD_FLAGS])
def test_a_bad_flag_value_is_one_line_naming_flag_and_value(argv, flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert_one_line_error(capsys.readouterr().err, argv[0], flag, value)


def test_an_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--out", str(blocker / "x"), *TINY])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, "bench", "--out", str(blocker / "x"))
    assert captured.out == "", "nothing may run before the output path is checked"


def test_an_error_of_the_library_is_one_line(monkeypatch, capsys):
    def failing_bench(**_):
        raise ValueError("the workload cannot be drawn")

    monkeypatch.setattr("lazyattention.cli.run_bench", failing_bench)
    assert main(["bench"]) == 2
    assert capsys.readouterr().err == "lazyattention bench: error: the workload cannot be drawn\n"


def test_machine_dependent_cases_in_a_fresh_interpreter(tmp_path):
    """No CUDA (hidden), no Triton (blocked), and TRITON_INTERPRET=1: each refused in one
    line that says what to do, or resolved to the CPU. Run through ``python -m`` (runpy)."""
    script = textwrap.dedent(
        """
        import contextlib, io, json, os, runpy, sys

        os.environ.pop("TRITON_INTERPRET", None)
        results = []

        def run(*argv):
            err = io.StringIO()
            sys.argv = ["lazyattention", *argv]
            code = 0
            with contextlib.redirect_stderr(err):
                try:
                    runpy.run_module("lazyattention.cli", run_name="__main__")
                except SystemExit as exc:
                    code = exc.code
            results.append({"argv": list(argv), "code": code, "err": err.getvalue()})

        run("demo", "--device", "cuda")
        run("bench", "--device", "cuda:1")
        run("demo", "--backend", "fast")
        run("demo", "--backend", "fast", "--device", "cpu")
        os.environ["TRITON_INTERPRET"] = "1"
        sys.modules["triton"] = None  # as if Triton were not installed
        run("demo", "--backend", "fast")
        del sys.modules["triton"]
        from lazyattention.cli import parse_args  # after the runs: runpy wants the module unimported

        interpreted = parse_args(["demo", "--backend", "fast"]).device
        print(json.dumps({"results": results, "interpreted_device": interpreted}))
        """
    )
    env = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    cuda, cuda1, fast, fast_cpu, no_triton = report["results"]
    for r in report["results"]:
        assert r["code"] == 2, r
    assert_one_line_error(cuda["err"], "demo", "--device", "'cuda'")
    assert "no CUDA device" in cuda["err"]
    assert_one_line_error(cuda1["err"], "bench", "--device", "'cuda:1'")
    assert_one_line_error(fast["err"], "demo", "--backend", "'fast'")
    assert "TRITON_INTERPRET=1" in fast["err"] and "--device cpu" in fast["err"]
    assert_one_line_error(fast_cpu["err"], "demo", "--device", "'cpu'")
    assert "TRITON_INTERPRET=1" in fast_cpu["err"]
    assert report["interpreted_device"] == "cpu", "with TRITON_INTERPRET=1 the default device follows"
    assert_one_line_error(no_triton["err"], "demo", "--backend", "'fast'")
    assert "pip install lazyattention[fast]" in no_triton["err"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"lazyattention {lazyattention.__version__}"


def test_help_shows_the_defaults_of_run_bench(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # help text is wrapped to the terminal
    for flag, shown in (("--block-size", "16"), ("--alphas", "0,1"), ("--budgets", "0.5,1"), ("--rate", "inf")):
        assert f"{flag} " in out and f"(default: {shown})" in out
    assert "(default: None)" not in out and "(default: False)" not in out
    args = vars(parse_args(["bench"]))
    for name, default in BENCH_DEFAULTS.items():
        if name not in ("progress", "strategies", "backend"):
            assert args[name] == (list(default) if isinstance(default, tuple) else default), name
    assert args["strategies"] == list(STRATEGIES)
    assert BENCH_DEFAULTS["backend"] is None and args["backend"] == "sdpa", "no backend named: the CPU's"


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


@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "progress"])
def test_bench_smoke_run(quiet, tmp_path, capsys):
    assert main(["bench", *TINY, "--out", str(tmp_path), *(["--quiet"] if quiet else [])]) == 0
    captured = capsys.readouterr()
    assert "vs skew" in captured.out and "vs budget" in captured.out
    assert "device=cpu threads=1 dtype=float32" in captured.out  # the thread count it runs with, said
    assert "%|" not in captured.out, "progress bars go to stderr, never into the tables"
    assert json.loads((tmp_path / "engine.json").read_text())["runs"]
    if quiet:
        assert captured.err == ""
    else:
        # a bar over the sweep (2 warm-ups + 2 x 2 runs) and one per run over its requests
        assert "sweep: 100%" in captured.err and "6/6" in captured.err
        assert "warm-up: lazy" in captured.err and "skew: alpha=1 budget=1 lazy" in captured.err
        assert "/3 [" in captured.err and "req/s" in captured.err  # 3 requests per run
        assert "building the tiny model" in captured.err


def test_the_usage_line_names_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "{demo,bench,check}" in err


def test_a_sweep_too_large_for_memory_is_refused_before_any_work(tmp_path, capsys):
    assert main(["bench", *TINY, "--doc-len", "1000000000", "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lazyattention bench: error: this sweep needs about"), lines
    assert "lower --documents, --doc-len" in lines[0]


def test_size_check_counts_the_pool_and_the_workload():
    sizes = dict(requests=1000, documents=10, doc_len=1000, docs_per_request=2, query_len=8, output_len=4)
    args = ("tiny", "cpu", "float32", *sizes.values(), [0.5, 1.0], 1.0, 16)
    per_run = check_size(*args, free=lambda device: 10**12)
    assert per_run == 1000 * (2 * 1000 + 8 + 4)
    with pytest.raises(ValueError, match=r"needs about .* GB on cpu .* and 0.0 GB is free"):
        check_size(*args, free=lambda device: 10**6)
    # ten times the documents need about ten times the memory
    small = _needed(args)
    large = _needed(("tiny", "cpu", "float32", 1000, 100, 1000, 2, 8, 4, [0.5, 1.0], 1.0, 16))
    assert 5 * small < large < 15 * small


def _needed(args) -> int:
    """The bytes ``check_size`` asks for: the largest ``free`` it refuses."""
    low, high = 0, 10**15
    while low < high:
        mid = (low + high) // 2
        try:
            check_size(*args, free=lambda device, mid=mid: mid)
            high = mid
        except ValueError:
            low = mid + 1
    return low


def test_ctrl_c_keeps_the_finished_runs(tmp_path, monkeypatch, capsys):
    import lazyattention.bench as bench

    real, calls = bench.run_sweep, []

    def interrupted_after_one(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "run_sweep", interrupted_after_one)
    argv = [*TINY[:-4], "--alphas", "0,1", "--budgets", "1", "--strategies", "lazy", "--quiet"]
    assert main(["bench", *argv, "--out", str(tmp_path)]) == 130
    result = json.loads((tmp_path / "engine.json").read_text())
    assert result["interrupted"] is True
    assert [(r["sweep"], r["alpha"]) for r in result["runs"]] == [("skew", 0.0)]
    err = capsys.readouterr().err
    assert "the 1 finished runs are in" in err and "interrupted" in err.splitlines()[-1]


def test_the_interpreted_demo_says_it_is_slow_before_it_starts(monkeypatch, capsys):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr("lazyattention.cli.run_demo", lambda *a: print("demo ran") or 0)
    assert main(["demo", "--backend", "fast", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "interpreter" in captured.err and "many minutes" in captured.err and "demo ran" in captured.out


def test_the_reference_check_speaks_of_the_reference():
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    argv = ["check", "--backend", "reference", "--functions", "lazy_decode", "--device", "cpu"]
    proc = subprocess.run(
        [sys.executable, "-m", "lazyattention.cli", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert "backend=reference" in first and "small cases" in first and "Triton" not in proc.stdout
    assert proc.stderr == "", "nothing but the summary: no warnings beside ok"


def test_a_plain_install_says_what_to_install_for_the_real_model_demo():
    script = textwrap.dedent(
        """
        import importlib.util, sys
        sys.modules["transformers"] = None
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "transformers" else real(name, *a)
        from lazyattention.rag_demo import run_rag_demo
        try:
            run_rag_demo("reference", "cpu")
        except ImportError as exc:
            print(f"skipped: {exc}")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "skipped:" in proc.stdout and "pip install 'lazyattention[transformers]'" in proc.stdout, proc


def test_warnings_while_checking_are_named_in_the_summary(monkeypatch, capsys):
    import warnings

    import lazyattention.testing.properties as properties
    from lazyattention.testing.check import run_check

    def overflowing(*args):
        warnings.warn("overflow encountered in scalar add", RuntimeWarning, stacklevel=1)
        return 0.25

    monkeypatch.setattr(properties, "differential", overflowing)
    monkeypatch.setattr(properties, "shift_invariance", overflowing)
    lines = []
    assert run_check("reference", "ci", ["lazy_decode"], "cpu", say=lines.append) == 0
    assert capsys.readouterr().err == ""
    summary = "\n".join(lines)
    assert "lazy_decode: 10 warning(s) while checking; RuntimeWarning: overflow encountered in scalar add" in summary
    assert "ok" in summary and "Triton" not in summary
