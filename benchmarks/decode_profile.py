"""Where one replayed decode step's GPU time goes, kernel by kernel (needs CUDA).

The engine benchmark's decode at batch 16 (``benchmarks/engine.py``, section 5;
``--decode-batch`` sets another): a preset's requests (default: the heavy preset's, 8
documents of about 1,024 tokens each) prefilled together, then decode-only steps until
the first request finishes; the captured CUDA graph of the last step is replayed alone.
Each *variant* runs that on a fresh engine:

* ``eager``: the norms and MLPs as PyTorch operations (the engine's default);
* ``inductor`` (or another ``torch.compile`` backend): the norms and MLPs compiled
  with it (``compile_backend``);

each with shared-segment decode off and on (``+shared``, the preset's threshold).
For each, the replay is timed between CUDA events and profiled (``torch.profiler``,
CUDA activity): every kernel of the replay falls in one category by its name
(:data:`CATEGORIES`), and the table gives each category's GPU time per step, the time
between the step's kernels (``gaps``: the replay's time less its kernels' time), and
the time to read the weights and the batch's K/V once at copy bandwidth. The result,
with the 12 costliest kernels of each variant, goes to
``benchmarks/sweeps/decode_profile_<card>.json`` (a diagnosis, not a result page).

Run: ``python benchmarks/decode_profile.py [--preset heavy] [--variants eager,inductor]
[--decode-batch 64]``.
``torch.compile`` changes the model's modules in place, so the compiled variants run last.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine as bench

from lazyattention.backends import default_backend
from lazyattention.serving.loading import random_model
from lazyattention.serving.sweep import environment

#: Kernel categories, first match wins (a kernel's name, searched).
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("attention", r"_attention_kernel|_shared_kernel|_query_kernel|_angles_kernel"),
    ("merge", r"_merge_kernel"),
    ("kv write", r"write_kv"),
    ("matmul", r"gemm|gemv|nvjet|cutlass|xmma|splitk|sm90_|cublas"),
    ("compiled", r"^triton_"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|index|scatter|gather|copy|fill|cat"),
)
PROFILED_REPLAYS = 20


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def profile_replays(graph, replays: int = PROFILED_REPLAYS) -> tuple[dict[str, float], list[dict], int]:
    """Seconds per replay of each category, the costliest kernels and the kernels per
    replay, from ``replays`` profiled replays."""
    graph.graph.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.graph.replay()
        torch.cuda.synchronize()
    by_category: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    count = 0
    for e in prof.profiler.kineto_results.events():
        if e.device_type() != torch.autograd.DeviceType.CUDA:
            continue
        seconds = e.duration_ns() / 1e9 / replays
        by_category[category(e.name())] += seconds
        by_name[e.name()][0] += seconds
        by_name[e.name()][1] += 1
        count += 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:12]
    kernels = [{"name": n[:120], "s_per_step": s, "per_step": c / replays} for n, (s, c) in top]
    return dict(by_category), kernels, count // replays


def variant(model, preset_args, name: str, compile_backend: str | None, shared: int | None, bandwidth: float,
            clock) -> dict:  # fmt: skip
    args = argparse.Namespace(**vars(preset_args))
    args.compile_backend = compile_backend
    provider = bench.Provider(name, "lazy", shared)
    engine, times, tokens = bench.decode_batch(model, bench._workload_config(args), args, clock, provider)
    key, graph = bench.last_graph(engine)
    if graph is None:
        raise RuntimeError(f"{name}: no decode step was replayed from a CUDA graph")
    weight_bytes, kv_bytes, ideal = bench.ideal_seconds(model, engine, tokens, bandwidth)
    replay = statistics.median(bench.replay_seconds(graph, clock))
    categories, kernels, per_step = profile_replays(graph)
    row = {
        "variant": name,
        "shared_decode_min_requests": shared,
        "graph_bucket": [k if isinstance(k, int) else str(k) for k in key],
        "steps_shared": engine.runner.steps_shared,
        "tpot_median_s": statistics.median(times),
        "replay_s": replay,
        "ideal_s": ideal,
        "weight_bytes": weight_bytes,
        "kv_bytes": kv_bytes,
        "kernels_per_step": per_step,
        "categories_s": categories,
        "gaps_s": replay - sum(categories.values()),
        "top_kernels": kernels,
    }
    engine.run_until_done()
    return row


def show(rows: list[dict]) -> None:
    names = [label for label, _ in CATEGORIES] + ["other"]
    head = ["variant", "TPOT", "replay", "ideal", "kernels", *names, "gaps"]
    print(" | ".join(f"{h:>11}" for h in head))
    for r in rows:
        cells = [r["variant"], r["tpot_median_s"], r["replay_s"], r["ideal_s"], r["kernels_per_step"]]
        cells += [r["categories_s"].get(n, 0.0) for n in names] + [r["gaps_s"]]
        print(" | ".join(f"{c:>11}" if isinstance(c, (str, int)) else f"{c * 1e3:>9.3f}ms" for c in cells))
    for r in rows:
        print(f"\n{r['variant']}: costliest kernels per step")
        for k in r["top_kernels"]:
            print(f"  {k['s_per_step'] * 1e6:8.1f} us  x{k['per_step']:5.1f}  {k['name']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="heavy", choices=tuple(bench.PRESETS))
    p.add_argument("--variants", default="eager,inductor", help="eager and/or torch.compile backends, comma-separated")
    p.add_argument("--decode-batch", type=int, help="requests in the step (default: the preset's)")
    p.add_argument("--out", default="benchmarks/sweeps")
    opts = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("decode_profile needs a CUDA device: it profiles replayed CUDA graphs")
    batch = [] if opts.decode_batch is None else ["--decode-batch", str(opts.decode_batch)]
    _, [(_, args)] = bench.parse(["--preset", opts.preset, *batch])
    backend = default_backend("cuda")
    model = random_model(args.model, backend, torch.bfloat16, "cuda", 0)
    bandwidth = bench.copy_bandwidth("cuda")
    clock = bench.Clock()
    rows = []
    env = environment("cuda", backend.name)
    card = env["device_name"]
    stem = f"decode_profile_{re.sub(r'[^a-z0-9]+', '_', card.lower()).strip('_')}"
    out = Path(opts.out) / f"{stem}{'' if opts.decode_batch is None else f'_batch{opts.decode_batch}'}.json"
    result = {"preset": opts.preset, "decode_batch": args.decode_batch, "device": card, "environment": env,
              "copy_bytes_per_s": bandwidth}  # fmt: skip
    for name in opts.variants.split(","):
        compile_backend = None if name == "eager" else name
        for shared in dict.fromkeys((None, args.shared_decode_min_requests or None)):
            label = name + ("+shared" if shared else "")
            try:
                rows.append(variant(model, args, label, compile_backend, shared, bandwidth, clock))
            except Exception as exc:  # a variant that fails is reported, the others still run
                rows.append({"variant": label, "error": f"{type(exc).__name__}: {exc}"})
                print(f"{label}: {type(exc).__name__}: {exc}", file=sys.stderr)
            out.write_text(json.dumps({**result, "rows": rows}, indent=1))
    show([r for r in rows if "error" not in r])
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
