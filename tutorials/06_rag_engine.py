# %% [markdown]
# # 6. A RAG engine: documents cached once, reused everywhere
#
# **What you will learn**
#
# * how `Engine.generate(query, documents=[...])` prefills each document alone from
#   position 0, keys it by content, and reuses it zero-copy at any slot of a later
#   request (the `lazy` strategy);
# * what the other strategies of the same engine do with the same requests:
#   `block_attention` (copy + re-rotate per request), `prefix_cache` (exact prefixes
#   only), `recompute` (no reuse) and `raw_cache` (unrotated keys);
# * that `lazy` and `block_attention` compute the same function (they differ by
#   rounding), while full attention is another function;
# * how a Zipf-popular document pool and a KV budget turn into hit ratios, bytes copied
#   and blocks, with a plot of the strategies side by side.
#
# A tiny random Llama-shaped model on the CPU: it runs in well under a minute, and every
# claim is an `assert`. Timings on a CPU say little; the GPU figures are on the
# [engine benchmark page](../benchmarks/engine.md).

# %%
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from lazyattention.plot_style import color
from lazyattention.serving.engine import STRATEGIES, Engine
from lazyattention.serving.model import Model, ModelConfig
from lazyattention.serving.quality import quality_check
from lazyattention.serving.workload import WorkloadConfig, make_workload, run_workload

SMALL = os.environ.get("LAZYATTENTION_TUTORIAL_SMALL") == "1"
torch.set_num_threads(1)  # tiny matmuls: threads would only add overhead
model = Model(ModelConfig.tiny()).init_random(seed=0, std=0.1)
print(model.cfg)

# %% [markdown]
# ## One document, three requests, three positions
#
# Token ids in, token ids out. The first request prefills documents `A` and `B`; the
# second puts `B` first and `A` second (new logical starts), the third adds `C`. Under
# `lazy` each document is computed exactly once.

# %%
g = torch.Generator().manual_seed(0)
A, B, C = (torch.randint(1, 256, (n,), generator=g).tolist() for n in (40, 25, 31))
requests = [([1, 2, 3], [A, B]), ([4, 5], [B, A]), ([6], [C, A, B])]

engine = Engine(model, "lazy", num_blocks=64, block_size=16)
for query, docs in requests:
    out = engine.generate(query, documents=docs, max_new_tokens=5)
    print(f"query {query} over {len(docs)} documents -> {out}")
print(engine.stats)
assert engine.stats.segment_prefill_tokens == len(A) + len(B) + len(C)  # each document once
assert (engine.stats.hits, engine.stats.lookups) == (4, 7)
assert engine.stats.bytes_copied == 0  # zero copy

# %% [markdown]
# ## The same requests under every strategy
#
# `block_attention` also prefills each document once, but copies it into blocks owned by
# each request and re-rotates the keys there (eq. 9): the bytes are counted.
# `prefix_cache` reuses only an exact prefix: a reordered list misses. `recompute`
# reuses nothing. `lazy`, `raw_cache` and `block_attention` give the same tokens.

# %%
rows = {}
for strategy in STRATEGIES:
    e = Engine(model, strategy, num_blocks=64, block_size=16)
    outputs = [e.generate(q, documents=d, max_new_tokens=5) for q, d in requests]
    rows[strategy] = (outputs, e.stats)
    print(
        f"{strategy:>16}: hits {e.stats.hits}/{e.stats.lookups}, {e.stats.forward_tokens} tokens through the model, "
        f"copied {e.stats.bytes_copied / 1e3:.0f} kB, peak {e.stats.peak_blocks} blocks"
    )

assert rows["lazy"][0] == rows["block_attention"][0] == rows["raw_cache"][0]
assert rows["prefix_cache"][0] == rows["recompute"][0]  # both are ordinary full attention
assert rows["block_attention"][1].bytes_copied > 0 and rows["lazy"][1].bytes_copied == 0
assert rows["prefix_cache"][1].hits < rows["lazy"][1].hits

# %% [markdown]
# ## Same function, different rounding
#
# The quality check runs each request alone under `lazy`, `block_attention` and
# `recompute` (full attention over the concatenated sequence) and compares first-token
# logits and greedy tokens. Between `lazy` and `block_attention` only rounding differs;
# documents that see each other (full attention) are a different function — models
# fine-tuned for block-diagonal attention keep their quality under it.

# %%
reports = [quality_check(model.to(dtype), requests, max_new_tokens=6) for dtype in (torch.float32, torch.bfloat16)]
model.to(torch.float32)
for r in reports:
    print(r)
assert reports[0].lazy_vs_block_logits < 1e-4 and reports[0].lazy_vs_block_agreement == 1.0
assert reports[0].lazy_vs_full_logits > 100 * reports[0].lazy_vs_block_logits

# %% [markdown]
# ## A Zipf workload under a KV budget
#
# A pool of documents with log-normal lengths; each request draws `k` of them by Zipf
# popularity (`α = 0` uniform, `α = 1` skewed) in random order. The KV budget holds
# only part of the pool. Under `block_attention` every running request also holds its
# copies, so fewer documents stay cached: the hit ratio drops.

# %%
alphas = [0.0, 1.0] if SMALL else [0.0, 0.5, 1.0, 1.5]
results = {s: [] for s in STRATEGIES}
for alpha in alphas:
    w = make_workload(
        WorkloadConfig(
            num_requests=16 if SMALL else 32,
            num_documents=10,
            doc_len_mean=40,
            docs_per_request=3,
            zipf_alpha=alpha,
            query_len=6,
            output_len=3,
            seed=1,
        )
    )
    for strategy in STRATEGIES:
        m = run_workload(Engine(model, strategy, num_blocks=24, block_size=16, max_num_seqs=4), w)
        results[strategy].append(m)
    print(f"alpha={alpha}: " + ", ".join(f"{s} hit {results[s][-1].hit_ratio:.2f}" for s in STRATEGIES))

for i in range(len(alphas)):
    lazy = results["lazy"][i].hit_ratio
    assert lazy >= results["block_attention"][i].hit_ratio and lazy >= results["prefix_cache"][i].hit_ratio
    assert results["recompute"][i].hit_ratio == 0.0
assert results["lazy"][-1].hit_ratio > results["lazy"][0].hit_ratio  # skew helps caching

# %%
# lazy and raw_cache read the same cached blocks, so their lines coincide: lazy is drawn
# wide underneath, raw_cache dashed on top, and both stay visible.
STYLE = {
    "lazy": {"linewidth": 5, "alpha": 0.55, "marker": "o", "markersize": 9, "zorder": 2},
    "raw_cache": {"linestyle": "--", "marker": "s", "markerfacecolor": "none", "zorder": 3},
}
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), constrained_layout=True)
for strategy in STRATEGIES:
    style = STYLE.get(strategy, {"marker": "o", "zorder": 3})
    axes[0].plot(alphas, [m.hit_ratio for m in results[strategy]], label=strategy, color=color(strategy), **style)
    axes[1].plot(alphas, [m.bytes_copied / 1e6 for m in results[strategy]], label=strategy, color=color(strategy),
                 **style)  # fmt: skip
axes[0].set(xlabel="Zipf skew α", ylabel="cache hit ratio", title="hit ratio at a 24-block budget")
axes[1].set(xlabel="Zipf skew α", ylabel="MB copied", title="bytes copied for re-encoding (0: no copy)")
axes[0].legend()
plt.show()

# %% [markdown]
# ## What to take away
#
# * One copy of a document serves every request, at any position, in any order:
#   the query is rotated by `p − δ`, the cached keys never move.
# * Block-Attention computes the same function with a copy per request; the copies cost
#   bandwidth and, under a KV budget, cache capacity.
# * Prefix caching cannot reuse a reordered document list.
#
# `lazyattention bench` runs this sweep (and one over KV budgets) at any size;
# `benchmarks/engine.py` is the GPU configuration.
