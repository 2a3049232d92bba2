"""Fixtures of the vLLM plugin's tests: a tiny Llama on disk and engines serving it.

These tests need vLLM, which lives in a virtual environment of its own (``make
test-vllm``). Without it every module here skips, saying so. The engines run in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and share one model folder. They are
never shut down (nor garbage-collected) before the process ends: shutting one down
tears down the process's distributed state, which the other engines still use.
"""

from __future__ import annotations

import os

import pytest

#: The environment before any engine started here (an engine in this process adds its
#: own variables, which a server started as a child must not inherit).
BASE_ENVIRONMENT = dict(os.environ)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

BLOCK = 32
VLLM_MISSING = "vLLM is not installed here: `make test-vllm` runs these tests in their own venv"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from tests.integrations.vllm.tiny_model import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


#: Every engine made here, kept until the process ends (see the module docstring: an
#: engine collected early shuts down, and with it the others' distributed state).
_ENGINES = []


def make_llm(model, kv_tokens: int = 4096, kv_bytes: int | None = None, **overrides):
    """An engine with the plugin: fp32, blocks of 32, room for ``kv_tokens`` of KV at
    ``kv_bytes`` per token (the tiny model's by default)."""
    pytest.importorskip("vllm", reason=VLLM_MISSING)
    from vllm import LLM

    from lazyattention.integrations.vllm import engine_args
    from tests.integrations.vllm.tiny_model import kv_bytes_per_token

    args = dict(
        model=str(model),
        dtype="float32",
        block_size=BLOCK,
        max_model_len=2048,
        enforce_eager=True,
        kv_cache_memory_bytes=kv_tokens * (kv_bytes or kv_bytes_per_token()),
        seed=0,
        **engine_args(),
    )
    args.update(overrides)
    engine = LLM(**args)
    _ENGINES.append(engine)
    return engine


def scheduler_of(engine):
    """The engine's scheduler (the engine core runs in this process)."""
    return engine.llm_engine.engine_core.engine_core.scheduler


@pytest.fixture(scope="session")
def llm(tiny_llama):
    return make_llm(tiny_llama)


def documents_params(documents, max_tokens: int = 6, query_start=None, **kwargs):
    """``SamplingParams`` of a greedy request naming ``documents``."""
    from vllm import SamplingParams

    field = {"documents": documents, **({} if query_start is None else {"query_start": query_start})}
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args={"lazyattention": field}, **kwargs)


def random_tokens(seed: int, n: int) -> list[int]:
    g = __import__("random").Random(seed)
    return [g.randrange(256) for _ in range(n)]
