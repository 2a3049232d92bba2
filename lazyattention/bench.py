"""``lazyattention bench``: every strategy over a sweep of skews and KV budgets.

:func:`run_bench` builds a random-weight model and a document workload, serves it
under every strategy with :func:`~lazyattention.serving.sweep.run_sweep`, prints one
table per sweep, and writes ``<name>.json`` (the runs, the workload, the engine
settings, device and versions) and ``<name>.png`` (TTFT and throughput against skew
and against budget) to a folder. The plot needs matplotlib (``pip install
lazyattention[plot]``); without it the plot is skipped with a note and the JSON is
still written.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from lazyattention.backends import DEFAULT_BACKENDS, REFERENCE
from lazyattention.console import SweepProgress, cpu_threads_for, note, say, ticking
from lazyattention.serving.config import MODEL_SHAPES
from lazyattention.serving.engine import STRATEGIES
from lazyattention.serving.loading import random_model
from lazyattention.serving.sweep import (
    METRIC_COLUMNS,
    display_units,
    environment,
    format_table,
    plot_sweep,
    run_sweep,
    sweep_size,
    writable_paths,
)
from lazyattention.serving.workload import WorkloadConfig

__all__ = ["DTYPES", "can_plot", "check_size", "output_paths", "run_bench"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def can_plot() -> bool:
    """Whether matplotlib is installed (it is optional: the ``plot`` extra)."""
    return importlib.util.find_spec("matplotlib") is not None


def output_paths(out: str | Path, name: str) -> tuple[Path, Path | None]:
    """The JSON and plot files ``run_bench`` writes (the plot ``None`` without matplotlib),
    checked to be writable now.

    Raises:
        ValueError: the folder cannot be created or a file cannot be written.
    """
    names = [f"{name}.json", f"{name}.png"] if can_plot() else [f"{name}.json"]
    paths = writable_paths(out, names)
    return paths[0], (paths[1] if len(paths) > 1 else None)


#: Bytes a token of the drawn workload holds: an int in a Python list (pointer + object).
WORKLOAD_BYTES_PER_TOKEN = 36

#: Tokens a sweep may serve per run before :func:`run_bench` warns that it will take long.
LARGE_RUN_TOKENS = 5_000_000


def _parameters(cfg) -> int:
    """Weights of a :class:`~lazyattention.serving.config.ModelConfig` (biases and norms aside)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    attention = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * d * cfg.intermediate_size
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)
    return cfg.num_layers * (attention + mlp) + embeddings


def _free_bytes(device: str) -> int | None:
    """Memory free for a new allocation on ``device`` (``None`` where it cannot be read)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def check_size(
    model: str,
    device: str,
    dtype: str,
    requests: int,
    documents: int,
    doc_len: int,
    docs_per_request: int,
    query_len: int,
    output_len: int,
    budgets: Sequence[float],
    budget: float,
    block_size: int,
    free=_free_bytes,
) -> int:
    """Refuse a sweep whose memory cannot fit; return the tokens a run serves.

    The estimate: the model's weights and the KV cache of the largest budget (on
    ``device``), and the drawn workload's token lists (in host memory), against what
    ``free(device)`` reports.

    Raises:
        ValueError: naming the sizes and the flags to lower.
    """
    cfg = MODEL_SHAPES[model]()
    element = DTYPES[dtype].itemsize
    pool = documents * (doc_len + block_size)  # tokens of the pool, each document's last block whole
    alone = docs_per_request * 4 * doc_len + query_len + output_len + block_size  # a request alone
    kv_tokens = max(max(budgets, default=budget), budget) * pool + alone
    kv = kv_tokens * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * element
    weights = _parameters(cfg) * element
    workload = (documents * doc_len + requests * (query_len + docs_per_request)) * WORKLOAD_BYTES_PER_TOKEN
    needs = [("workload", "cpu", workload, "--documents, --doc-len or --requests")]
    needs += [("model and KV cache", device, weights + kv, "--documents, --doc-len, --budget(s) or --model")]
    host = sum(n for _, where, n, _ in needs if not where.startswith("cuda"))
    for what, where, n, flags in needs:
        total = host if not where.startswith("cuda") else n
        available = free(where)
        if available is not None and total > available:
            raise ValueError(
                f"this sweep needs about {_gb(total)} on {where} ({what} {_gb(n)}: {documents:,} documents of "
                f"{doc_len:,} tokens, {requests:,} requests) and {_gb(available)} is free; lower {flags}"
            )
    return requests * (docs_per_request * doc_len + query_len + output_len)


def run_bench(
    out: str | Path = "bench-out",
    name: str = "engine",
    model: str = "tiny",
    backend: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    requests: int = 24,
    documents: int = 12,
    doc_len: int = 48,
    docs_per_request: int = 3,
    query_len: int = 8,
    output_len: int = 4,
    rate: float = math.inf,
    alphas: Sequence[float] = (0.0, 1.0),
    budgets: Sequence[float] = (0.5, 1.0),
    skew: float = 1.0,
    budget: float = 1.0,
    block_size: int = 16,
    max_num_seqs: int = 8,
    max_batch_tokens: int = 4096,
    strategies: Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """Run the sweep, print its tables, write the JSON and the plot; return the result.

    Args:
        out: folder for the files (created; checked to be writable before any work).
        name: file name stem of the JSON and the plot.
        model: random-weight model shape (``"tiny"`` or ``"llama3-1b"``).
        backend: a name of :data:`~lazyattention.backends.BACKENDS`; ``None``: the
            device's (:data:`~lazyattention.backends.DEFAULT_BACKENDS`).
        device: torch device of the model and the cache.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        seed: seeds the weights and the workload.
        requests: requests per workload.
        documents: documents in the pool.
        doc_len: mean document length in tokens (log-normal, clipped to
            ``[min(8, doc_len), 4 * doc_len]``).
        docs_per_request: distinct documents per request.
        query_len: query tokens per request.
        output_len: generated tokens per request.
        rate: Poisson arrivals per second (``math.inf``: all at once).
        alphas: Zipf skews of the skew sweep (at KV budget ``budget``).
        budgets: KV budgets (× the document pool) of the budget sweep (at skew ``skew``).
        skew: Zipf skew of the budget sweep.
        budget: KV budget of the skew sweep.
        block_size: tokens per KV block.
        max_num_seqs: requests running at once.
        max_batch_tokens: prefill tokens per engine step.
        strategies: the strategies to compare (default: all).
        progress: draw progress bars on stderr.

    Before any work it refuses a sweep whose memory cannot fit (:func:`check_size`) and
    warns of a long one. The sweep's points run one after another; on Ctrl-C the JSON
    keeps the runs that finished (with ``"interrupted": true``) and the
    ``KeyboardInterrupt`` goes on.

    Returns:
        what the JSON holds: ``environment``, ``model``, ``dtype``, ``workload``,
        ``engine``, ``seconds`` and ``runs`` (one dict of metrics per run).

    Raises:
        ValueError: a bad argument, an output path that cannot be written, or a sweep
            too large for the memory free on the device or the host.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if model not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {model!r}; choose one of {', '.join(MODEL_SHAPES)}")
    json_path, plot_path = output_paths(out, name)
    strategies = list(strategies or STRATEGIES)
    per_run = check_size(
        model, device, dtype, requests, documents, doc_len, docs_per_request, query_len, output_len,
        budgets, budget, block_size,
    )  # fmt: skip
    if backend is None:
        backend = DEFAULT_BACKENDS.get(torch.device(device).type, REFERENCE)
    cpu_threads_for(model, device)
    threads = f" threads={torch.get_num_threads()}" if device == "cpu" else ""
    say(f"lazyattention bench: model={model} backend={backend} device={device}{threads} dtype={dtype}")
    runs_total = sweep_size(alphas, budgets, strategies)
    if per_run > LARGE_RUN_TOKENS:
        note(
            f"a large sweep: {runs_total} runs of about {per_run:,} tokens each ({requests:,} requests); each run "
            "draws its workload before its first progress",
            enabled=True,
        )
    if plot_path is None:
        say(f"matplotlib is not installed: {name}.png will be skipped (pip install lazyattention[plot])")
    start = time.perf_counter()
    with ticking(f"building the {model} model (random weights) on {device}:", enabled=progress):
        net = random_model(model, backend, DTYPES[dtype], device, seed)
    params = sum(p.numel() for p in net.parameters())
    note(f"built {params / 1e6:.1f} M parameters in {time.perf_counter() - start:.1f} s", enabled=progress)
    base = WorkloadConfig(
        num_requests=requests,
        num_documents=documents,
        doc_len_mean=doc_len,
        doc_len_min=min(WorkloadConfig.doc_len_min, doc_len),
        doc_len_max=4 * doc_len,
        docs_per_request=docs_per_request,
        query_len=query_len,
        output_len=output_len,
        rate=rate,
        vocab_size=net.cfg.vocab_size,
        seed=seed,
    )
    settings = dict(
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_batch_tokens=max_batch_tokens,
        strategies=strategies,
        skew=skew,
        budget=budget,
    )
    env = environment(device, backend)
    result = {
        "environment": env,
        "model": model,
        "dtype": dtype,
        "workload": {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(base).items()},
        "engine": {"block_size": block_size, "max_num_seqs": max_num_seqs, "max_batch_tokens": max_batch_tokens},
        "seconds": 0.0,
        "runs": [],
    }
    points = [([a], []) for a in alphas] + [([], [f]) for f in budgets]
    with SweepProgress(runs_total, enabled=progress) as bar:
        try:
            for i, (point_alphas, point_budgets) in enumerate(points):  # one point at a time: Ctrl-C keeps them
                warmup = 2 if i == 0 else 0  # each strategy warms up once, before its first run
                result["runs"] += run_sweep(
                    net, base, point_alphas, point_budgets, progress=bar, warmup=warmup, **settings
                )
        except KeyboardInterrupt:
            bar.close()
            result.update(seconds=time.perf_counter() - start, interrupted=True)
            json_path.write_text(json.dumps(result, indent=1))
            note(f"interrupted: the {len(result['runs'])} finished runs are in {json_path}")
            raise
    runs = result["runs"]
    for sweep, key, head in (("skew", "alpha", "alpha"), ("budget", "budget_fraction", "budget")):
        chosen = [display_units(r) for r in runs if r["sweep"] == sweep]
        if chosen:
            say(f"\nvs {sweep}:")
            say(format_table(chosen, [(key, head, "g"), *METRIC_COLUMNS]))
    result["seconds"] = time.perf_counter() - start
    json_path.write_text(json.dumps(result, indent=1))
    written = [json_path]
    if plot_path is not None:
        plot_sweep(runs, plot_path, f"{model}, {backend} backend, {env['device_name']}")
        written.append(plot_path)
    say(f"\nwrote {' and '.join(map(str, written))} in {result['seconds']:.1f} s")
    return result
