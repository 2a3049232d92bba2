"""Tables and plots read from the committed result files, ``benchmarks/results/*.json``.

A result file's *kind* is the part of its name before the first underscore
(``kernels_h200.json`` is a ``kernels`` result). Of the GPU results of one kind only the
newest is current: an older one is an earlier run, made with other kernels or engine
code. It stays in the repository and is listed as such, but no table or plot shows it.
A CPU result, or one that names no device, is current beside a GPU one: they measure
different things.

Convention for a result file: its ``device`` and ``date`` at the top level or one level
down (``environment``); a top-level ``headline`` list (items ``name``, ``value``,
``unit``, optionally ``target`` and ``pass``) or else a ``targets`` list (items
``target``, ``pass`` and the measured ``value`` or ``worst``).
"""

from __future__ import annotations

import json
import logging
import statistics

from . import ROOT

log = logging.getLogger("mkdocs.hooks.lazyattention")

RESULTS = ROOT / "benchmarks" / "results"

#: The benchmark pages, for the overview: (file under docs/benchmarks/, title, what it measures).
BENCHMARK_PAGES = (
    (
        "kernels.md",
        "Kernels",
        "the lazy prefill and decode kernels beside the same kernels without rotation, FlashInfer, "
        "PyTorch SDPA and the copy-and-re-rotate (Block-Attention) path, with the targets each has to meet.",
    ),
    (
        "engine.md",
        "Serving engine",
        "the document workload under every reuse strategy: TTFT, throughput, hit ratio and KV memory "
        "against popularity skew.",
    ),
    (
        "shared-decode.md",
        "Shared-segment decode",
        "documents read by many requests of one decode batch, read once for all of them at their own "
        "offsets, against the per-request decode.",
    ),
)

#: How the engine's lazy-against-Block-Attention ratios are summarised, everywhere they appear.
RATIO_STATISTIC = (
    "the median over the runs of each run's ratio (Block-Attention's TTFT p50 over lazy's; lazy's "
    "requests/s over Block-Attention's), the statistic the engine page's targets use"
)


# --------------------------------------------------------------------------- reading the files


def load_results() -> list[tuple[str, dict]]:
    """Every committed ``benchmarks/results/*.json`` as ``(name, data)``, sorted by name."""
    out = []
    for path in sorted(RESULTS.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            log.warning("benchmarks/results/%s is not valid JSON: %s", path.name, exc)
            continue
        out.append((path.name, data if isinstance(data, dict) else {"data": data}))
    return out


def _find(data: dict, *keys: str):
    """The first of ``keys`` found at the top level or one level down (``environment``…)."""
    for key in keys:
        if key in data:
            return data[key]
    for value in data.values():
        if isinstance(value, dict):
            for key in keys:
                if key in value:
                    return value[key]
    return None


def describe_device(data: dict) -> str:
    device = _find(data, "device", "gpu", "device_name")
    if isinstance(device, dict):
        device = device.get("name") or device.get("device") or json.dumps(device, sort_keys=True)
    return str(device) if device else "device not recorded"


def date(data: dict) -> str:
    value = _find(data, "date", "timestamp", "time", "created")
    return str(value) if value else "date not recorded"


def kind(name: str) -> str:
    """The kind of a result file: ``kernels_h200.json`` is a ``kernels`` result."""
    return name.split("_", 1)[0].removesuffix(".json")


def _on_gpu(data: dict) -> bool:
    """Whether a result names the GPU it ran on (a CPU run, or one naming no device, does not)."""
    device = _find(data, "device", "gpu", "device_name")
    return bool(device) and not describe_device(data).upper().startswith("CPU")


def superseded_by(name: str, data: dict, results: list[tuple[str, dict]]) -> str | None:
    """The newer GPU result of the same kind that replaces a GPU result, or None if current."""
    if not _on_gpu(data):
        return None
    newer = [
        (date(d), n)
        for n, d in results
        if n != name and kind(n) == kind(name) and _on_gpu(d) and (date(d), n) > (date(data), name)
    ]
    return max(newer)[1] if newer else None


def current_results() -> list[tuple[str, dict]]:
    """The result files no newer run replaces."""
    results = load_results()
    return [(n, d) for n, d in results if superseded_by(n, d, results) is None]


def newest(kind_name: str) -> tuple[str, dict]:
    """The current GPU result of a kind (a missing one is a warning: the strict build fails)."""
    found = [(n, d) for n, d in current_results() if kind(n) == kind_name and _on_gpu(d)]
    if not found:
        log.warning("no GPU result of kind %r under benchmarks/results/", kind_name)
        return f"{kind_name}.json", {}
    return max(found, key=lambda item: (date(item[1]), item[0]))


def source_line(name: str, data: dict) -> str:
    return f"Measured on **{describe_device(data)}**, {date(data)[:10]} (`benchmarks/results/{name}`)."


def fmt(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


# --------------------------------------------------------------------------- the benchmarks overview


def headline_items(name: str, data: dict) -> list[dict]:
    """A result file's headline figures: its ``headline`` list, else its ``targets``."""
    items = []
    if data.get("headline"):
        for item in data["headline"]:
            if not isinstance(item, dict) or "name" not in item or "value" not in item:
                log.warning("benchmarks/results/%s: a headline item needs 'name' and 'value': %r", name, item)
                continue
            items.append(item)
        return items
    for item in data.get("targets") or []:
        if not isinstance(item, dict) or "target" not in item or "pass" not in item:
            log.warning("benchmarks/results/%s: a target needs 'target' and 'pass': %r", name, item)
            continue
        value = item.get("value", item.get("worst"))
        where = f" (worst at {item['where']})" if item.get("where") else ""
        items.append({"name": f"{item['target']}{where}", "value": "n/a" if value is None else value,
                      "pass": item["pass"]})  # fmt: skip
    return items


def headline_table() -> str:
    """The headline figures of every current result file, one table per file."""
    blocks = []
    for name, data in current_results():
        rows = []
        for item in headline_items(name, data):
            target = item.get("target", "")
            verdict = {True: "PASS", False: "**MISS**"}.get(item.get("pass"), "")
            measured = f"{fmt(item['value'])} {item.get('unit', '')}".strip()
            rows.append(f"| {item['name']} | {measured} | {f'{target} ' if target else ''}{verdict} |")
        if rows:
            blocks.append(
                f"From `benchmarks/results/{name}`, measured on **{describe_device(data)}**, {date(data)}:\n\n"
                "| figure | measured | verdict |\n|---|---|---|\n" + "\n".join(rows)
            )
    if not blocks:
        log.warning("no committed result file under benchmarks/results/ carries headline figures")
    return "\n\n".join(blocks)


def results_table() -> str:
    """One row per committed result file: device, date, versions, and whether it is current."""
    results = load_results()
    if not results:
        log.warning("no result file is committed under benchmarks/results/")
    rows = []
    for name, data in results:
        versions = _find(data, "versions", "torch", "software")
        if isinstance(versions, dict):
            versions = ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
        newer = superseded_by(name, data, results)
        status = f"earlier run, other kernels and engine code; replaced by `{newer}`" if newer else "current"
        rows.append(f"| `{name}` | {describe_device(data)} | {date(data)[:10]} | {versions or 'not recorded'} | "
                    f"{status} |")  # fmt: skip
    head = "| file | device | date | versions | status |\n|---|---|---|---|---|"
    return head + "\n" + "\n".join(rows)


def plots_markdown() -> str:
    """The plot of every current result file that has one."""
    plots = [RESULTS / f"{name.removesuffix('.json')}.png" for name, _ in current_results()]
    return "\n\n".join(f"![{p.stem}](results/{p.name})\n\n`benchmarks/results/{p.name}`" for p in plots if p.exists())


def benchmark_pages() -> str:
    return "\n".join(f"* [{title}]({name}): {what}" for name, title, what in BENCHMARK_PAGES)


# --------------------------------------------------------------------------- the home page: kernels


def _best_bold(values: list[float | None], fmt_spec: str) -> list[str]:
    best = max((v for v in values if v is not None), default=None)
    cells = []
    for v in values:
        text = "—" if v is None else format(v, fmt_spec)
        cells.append(f"**{text}**" if v is not None and v == best else text)
    return cells


def _provider(rows: list[dict], field: str, *candidates: str) -> str | None:
    """The first provider among ``candidates`` (a name, or ``~part`` for any name holding
    ``part``) that some row measured in ``field``."""
    names = {n for r in rows for n, v in (r.get(field) or {}).items() if v}
    for cand in candidates:
        match = sorted(n for n in names if (cand[1:] in n if cand.startswith("~") else n == cand))
        if match:
            return match[0]
    return None


#: The kernel rows a newcomer can place: (column title, providers to look for).
PREFILL_PEERS = (
    ("lazy (ours)", ("lazy",)),
    ("FlashInfer", ("~flashinfer",)),
    ("SDPA flash, pre-rotated keys", ("sdpa_flash",)),
    ("SDPA cuDNN, pre-rotated keys", ("sdpa_cudnn",)),
    ("materialise: copy + re-rotate first", ("materialise_sdpa", "materialise")),
)
DECODE_PEERS = (
    ("lazy (ours)", ("lazy",)),
    ("FlashInfer", ("flashinfer", "~flashinfer")),
    ("FlashInfer tensor-core decode", ("flashinfer_tc",)),
    ("materialise: copy + re-rotate", ("materialise",)),
)
OFFICIAL_KERNELS = (
    "The official LazyAttention kernels (a patch layer over vLLM 0.9.2: Llama only, NeoX RoPE, "
    "rotation math in bf16) have no published kernel-level throughput that we know of to set in these "
    "tables; the paper reports end-to-end serving figures, which stand beside the engine's below."
)


def _peer_table(rows: list[dict], field: str, peers, key_cols, fmt_spec: str, extra=None):
    """A table of ``field`` per provider, one row per shape; also the peers not measured,
    as ``(title, provider names)``."""
    chosen = [(title, _provider(rows, field, *cands)) for title, cands in peers]
    present = [(title, name) for title, name in chosen if name]
    missing = [(title, cands) for (title, cands), (_, name) in zip(peers, chosen, strict=True) if not name]
    head = [title for title, _ in key_cols] + [title for title, _ in present]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        values = [(r.get(field) or {}).get(name) for _, name in present]
        cells = _best_bold(values, fmt_spec)
        if extra:
            cells = [c if v is None else f"{c} {extra(v)}" for c, v in zip(cells, values, strict=True)]
        lines.append("| " + " | ".join([describe(r) for _, describe in key_cols] + cells) + " |")
    return "\n".join(lines), missing


def _missing_peer(peer: tuple[str, tuple[str, ...]], data: dict, device: str, other: str) -> str:
    """The line for a peer a table could not show: not measured, or measured in another
    form somewhere in the result other than the ``other`` table."""
    title, cands = peer
    rest = json.dumps({k: v for k, v in data.items() if k != other}).lower()
    if any(f'"{c.lstrip("~")}' in rest for c in cands):
        return (
            f"*{title} is in this result in a form this table does not read: see the "
            "[kernels page](benchmarks/kernels.md).*"
        )
    return f"*{title}: not measured on {device}.*"


def peers_kernels() -> str:
    """Lazy against FlashInfer, SDPA on pre-rotated keys and materialise, from the current
    kernel result; a line for every peer it did not measure."""
    name, data = newest("kernels")
    device = describe_device(data)
    parts = [source_line(name, data)]
    prefill = [r for r in data.get("prefill") or [] if r.get("head_dim", 128) == 128 and r.get("tflops")]
    table, missing = _peer_table(
        prefill,
        "tflops",
        PREFILL_PEERS,
        [
            ("requests", lambda r: str(r.get("batch", 1))),
            ("query tokens", lambda r: str(r.get("Tq", "—"))),
            ("keys", lambda r: f"{r.get('Tk', 0) // 1024}k"),
            ("document length", lambda r: str(r.get("segment", "—"))),
        ],
        ".0f",
    )
    parts += [
        f"**Prefill**, TFLOP/s (higher is better; best in bold): {data.get('heads', '?')} query heads over "
        f"{data.get('kv_heads', '?')} KV heads, head dim 128, bf16, new query tokens per request after the "
        "documents were cached once. SDPA and FlashInfer read the documents' keys already rotated where they "
        "sit, contiguous: their best case, since neither can shift a cached document.",
        table,
        *[_missing_peer(m, data, device, "decode") for m in missing],
    ]
    decode = [r for r in data.get("decode") or [] if r.get("Tk", 0) >= 4096 and r.get("tb_per_s")]
    copy_bw = (data.get("ceilings") or {}).get("copy_tb_per_s")
    table, missing = _peer_table(
        decode,
        "tb_per_s",
        DECODE_PEERS,
        [
            ("requests", lambda r: str(r.get("batch", "—"))),
            ("keys", lambda r: f"{r.get('Tk', 0) // 1024}k"),
            ("document length", lambda r: str(r.get("segment", "—"))),
        ],
        ".2f",
        extra=(lambda v: f"({v / copy_bw:.0%})") if copy_bw else None,
    )
    ceiling = f" and, in brackets, the fraction of the device's copy bandwidth ({copy_bw:.2f} TB/s)" if copy_bw else ""
    parts += [f"**Decode**, one query per request: TB/s of keys and values read{ceiling}.", table]
    parts += [_missing_peer(m, data, device, "prefill") for m in missing]
    parts.append(OFFICIAL_KERNELS)
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- the home page: engine

#: The paper's headline (the official implementation, on its own hardware), for the engine table.
PAPER_ENGINE = {"TTFT p50": 1.37, "throughput": 1.40}


def run_ratios(runs: list[dict], alpha: float, budget: float) -> dict[str, list[float]]:
    """Each run's lazy-against-Block-Attention ratios at one workload setting, paired by
    repeat: ``{"ttft": [...], "throughput": [...]}``."""
    by_repeat: dict[int, dict[str, dict]] = {}
    for row in runs:
        if row.get("alpha") == alpha and row.get("budget_fraction") == budget:
            by_repeat.setdefault(row.get("repeat", 0), {})[row.get("strategy")] = row
    ratios: dict[str, list[float]] = {"ttft": [], "throughput": []}
    for pair in by_repeat.values():
        lazy, block = pair.get("lazy"), pair.get("block_attention")
        if lazy and block:
            ratios["ttft"].append(block["ttft_p50"] / lazy["ttft_p50"])
            ratios["throughput"].append(lazy["requests_per_s"] / block["requests_per_s"])
    return ratios


def peers_engine() -> str:
    """The engine's lazy against Block-Attention, per workload setting, beside the paper's figures."""
    name, data = newest("engine")
    runs = data.get("burst") or []
    medians = {(r["alpha"], r["budget_fraction"], r["strategy"]): r for r in data.get("burst_medians") or []}
    settings = dict.fromkeys((r["alpha"], r["budget_fraction"]) for r in runs)
    head = (
        "| workload | runs | TTFT p50: lazy / Block-Attention (medians) | lazy's TTFT lower by | throughput: lazy / "
        "Block-Attention (medians) | lazy's throughput higher by | KV copied by Block-Attention |\n"
        "|---|---|---|---|---|---|---|"
    )
    lines = []
    for alpha, budget in settings:
        ratios = run_ratios(runs, alpha, budget)
        lazy, block = medians.get((alpha, budget, "lazy")), medians.get((alpha, budget, "block_attention"))
        if not ratios["ttft"] or not lazy or not block:
            continue
        skew = "uniform documents (α = 0)" if alpha == 0 else f"skewed documents (Zipf α = {alpha:g})"
        lines.append(
            f"| {skew}, KV budget {budget:.0%} | {len(ratios['ttft'])} | "
            f"{lazy['ttft_p50'] * 1e3:.0f} / {block['ttft_p50'] * 1e3:.0f} ms | "
            f"**{statistics.median(ratios['ttft']):.2f}×** | "
            f"{lazy['requests_per_s']:.1f} / {block['requests_per_s']:.1f} requests/s | "
            f"**{statistics.median(ratios['throughput']):.2f}×** | {block.get('bytes_copied', 0) / 1e9:.2f} GB |"
        )
    if not lines:
        log.warning("benchmarks/results/%s holds no lazy and Block-Attention runs side by side", name)
    lines.append(
        "| the paper: skewed documents, the official implementation on its own hardware | — | — | "
        f"{PAPER_ENGINE['TTFT p50']:.2f}× | — | {PAPER_ENGINE['throughput']:.2f}× | — |"
    )
    workload = data.get("workload") or {}
    what = (
        f"A model of the `{data.get('model', '?')}` shape, {data.get('dtype', '?')}; "
        f"{workload.get('num_requests', '?')} requests of {workload.get('docs_per_request', '?')} documents "
        f"(about {workload.get('doc_len_mean', '?')} tokens each) in random order, all arriving at t = 0. "
        f"The ratios in bold are {RATIO_STATISTIC}."
    )
    return "\n\n".join([source_line(name, data) + " " + what, head + "\n" + "\n".join(lines)])


# --------------------------------------------------------------------------- the home page: quality

#: The quality study the home page summarises: a real checkpoint, on the CPU, every dtype.
QUALITY_STUDY = "quality_cpu.json"
QUALITY_ROWS = (
    ("lazy", "lazy: the query turned by −δ, one shared copy"),
    ("block", "Block-Attention: copy and re-rotate"),
    ("recompute", "re-encode with eager RoPE at the logical positions"),
    ("no_shift", "control: cached keys used as if every document sat at 0"),
    ("full", "full attention: documents see each other (another function)"),
)


def peers_quality() -> str:
    """A short table of the committed CPU quality study: float32 logit error against the
    float64 run at three offsets, and the share of generated tokens reproduced."""
    data = json.loads((RESULTS / QUALITY_STUDY).read_text(encoding="utf-8"))
    rows = [r for r in data["rows"] if r["dtype"] == "float32"]
    offsets = sorted({r["offset"] for r in rows})
    cell = {(r["strategy"], r["offset"]): r for r in rows}
    head = (
        "| strategy | "
        + " | ".join(f"first-token logit error, offset {o:,}" for o in offsets)
        + f" | tokens reproduced, offset {offsets[-1]:,} |\n"
        + "|---|"
        + "---|" * (len(offsets) + 1)
    )
    lines = []
    for strategy, title in QUALITY_ROWS:
        errors = [f"{cell[(strategy, o)]['logit_error_max']:.1e}" for o in offsets]
        lines.append(f"| {title} | " + " | ".join(errors) + f" | {cell[(strategy, offsets[-1])]['agreement']:.2f} |")
    settings = data["settings"]
    flips = next((h for h in data["headline"] if "flips" in h["name"]), None)
    flip_line = (
        f" In bfloat16 and float16, lazy and Block-Attention choose different greedy tokens {flips['value']} "
        f"times {flips['unit']}, each a tie within one rounding step."
        if flips
        else ""
    )
    return "\n\n".join(
        [
            f"Measured on **{describe_device(data)}**, {date(data)[:10]} (`benchmarks/results/{QUALITY_STUDY}`): "
            f"the pretrained **{data['model']}**, float32, {settings['questions']} questions over 3 retrieved "
            f"documents each, {settings['max_new_tokens']} generated tokens, every output against the same "
            "computation in float64.",
            head + "\n" + "\n".join(lines),
            "Lazy and Block-Attention compute one function: their error stays at float32 rounding at every "
            "offset, because both rotate by position differences, while eager RoPE loses digits as positions "
            f"grow.{flip_line}",
            '!!! warning "What this table does not say"\n'
            f"    {settings['questions']} questions on a 135M-parameter model that was not fine-tuned for "
            "documents encoded apart: accuracy on so few questions is noise (0.3–0.4 for lazy, Block-Attention, "
            "re-encoding and full attention alike), "
            "so the table reports agreement with the definition, not task quality. Full attention is a "
            "different function; closing the gap to it is what block fine-tuning is for. The whole study "
            "is on [Quality on a real model](concepts/quality.md).",
        ]
    )


# --------------------------------------------------------------------------- fast on your machine


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _transformers_tables(name: str, data: dict) -> str:
    """The transformers speed result: LazyRAG against full attention (and stock ``generate``)."""
    head = f"`benchmarks/results/{name}`, measured on **{describe_device(data)}**, {date(data)}, {data['dtype']}"
    if "cached" in data:
        backend = data["backend"]
        lines = [
            "| request | tokens in the prompt | lazy, `" + backend + "` | lazy, `reference` | full attention |",
            "|---|---|---|---|---|",
        ]
        for passages, rows in data["cached"].items():
            ref = f"{_median(rows, 'lazy_reference_s'):.2f} s" if "lazy_reference_s" in rows[0] else "—"
            lines.append(
                f"| {passages} passages, all cached, {data['new_tokens']} new tokens | {rows[0]['prompt_tokens']:,} | "
                f"{_median(rows, f'lazy_{backend}_s'):.2f} s | {ref} | {_median(rows, 'full_s'):.2f} s |"
            )
        fp = data["first_prefill"]
        lines.append(
            f"| a {fp[0]['words']:,}-word document seen for the first time, 1 new token "
            f"| {fp[0]['prefilled_tokens']:,} | {_median(fp, 'lazy_s'):.2f} s | — | {_median(fp, 'full_s'):.2f} s |"
        )
        return head + f" (the median of {data['repeats']} runs):\n\n" + "\n".join(lines)
    lines = ["| measure | lazy | stock transformers |", "|---|---|---|"]
    latency = data["decode_latency_s"]
    stock = ", ".join(
        f"{k.removeprefix('generate_')}: {v * 1e3:.2f} ms" for k, v in latency.items() if not k.startswith("lazy")
    )
    eager = f" (eager steps: {latency['lazy_eager'] * 1e3:.2f} ms)" if "lazy_eager" in latency else ""
    lines.append(f"| decode, per token, batch 1 | {latency['lazy'] * 1e3:.2f} ms{eager} | {stock} |")
    for model, rates in (
        ("SmolLM2", data["batch_tokens_per_s"]),
        ("Llama-3.2-1B shape", data["llama1b"]["batch_tokens_per_s"]),
    ):
        lines.append(f"| {model}, tokens/s at batch 1 → 16 | {rates['1']:.0f} → {rates['16']:.0f} | — |")
    ttft = data["ttft_s"]
    lines.append(
        f"| time to first token, 8 cached documents ({data['ttft_prompt_tokens']:,} tokens) | "
        f"{ttft['lazy'] * 1e3:.1f} ms | {ttft['generate'] * 1e3:.1f} ms |"
    )
    return head + ":\n\n" + "\n".join(lines)


def _vllm_table(name: str, data: dict) -> str:
    w = data["workload"]
    lines = ["| server | requests/s | p50 latency | decode, one stream |", "|---|---|---|---|"]
    for server, title in (
        ("stock", "stock vLLM, prefix caching, documents in the prompt"),
        ("plugin", "the plugin, documents named"),
    ):
        r = data[server]
        lines.append(
            f"| {title} | {r['requests_per_s']:.2f} | {r['p50_latency_s']:.2f} s "
            f"| {r['decode_tokens_per_s']:.1f} tokens/s |"
        )
    return (
        f"`benchmarks/results/{name}`, measured on **{describe_device(data)}**, {date(data)}, vLLM "
        f"{data['versions']['vllm']}: {w['clients']} clients × {w['requests']} requests, each naming 2–4 of "
        f"{w['passages']} passages in a new order, {w['new_tokens']} new tokens:\n\n" + "\n".join(lines)
    )


def speed_tables() -> str:
    """Every current transformers and vLLM speed result, as tables."""
    blocks = []
    for name, data in current_results():
        if kind(name) == "transformers":
            blocks.append(_transformers_tables(name, data))
        elif kind(name) == "vllm":
            blocks.append(_vllm_table(name, data))
        else:
            continue
        notes = (RESULTS / name).with_suffix(".notes.md")
        if notes.exists():  # the reading of the figures (its history is an HTML comment the page hides)
            text = notes.read_text(encoding="utf-8")
            blocks.append(text.replace("## Reading the numbers", "**Reading the numbers.**"))
    if not blocks:
        log.warning("no transformers or vLLM speed result under benchmarks/results/")
    return "\n\n".join(blocks)
