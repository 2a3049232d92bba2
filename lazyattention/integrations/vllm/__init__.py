"""``lazyattention.integrations.vllm``: deferred RoPE inside vLLM, as a plugin.

Installed through the ``vllm.general_plugins`` entry point (:func:`register`). A
request names its documents in ``extra_args["lazyattention"]`` (:mod:`.request`);
:class:`~.scheduler.LazyScheduler` caches each document once with its own block-hash
chain and places it at the request's offsets; the attention backends
(:mod:`.backend`) rotate the query by ``−δ`` per block. See the how-to "Serve with
vLLM". Importing this package imports no vLLM module; the submodules do.
"""

from .plugin import SUPPORTED_VLLM, check_vllm_version, engine_args, register
from .request import FIELD, ControlSpec, DocumentSpec, LazyRequestError, LazyRequestSpec, parse_request

__all__ = [
    "SUPPORTED_VLLM",
    "check_vllm_version",
    "register",
    "engine_args",
    "FIELD",
    "DocumentSpec",
    "LazyRequestSpec",
    "ControlSpec",
    "LazyRequestError",
    "parse_request",
]
