"""Models from a checkpoint folder or from a seed.

:func:`load_model` reads a Hugging Face ``config.json`` and its safetensors weights
from a local folder into a :class:`~lazyattention.serving.model.Model`;
:func:`load_tokenizer` reads the folder's ``tokenizer.json``; :func:`random_model`
builds a named shape (:data:`~lazyattention.serving.config.MODEL_SHAPES`) with seeded
random weights, for the demo and the benchmarks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lazyattention.backends import Backend

from .config import MODEL_SHAPES, ModelConfig
from .model import Model

__all__ = ["load_model", "load_tokenizer", "random_model"]


def random_model(name: str, backend: str | Backend, dtype: torch.dtype, device: str | torch.device, seed: int) -> Model:
    """A model of the named shape (:data:`~lazyattention.serving.config.MODEL_SHAPES`) with seeded random weights.

    The weights are drawn on the CPU, so every device gets the same model.
    """
    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; choose one of {', '.join(MODEL_SHAPES)}")
    return Model(MODEL_SHAPES[name](), backend=backend).init_random(seed).to(device=device, dtype=dtype).eval()


def load_model(
    path: str | os.PathLike,
    backend: str | Backend = "reference",
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> Model:
    """Load a Hugging Face ``config.json`` + safetensors checkpoint from a local folder.

    Args:
        path: folder holding ``config.json`` and ``*.safetensors`` (one file or shards).
        backend: a :class:`~lazyattention.backends.Backend` or its name.
        dtype: weights and cache dtype; ``None`` keeps the checkpoint's.
        device: where the model lives.

    Raises:
        FileNotFoundError: no ``config.json`` or no safetensors file in ``path``.
        ValueError: unsupported architecture or RoPE type; weights that do not match.
    """
    from safetensors.torch import load_file  # an optional dependency: only the loader needs it

    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    cfg = ModelConfig.from_hf(json.loads(config_file.read_text()))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model = Model(cfg, backend=backend)
    expected = set(model.state_dict())
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint in {folder} does not match a {cfg.model_type} model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, strict=False)
    target = dtype or next(iter(state.values())).dtype
    return model.to(device=device, dtype=target).eval()


def load_tokenizer(path: str | os.PathLike):
    """The folder's ``tokenizer.json`` as a ``tokenizers.Tokenizer``, or ``None`` when
    the file is absent. Raises ``ImportError`` if the file exists but the optional
    ``tokenizers`` package is not installed (the model itself takes token ids)."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ImportError(f"{file} needs the 'tokenizers' package: pip install tokenizers") from exc
    return Tokenizer.from_file(str(file))
