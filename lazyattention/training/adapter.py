"""The block fine-tuned SmolLM2 that ships with the package.

``adapters/smollm2-block-ft/`` holds LoRA adapters for SmolLM2-135M-Instruct trained by
``scripts/block_ft_gpu.sh`` (:mod:`~lazyattention.training.run`): the weights and peft's
config, ``training.json`` (settings, seed, loss curve), ``loss.png`` and
``block_ft_eval.json`` (the before/after study). :func:`load_block_ft` gives the
embedded SmolLM2 with the adapter merged into its weights: a plain ``LlamaForCausalLM``
that :class:`~lazyattention.integrations.transformers.rag.LazyRAG` serves like any other.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["BLOCK_FT_ADAPTER", "block_ft_available", "load_block_ft"]

#: The folder of the committed adapter.
BLOCK_FT_ADAPTER = Path(__file__).resolve().parent / "adapters" / "smollm2-block-ft"

_FILES = ("adapter_config.json", "adapter_model.safetensors")


def block_ft_available() -> bool:
    """True when the adapter's files are in the package and ``peft`` is installed."""
    import importlib.util

    return all((BLOCK_FT_ADAPTER / f).is_file() for f in _FILES) and importlib.util.find_spec("peft") is not None


def load_block_ft(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """SmolLM2-135M-Instruct with the block fine-tuning adapter merged in, and its tokenizer.

    Args:
        dtype: the weights' dtype in memory.
        device: where the model runs.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        FileNotFoundError: an adapter file is missing from the package (the message names it).
        ModuleNotFoundError: ``peft`` (or SmolLM2's package) is missing; the message names
            the pip command.
    """
    from lazyattention.integrations.transformers.pretrained import load_pretrained

    from .lora import load_adapter, merged

    for name in _FILES:
        if not (BLOCK_FT_ADAPTER / name).is_file():
            raise FileNotFoundError(
                f"the block fine-tuned SmolLM2 adapter is not in this package: {BLOCK_FT_ADAPTER / name} is missing "
                "(scripts/block_ft_gpu.sh trains it)"
            )
    model, tokenizer = load_pretrained(dtype=torch.float32, device="cpu")
    tuned = merged(load_adapter(model, BLOCK_FT_ADAPTER))
    return tuned.to(dtype=dtype, device=device).eval(), tokenizer
