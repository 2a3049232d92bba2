"""LazyRAG against plain full attention, as a user times it: SmolLM2 through transformers.

What is timed (wall clock, the median of ``--repeats`` runs after one warm-up, each
side by side with its baseline in the same process):

* **cached** — a question over ``P`` passages of the generated 2Wiki-like set
  (:func:`~lazyattention.integrations.transformers.qa.wiki_set`), every passage already
  cached by an earlier request that placed them in another order. ``LazyRAG`` (the
  chosen backend, and the reference beside it) prefills only the question's own tokens
  and decodes; full attention (:func:`~lazyattention.integrations.transformers.full_attention`,
  ``model.generate`` with transformers' SDPA) prefills the whole prompt and decodes.
  Both generate exactly ``--new-tokens`` tokens (EOS ignored), so the times compare
  the same work.
* **first prefill** — one document of about 3,000 words seen for the first time (a
  fresh cache), and a question: LazyRAG prefills the document alone, then the
  question over it; full attention prefills both as one prompt. One new token each.
* **GPU only** (``--device cuda``): the per-token decode latency at batch 1 (the time
  of ``N`` tokens minus the time of one, over ``N − 1``), with ``LazyRAG``'s steps
  from CUDA graphs (its default on CUDA) and eager beside it, against ``model.generate``
  with a dynamic and a static cache, the tokens per second of ``answer_batch`` at
  batch 16 against batch 1, and the time to the first token with 8 cached documents of
  about 1,000 tokens against ``generate``'s full prefill.

Targets, printed PASS or MISS (never asserted in a timed test):

* CPU: cached answer ≤ 0.5× full attention's time; first prefill ≤ 1.5× full attention's;
* GPU: decode latency at batch 1 ≤ 1.2× the best stock ``generate``; batch 16 ≥ 8× the
  tokens per second of batch 1; time to first token with cached documents ≥ 5× lower.

CPU run (one thread, float32; the committed ``benchmarks/results/transformers_cpu.json``)::

    python benchmarks/transformers_speed.py --device cpu --name transformers_cpu

GPU run (bfloat16, the fast backend)::

    python benchmarks/transformers_speed.py --device cuda --dtype bfloat16 --name transformers_h200

The GPU sections time shapes, so ``--random-weights FOLDER`` runs them on a model
built from a checkpoint folder's ``config.json`` and tokenizer with random weights
(SmolLM2's folder without its 270 MB of weights, for a machine without the model).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lazyattention.integrations.transformers import LazyRAG, Sampling, full_attention
from lazyattention.integrations.transformers.pretrained import load_pretrained
from lazyattention.integrations.transformers.qa import wiki_set

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Seconds ``fn`` takes (device work included) and what it returned."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began, out


def long_document(words: int, seed: int = 7) -> str:
    """About ``words`` words of generated passages, joined as one document."""
    text, items = [], wiki_set(max(4, words // 1000), split="heldout", seed=seed)
    for item in items:
        for passage in item.documents:
            text.append(passage)
            if sum(len(t.split()) for t in text) >= words:
                return "\n\n".join(text)
    raise ValueError(f"the generated set holds fewer than {words} words")


def cached_answers(model, tokenizer, backends: list[str], passages: int, repeats: int, new_tokens: int, device):
    """Per repeat: every backend's cached answer and full attention's, seconds."""
    sampling = Sampling(max_new_tokens=new_tokens, ignore_eos=True)
    rags = {name: LazyRAG(model, tokenizer, backend=name) for name in backends}
    rows = []
    for item in wiki_set(repeats + 1, split="heldout", seed=3, passages=passages):
        docs = list(item.documents)
        reordered = docs[1:] + docs[:1]  # a new order: every passage at a new offset
        row = {"passages": passages, "question": item.question}
        for name, rag in rags.items():
            rag.answer(item.question, docs, sampling=Sampling(max_new_tokens=1))  # caches the passages
            seconds, answer = timed(
                lambda rag=rag, q=item.question, docs=reordered: rag.answer(q, docs, sampling=sampling), device
            )
            assert answer.stats.prefilled_tokens == 0 and len(answer.tokens) == new_tokens
            row[f"lazy_{name}_s"] = seconds
        request = rags[backends[0]].request(item.question, reordered)
        row["prompt_tokens"] = len(request.tokens_and_positions()[0])
        row["full_s"], _ = timed(lambda request=request: full_attention(model, tokenizer, request, sampling), device)
        rows.append(row)
    return rows[1:]  # the first is the warm-up


def first_prefill(model, tokenizer, backend: str, words: int, repeats: int, device):
    """Per repeat: a ~``words``-word document's first request (fresh cache) and full attention's prefill."""
    doc = long_document(words)
    question = "What is this document about?"
    one = Sampling(max_new_tokens=1, ignore_eos=True)
    rows = []
    for _ in range(repeats + 1):
        rag = LazyRAG(model, tokenizer, backend=backend)
        lazy_s, answer = timed(lambda rag=rag: rag.answer(question, [doc], sampling=one), device)
        request = rag.request(question, [doc])
        full_s, _ = timed(lambda request=request: full_attention(model, tokenizer, request, one), device)
        rows.append({"words": len(doc.split()), "prefilled_tokens": answer.stats.prefilled_tokens, "lazy_s": lazy_s})
        rows[-1]["full_s"] = full_s
    return rows[1:]


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def cpu_targets(result: dict) -> list[dict]:
    """The CPU targets from a result: each with every repeat's ratio and the median's verdict."""
    backend = result["backend"]
    targets = []
    for passages, rows in result["cached"].items():
        ratios = [r[f"lazy_{backend}_s"] / r["full_s"] for r in rows]
        targets.append(
            {
                "target": f"cached answer, {passages} passages: lazy ÷ full attention ≤ 0.5",
                "ratios": ratios,
                "value": statistics.median(ratios),
                "pass": statistics.median(ratios) <= 0.5,
            }
        )
    ratios = [r["lazy_s"] / r["full_s"] for r in result["first_prefill"]]
    targets.append(
        {
            "target": "first prefill of a 3,000-word document: lazy ÷ full attention ≤ 1.5",
            "ratios": ratios,
            "value": statistics.median(ratios),
            "pass": statistics.median(ratios) <= 1.5,
        }
    )
    return targets


def print_report(result: dict) -> None:
    if "decode_latency_s" in result:
        print(f"\n{result['device']}, {result['dtype']}, backend {result['backend']}")
        for name, seconds in result["decode_latency_s"].items():
            print(f"decode latency, batch 1, {name:<18} {seconds * 1e3:8.2f} ms/token")
        for batch, rate in result["batch_tokens_per_s"].items():
            print(f"answer_batch, SmolLM2, batch {batch:>2}: {rate:8.1f} tokens/s")
        for batch, rate in result["llama1b"]["batch_tokens_per_s"].items():
            print(f"generate_batch, Llama-3.2-1B shape, batch {batch:>2}: {rate:8.1f} tokens/s")
        print(
            f"TTFT, {result['ttft_prompt_tokens']} tokens: lazy {result['ttft_s']['lazy'] * 1e3:.1f} ms, "
            f"generate {result['ttft_s']['generate'] * 1e3:.1f} ms"
        )
        for t in result["targets"]:
            print(f"{verdict(t['pass'])}  {t['target']}: {t['value']:.2f}")
        return
    backend = result["backend"]
    print(f"\n{result['device']}, {result['dtype']}, backend {backend}")
    print(f"{'case':<34} {'lazy ' + backend:>12} {'lazy reference':>15} {'full attention':>15}")
    for passages, rows in result["cached"].items():
        ref = f"{median(rows, 'lazy_reference_s'):.2f} s" if "lazy_reference_s" in rows[0] else "—"
        print(
            f"{'cached, ' + passages + ' passages (' + str(rows[0]['prompt_tokens']) + ' tok)':<34} "
            f"{median(rows, f'lazy_{backend}_s'):>10.2f} s {ref:>15} {median(rows, 'full_s'):>13.2f} s"
        )
    fp = result["first_prefill"]
    print(
        f"{'first prefill, ' + str(fp[0]['prefilled_tokens']) + ' tokens':<34} "
        f"{median(fp, 'lazy_s'):>10.2f} s {'—':>15} {median(fp, 'full_s'):>13.2f} s"
    )
    for t in result["targets"]:
        every = ", ".join(f"{r:.2f}" for r in t["ratios"])
        print(f"{verdict(t['pass'])}  {t['target']}: median {t['value']:.2f} (each: {every})")


def run_cpu(args) -> dict:
    device = torch.device("cpu")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained(dtype=DTYPES[args.dtype], device=device)
    backends = [args.backend, "reference"] if args.with_reference else [args.backend]
    result = {
        "device": f"CPU ({platform.machine()}, {args.threads} thread{'s' if args.threads > 1 else ''})",
        "dtype": args.dtype,
        "threads": args.threads,
        "backend": args.backend,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "cached": {},
    }
    for passages in args.passages:
        rows = cached_answers(model, tokenizer, backends, passages, args.repeats, args.new_tokens, device)
        result["cached"][str(passages)] = rows
    result["first_prefill"] = first_prefill(model, tokenizer, args.backend, args.words, args.repeats, device)
    result["targets"] = cpu_targets(result)
    return result


# --------------------------------------------------------------------------- GPU


def per_token(run: Callable[[Sampling], object], tokens: int, device) -> float:
    """Seconds per decoded token: (time of ``tokens`` − time of 1) / (``tokens`` − 1)."""
    run(Sampling(max_new_tokens=tokens, ignore_eos=True))  # warm-up (kernels compiled, caches filled)
    long_s, _ = timed(lambda: run(Sampling(max_new_tokens=tokens, ignore_eos=True)), device)
    one_s, _ = timed(lambda: run(Sampling(max_new_tokens=1, ignore_eos=True)), device)
    return (long_s - one_s) / (tokens - 1)


def static_generate(model, request, tokens: int):
    """Stock ``generate`` with a static cache (transformers compiles its decode step)."""
    ids = torch.tensor([request.tokens_and_positions()[0]], device=model.device)
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            cache_implementation="static",
            pad_token_id=0,
        )


def llama1b_batch(new_tokens: int, device, tiny: bool = False) -> dict:
    """``generate_batch`` at batch 1 and 16 on a Llama-3.2-1B-shaped model (random
    weights, bfloat16: the shapes set the cost), 8 cached documents of 1,000 tokens
    in a new order per request; tokens per second of each."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lazyattention.integrations.transformers import RAGRequest

    shape = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32)
    if tiny:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8)
    config = LlamaConfig(
        vocab_size=128256,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        **shape,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    rag = LazyRAG(model, None, num_blocks=8192)
    g = torch.Generator().manual_seed(0)
    doc_len = 50 if tiny else 1000
    docs = [tuple(torch.randint(1, config.vocab_size, (doc_len,), generator=g).tolist()) for _ in range(8)]

    def requests(batch: int) -> list:
        out = []
        for _ in range(batch):
            order = torch.randperm(8, generator=g).tolist()
            own = tuple(torch.randint(1, config.vocab_size, (16,), generator=g).tolist())
            starts = tuple(k * doc_len for k in range(8))
            out.append(RAGRequest(tuple(docs[j] for j in order), starts, own, 8 * doc_len))
        return out

    sampling = Sampling(max_new_tokens=new_tokens, ignore_eos=True)
    rates = {}
    for batch in (1, 16):
        rag.generate_batch(requests(batch), sampling=sampling)  # caches the documents, captures the batch's graphs
        seconds, answers = timed(lambda batch=batch: rag.generate_batch(requests(batch), sampling=sampling), device)
        rates[str(batch)] = sum(len(a.tokens) for a in answers) / seconds
    return {"batch_tokens_per_s": rates}


def shaped_like(folder: str, dtype: torch.dtype, device) -> tuple:
    """A model with the configuration and tokenizer of a checkpoint folder (its weights
    need not be there) and seeded random weights: what a step costs depends on the
    shapes, not on the weights' values."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(device=device, dtype=dtype).eval(), AutoTokenizer.from_pretrained(folder)


def run_gpu(args) -> dict:
    device = torch.device(args.device)
    if args.random_weights:
        model, tokenizer = shaped_like(args.random_weights, DTYPES[args.dtype], device)
    else:
        model, tokenizer = load_pretrained(dtype=DTYPES[args.dtype], device=device)
    rag = LazyRAG(model, tokenizer, backend=args.backend)  # CUDA graphs wherever the backend captures
    item = wiki_set(1, split="heldout", seed=3, passages=4)[0]
    docs = list(item.documents)
    rag.answer(item.question, docs, sampling=Sampling(max_new_tokens=1))
    request = rag.request(item.question, docs)
    n = args.new_tokens
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()})",
        "dtype": args.dtype,
        "backend": args.backend,
        "new_tokens": n,
        "weights": "random, SmolLM2's shapes" if args.random_weights else "SmolLM2-135M-Instruct",
        "prompt_tokens": len(request.tokens_and_positions()[0]),
    }
    eager = LazyRAG(model, tokenizer, backend=args.backend, cuda_graphs=False)
    latency = {
        "lazy": per_token(lambda s: rag.answer(item.question, docs, sampling=s), n, device),
        "lazy_eager": per_token(lambda s: eager.answer(item.question, docs, sampling=s), n, device),
        "generate_dynamic": per_token(lambda s: full_attention(model, tokenizer, request, s), n, device),
    }
    try:
        static_generate(model, request, n)  # compiles
        long_s, _ = timed(lambda: static_generate(model, request, n), device)
        one_s, _ = timed(lambda: static_generate(model, request, 1), device)
        latency["generate_static"] = (long_s - one_s) / (n - 1)
    except Exception as exc:  # the stock configuration is the baseline: record why it is missing
        result["generate_static_error"] = f"{type(exc).__name__}: {exc}"[:500]
    result["decode_latency_s"] = latency

    questions = [q.question for q in wiki_set(16, split="heldout", seed=5, passages=4)]
    batch_docs = [docs] * 16  # the same cached documents for every request: shared across the batch
    sampling = Sampling(max_new_tokens=n, ignore_eos=True)
    for batch in (1, 16):  # warm-up: kernels compiled, each batch's graphs captured
        rag.answer_batch(questions[:batch], batch_docs[:batch], sampling=sampling)
    one_s, _ = timed(lambda: rag.answer_batch(questions[:1], batch_docs[:1], sampling=sampling), device)
    sixteen_s, _ = timed(lambda: rag.answer_batch(questions, batch_docs, sampling=sampling), device)
    result["batch_tokens_per_s"] = {"1": n / one_s, "16": 16 * n / sixteen_s}

    eight = [long_document(60 if args.tiny else 700, seed=11 + i) for i in range(8)]
    one = Sampling(max_new_tokens=1, ignore_eos=True)
    rag.answer(item.question, eight, sampling=one)  # caches the 8 documents
    ttft_request = rag.request(item.question, eight[::-1])
    full_attention(model, tokenizer, ttft_request, one)  # warm-up
    result["ttft_prompt_tokens"] = len(ttft_request.tokens_and_positions()[0])
    result["ttft_s"] = {
        "lazy": statistics.median(
            timed(lambda: rag.answer(item.question, eight[::-1], sampling=one), device)[0] for _ in range(5)
        ),
        "generate": statistics.median(
            timed(lambda: full_attention(model, tokenizer, ttft_request, one), device)[0] for _ in range(5)
        ),
    }
    result["llama1b"] = llama1b_batch(n, device, args.tiny)
    result["graphs"] = {"buckets": len(rag.graphs.graphs), "replays": rag.graphs.replays} if rag.graphs else None
    best = min(v for k, v in latency.items() if not k.startswith("lazy"))
    speedup = result["batch_tokens_per_s"]["16"] / result["batch_tokens_per_s"]["1"]
    rates_1b = result["llama1b"]["batch_tokens_per_s"]
    speedup_1b = rates_1b["16"] / rates_1b["1"]
    ttft = result["ttft_s"]["generate"] / result["ttft_s"]["lazy"]
    result["targets"] = [
        {"target": "decode latency at batch 1 ÷ best stock generate ≤ 1.2", "ratios": [latency["lazy"] / best]},
        {"target": "batch 16 tokens/s ÷ batch 1 ≥ 8 (SmolLM2)", "ratios": [speedup]},
        {"target": "batch 16 tokens/s ÷ batch 1 ≥ 8 (Llama-3.2-1B shape)", "ratios": [speedup_1b]},
        {"target": "TTFT with 8 cached documents: generate ÷ lazy ≥ 5", "ratios": [ttft]},
    ]
    verdicts = (latency["lazy"] / best <= 1.2, speedup >= 8, speedup_1b >= 8, ttft >= 5)
    for t, ok in zip(result["targets"], verdicts, strict=True):
        t["value"] = t["ratios"][0]
        t["pass"] = ok
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--backend", default="sdpa", help="LazyRAG's backend (default: sdpa)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default: 1)")
    parser.add_argument("--passages", type=int, nargs="+", default=[4, 10], help="passages per cached request")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens each answer generates")
    parser.add_argument("--words", type=int, default=3000, help="words of the first-prefill document")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--with-reference", action="store_true", help="time the reference backend beside it")
    parser.add_argument("--name", default=None, help="write benchmarks/results/NAME.json")
    parser.add_argument("--gpu-sections", action="store_true", help="GPU sections on --device (CPU: smoke test)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument(
        "--random-weights",
        metavar="FOLDER",
        default=None,
        help="GPU sections: a model shaped by FOLDER's config.json, with its tokenizer, and random weights",
    )
    args = parser.parse_args(argv)
    result = run_gpu(args) if args.device == "cuda" or args.gpu_sections else run_cpu(args)
    result["versions"] = {"torch": torch.__version__, "python": platform.python_version()}
    result["date"] = datetime.date.today().isoformat()
    print_report(result)
    if args.name:
        path = RESULTS / f"{args.name}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
