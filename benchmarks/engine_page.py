"""Turn a committed engine benchmark result into its docs page.

Run: ``python benchmarks/engine_page.py benchmarks/results/engine_h100_heavy.json``.

Writes ``docs/benchmarks/engine.md``: setup, parity gate, every target with its
verdict (the median and the value in every run), the GPU time of the runs, the plot
written by ``benchmarks/engine.py``, the tables of medians with their spread
(min–max), the cache hit ratio against the KV budget of the result's preset
(``engine_<preset>_hit_ratio.json`` beside the result, from ``engine.py --hit-ratio``,
with the paper's row, and its plot) and the quality check. No figure on the page is
typed by hand: rerun this script after committing a new result file
(``tests/test_benchmark_pages.py`` fails when the page and the result disagree). The reading of the figures is prose in
``benchmarks/results/<name>.notes.md``, appended to the page when present.

A result written before the benchmark profiled its runs (``engine_h100.json``) has its
medians under ``medians`` and no GPU time, decode or many-request sections; it renders
with those cells and sections left out. Runs under Poisson arrivals stay in the result
file, not on the page: each run captures its CUDA graphs inside the timed region (the
notes say so), so their table is no curve to read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "benchmarks" / "engine.md"


def _ms(row: dict, key: str, spread: bool = True) -> str:
    text = f"{row[key] * 1e3:.0f}" if row[key] * 1e3 >= 10 else f"{row[key] * 1e3:.2f}"
    if spread and f"{key}_min" in row:
        text += f" ({row[f'{key}_min'] * 1e3:.0f}–{row[f'{key}_max'] * 1e3:.0f})"
    return text


def _rate(row: dict) -> str:
    text = f"{row['requests_per_s']:.2f}"
    if "requests_per_s_min" in row:
        text += f" ({row['requests_per_s_min']:.2f}–{row['requests_per_s_max']:.2f})"
    return text


def _busy(row: dict) -> str:
    if row.get("gpu_busy_fraction") is None:
        return "—"
    text = f"{row['gpu_busy_fraction']:.2f}"
    if "gpu_busy_fraction_min" in row:
        text += f" ({row['gpu_busy_fraction_min']:.2f}–{row['gpu_busy_fraction_max']:.2f})"
    return text


HEAD = [
    "strategy",
    "blocks",
    "TTFT p50 ms (min–max)",
    "TTFT p99 ms",
    "TPOT ms",
    "requests/s (min–max)",
    "tokens/s",
    "hit ratio",
    "GB copied",
    "GPU busy (min–max)",
    "graph steps / steps",
    "runs",
]


def _host(row: dict) -> str:
    """The host's shares of the wall time: working in the engine's steps / blocked on the device."""
    if row.get("host_fraction") is None:
        return "—"
    return f"{row['host_fraction']:.2f} / {row['wait_fraction']:.2f}"


def _row(r: dict, host: bool) -> str:
    cells = [
        r["strategy"],
        str(r["num_blocks"]),
        _ms(r, "ttft_p50"),
        _ms(r, "ttft_p99", spread=False),
        f"{r['tpot_mean'] * 1e3:.2f}",
        _rate(r),
        f"{r['tokens_per_s']:,.0f}",
        f"{r['hit_ratio']:.2f}",
        f"{r['bytes_copied'] / 1e9:.2f}",
        _busy(r),
        *([_host(r)] if host else []),
        f"{r['graph_steps']} / {r['steps']}" if "steps" in r else "—",
        str(r["repeats"]),
    ]
    return "| " + " | ".join(cells) + " |"


def _table(rows: list[dict]) -> list[str]:
    """The rows' table; the host's shares (``host_fraction``, ``wait_fraction``) in a
    column after GPU busy where the result recorded them."""
    host = any(r.get("host_fraction") is not None for r in rows)
    at = HEAD.index("GPU busy (min–max)") + 1
    head = HEAD[:at] + (["host works / waits"] if host else []) + HEAD[at:]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + [_row(r, host) for r in rows]


PLOT_CAPTION = "Offline burst medians with their spread (the request-rate panels are read in the notes below)"
LEGACY_CAPTION = "TTFT and throughput vs skew and vs KV budget"


def _hit_ratio_section(table: dict, plot: str | None) -> list[str]:
    """The hit ratio against the KV budget (``engine.py --hit-ratio``), the paper's row
    beside it, and its plot (a file name under ``results/``) when there is one."""
    strategies = list(dict.fromkeys(r["strategy"] for r in table["rows"]))
    cells: dict[tuple, dict] = {}
    for r in table["rows"]:
        key = (r["alpha"], r["budget_gib"], r["num_blocks"], r["pool_fraction"])
        cells.setdefault(key, {})[r["strategy"]] = f"{r['hit_ratio']:.1%}" if r["fits"] else "no fit"
    paper, alphas = table["paper"], " and ".join(f"{a:g}" for a in table["workload"]["zipf_alpha"])
    lines = [
        "## Cache hit ratio against the KV budget",
        "",
        f"The same workload at skews {alphas}, at most {table['engine']['max_num_seqs']} running (counting: "
        f"{table['counting']}). No forward pass runs: an offline burst is scheduled the same whatever its steps "
        "cost, so these are the real runs' ratios. The budget is in GiB of this model's "
        f"{table['dtype']} K/V; *no fit*: a request of the workload does not fit it alone. "
        f"`python benchmarks/engine.py --hit-ratio --preset {table['preset']} --name engine` writes the table.",
        "",
        *([f"![The hit ratio against the KV budget, one panel per skew](results/{plot})", ""] if plot else []),
        "| α | budget GiB | blocks | × the document pool | " + " | ".join(strategies) + " |",
        "|---" * (4 + len(strategies)) + "|",
    ]
    for (alpha, gib, blocks, fraction), row in cells.items():
        lines.append(
            f"| {alpha:g} | {gib:g} | {blocks} | {fraction:.2f} | " + " | ".join(row[s] for s in strategies) + " |"
        )
    lines += [
        f"| paper, {paper['alpha']:g} | {paper['budget_gib']:g} GB | — | — | "
        + " | ".join(f"{paper[s]:.2%}" for s in strategies)
        + " |",
        "",
        f"The paper's row is its own model and workload (CacheBlend {paper['cacheblend']:.2%} at the same "
        "point): the order of the strategies compares with ours, the values do not.",
        "",
    ]
    return lines


def page(
    result: dict, name: str, notes: str | None, hit_ratio: dict | None = None, hit_ratio_plot: str | None = None
) -> str:
    """The Markdown of the engine benchmark page for ``result`` (``<name>.json``), with
    the hit-ratio table of its preset (and its plot) when there is one."""
    wl, eng, versions = result["workload"], result["engine"], result["versions"]
    graphs = "on (decode-only steps replayed per batch and block-count bucket)" if eng.get("cuda_graphs") else "off"
    burst = result.get("burst_medians", result.get("medians", []))
    profiled = any(r.get("gpu_busy_fraction") is not None for r in burst)
    repeats = result.get("repeats") or max((r.get("repeats", 1) for r in burst), default=1)
    lines = [
        "# Serving engine",
        "",
        f"<!-- Generated by benchmarks/engine_page.py from benchmarks/results/{name}.json; do not edit by hand. -->",
        "",
        "The paper's system claim: under skewed document popularity, LazyAttention lowers",
        "time-to-first-token **1.37×** and raises throughput **1.40×** over Block-Attention. This",
        "page measures it in this project's engine, every strategy served by the same code",
        "(`lazyattention.serving.engine.Engine`), written by `benchmarks/engine.py`.",
        *(
            [
                "Each run is profiled, so the page also says how much of its wall time the GPU was busy: an",
                "end-to-end ratio says something about the strategies only as far as that fraction is high.",
            ]
            if profiled
            else [
                "These runs were not profiled: how much of their wall time was the GPU's, and how much the",
                "host loop's, is not measured here.",
            ]
        ),
        "",
        f"* **Device**: {result['device']}; torch {versions.get('torch')}, Triton {versions.get('triton')}; "
        f"backend `{result['environment']['backend']}`; {result['date']}.",
        f"* **Model**: `{result['model']}` shape, random {result['dtype']} weights (the shapes set the cost, "
        "the weights do not).",
        f"* **Workload**: {wl['num_documents']} documents of mean length {wl['doc_len_mean']} tokens; "
        f"{wl['num_requests']} requests of {wl['docs_per_request']} documents each, drawn by Zipf popularity "
        f"in random order, a {wl['query_len']}-token query, {wl['output_len']} generated tokens; seed {wl['seed']}. "
        "Offline burst (every request at t = 0) unless a rate is given.",
        f"* **Engine**: blocks of {eng['block_size']} tokens, at most {eng['max_num_seqs']} running requests, "
        f"{eng['max_batch_tokens']} tokens per step; CUDA graphs {graphs}. Every strategy serves a whole "
        "workload once, untimed, before any timing.",
        *(
            [
                "* **GPU time**: every run under `torch.profiler` (CUDA activity only); GPU busy = the union of "
                "the device's kernel and copy intervals, `gpu_busy_fraction` = GPU busy / wall time (the makespan)."
            ]
            if profiled
            else []
        ),
        *(
            [
                "* **Host time**: *host works* is the share of the wall time the host spent in the engine's "
                "steps (scheduling, building and issuing them, taking tokens in), *host waits* the share it "
                "was blocked on the device's tokens; GPU idle time with little waiting is the host's."
            ]
            if any(r.get("host_fraction") is not None for r in burst)
            else []
        ),
        f"* **Repeats**: {repeats} runs of each strategy per point; medians, with the spread (min–max) beside "
        "them where recorded and every run's value in the targets.",
        "",
        "## Parity gate",
        "",
        "Before any timing, a tiny model with the benchmark's head dim and RoPE serves the same requests "
        f"under every strategy with this backend{' (CUDA graphs included)' if eng.get('cuda_graphs') else ''} "
        "and with the reference; the "
        "first-token logits must pass the tolerance rule (oracle: the reference in float64).",
        "",
    ]
    rows = result["parity"].get("rows", [])
    if rows:
        lines += [
            "| strategy | dtype | max error | bound | greedy tokens equal | verdict |",
            "|---|---|---|---|---|---|",
        ]
    else:
        lines.append(f"*No gate: {result['parity'].get('note', 'no parity rows recorded')}.*")
    for row in rows:
        lines.append(
            f"| {row['strategy']} | {row['dtype']} | {row['error']:.1e} | {row['bound']:.1e} | "
            f"{'yes' if row['tokens_equal'] else 'no'} | {'pass' if row['passed'] else '**FAIL**'} |"
        )
    lines += [
        "",
        "## Targets",
        "",
        "A ratio target is summarised by the median over the runs of each run's ratio (the runs of the two "
        "strategies paired by repeat); the home page reports the same statistic.",
        "",
        "| target | median over the runs | each run | mark |",
        "|---|---|---|---|",
    ]
    for t in result["targets"]:
        each = ", ".join(f"{v:.2f}" for v in t.get("per_repeat", []))
        mark = f"**{t['mark']}**" if "MISS" in t["mark"] else t["mark"]
        lines.append(f"| {t['target']} | **{t['value']:.2f}** | {each} | {mark} |")
    decode = result.get("decode")
    if decode:
        replay = (
            f" One captured decode step of bucket (batch, blocks) = ({decode['graph_bucket'][0]}, "
            f"{decode['graph_bucket'][1]}), replayed alone between CUDA events: **{decode['replay_s'] * 1e3:.3f} ms** "
            "of GPU time."
            if "replay_s" in decode
            else ""
        )
        lines += [
            "",
            f"**Decode at batch {decode['batch']}.** {decode['batch']} requests prefilled together, then "
            f"{decode['steps']} decode-only steps, each timed on the wall clock: TPOT median "
            f"**{decode['tpot_median'] * 1e3:.3f} ms** (min {decode['tpot_min'] * 1e3:.3f}, "
            f"max {decode['tpot_max'] * 1e3:.3f}).{replay}",
        ]
    lines += [
        "",
        f"![{PLOT_CAPTION if profiled else LEGACY_CAPTION}](results/{name}.png)",
        "",
        "## Offline burst",
        "",
        "Tokens/s counts each request's document tokens once; the hit ratio counts each document of a request "
        "once; GB copied is Block-Attention's re-encoding (K and V, all layers). *Graph steps* are the decode "
        "steps replayed from a CUDA graph.",
        "",
    ]
    for sweep, alpha, fraction in dict.fromkeys((r["sweep"], r["alpha"], r["budget_fraction"]) for r in burst):
        chosen = [r for r in burst if (r["sweep"], r["alpha"], r["budget_fraction"]) == (sweep, alpha, fraction)]
        title = f"{sweep} sweep: skew α = {alpha:g}, KV budget {fraction:g}× the document pool"
        lines += [f"**{title[0].upper() + title[1:]}:**", "", *_table(chosen), ""]
    if result.get("many_medians"):
        n = result["many"][0]["requests"]
        lines += [
            "## Many requests",
            "",
            f"An offline burst of {n} requests (skew 1, KV budget 1× the document pool).",
            "",
            *_table(result["many_medians"]),
            "",
        ]
    if hit_ratio is not None:
        lines += _hit_ratio_section(hit_ratio, hit_ratio_plot)
    lines += ["## Quality on the benchmark model", ""]
    if result["quality"]:
        lines += [
            "`quality_check` on four requests of the α = 1 workload, each served alone after its documents were "
            "cached at other offsets: the largest first-token logit difference and the greedy-token agreement.",
            "",
            "| dtype | lazy vs block_attention | agreement | lazy vs full attention | agreement |",
            "|---|---|---|---|---|",
        ]
        for q in result["quality"]:
            lines.append(
                f"| {q['dtype']} | {q['lazy_vs_block_logits']:.2g} | {q['lazy_vs_block_agreement']:.2f} | "
                f"{q['lazy_vs_full_logits']:.3g} | {q['lazy_vs_full_agreement']:.2f} |"
            )
    else:
        lines.append(
            "Not run for this result (`--skip-quality`): the benchmark's model has random weights, so this "
            "check only compares the strategies' logits. What reuse does to a real model's answers is on the "
            "[quality page](../concepts/quality.md)."
        )
    if notes:
        lines += ["", notes.strip()]
    lines.append("")
    return "\n".join(lines)


def hit_ratio_path(result_path: Path, preset: str | None) -> Path:
    """Where the hit-ratio table of a result's preset lies: ``engine_hit_ratio.json``
    for the default preset, ``engine_<preset>_hit_ratio.json`` otherwise, beside it."""
    stem = "engine" if preset in (None, "default") else f"engine_{preset}"
    return result_path.parent / f"{stem}_hit_ratio.json"


def render(result_path: Path) -> str:
    """The page for a result file, with its ``.notes.md`` and its preset's hit-ratio
    table when present."""
    notes_path = result_path.with_suffix(".notes.md")
    notes = notes_path.read_text() if notes_path.exists() else None
    result = json.loads(result_path.read_text())
    table_path = hit_ratio_path(result_path, result.get("preset"))
    table = json.loads(table_path.read_text()) if table_path.exists() else None
    plot = table_path.with_suffix(".png")
    return page(result, result_path.stem, notes, table, plot.name if plot.exists() else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("result", type=Path, help="benchmarks/results/<name>.json")
    parser.add_argument("--page", type=Path, default=PAGE)
    args = parser.parse_args()
    args.page.write_text(render(args.result))
    print(f"wrote {args.page}")


if __name__ == "__main__":
    main()
