"""Where a replayed decode step's GPU time goes, kernel by kernel, eager and compiled.

The engine benchmark times one captured decode step of the heavy preset (16 requests,
8 documents of about 1,024 tokens each, Llama-3.2-1B shape, bf16) against reading the
weights and the batch's K/V once at copy bandwidth. This script breaks that step down:
the same step, with the model's norms and MLPs eager and then compiled
(``Engine(compile_backend="inductor")``), each replayed from its CUDA graph under
``torch.profiler``. Kernels are grouped by what they do (the attention's own kernels,
the matrix products, the rest), and each group's device time is set against its
share of the ideal: the attention against the K/V read once, the matrix products
against the weights read once.

Run on a CUDA machine::

    python benchmarks/decode_profile.py --name decode_profile_h100

It writes ``benchmarks/results/NAME.json`` and prints a table per variant.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from engine import BLOCK_SIZE, copy_bandwidth  # noqa: E402

from lazyattention.serving.config import MODEL_SHAPES  # noqa: E402
from lazyattention.serving.engine import Engine  # noqa: E402
from lazyattention.serving.loading import random_model  # noqa: E402
from lazyattention.serving.workload import WorkloadConfig, make_workload  # noqa: E402

#: Kernel-name fragments of each group (first match wins; the rest is "other").
GROUPS = (
    ("attention", ("_attention_kernel", "_query_kernel", "merge", "scatter_kv", "_scatter")),
    ("matmul", ("gemm", "gemv", "cutlass", "sm90_xmma", "nvjet", "matmul", "splitk")),
)


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, fragments in GROUPS:
        if any(f.lower() in lowered for f in fragments):
            return group
    return "other"


def decode_engine(model, batch: int, docs: int, doc_len: int, compile_backend: str | None) -> tuple[Engine, int]:
    """An engine with ``batch`` requests all decoding (every one prefilled), and the
    K/V tokens its next step reads."""
    cfg = WorkloadConfig(
        num_requests=batch,
        num_documents=96,
        doc_len_mean=doc_len,
        doc_len_min=min(16, doc_len),
        doc_len_max=4 * doc_len,
        docs_per_request=docs,
        query_len=32,
        output_len=64,
        zipf_alpha=1.0,
        vocab_size=model.cfg.vocab_size,
    )
    workload = make_workload(cfg)
    blocks = 2 * sum(-(-len(d) // BLOCK_SIZE) for d in workload.documents) + batch * 64
    engine = Engine(model, "lazy", num_blocks=blocks, block_size=BLOCK_SIZE, max_num_seqs=batch,
                    max_batch_tokens=8192, compile_backend=compile_backend)  # fmt: skip
    for r in workload.requests:
        engine.add_request(r.query, workload.request_documents(r), r.max_new_tokens)
    while engine.waiting or not all(r.output for r in engine.running):
        engine.step()
    for _ in range(3):  # the first decode steps at this batch capture its graph
        engine.step()
    tokens = sum(r.document_tokens + len(r.query) + len(r.output) for r in engine.running)
    return engine, tokens


def profile_replay(graph, replays: int) -> tuple[float, list[dict]]:
    """Median replay time (CUDA events, 5 batches of ``replays``), and the kernels of
    ``replays`` replays under the profiler: name, group, device µs per replay."""
    each = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        each.append(start.elapsed_time(end) / 1e3 / replays)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if device_us <= 0:
            continue
        kernels.append(
            {
                "name": event.key[:120],
                "group": group_of(event.key),
                "us_per_step": device_us / replays,
                "calls_per_step": event.count / replays,
            }
        )
    kernels.sort(key=lambda k: -k["us_per_step"])
    return statistics.median(each), kernels


def run(args) -> dict:
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    model = random_model(args.model, "fast", torch.bfloat16, device, seed=0)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__},
        "model": args.model,
        "batch": args.batch,
        "docs_per_request": args.docs,
        "doc_len": args.doc_len,
        "copy_bytes_per_s": bandwidth,
        "weight_bytes": weight_bytes,
        "variants": {},
    }
    for variant in args.variants.split(","):
        compile_backend = None if variant == "eager" else variant
        engine, tokens = decode_engine(model, args.batch, args.docs, args.doc_len, compile_backend)
        key, graph = max(engine.runner.graphs.items(), key=lambda kv: kv[0][:2])
        kv_bytes = tokens * engine.cache.bytes_per_block // BLOCK_SIZE
        replay_s, kernels = profile_replay(graph.graph, args.replays)
        groups = {}
        for k in kernels:
            g = groups.setdefault(k["group"], {"us_per_step": 0.0, "kernels_per_step": 0.0})
            g["us_per_step"] += k["us_per_step"]
            g["kernels_per_step"] += k["calls_per_step"]
        result["variants"][variant] = {
            "graph_bucket": list(key[:2]),
            "replay_s": replay_s,
            "kv_bytes": kv_bytes,
            "ideal_s": (weight_bytes + kv_bytes) / bandwidth,
            "ideal_attention_s": kv_bytes / bandwidth,
            "ideal_weights_s": weight_bytes / bandwidth,
            "groups": groups,
            "kernels": kernels[:25],
        }
        del engine, graph
        torch.cuda.empty_cache()
    return result


def print_report(result: dict) -> None:
    print(f"{result['device']}, {result['model']}, batch {result['batch']} × {result['docs_per_request']} documents")
    for variant, v in result["variants"].items():
        print(
            f"\n{variant}: replay {v['replay_s'] * 1e3:.3f} ms, ideal {v['ideal_s'] * 1e3:.3f} ms "
            f"(K/V {v['ideal_attention_s'] * 1e3:.3f}, weights {v['ideal_weights_s'] * 1e3:.3f}), "
            f"{v['replay_s'] / v['ideal_s']:.2f}x"
        )
        for group, g in sorted(v["groups"].items(), key=lambda kv: -kv[1]["us_per_step"]):
            print(f"  {group:<10} {g['us_per_step']:9.1f} µs  {g['kernels_per_step']:6.0f} kernels")
        for k in v["kernels"][:12]:
            print(f"    {k['us_per_step']:8.1f} µs ×{k['calls_per_step']:<5.0f} {k['group']:<9} {k['name'][:80]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama3-1b", choices=tuple(MODEL_SHAPES))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--doc-len", type=int, default=1024)
    p.add_argument("--variants", default="eager,inductor", help="eager and/or a torch.compile backend")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--name", default=None, help="write benchmarks/results/NAME.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("a replayed decode step needs a CUDA device")
    result = run(args)
    print_report(result)
    if args.name:
        path = ROOT / "benchmarks" / "results" / f"{args.name}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
