"""Schema checks at admission, so the server answers a malformed field with HTTP 400.

vLLM runs each configured logits processor's ``validate_params`` on every request in
the front end, before the request reaches the engine; a ``ValueError`` there becomes
a 400 with its message. :class:`LazyRequestValidator` uses that hook for the shape of
the ``lazyattention`` field (:func:`~.request.parse_request`) and leaves the logits
alone. What needs the engine's state (unknown ids, positions past the bound) is
checked by the scheduler, which refuses such a request with its reason.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor

from .request import parse_request

__all__ = ["LazyRequestValidator"]


class LazyRequestValidator(LogitsProcessor):
    """Validates ``extra_args["lazyattention"]``; a no-op on the logits."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        parse_request(sampling_params.extra_args)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        return None
