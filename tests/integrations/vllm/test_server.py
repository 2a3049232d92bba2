"""vLLM's OpenAI-compatible server with the plugin, end to end on 127.0.0.1.

Sends completions and chat requests that name documents (in ``vllm_xargs``) to the
server of ``conftest.server`` and checks the answers against transformers'
block-diagonal reference and the hit counters in the responses.
"""

from __future__ import annotations

import json
import urllib.error

import pytest

from tests.integrations.vllm.conftest import BLOCK, REQUEST_S, VLLM_MISSING, post

pytest.importorskip("vllm", reason=VLLM_MISSING)

DOC_A = "Mercury is the smallest planet and the closest to the Sun."
DOC_B = "The Danube flows through ten countries before it reaches the Black Sea."


def _blocks(*texts: str) -> int:
    """Document blocks of texts under the tiny tokenizer (one token per byte)."""
    return sum(-(-len(t.encode()) // BLOCK) for t in texts)


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
    return post(port, "/v1/completions", body)


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
    first = post(server, "/v1/chat/completions", body)
    second = post(server, "/v1/chat/completions", body)
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
