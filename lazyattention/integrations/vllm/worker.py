"""Workers that select the plugin's attention backend and hand it the model runner.

The plugin acts only where it is selected: these workers (``worker_cls``) install the
lazyattention backend while their model is built, so vLLM's attention layers pick it,
and remove it afterwards; a vLLM that has the plugin installed but started without
these workers keeps its own attention. On CPU the backend takes the place of
``CPU_ATTN`` (the only backend vLLM's CPU platform picks); on CUDA it is ``CUSTOM``
(chosen with ``--attention-backend CUSTOM``).

vLLM's attention builders see the batch (query starts, sequence lengths, block table)
but not which request each row is. The plugin's builder needs each request's plan,
which the scheduler put in the request's ``extra_args``; the V1 model runner holds
those (``runner.requests[req_id].sampling_params``) and the row order
(``runner.input_batch.req_ids``). Once the KV cache (and with it the builders) exists,
the workers bind the runner to every :class:`~.backend.LazyMetadataBuilder`.
"""

from __future__ import annotations

from contextlib import contextmanager

import vllm
from vllm.v1.attention import selector
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import Worker

from .backend import LazyMetadataBuilder
from .plugin import check_vllm_version

__all__ = ["LazyCPUWorker", "LazyGPUWorker", "bind_builders", "lazy_backend"]

_BACKENDS = {
    AttentionBackendEnum.CPU_ATTN: "lazyattention.integrations.vllm.backend.LazyCPUBackend",
    AttentionBackendEnum.CUSTOM: "lazyattention.integrations.vllm.backend.LazyTritonBackend",
}


@contextmanager
def lazy_backend(slot: AttentionBackendEnum):
    """Within the block, vLLM's attention selection resolves ``slot`` to the plugin's
    backend; before and after, to whatever it resolved to before.

    vLLM caches its selection per process, so the cache is cleared on entry and exit
    (several engines may share a process, with and without the plugin).
    """
    check_vllm_version(vllm.__version__)
    previous = slot.get_path() if slot.is_overridden() else None
    selector._cached_get_attn_backend.cache_clear()
    register_backend(slot, _BACKENDS[slot])
    try:
        yield
    finally:
        if previous is None:
            slot.clear_override()
        else:
            register_backend(slot, previous)
        selector._cached_get_attn_backend.cache_clear()


def bind_builders(runner) -> int:
    """Bind ``runner`` to its lazy metadata builders; returns how many there were."""
    count = 0
    for groups in runner.attn_groups:
        for group in groups:
            for builder in group.metadata_builders:
                if isinstance(builder, LazyMetadataBuilder):
                    builder.bind(runner)
                    count += 1
    if count == 0:
        raise RuntimeError(
            "the lazyattention worker found no lazyattention attention backend: on CUDA, is "
            "--attention-backend CUSTOM set?"
        )
    return count


class LazyCPUWorker(CPUWorker):
    """vLLM's CPU worker, its model built with the lazyattention backend as ``CPU_ATTN``."""

    def load_model(self, *args, **kwargs) -> None:
        with lazy_backend(AttentionBackendEnum.CPU_ATTN):
            super().load_model(*args, **kwargs)

    def initialize_from_config(self, kv_cache_config) -> None:
        super().initialize_from_config(kv_cache_config)
        bind_builders(self.model_runner)


class LazyGPUWorker(Worker):
    """vLLM's GPU worker (V1 model runner), its model built with the lazyattention
    backend as ``CUSTOM``."""

    def load_model(self, *args, **kwargs) -> None:
        if self.use_v2_model_runner:
            raise RuntimeError(
                "lazyattention's GPU worker needs vLLM's V1 model runner (its builder reads the runner's input "
                "batch): start vLLM with VLLM_USE_V2_MODEL_RUNNER=0"
            )
        with lazy_backend(AttentionBackendEnum.CUSTOM):
            super().load_model(*args, **kwargs)

    def initialize_from_config(self, kv_cache_config) -> None:
        super().initialize_from_config(kv_cache_config)
        bind_builders(self.model_runner)
