"""Turn a committed kernel benchmark result into its plot and its docs page.

Run: ``python benchmarks/plot_kernels.py benchmarks/results/kernels_h200.json [--gpu-tests junit.xml]``
(``--gpu-tests``: record in the result the compiled test run of ``scripts/gpu_suite.sh``).

Writes ``benchmarks/results/<name>.png`` (prefill throughput and decode bandwidth, one
line per provider) and ``docs/benchmarks/kernels.md`` (the tables, every target with its
verdict, the method). No figure on the page is typed by hand: rerun this script after
committing a new result file. The analysis of the figures (why a target is missed) is
prose in ``benchmarks/results/<name>.notes.md``, appended to the page when present.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from xml.etree import ElementTree

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from lazyattention.plot_style import PAGE_WIDTH, color, legend_below, page_style

ROOT = Path(__file__).resolve().parent.parent
PREFILL = ("lazy", "norot", "materialise", "sdpa_flash", "flashinfer")
DECODE = ("lazy", "norot", "materialise", "flashinfer", "flashinfer_tc")
LABELS = {
    "lazy": "lazy (ours)",
    "norot": "same kernel, no rotation",
    "materialise": "materialise: copy + re-rotate, then our kernel",
    "sdpa_flash": "SDPA flash, pre-rotated keys",
    "flashinfer": "FlashInfer, RoPE in kernel (contiguous documents)",
    "flashinfer_tc": "FlashInfer tensor-core decode (contiguous documents)",
}


def plot(result: dict, path: Path) -> None:
    """Prefill throughput above decode bandwidth, one line per provider, sized for the docs
    page (``lazyattention.plot_style``): one legend under both panels, covering no line."""
    with plt.rc_context(page_style()):
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(PAGE_WIDTH, 8.6), layout="constrained")
        rows = result["prefill"]
        labels = [f"B{r['batch']} Tq{r['Tq']}\n{r['segments']}x{r['segment']}" for r in rows]
        for name in PREFILL:
            ys = [r["tflops"].get(name) for r in rows]
            if any(ys):
                ys = [y if y else float("nan") for y in ys]
                ax1.plot(range(len(rows)), ys, marker="o", label=LABELS[name], color=color(name))
        ax1.set_xticks(range(len(rows)), labels, fontsize=7)
        ax1.set_ylabel("TFLOP/s")
        ax1.set_ylim(bottom=0)
        ax1.set_title(f"Prefill: bf16, {result['heads']}/{result['kv_heads']} heads, D={result['head_dim']}")
        copy_bw = result["ceilings"]["copy_tb_per_s"]
        rows = result["decode"]
        labels = [f"B{r['batch']}\n{r['Tk'] // 1024}k\nL{r['segment']}" for r in rows]
        for name in DECODE:
            ys = [r["tb_per_s"].get(name) for r in rows]
            if any(ys):
                ys = [y / copy_bw if y else float("nan") for y in ys]
                style = "--" if name.endswith("_tc") else "-"  # FlashInfer's two decodes share a colour
                ax2.plot(range(len(rows)), ys, style, marker="o", label=LABELS[name], color=color(name))
        ax2.axhline(0.90, color="gray", linestyle=":", linewidth=1, label="target: 90% of copy bandwidth")
        ax2.set_xticks(range(len(rows)), labels, fontsize=6)
        ax2.set_ylabel(f"fraction of copy bandwidth\n({copy_bw:.2f} TB/s)")
        ax2.set_ylim(0, 1.1)
        ax2.set_title(f"Decode: bf16, D={result['head_dim']}, one query per request")
        legend_below(fig, (ax1, ax2))
        fig.suptitle(f"{result['environment']['device']}, {result['environment']['date'][:10]}")
        fig.savefig(path)


def _cell(value, fmt, parity) -> str:
    if value is None:
        return "n/a"
    return format(value, fmt) + (" (parity FAIL)" if parity is False else "")


def _ratio(row: dict, *fis: str) -> str:
    base = [row["ms"][n] for n in fis if row["parity"].get(n) is True and row["ms"].get(n)]
    lazy = row["ms"].get("lazy") if row["parity"].get("lazy") is True else None
    return f"{lazy / min(base):.2f}" if lazy and base else "n/a"


def _table_row(r: dict, size: str, providers, rate: str, rate_format: str, peers) -> str:
    """One shape's row: batch, size, document length, splits, then each provider's
    microseconds (its rate), then lazy's time over the fastest of ``peers``."""
    cells = [
        "n/a"
        if r["ms"].get(n) is None
        else _cell(r["ms"][n] * 1e3, ".1f", r["parity"].get(n)) + f" ({r[rate][n]:{rate_format}})"
        for n in providers
    ]
    head = f"| {r['batch']} | {r[size]} | {r['segment']} | {r['splits']} | "
    return head + " | ".join(cells) + f" | {_ratio(r, *peers)} |"


#: A target stated as "..., as <expression> <= <bound>" (the form the benchmark checks),
#: and how to show its worst value in the target's own units.
_CHECKED_AS = re.compile(r",\s*as (?P<form>.+)$")
_TB_PER_S = re.compile(r"(?P<floor>[0-9.]+) - TB/s <= 0")


def target_cells(target: dict) -> tuple[str, str]:
    """A target's text and its worst measured value, both in the target's own terms:
    a bandwidth fraction as a percentage of the copy bandwidth, TB/s as TB/s, an
    overhead as a percentage, a time ratio as a ratio. A form this page does not know
    raises, naming it."""
    text, worst = target["target"], target["worst"]
    found = _CHECKED_AS.search(text)
    if found:
        text, form = text[: found.start()], found.group("form")
    else:
        form = None
    if worst is None:
        return text, "n/a"
    if form is None:
        return text, f"{worst:.1%}" if "overhead" in text else f"{worst:.2f}"
    if form.startswith("1 - fraction"):
        return text, f"{1 - worst:.1%} of copy bandwidth"
    tb = _TB_PER_S.match(form)
    if tb:
        return text, f"{float(tb.group('floor')) - worst:.2f} TB/s"
    raise ValueError(f"target {target['target']!r}: no way to show a value checked as {form!r}")


def page(result: dict, name: str, png: str, notes: str | None) -> str:
    env, ceil = result["environment"], result["ceilings"]
    fi = env.get("flashinfer")
    lines = [
        "# Kernels",
        "",
        f"<!-- Generated by benchmarks/plot_kernels.py from benchmarks/results/{name}.json; do not edit by hand. -->",
        "",
        f"Measured by `benchmarks/kernels.py` (through `scripts/gpu_suite.sh`) on **{env['device']}** "
        f"({env['sms']} SMs), torch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}, "
        f"FlashInfer {fi or 'not installed'}, {env['date']}. "
        f"Measured ceilings on that device: copy bandwidth **{ceil['copy_tb_per_s']:.2f} TB/s** "
        f"(bytes read + written), bf16 matrix product **{ceil['bf16_matmul_tflops']:.0f} TFLOP/s**. "
        f"Clocks and driver as `nvidia-smi` read them at the start: `{env['nvidia_smi'].splitlines()[-1]}`.",
        "",
        "Every time is the median of many replays of a CUDA graph after warm-up "
        "(`triton.testing.do_bench_cudagraph`): device time, without the host's launch overhead. "
        f"bf16, {result['heads']} query heads over {result['kv_heads']} KV heads, head dim {result['head_dim']}, "
        f"block size (and FlashInfer page size) {result['block_size']}, RoPE base {result['rope_base']:.0f}. "
        "Before timing, every provider's output for the first requests is compared with attention computed "
        "in float64 from the same numbers, the keys rotated in float64 at the positions that provider's "
        f"function defines: max |diff| ≤ {result['parity_tolerance']}. A provider that fails shows "
        "*parity FAIL* and counts for no target.",
        "",
        "**FlashInfer runs its best case.** It rotates keys inside the kernel at positions `0 .. n − 1` of "
        "each paged sequence, so it reads unrotated keys in logical order and cannot place a cached "
        "document at another offset without rewriting its keys. Here every document sits where FlashInfer "
        "expects it; the lazy kernels read the same documents stored at position 0 and shifted.",
        "",
        *(
            [
                f"The fast-path tests ran compiled on the same device type, at realistic shapes "
                f"(`{result['gpu_tests']['command']}`): **{result['gpu_tests']['result']}**.",
                "",
            ]
            if result.get("gpu_tests")
            else []
        ),
        "## Targets",
        "",
        "| target | verdict | worst measured | where |",
        "|---|---|---|---|",
    ]
    for t in result["targets"]:
        text, worst = target_cells(t)
        lines.append(f"| {text} | {'PASS' if t['pass'] else '**MISS**'} | {worst} | {t['where']} |")
    lines += [
        "",
        "Each target holds at every shape it names, so the table gives the worst shape. Rotation overhead "
        "is `time(lazy) / time(no rotation) − 1`; the FlashInfer, SDPA and materialise rows are time ratios "
        "(lazy over the baseline: below 1 means lazy is faster). The cause of each miss is below the tables.",
        "",
        f"![Prefill throughput and decode bandwidth](results/{png})",
        "",
        "## Prefill",
        "",
        "`B` requests, each with `Tq` own query tokens after 8 documents of `L` tokens (stored at 0, "
        "placed back to back, so every document has its own shift). `P` is the number of key splits the "
        "plan chose. FLOPs = `4 · H · D · Σ (Tq · Tseg + Tq (Tq + 1) / 2)`. Microseconds (TFLOP/s):",
        "",
        "| B | Tq | L | P | " + " | ".join(PREFILL) + " | lazy ÷ FlashInfer |",
        "|---|---|---|---|" + "---|" * (len(PREFILL) + 1),
    ]
    lines += [_table_row(r, "Tq", PREFILL, "tflops", ".0f", ("flashinfer",)) for r in result["prefill"]]
    lines += [
        "",
        "## Decode",
        "",
        "One query per request; documents of `L` tokens placed back to back, then 64 own tokens; every "
        "request reads its own blocks. `P` is the number of key splits. Bytes = `2 · B · Tk · Hkv · D · 2` "
        "(keys and values read once) plus q and out. Microseconds (TB/s):",
        "",
        "| B | Tk | L | P | " + " | ".join(DECODE) + " | lazy ÷ FlashInfer (faster) |",
        "|---|---|---|---|" + "---|" * (len(DECODE) + 1),
    ]
    lines += [_table_row(r, "Tk", DECODE, "tb_per_s", ".2f", ("flashinfer", "flashinfer_tc")) for r in result["decode"]]
    if notes:
        lines += ["", notes.strip()]
    lines.append("")
    return "\n".join(lines)


def gpu_tests(junits: list[Path], command: str) -> dict:
    """``{"command", "result"}`` of a compiled test run, read off its JUnit XML files (one
    per call, when the run took more than one): ``"N passed, M failed in T s"`` (errors
    count as failed, skipped tests are named)."""
    count = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    seconds = 0.0
    for junit in junits:
        suite = ElementTree.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        for k in count:
            count[k] += int(suite.get(k, 0))
        seconds += float(suite.get("time", 0))
    failed = count["failures"] + count["errors"]
    result = f"{count['tests'] - failed - count['skipped']} passed, {failed} failed"
    if count["skipped"]:
        result += f", {count['skipped']} skipped"
    calls = f", in {len(junits)} calls" if len(junits) > 1 else ""
    return {"command": command, "result": f"{result} in {seconds:.0f} s{calls}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("result", type=Path, help="benchmarks/results/<name>.json")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "benchmarks" / "kernels.md")
    parser.add_argument("--gpu-tests", type=Path, nargs="+", metavar="JUNIT",
                        help="record the compiled tests' JUnit XML files (same device type) in the result")  # fmt: skip
    parser.add_argument("--gpu-tests-command", help="how those tests ran",
                        default="LAZYATTN_GPU_SUITE=1 python -m pytest tests/fast -n 16 (scripts/gpu_suite.sh), "
                        "compiled kernels, realistic shapes")  # fmt: skip
    args = parser.parse_args()
    result = json.loads(args.result.read_text())
    if args.gpu_tests:
        result["gpu_tests"] = gpu_tests(args.gpu_tests, args.gpu_tests_command)
        args.result.write_text(json.dumps(result, indent=1) + "\n")
    png = args.result.with_suffix(".png")
    plot(result, png)
    notes_path = args.result.with_suffix(".notes.md")
    notes = notes_path.read_text() if notes_path.exists() else None
    args.page.write_text(page(result, args.result.stem, png.name, notes))
    print(f"wrote {png} and {args.page}")


if __name__ == "__main__":
    main()
