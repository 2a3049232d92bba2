# %% [markdown]
# # 9. Teach a model to read documents encoded apart
#
# **What you will learn**
#
# * why a stock model answers worse when its documents are encoded apart — the function
#   lazy attention and Block-Attention compute — than with full attention: no document
#   ever saw another, and each document's first tokens, which the model treats as the
#   start of a text, soak up attention ("lost in block head");
# * Block-Attention's cure, fine-tuning on exactly that function, built here from the
#   project's own pieces: the request `LazyRAG` serves, its block-diagonal mask, and
#   placements drawn the way users place documents (any order, gaps, offsets past
#   $2^{20}$);
# * that a training example *is* what `LazyRAG` serves: the same logits;
# * a few LoRA steps (`peft`) on a tiny model on the CPU, the loss falling;
# * the before/after table of the SmolLM2 adapter that ships with the package.
#
# Install with `pip install 'lazyattention[train]'`. What this is: synthetic data and a
# 135M model. It shows the mechanism and the equivalence; it is not a claim about 8B
# models on 2WikiMQA.

# %%
import json
import random
import tempfile

import torch

from lazyattention.integrations.transformers.pretrained import load_pretrained, tiny_random
from lazyattention.integrations.transformers.qa import wiki_set
from lazyattention.integrations.transformers.rag import INSTRUCTION, LazyRAG, RAGRequest
from lazyattention.training import LoraSettings, TrainSettings, train
from lazyattention.training.adapter import BLOCK_FT_ADAPTER
from lazyattention.training.examples import answer_ids, block_example, collate, draw_placement

torch.manual_seed(0)
torch.set_num_threads(1)  # a tiny model: threads only add hand-off cost

# %% [markdown]
# ## The data: 2Wiki-like questions over invented people and organisations
#
# `wiki_set` writes questions whose answers need one passage (single-hop) or two
# (bridge: "Where was the founder of X born?" needs X's passage and the founder's), among
# distractor passages, shuffled. The training and held-out splits share no entity, no
# fact and no wording. Here: a few questions with three passages each, small enough for
# a CPU.

# %%
items = wiki_set(6, "train", seed=0, passages=3)
bridge = next(it for it in items if it.hops == 2)
print(bridge.question, "->", bridge.answer)
for g in bridge.gold:
    print("  gold:", bridge.documents[g][:100], "…")
assert all(any(it.answer in it.documents[g] for g in it.gold) for it in items)

# %% [markdown]
# ## A training example is the request LazyRAG serves, plus its answer
#
# A tiny random-weight Llama stands in for a real model (its word-level tokenizer knows
# exactly these texts). `draw_placement` places the documents as a user might;
# `block_example` asks `LazyRAG.request` for the request, appends the answer and the
# end-of-sequence token to the request's own tokens, and takes the mask from
# `block_diagonal_mask`: each document sees only itself, the question and the answer
# see everything. The loss is on the answer's tokens only.

# %%
texts = [f"{INSTRUCTION} Question: Answer:"] + [t for it in items for t in (it.question, it.answer, *it.documents)]
folder = tempfile.mkdtemp()
model, tokenizer = tiny_random(folder, texts)
rag = LazyRAG(model, tokenizer, backend="reference", num_blocks=256, block_size=16)

rng = random.Random(3)
lengths = [len(rag.encode(d + "\n\n")) for d in bridge.documents]
placement = draw_placement(rng, lengths)
while placement.offset < 1 << 20 or placement.starts is None:  # show a far, reordered one
    placement = draw_placement(rng, lengths)
example = block_example(rag, bridge.question, bridge.documents, placement, bridge.answer)
print("placement:", placement)
print("tokens", len(example.tokens), "answer tokens", sum(label != -100 for label in example.labels))

# A coarse picture of the mask, 24 rows: '#' where any query of the cell sees any key of it.
step = -(-len(example.tokens) // 24)
for r in range(0, len(example.tokens), step):
    print("".join("#" if example.visible[r : r + step, c : c + step].any() else "." for c in range(0, r + 1, step)))

# %% [markdown]
# The same tokens through the training forward (mask, positions shifted to start at 0:
# RoPE sees only differences) and through `LazyRAG` (documents cached at 0, queries
# turned by $-\delta$) give the same logits for the question and answer tokens.

# %%
served = rag.request(bridge.question, list(bridge.documents), offset=placement.offset, starts=placement.starts)
whole = RAGRequest(served.segments, served.starts, served.own + tuple(answer_ids(rag, bridge.answer)), served.own_start)
batch = collate([example], torch.float32, "cpu", pad_id=0)
with torch.no_grad():
    training_logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    ).logits[0, len(example.tokens) - len(whole.own) : len(example.tokens)]
lazy_logits = rag.own_logits(whole, "lazy")
print("max |training − LazyRAG| logit:", float((training_logits - lazy_logits).abs().max()))
torch.testing.assert_close(training_logits, lazy_logits, rtol=1e-4, atol=1e-4)

# %% [markdown]
# ## A few LoRA steps
#
# Half the examples are block examples at drawn placements, half ordinary full-attention
# prompts (so the model stays a normal model). Only LoRA adapters on the attention
# projections train; everything is drawn from one seed. On this tiny model a few dozen
# steps take seconds, and the loss must fall.

# %%
fresh, _ = load_pretrained(folder)
run = TrainSettings(steps=20, batch_size=4, learning_rate=1e-2, warmup=2, lora=LoraSettings(rank=8, alpha=16))
peft_model, history = train(fresh, tokenizer, items[:4], run, log=lambda line: None)
first, last = sum(history["loss"][:4]) / 4, sum(history["loss"][-4:]) / 4
print(f"loss: first 4 steps {first:.3f}, last 4 steps {last:.3f} ({history['seconds']:.1f} s)")
assert last < 0.5 * first

# %% [markdown]
# ## The shipped adapter: SmolLM2 before and after
#
# `scripts/block_ft_gpu.sh` trains SmolLM2-135M-Instruct the same way on one GPU and
# measures base and fine-tuned models on held-out questions (subspan exact match, token
# F1, KL(full ‖ lazy), the attention on each document's first two tokens).
# `lazyattention.training.adapter.load_block_ft()` loads it. Its evaluation, as shipped:

# %%
evaluation = BLOCK_FT_ADAPTER / "block_ft_eval.json"
if evaluation.is_file():
    result = json.loads(evaluation.read_text())
    print(f"{result['device']}, {result['settings']['questions']} held-out questions")
    rows = [r for r in result["summary"] if r["split"] == "heldout"]
    for r in rows:
        print(f"  {r['model']:9} {r['strategy']:10} EM {100 * r['em_all']:5.1f}  F1 {100 * r['f1_all']:5.1f}")
    for t in result["targets"]:
        print(("PASS " if t["pass"] else "MISS ") + t["target"])
    assert {(r["model"], r["strategy"]) for r in rows} >= {("base", "full"), ("block_ft", "full")}
else:
    print(f"This package does not ship the evaluation ({evaluation.name} is not in {BLOCK_FT_ADAPTER}).")
