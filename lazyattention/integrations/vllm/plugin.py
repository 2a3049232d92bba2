"""The plugin's entry point, its version check, and the engine arguments that select it.

vLLM calls :func:`register` in every process it starts (the ``vllm.general_plugins``
entry point), whether or not a server asked for the plugin, so it changes nothing:
a vLLM with the plugin installed but not selected keeps its own scheduler, workers,
attention and model support. The plugin is selected by the engine arguments of
:func:`engine_args` (``--scheduler-cls``, ``--worker-cls``, ``--logits-processors``);
its worker installs the attention backend (:mod:`.worker`) and its scheduler checks
vLLM's version (:func:`check_vllm_version`). For requests that name no documents the
backend computes ordinary causal attention.
"""

from __future__ import annotations

__all__ = ["SUPPORTED_VLLM", "LAZY_WORKERS", "check_vllm_version", "register", "engine_args"]

#: The vLLM releases the plugin is tested with: ``[low, high)``.
SUPPORTED_VLLM = ((0, 32, 0), (0, 33, 0))

#: ``worker_cls`` values for CPU and for CUDA (:mod:`.worker`).
LAZY_WORKERS = (
    "lazyattention.integrations.vllm.worker.LazyCPUWorker",
    "lazyattention.integrations.vllm.worker.LazyGPUWorker",
)


def _release(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_vllm_version(installed: str) -> None:
    """Raise ``RuntimeError`` unless ``installed`` lies in :data:`SUPPORTED_VLLM`."""
    low, high = SUPPORTED_VLLM
    if not (low <= _release(installed) < high):
        raise RuntimeError(
            f"lazyattention's vLLM plugin supports vLLM >= {'.'.join(map(str, low))}, "
            f"< {'.'.join(map(str, high))}; found vLLM {installed}. Install the tested release with "
            "`pip install 'lazyattention[vllm]'`, or start vLLM without the plugin's scheduler and worker"
        )


def register() -> None:
    """The ``vllm.general_plugins`` entry point: does nothing (the plugin acts only when
    selected; see the module docstring)."""


def engine_args(device: str = "cpu") -> dict:
    """The engine arguments that select the plugin's scheduler and worker.

    ``LLM(model, **engine_args())``; on the command line, the same as
    ``--scheduler-cls … --worker-cls … --logits-processors …`` (and ``--attention-backend
    CUSTOM`` on CUDA, where vLLM must also run its V1 model runner:
    ``VLLM_USE_V2_MODEL_RUNNER=0``). The logits processor only validates the request's
    field (:mod:`.validator`).
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    args = {
        "scheduler_cls": "lazyattention.integrations.vllm.scheduler.lazy_scheduler",
        "worker_cls": LAZY_WORKERS[0] if device == "cpu" else LAZY_WORKERS[1],
        "enable_prefix_caching": True,
        "logits_processors": ["lazyattention.integrations.vllm.validator:LazyRequestValidator"],
    }
    if device == "cuda":
        args["attention_config"] = {"backend": "CUSTOM"}
    return args
