"""The engine's host time per step, with the device's work left out (any machine).

The engine overlaps its host work for step ``n + 1`` (scheduling, the step's layouts
and metadata, the runner's checks and buffers) with the device running step ``n``, so
a step whose host work takes longer than its device work leaves the GPU idle. This
script measures that host work alone, on the engine benchmark's workload
(``benchmarks/engine.py``, same presets and options), as the engine runs it on a GPU:

* a decode-only step goes through the runner's CUDA-graph path (the bucket key, the
  sharing plan kept or rebuilt, the fill of the bucket's host buffer) with a replay
  that does nothing;
* a prefill step returns zero logits without running the model.

The model is a tiny one with the fast backend (its host code plans shared-segment
decode; nothing is computed), the KV budget and block size are the benchmark's. It
prints the host time of prefill and decode steps (median, mean, sum) and, with
``--profile``, the functions that take it (``cProfile``).

Run: ``python benchmarks/host_step.py [--preset heavy] [--max-num-seqs 64]
[--shared-decode-min-requests 4] [--profile]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the fast backend's host code, without a GPU

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine as bench

from lazyattention.serving.config import ModelConfig
from lazyattention.serving.engine import Engine
from lazyattention.serving.model import Model
from lazyattention.serving.workload import make_workload, run_workload

VOCAB = 512  # the tiny model's vocabulary; the workload's token ids are drawn from it


class _NoReplay:
    """A captured graph whose replay does nothing."""

    def replay(self) -> None:
        pass


def host_only_engine(model: Model, strategy: str, num_blocks: int, args) -> Engine:
    """An engine whose runner does every host part of a step and no device work."""
    engine = Engine(
        model,
        strategy,
        num_blocks=num_blocks,
        block_size=bench.BLOCK_SIZE,
        max_num_seqs=args.max_num_seqs,
        max_batch_tokens=args.max_batch_tokens,
        cuda_graphs=False,
        shared_decode_min_requests=args.shared_decode_min_requests or None,
    )
    runner = engine.runner
    runner.cuda_graphs = True  # decode-only steps take the graph path: key, plan, fill

    def capture(key, token_ids, step, shared, carried):
        graph = runner._new_graph(key, shared)
        runner._fill(graph, token_ids, step, shared, carried)
        graph.graph, graph.logits = _NoReplay(), torch.zeros(key[0], VOCAB)
        return graph

    runner._capture = capture
    runner._eager = lambda token_ids, step, shared, carried: torch.zeros(len(step.logit_rows), VOCAB)
    return engine


def measure(args, strategy: str = "lazy", profile: bool = False) -> tuple[dict[str, list[float]], int]:
    """Host seconds of each prefill and decode step of one offline burst at skew 1,
    after an untimed one; and how many decode steps had shared segments."""
    model = Model(ModelConfig.tiny(vocab_size=VOCAB), backend="fast").init_random(0).eval()
    workload = make_workload(replace(bench._workload_config(args), vocab_size=VOCAB, zipf_alpha=1.0))
    blocks = bench._num_blocks(workload, 1.0)
    run_workload(host_only_engine(model, strategy, blocks, args), workload)  # warm: allocators, caches
    engine = host_only_engine(model, strategy, blocks, args)
    times: dict[str, list[float]] = {"prefill": [], "decode": []}
    step = engine.step

    def timed_step():
        steps, decodes, start = engine.stats.steps, engine.stats.decode_steps, time.perf_counter()
        out = step()
        elapsed = time.perf_counter() - start
        if engine.stats.steps > steps:  # a step was launched (the last call only lands tokens)
            times["decode" if engine.stats.decode_steps > decodes else "prefill"].append(elapsed)
        return out

    engine.step = timed_step
    if profile:
        print(bench.host_profile(engine, workload, lines=40))
    else:
        run_workload(engine, workload)
    return times, engine.runner.steps_shared


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", action="store_true", help="print where the host time goes (cProfile)")
    p.add_argument("--strategy", default="lazy")
    own, rest = p.parse_known_args(argv)
    _, presets = bench.parse(["--skip-quality", *rest])
    for name, args in presets:
        times, shared_steps = measure(args, own.strategy, own.profile)
        shared = args.shared_decode_min_requests or "off"
        print(f"[{name}] {own.strategy}, at most {args.max_num_seqs} running, shared decode {shared} "
              f"({shared_steps} steps with shared segments): host time a step")  # fmt: skip
        for kind, values in times.items():
            if values:
                print(f"  {kind:>7}: {len(values):4d} steps, median {statistics.median(values) * 1e3:.3f} ms, "
                      f"mean {statistics.mean(values) * 1e3:.3f} ms, sum {sum(values) * 1e3:.1f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
