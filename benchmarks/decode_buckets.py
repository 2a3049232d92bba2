"""What padding a decode step's block tables to its CUDA-graph bucket costs.

A decode step of ``B`` requests whose longest block table has ``M`` blocks replays the
graph of a bucket ``M' >= M`` (:func:`lazyattention.steps.graph_bucket`), and
the decode kernel splits ``M'`` blocks among its programs. This times one decode
step's graph replay (Llama-3.2-1B shape, random weights, bf16, block size 16) at batch
16, each request reading 8 documents of 1,024 tokens (the engine benchmark's heavy
workload: 517 blocks a request), in two buckets:

* ``power_of_two``: ``M'`` the next power of two (1,024 blocks);
* ``graph_bucket``: the runner's buckets, eight sizes per octave (576 blocks).

Run on a CUDA machine (about a minute, most of it drawing the weights and compiling)::

    python benchmarks/decode_buckets.py --out decode_buckets.json

It prints one line per bucket (median replay time over ``--replays``) and writes them,
with the device, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from lazyattention.reference.layout import Layout, Placement, RequestLayout
from lazyattention.serving import runner as runner_module
from lazyattention.serving.model import Model, ModelConfig, StepInputs
from lazyattention.serving.runner import ModelRunner
from lazyattention.steps import graph_bucket

BLOCK_SIZE = 16


def power_of_two_bucket(batch: int, blocks: int) -> tuple[int, int]:
    """Next powers of two (at least 16 blocks): the bucket rule ``graph_bucket`` replaced."""
    return 1 << (batch - 1).bit_length(), max(16, 1 << (blocks - 1).bit_length())


def decode_step(batch: int, documents: int, doc_tokens: int, pool: int) -> tuple[torch.Tensor, StepInputs, int]:
    """A decode step of ``batch`` requests, each reading ``documents`` of a pool of
    ``pool`` cached documents (request ``r`` reads ``r·documents + j`` modulo the pool),
    then one own token. Returns the token ids, the step, and the blocks it needs."""
    per_doc = -(-doc_tokens // BLOCK_SIZE)
    first_own = pool * per_doc
    requests = []
    for r in range(batch):
        segments, start = [], 0
        for j in range(documents):
            d = (r * documents + j) % pool
            segments.append(Placement(tuple(range(d * per_doc, (d + 1) * per_doc)), doc_tokens, start=start))
            start += doc_tokens
        own = Placement((first_own + r,), 1, start=start, stored_start=start)
        requests.append(RequestLayout(tuple(segments), own, num_queries=1))
    step = StepInputs(
        slots=torch.tensor([(first_own + r) * BLOCK_SIZE for r in range(batch)]),
        positions=torch.tensor([req.own.start for req in requests]),
        decode=Layout(requests, BLOCK_SIZE),
        logit_rows=torch.arange(batch),
    )
    return torch.zeros(batch, dtype=torch.long), step, first_own + batch


def time_replay(runner: ModelRunner, replays: int) -> float:
    """Median seconds of one replay of the runner's only graph, timed by CUDA events."""
    (graph,) = runner.graphs.values()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--documents", type=int, default=8)
    p.add_argument("--doc-tokens", type=int, default=1024)
    p.add_argument("--pool", type=int, default=96)
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decode_buckets.py needs a CUDA device")
    model = Model(ModelConfig.llama3_1b(), backend="fast").init_random(0).to(device="cuda", dtype=torch.bfloat16)
    ids, step, blocks = decode_step(args.batch, args.documents, args.doc_tokens, args.pool)
    cache = model.new_cache(blocks, BLOCK_SIZE)
    m = step.decode.metadata().block_table.shape[1]
    rows = []
    for name, rule in (("power_of_two", power_of_two_bucket), ("graph_bucket", graph_bucket)):
        bucket = rule(args.batch, m)
        runner_module.graph_bucket = rule  # the bucket rule the runner reads
        try:
            runner = ModelRunner(model, cache, cuda_graphs=True)
            runner.run(ids, step)  # captures the bucket's graph
        finally:
            runner_module.graph_bucket = graph_bucket
        seconds = time_replay(runner, args.replays)
        rows.append({"bucket_rule": name, "blocks": m, "bucket": list(bucket), "replay_s": seconds})
        print(f"{name:>13}: {m} blocks in bucket {bucket}: replay {seconds * 1e3:.3f} ms")
        del runner
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "args": vars(args), "rows": rows}
    print(f"power-of-two padding costs {rows[0]['replay_s'] / rows[1]['replay_s']:.2f}x the runner's buckets")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
