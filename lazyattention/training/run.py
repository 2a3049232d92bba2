"""Train the block fine-tune and measure it before and after, in one run with a deadline.

``python -m lazyattention.training.run --out DIR`` prepares SmolLM2-135M-Instruct, trains
LoRA adapters on the generated training split (:mod:`~lazyattention.training.recipe`),
writes the adapter first (``DIR/adapter/``: ``adapter_model.safetensors``,
``adapter_config.json`` and ``training.json`` with the settings, seed and loss curve),
then evaluates base and fine-tuned models on the held-out split
(:mod:`~lazyattention.training.evaluate`) into ``DIR/block_ft_eval.json``, saved after
every phase, and prints the targets PASS/MISS. ``--tiny`` runs a tiny random-weight
Llama instead (a smoke test on a CPU); ``--adapter DIR`` skips training and evaluates
that adapter. ``scripts/block_ft_gpu.sh`` runs it on a CUDA machine without a network.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from lazyattention.integrations.transformers.pretrained import load_pretrained, prepare_smollm2, tiny_random
from lazyattention.integrations.transformers.qa import PROSE, wiki_set
from lazyattention.integrations.transformers.rag import INSTRUCTION, LazyRAG

from . import evaluate as ev
from .lora import LoraSettings, load_adapter, merged, save_adapter
from .recipe import TrainSettings, train

__all__ = ["main"]


def _log(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def environment(device: str, backend: str) -> dict:
    """Versions and the device, for the result files."""
    import peft
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "backend": backend,
        "device": device,
    }
    if device.startswith("cuda"):
        env["device_name"] = torch.cuda.get_device_name()
    else:
        env["device_name"] = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def _model_folder(args, out: Path) -> Path:
    if not args.tiny:
        return Path(args.model) if args.model else prepare_smollm2(progress=False)
    folder = Path(tempfile.mkdtemp(prefix="tiny-random-"))
    items = wiki_set(args.train_questions, "train", 0, args.passages)
    items += wiki_set(args.eval_questions, "heldout", 0, args.passages) + list(PROSE)
    texts = [f"{INSTRUCTION} Question: Answer:"] + [t for it in items for t in (it.question, it.answer, *it.documents)]
    tiny_random(folder, texts)
    return folder


def run_training(args, folder: Path, out: Path, env: dict) -> Path:
    """Train and save the adapter (and its record) under ``out/adapter``; returns the folder."""
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, tokenizer = load_pretrained(folder, dtype=dtype, device=args.device)
    items = wiki_set(args.train_questions, "train", args.seed, args.passages)
    settings = TrainSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        max_seconds=args.train_seconds,
        lora=LoraSettings(rank=args.rank, alpha=2 * args.rank),
    )
    _log(f"training on {len(items)} questions ({args.passages} passages each), {dtype}, {settings}")
    peft_model, history = train(model, tokenizer, items, settings, log=_log)
    adapter = out / "adapter"
    weights = save_adapter(peft_model, adapter)
    record = {
        "base_model": folder.name,
        "data": {"generator": "wiki_set", "split": "train", "questions": len(items), "passages": args.passages},
        "seed": args.seed,
        "dtype": str(dtype).removeprefix("torch."),
        "environment": env,
        "adapter_bytes": weights.stat().st_size,
        **history,
    }
    (adapter / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    _log(f"adapter saved: {weights} ({weights.stat().st_size / 1e6:.1f} MB), {history['steps_run']} steps")
    del model, peft_model
    return adapter


def _models(folder: Path, adapter: Path, device: str) -> dict:
    """float32 base and block fine-tuned (merged) models, and the tokenizer."""
    base, tokenizer = load_pretrained(folder, dtype=torch.float32, device=device)
    tuned, _ = load_pretrained(folder, dtype=torch.float32, device=device)
    return {"base": base, "block_ft": merged(load_adapter(tuned, adapter))}, tokenizer


def run_evaluation(args, folder: Path, adapter: Path, out: Path, env: dict, deadline: float) -> dict:
    """Every phase of the before/after study, saved after each into ``out/block_ft_eval.json``."""
    models, tokenizer = _models(folder, adapter, args.device)
    items = wiki_set(args.eval_questions, "heldout", args.seed, args.passages)
    prose = list(PROSE)
    rags = {
        name: LazyRAG(m, tokenizer, backend=args.backend, num_blocks=args.num_blocks, block_size=16)
        for name, m in models.items()
    }
    records = [
        {"id": i, "question": it.question, "answer": it.answer, "relation": it.relation, "hops": it.hops}
        for i, it in enumerate(items + prose)
    ]
    n = len(items)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": env["device_name"],
        "environment": env,
        "model": folder.name,
        "adapter": str(adapter),
        "settings": {
            "questions": n,
            "prose_questions": len(prose),
            "passages": args.passages,
            "offsets": list(ev.OFFSETS),
            "max_new_tokens": args.max_new_tokens,
            "lazy_batch": args.lazy_batch,
            "seed": args.seed,
            "dtype": "float32",
        },
        "answers": records,
        "phases": {},
    }
    began = time.perf_counter()

    def save(phase: str) -> None:
        result["phases"][phase] = round(time.perf_counter() - began, 1)
        result["summary"] = _summary(result, items, prose, models)
        result["targets"] = ev.targets({**result, "answers": records[:n]})
        (out / "block_ft_eval.json").write_text(json.dumps(result, indent=1) + "\n")
        _log(f"phase {phase} done ({result['phases'][phase]:.0f} s)")

    def guarded(phase: str, work) -> bool:
        """Run one phase; an exception is recorded under ``errors`` and the next phase runs."""
        try:
            work()
        except Exception as exc:  # one call on the GPU: a failing phase must not lose the others
            result.setdefault("errors", {})[phase] = f"{type(exc).__name__}: {exc}"
            _log(f"phase {phase} FAILED:\n{traceback.format_exc()}")
            save(f"{phase} (failed)")
            return False
        save(phase)
        return True

    everything = items + prose

    def transformers_runs(name, rag):
        for strategy in ("full", "recompute"):
            tokens = ev.greedy(rag, ev.prompts(rag, everything, strategy), args.max_new_tokens, args.generate_batch)
            for r, t in zip(records, tokens, strict=True):
                r[f"{name}/{strategy}"] = tokenizer.decode(t)
                r[f"{name}/{strategy}_tokens"] = t

    for name, rag in rags.items():
        guarded(f"{name}: full and recompute", lambda name=name, rag=rag: transformers_runs(name, rag))

    def kl():
        result["kl"] = {name: ev.answer_kl(rag, items, max(1, args.generate_batch // 2)) for name, rag in rags.items()}

    def heads():
        chosen = items[: args.attention_questions]
        result["head_attention"] = {name: ev.head_attention(rag, chosen) for name, rag in rags.items()}

    guarded("kl", kl)
    guarded("head attention", heads)

    # LazyRAG: the prose questions first (few), then the held-out ones a chunk at a time,
    # both models per chunk, until the deadline.
    def lazy_round(first, chunk):
        for name, rag in rags.items():
            for strategy in ("lazy", "block"):
                answers = ev.lazy_answers(rag, chunk, strategy, args.max_new_tokens, args.lazy_batch, first_index=first)
                for k, a in enumerate(answers):
                    records[first + k][f"{name}/{strategy}"] = a.text
                    records[first + k][f"{name}/{strategy}_tokens"] = a.tokens
        result["identity"] = _identity(records[:n], models)

    order = [(n, prose)] + [(s, items[s : s + args.lazy_chunk]) for s in range(0, n, args.lazy_chunk)]
    result["settings"]["lazy_backend"] = args.backend
    for first, chunk in order:
        if time.perf_counter() > deadline:
            _log(f"deadline: LazyRAG stopped before question {first}")
            result["settings"]["lazy_stopped_at"] = first
            break
        phase = f"lazy and block, questions {first} to {first + len(chunk) - 1}"
        if not guarded(phase, functools.partial(lazy_round, first, chunk)):
            result["settings"]["lazy_stopped_at"] = first  # the error is in "errors"; no other backend stands in
            break
    return result


def _identity(records: list[dict], models) -> dict:
    out = {}
    for name in models:
        done = [r for r in records if f"{name}/lazy_tokens" in r and f"{name}/block_tokens" in r]
        out[name] = {
            "questions": len(records),
            "compared": len(done),
            "lazy_equals_block": sum(r[f"{name}/lazy_tokens"] == r[f"{name}/block_tokens"] for r in done),
            "lazy_equals_recompute": sum(r[f"{name}/lazy_tokens"] == r.get(f"{name}/recompute_tokens") for r in done),
        }
    return out


def _summary(result: dict, items, prose, models) -> list[dict]:
    rows = []
    n = len(items)
    for split, part, first in (("heldout", items, 0), ("prose", prose, n)):
        for name in models:
            for strategy in ("full", "lazy", "block", "recompute"):
                key = f"{name}/{strategy}"
                replies = [result["answers"][first + k].get(key) for k in range(len(part))]
                if all(r is None for r in replies):
                    continue
                rows.append({"split": split, "model": name, "strategy": strategy, **ev.score(replies, part)})
    return rows


def print_report(result: dict) -> None:
    """The summary table and the targets."""
    print(f"\n{'split':8} {'model':9} {'strategy':10} {'n':>4} {'EM':>6} {'F1':>6} {'EM 1-hop':>9} {'EM bridge':>9}")
    for r in result.get("summary", []):

        def pct(v):
            return "   –" if v is None else f"{100 * v:5.1f}"

        print(
            f"{r['split']:8} {r['model']:9} {r['strategy']:10} {r['questions']:4d} {pct(r['em_all']):>6} "
            f"{pct(r['f1_all']):>6} {pct(r['em_single']):>9} {pct(r['em_bridge']):>9}"
        )
    for name, kl in result.get("kl", {}).items():
        print(f"KL(full || lazy) per answer step, {name}: mean {kl['kl_mean']:.3f}, median {kl['kl_median']:.3f}")
    for name, h in result.get("head_attention", {}).items():
        print(f"attention on each document's first two tokens, {name}: block {h['block']:.3f}, full {h['full']:.3f}")
    for name, same in result.get("identity", {}).items():
        print(f"identity {name}: {same}")
    for phase, error in result.get("errors", {}).items():
        print(f"ERROR in {phase}: {error}")
    for t in result.get("targets", []):
        print(f"{'PASS' if t['pass'] else 'MISS'}  {t['target']}: {t['value']} vs {t['bound']} ({t['questions']} q)")


def plot_loss(record: dict, path: Path) -> None:
    """The loss curve of a training record (``training.json``): every step's loss, and the
    block and full-attention examples' losses apart, smoothed over 20 steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lazyattention.plot_style import PAGE_WIDTH, color, legend_below, page_style

    def smooth(values):
        out, window = [], []
        for v in values:
            if v is not None:
                window = [*window[-19:], v]
            out.append(sum(window) / len(window) if window else None)
        return out

    steps = record["step"]
    with plt.rc_context(page_style()):
        fig, ax = plt.subplots(figsize=(PAGE_WIDTH, 3.6), layout="constrained")
        ax.plot(steps, record["loss"], color="#bab0ac", linewidth=0.8, label="loss of each step")
        for mode, label in (("block", "block examples (documents apart)"), ("full", "full-attention examples")):
            ax.plot(
                steps,
                smooth(record[f"{mode}_loss"]),
                color=color("lazy" if mode == "block" else "sdpa_flash"),
                label=f"{label}, mean of 20 steps",
            )
        ax.set(
            xlabel="step",
            ylabel="answer cross-entropy",
            yscale="log",
            title=f"block fine-tuning of {record['base_model']} ({record['environment']['device_name']})",
        )
        legend_below(fig)
        fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="the folder for the adapter and the evaluation")
    parser.add_argument("--report", default=None, metavar="JSON", help="only print the report of a saved evaluation")
    parser.add_argument("--plot-loss", default=None, metavar="JSON", help="only plot a training.json beside it")
    parser.add_argument("--model", default=None, help="a checkpoint folder (default: SmolLM2, prepared once)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random-weight Llama (smoke test)")
    parser.add_argument("--adapter", default=None, help="evaluate this adapter folder; no training")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, help="LazyRAG's backend (default: fast on CUDA, else reference)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--passages", type=int, default=10)
    parser.add_argument("--train-questions", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--train-seconds", type=float, default=None, help="stop training after this long")
    parser.add_argument("--eval-questions", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--generate-batch", type=int, default=16)
    parser.add_argument("--lazy-batch", type=int, default=16, help="LazyRAG.generate_batch size (1: one at a time)")
    parser.add_argument("--lazy-chunk", type=int, default=32, help="held-out questions per LazyRAG round")
    parser.add_argument("--num-blocks", type=int, default=8192)
    parser.add_argument("--attention-questions", type=int, default=32)
    parser.add_argument("--deadline", type=float, default=None, help="seconds from start after which LazyRAG stops")
    args = parser.parse_args(argv)
    if args.report:
        print_report(json.loads(Path(args.report).read_text()))
        return 0
    if args.plot_loss:
        plot_loss(json.loads(Path(args.plot_loss).read_text()), Path(args.plot_loss).with_name("loss.png"))
        return 0
    if not args.out:
        parser.error("--out is required")
    began = time.perf_counter()
    deadline = began + args.deadline if args.deadline else float("inf")
    args.backend = args.backend or ("fast" if args.device.startswith("cuda") else "reference")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(args.device, args.backend)
    _log(f"environment: {env}")
    folder = _model_folder(args, out)
    adapter = Path(args.adapter) if args.adapter else run_training(args, folder, out, env)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    result = run_evaluation(args, folder, adapter, out, env, deadline)
    result["seconds"] = time.perf_counter() - began
    (out / "block_ft_eval.json").write_text(json.dumps(result, indent=1) + "\n")
    print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
