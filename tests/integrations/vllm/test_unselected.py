"""Installed but not selected, the plugin changes nothing: an engine started without
its arguments keeps vLLM's own scheduler and attention and serves models the plugin
cannot (a GPT-2), even in a process where an engine with the plugin runs. The
environment installs torch's CPU build, and the plugin picks the scheduler class that
matches vLLM's async-scheduling decision."""

from __future__ import annotations

import json

import pytest

from tests.integrations.vllm.conftest import _ENGINES, BLOCK, VLLM_MISSING, make_llm

pytest.importorskip("vllm", reason=VLLM_MISSING)


def _engine_core(engine):
    return engine.llm_engine.engine_core.engine_core


def _backends(engine) -> set[type]:
    runner = _engine_core(engine).model_executor.driver_worker.worker.model_runner
    return {group.backend for groups in runner.attn_groups for group in groups}


def _write_tiny_gpt2(folder):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.integrations.vllm.tiny_model import BOS, EOS, VOCAB_SIZE, write_tokenizer

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB_SIZE, n_embd=64, n_layer=1, n_head=2, n_positions=512, bos_token_id=BOS, eos_token_id=EOS
    )
    GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    return folder


def test_an_engine_without_the_plugin_keeps_vllms_attention(llm, tiny_llama):
    from vllm.v1.core.sched.scheduler import Scheduler

    from lazyattention.integrations.vllm.backend import LazyCPUBackend
    from lazyattention.integrations.vllm.scheduler import LazyScheduler

    assert _backends(llm) == {LazyCPUBackend}
    stock = make_llm(tiny_llama, scheduler_cls=None, worker_cls="auto", logits_processors=None)
    (backend,) = _backends(stock)
    assert backend is not LazyCPUBackend and backend.__module__.startswith("vllm."), backend
    assert type(_engine_core(stock).scheduler).__module__.startswith("vllm.")
    assert isinstance(_engine_core(llm).scheduler, LazyScheduler)
    assert not isinstance(_engine_core(stock).scheduler, LazyScheduler) and isinstance(
        _engine_core(stock).scheduler, Scheduler
    )


def test_an_engine_without_the_plugin_serves_gpt2(tmp_path_factory, llm):
    from vllm import LLM, SamplingParams

    folder = _write_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))
    gpt2 = LLM(model=str(folder), dtype="float32", block_size=BLOCK, max_model_len=256, enforce_eager=True,
               kv_cache_memory_bytes=1 << 22, seed=0)  # fmt: skip
    _ENGINES.append(gpt2)  # kept to the end of the process (conftest's docstring says why)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    (out,) = gpt2.generate([{"prompt_token_ids": [1, 2, 3]}], params, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 3


def test_the_scheduler_matches_vllms_async_decision(llm):
    from lazyattention.integrations.vllm.scheduler import LazyAsyncScheduler

    core = _engine_core(llm)
    assert isinstance(core.scheduler, LazyAsyncScheduler) == bool(core.vllm_config.scheduler_config.async_scheduling)


def test_torch_is_the_cpu_build():
    import torch

    assert torch.__version__.endswith("+cpu"), f"make test-vllm installed torch {torch.__version__}"
    assert torch.version.cuda is None
