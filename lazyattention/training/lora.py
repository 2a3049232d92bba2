"""LoRA adapters through ``peft``: add, save, load, merge.

The adapter lives in a folder ``save_pretrained`` writes (``adapter_config.json`` and
``adapter_model.safetensors``); :func:`load_adapter` reads it back with
``PeftModel.from_pretrained`` and :func:`merged` folds it into the base weights for
serving, so :class:`~lazyattention.integrations.transformers.rag.LazyRAG` sees a plain
``LlamaForCausalLM``.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LoraSettings", "add_lora", "save_adapter", "load_adapter", "merged"]


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise ModuleNotFoundError(
            "block fine-tuning needs 'peft': pip install 'lazyattention[train]'", name="peft"
        ) from exc
    return peft


@contextmanager
def _quiet_peft():
    """peft asks transformers ``is_gradient_checkpointing``, which transformers 5.24
    deprecates with a FutureWarning on every call: a notice between the two libraries,
    not about this package's use of them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@dataclass(frozen=True)
class LoraSettings:
    """The adapter's shape.

    Args:
        rank: LoRA rank ``r``.
        alpha: LoRA ``alpha`` (the update is scaled by ``alpha / rank``).
        dropout: dropout on the adapter's input while training.
        targets: the linear layers that get an adapter.
    """

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


def add_lora(model, settings: LoraSettings, seed: int):
    """``model`` wrapped in a ``PeftModel`` with fresh adapters, initialised from ``seed``
    (LoRA's B starts at zero, so the wrapped model computes what ``model`` does)."""
    import torch

    peft = _peft()
    config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), _quiet_peft():
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config)


def save_adapter(peft_model, folder: str | os.PathLike) -> Path:
    """``save_pretrained`` into ``folder`` (the model card peft writes is removed: the
    folder's own notes say what the adapter is). Returns the safetensors file."""
    folder = Path(folder)
    peft_model.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)
    return folder / "adapter_model.safetensors"


def load_adapter(model, folder: str | os.PathLike):
    """``PeftModel.from_pretrained(model, folder)``, in eval mode.

    Raises:
        FileNotFoundError: the folder lacks ``adapter_config.json`` or the weights.
    """
    folder = Path(folder)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"no LoRA adapter at {folder}: {name} is missing")
    peft = _peft()
    with _quiet_peft():
        return peft.PeftModel.from_pretrained(model, folder).eval()


def merged(peft_model):
    """The adapter folded into the base weights: a plain transformers model."""
    return peft_model.merge_and_unload().eval()
