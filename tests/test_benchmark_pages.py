"""The benchmark pages in docs/ are generated from the committed result files (and the
benchmarks' own pieces that run without a GPU hold what they claim).

A page edited by hand, or a result file committed without regenerating its page,
fails here: every figure a reader sees comes from a measured JSON.
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _load(script: str):
    spec = importlib.util.spec_from_file_location(script, ROOT / "benchmarks" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _notes(result: Path) -> str | None:
    notes = result.with_suffix(".notes.md")
    return notes.read_text() if notes.exists() else None


def test_engine_page_is_generated_from_its_result():
    """The page names the result it was generated from (an H100 or H200 file); it must
    equal what the generator writes from that file now."""
    text = (ROOT / "docs" / "benchmarks" / "engine.md").read_text()
    found = re.search(r"from (benchmarks/results/engine_h[0-9]+(?:_[a-z]+)?\.json); do not edit", text)
    assert found, "docs/benchmarks/engine.md does not name the result file it was generated from"
    result = ROOT / found.group(1)
    assert text == _load("engine_page").render(result), (
        f"docs/benchmarks/engine.md is stale: run python benchmarks/engine_page.py {found.group(1)}"
    )


def test_kernel_page_is_generated_from_its_result():
    pytest.importorskip("matplotlib")
    result = RESULTS / "kernels_h200.json"
    page = _load("plot_kernels").page(json.loads(result.read_text()), result.stem, "kernels_h200.png", _notes(result))
    assert (ROOT / "docs" / "benchmarks" / "kernels.md").read_text() == page, (
        "docs/benchmarks/kernels.md is stale: run "
        "python benchmarks/plot_kernels.py benchmarks/results/kernels_h200.json"
    )


def test_every_device_result_marks_its_targets():
    results = sorted(RESULTS.glob("*_h[0-9]00.json"))
    assert results, "no committed device result files"
    for result in results:
        targets = json.loads(result.read_text()).get("targets")
        assert targets, f"{result.name} has no targets"
        for target in targets:
            assert isinstance(target.get("pass"), bool), (result.name, target)


def test_shared_decode_page_is_generated_from_its_result():
    result = RESULTS / "shared_decode_h200.json"
    text = (ROOT / "docs" / "benchmarks" / "shared-decode.md").read_text()
    assert text == _load("shared_decode").render(result), (
        "docs/benchmarks/shared-decode.md is stale: "
        "run python benchmarks/shared_decode.py --render benchmarks/results/shared_decode_h200.json"
    )


def test_kernel_page_reads_the_compiled_test_run_off_its_junit_file(tmp_path):
    """The test count on the kernels page comes from pytest's JUnit files, as pytest wrote them."""
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="2" '
        'skipped="3" tests="40" time="310.4"></testsuite></testsuites>'
    )
    record = _load("plot_kernels").gpu_tests([junit], "pytest tests/fast")
    assert record == {"command": "pytest tests/fast", "result": "34 passed, 3 failed, 3 skipped in 310 s"}
    again = _load("plot_kernels").gpu_tests([junit, junit], "pytest tests/fast")
    assert again["result"] == "68 passed, 6 failed, 6 skipped in 621 s, in 2 calls"


def test_cascade_merge_is_the_log_sum_exp_merge(monkeypatch):
    """The shared-segment benchmark merges FlashInfer's two cascade levels with a kernel
    of its own (log-sum-exps in base 2, as FlashInfer's): attention over the union of the
    two key sets (eq. 12), checked against the merge in float64, under Triton's
    interpreter (chosen when the kernel is defined, as the benchmark is loaded)."""
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(0)
    v, v_other = torch.randn(2, 3, 4, 16, generator=gen)
    s, s_other = 4 * torch.randn(2, 3, 4, generator=gen)
    w, w_other = torch.exp2(s.double()), torch.exp2(s_other.double())
    want = (v.double() * w[..., None] + v_other.double() * w_other[..., None]) / (w + w_other)[..., None]
    want_lse = torch.log2(w + w_other)
    _load("shared_decode").merge_state_in_place(v, s, v_other, s_other)
    torch.testing.assert_close(v.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.double(), want_lse, rtol=1e-6, atol=1e-6)


def test_kernel_targets_show_their_worst_value_in_their_own_units():
    """A target checked as an expression ("…, as 1 - fraction <= 0.10") shows its worst
    value as what the target states (a percentage of the copy bandwidth, TB/s); a form
    the page cannot show raises."""
    cells = _load("plot_kernels").target_cells
    assert cells({"target": "decode >= 90% of copy bandwidth, as 1 - fraction <= 0.10", "worst": 0.083}) == (
        "decode >= 90% of copy bandwidth",
        "91.7% of copy bandwidth",
    )
    assert cells({"target": "decode B=1 >= 1.8 TB/s, as 1.8 - TB/s <= 0", "worst": -0.804}) == (
        "decode B=1 >= 1.8 TB/s",
        "2.60 TB/s",
    )
    assert cells({"target": "prefill: rotation overhead <= 5%", "worst": 0.483}) == (
        "prefill: rotation overhead <= 5%",
        "48.3%",
    )
    assert cells({"target": "lazy time / FlashInfer time <= 1", "worst": 0.948})[1] == "0.95"
    with pytest.raises(ValueError, match="as 'log TB/s <= 2'"):
        cells({"target": "x, as log TB/s <= 2", "worst": 1.0})


#: Words of a lab diary: a result page says what a run measured, in the present tense;
#: the history of a result is kept in its notes file, inside a comment the page hides.
DIARY = re.compile(r"\bnow\b|has since|next steps?\b|the run before|what moved|what changed since", re.I)


def test_result_pages_read_as_documentation():
    for page in ("engine.md", "kernels.md", "shared-decode.md"):
        text = (ROOT / "docs" / "benchmarks" / page).read_text()
        shown = re.sub(r"<!--.*?-->", "", text, flags=re.S)
        found = sorted({m.group(0).lower() for m in DIARY.finditer(shown)})
        assert not found, f"docs/benchmarks/{page} narrates its history: {found}"


def test_an_engine_result_without_the_quality_check_says_so_instead_of_an_empty_table():
    result = json.loads((RESULTS / "engine_h100_heavy.json").read_text())
    page = _load("engine_page").page({**result, "quality": []}, "engine_h100_heavy", None)
    section = page.split("## Quality on the benchmark model", 1)[1]
    assert "Not run for this result" in section and "| dtype |" not in section


def test_an_engine_result_with_the_hosts_shares_shows_them_beside_gpu_busy():
    result = json.loads((RESULTS / "engine_h100_heavy.json").read_text())
    engine_page = _load("engine_page")
    shares = ("host_fraction", "wait_fraction")
    before = [{k: v for k, v in r.items() if k not in shares} for r in result["burst_medians"]]
    page = engine_page.page({**result, "burst_medians": before}, "engine_h100_heavy", None)
    assert "host works / waits" not in page and "**Host time**" not in page
    rows = [{**r, "host_fraction": 0.25, "wait_fraction": 0.5} for r in result["burst_medians"]]
    page = engine_page.page({**result, "burst_medians": rows}, "engine_h100_heavy", None)
    header = next(line for line in page.splitlines() if line.startswith("| strategy | blocks |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    column = cells.index("host works / waits")
    assert cells[column - 1] == "GPU busy (min–max)"
    rows = [line.strip("|").split("|") for line in page.splitlines() if line.startswith("| lazy |")]
    runs = [r for r in rows if len(r) == len(cells)]  # the burst tables' rows (not the parity gate's)
    assert runs and all(r[column].strip() == "0.25 / 0.50" for r in runs)
    assert "**Host time**" in page


def test_an_engine_results_hit_ratio_table_is_of_its_own_workload_and_engine():
    """The page puts the preset's hit-ratio table under the result as "the same workload":
    it must be, down to the engine's limits (only the skews differ)."""
    engine_page = _load("engine_page")
    checked = 0
    for path in sorted(RESULTS.glob("engine_h*.json")):
        result = json.loads(path.read_text())
        table_path = engine_page.hit_ratio_path(path, result.get("preset"))
        if not table_path.exists():
            continue
        table = json.loads(table_path.read_text())
        same = {k: v for k, v in result["workload"].items() if k not in ("zipf_alpha", "rate")}
        assert {k: table["workload"][k] for k in same} == same, f"{table_path.name} is not {path.name}'s workload"
        assert {k: result["engine"][k] for k in table["engine"]} == table["engine"], path.name
        checked += 1
    assert checked, "no engine result has its hit-ratio table beside it"
