"""Workers that hand the model runner to the plugin's metadata builders.

vLLM's attention builders see the batch (query starts, sequence lengths, block table)
but not which request each row is. The plugin's builder needs each request's plan,
which the scheduler put in the request's ``extra_args``; the model runner holds those
(``runner.requests[req_id].sampling_params``) and the row order
(``runner.input_batch.req_ids``). These subclasses of vLLM's workers, passed as
``worker_cls``, bind the runner to every :class:`~.backend.LazyMetadataBuilder` once
the KV cache (and with it the builders) exists. Nothing of vLLM's is replaced.
"""

from __future__ import annotations

from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import Worker

from .backend import LazyMetadataBuilder

__all__ = ["LazyCPUWorker", "LazyGPUWorker", "bind_builders"]


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
            "the lazyattention worker found no lazyattention attention backend: is the plugin loaded "
            "(VLLM_PLUGINS must include 'lazyattention'), and on CUDA is --attention-backend CUSTOM set?"
        )
    return count


class LazyCPUWorker(CPUWorker):
    """vLLM's CPU worker, with the runner bound to the lazyattention builders."""

    def initialize_from_config(self, kv_cache_config) -> None:
        super().initialize_from_config(kv_cache_config)
        bind_builders(self.model_runner)


class LazyGPUWorker(Worker):
    """vLLM's GPU worker, with the runner bound to the lazyattention builders."""

    def initialize_from_config(self, kv_cache_config) -> None:
        super().initialize_from_config(kv_cache_config)
        bind_builders(self.model_runner)
