"""Block fine-tuning: teach a model to read documents encoded apart (Block-Attention's recipe).

Half the examples are block examples (:func:`~lazyattention.training.examples.block_example`:
documents encoded apart at the positions a user gives them, the question and answer
seeing everything), half ordinary full-attention examples; the loss is the answer's
tokens' cross-entropy; only LoRA adapters train (:mod:`~lazyattention.training.lora`).
Everything is drawn from one seed: the adapter's initialisation, the order of the
questions, the placements and the block/full choice.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

from .examples import TOKENIZER_LOCK, Example, block_example, collate, draw_placement, full_example
from .lora import LoraSettings, add_lora

__all__ = ["TrainSettings", "example_at", "batches", "answer_loss", "learning_rate", "train"]


@dataclass(frozen=True)
class TrainSettings:
    """What a training run does.

    Args:
        steps: optimiser steps planned (fewer if ``max_seconds`` runs out first).
        batch_size: examples per step.
        learning_rate: AdamW's peak rate (linear warm-up, cosine decay to 10%).
        warmup: warm-up steps (at most a tenth of the run).
        block_fraction: the share of block examples (the rest are full attention).
        seed: the one seed of the run.
        max_seconds: stop after this long (``None``: run every step).
        lora: the adapter's shape.
    """

    steps: int = 300
    batch_size: int = 8
    learning_rate: float = 3e-4
    warmup: int = 20
    block_fraction: float = 0.5
    seed: int = 0
    max_seconds: float | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)

    def to_dict(self) -> dict:
        return asdict(self)


def example_at(rag, items, seed: int, block_fraction: float, index: int) -> Example:
    """The run's example number ``index``, a function of ``(seed, index)`` alone.

    Epoch ``e`` visits ``items`` in an order seeded by ``(seed, e)``; each example draws
    block or full (``block_fraction``) and its placement from ``(seed, index)``.
    """
    epoch, k = divmod(index, len(items))
    order = list(range(len(items)))
    random.Random(f"order:{seed}:{epoch}").shuffle(order)
    item = items[order[k]]
    rng = random.Random(f"example:{seed}:{index}")
    if rng.random() >= block_fraction:
        return full_example(rag, item.question, item.documents, item.answer)
    with TOKENIZER_LOCK:
        lengths = [len(rag.encode(d + "\n\n")) for d in item.documents]
    return block_example(rag, item.question, item.documents, draw_placement(rng, lengths), item.answer)


def batches(rag, items, settings: TrainSettings, dtype: torch.dtype, pad_id: int, workers: int = 8):
    """Collated CPU batches of the run, in order, built ahead by ``workers`` threads.

    Yields ``(examples, batch)`` (:func:`~lazyattention.training.examples.collate`'s
    dictionary); the examples depend only on the seed and the step, not on the threads.
    """

    def build(step: int):
        size = settings.batch_size
        examples = [
            example_at(rag, items, settings.seed, settings.block_fraction, step * size + i) for i in range(size)
        ]
        return examples, collate(examples, dtype, "cpu", pad_id)

    with ThreadPoolExecutor(workers) as pool:
        ahead = deque(pool.submit(build, step) for step in range(min(settings.steps, 2 * workers)))
        try:
            for step in range(settings.steps):
                yield ahead.popleft().result()
                if step + len(ahead) + 1 < settings.steps:
                    ahead.append(pool.submit(build, step + len(ahead) + 1))
        finally:
            for future in ahead:
                future.cancel()


def answer_logits(causal_lm, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits ``[N, V]`` at the positions that predict a label, and those labels ``[N]``.

    The language-model head runs on those positions only (the full ``[B, L, V]`` logits
    of a 2,000-token batch would take gigabytes).
    """
    out = causal_lm.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    )
    hidden = out.last_hidden_state[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    return causal_lm.lm_head(hidden[keep]).float(), targets[keep]


def answer_loss(causal_lm, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens of ``batch`` (:func:`collate`'s output)."""
    logits, targets = answer_logits(causal_lm, batch)
    return torch.nn.functional.cross_entropy(logits, targets)


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up over ``min(warmup, total // 10)`` steps, then cosine from ``peak`` to ``peak / 10``."""
    warm = max(1, min(warmup, total // 10))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _base(model):
    """The transformers ``*ForCausalLM`` inside a ``PeftModel``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def train(model, tokenizer, items, settings: TrainSettings, log=print) -> tuple[object, dict]:
    """Block-fine-tune ``model`` with LoRA on ``items`` (:class:`~lazyattention.integrations.transformers.qa.WikiItem`).

    Args:
        model: a transformers causal LM (its weights stay frozen).
        tokenizer: its tokenizer.
        items: the training questions.
        settings: the run's settings.
        log: called with a line of progress now and then.

    Returns:
        ``(peft_model, history)``: the model with its trained adapters (train mode off),
        and the run's record: settings, the loss of every step (with its block/full
        split), the learning rates, steps run and seconds.
    """
    from lazyattention.integrations.transformers.rag import LazyRAG

    rag = LazyRAG(model, tokenizer, num_blocks=1)  # builds requests exactly as served; its cache is unused
    peft_model = add_lora(model, settings.lora, settings.seed)
    causal_lm = _base(peft_model)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else rag.eos_token_ids()[0]
    dtype = next(model.parameters()).dtype
    device = model.device
    torch.manual_seed(settings.seed)
    history = {"step": [], "loss": [], "block_loss": [], "full_loss": [], "lr": [], "seconds": []}
    total, began = settings.steps, time.perf_counter()
    peft_model.train()
    for step, (examples, cpu_batch) in enumerate(batches(rag, items, settings, dtype, pad)):
        if step >= total:
            break
        lr = learning_rate(step, total, settings.learning_rate, settings.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
        logits, targets = answer_logits(causal_lm, batch)
        per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        loss = per_token.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        owner = _owners(examples, batch)
        elapsed = time.perf_counter() - began
        history["step"].append(step)
        history["loss"].append(float(loss.detach()))
        for mode in ("block", "full"):
            picked = per_token.detach()[owner == (mode == "block")]
            history[f"{mode}_loss"].append(float(picked.mean()) if picked.numel() else None)
        history["lr"].append(lr)
        history["seconds"].append(elapsed)
        if step == 9 and settings.max_seconds is not None:
            total = min(settings.steps, max(step + 1, int(settings.max_seconds / (elapsed / (step + 1)))))
            log(f"{elapsed / (step + 1):.2f} s a step: {total} steps fit in {settings.max_seconds:.0f} s")
        if step % 10 == 0 or step == total - 1:
            log(f"step {step:4d}/{total}  loss {history['loss'][-1]:.4f}  lr {lr:.2e}  {elapsed:.0f} s")
    peft_model.eval()
    history.update(
        settings=settings.to_dict(),
        steps_run=len(history["step"]),
        examples_seen=len(history["step"]) * settings.batch_size,
        seconds=time.perf_counter() - began,
        trainable_parameters=sum(p.numel() for p in params),
    )
    return peft_model, history


def _owners(examples: list[Example], batch: dict) -> torch.Tensor:
    """For each scored token of ``batch``, whether it belongs to a block example."""
    targets = batch["labels"][:, 1:]
    is_block = torch.tensor([e.mode == "block" for e in examples], device=targets.device)
    return is_block[:, None].expand_as(targets)[targets != -100]
