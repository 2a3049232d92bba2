"""The model runner: one engine step's inputs onto the device, then the forward.

The engine builds a step on the host (:class:`~lazyattention.serving.model.StepInputs`
with CPU tensors); the runner moves it to the model's device and runs the model.
"""

from __future__ import annotations

import torch

from lazyattention.reference.cache import PagedKVCache

from .model import Model, StepInputs

__all__ = ["ModelRunner"]


class ModelRunner:
    """Runs engine steps of ``model`` over ``cache``.

    Args:
        model: the decoder.
        cache: the paged KV cache the steps read and write.
    """

    def __init__(self, model: Model, cache: PagedKVCache):
        self.model = model
        self.cache = cache

    def run(self, token_ids: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """``token_ids [T]`` and ``step`` on the host → logits ``[R, V]`` float32 on the
        model's device, one row per ``step.logit_rows``."""
        return self.model(token_ids.to(self.model.device), self.cache, step.to(self.model.device))
