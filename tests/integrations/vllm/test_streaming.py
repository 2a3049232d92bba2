"""Streaming on the live server (with the plugin's middleware): the last chunk before
``data: [DONE]`` carries the document counters, a refused request streams an error
event with its reason, the streamed tokens are the unstreamed answer's, and vLLM's
``cached_tokens`` never exceeds the prompt's tokens."""

from __future__ import annotations

import json

import pytest

from tests.integrations.vllm.conftest import BLOCK, VLLM_MISSING, post, request

pytest.importorskip("vllm", reason=VLLM_MISSING)

DOC = "Streams carry tokens one chunk at a time, and counters at the end."


def _events(raw: bytes) -> list:
    """The stream's ``data:`` payloads, decoded (``[DONE]`` kept as the string)."""
    events = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def _body(model, documents, stream: bool, chat: bool = False, salt: str | None = None) -> dict:
    body = {
        "model": model,
        "max_tokens": 4,
        "temperature": 0,
        "stream": stream,
        "vllm_xargs": {"lazyattention": json.dumps({"documents": documents})},
        **({} if salt is None else {"cache_salt": salt}),
    }
    if chat:
        body["messages"] = [{"role": "user", "content": "What do streams carry?"}]
    else:
        body.update(prompt="Q: what do streams carry?", return_token_ids=True)
    return body


def test_the_last_chunk_carries_the_counters(server, tiny_llama):
    model = str(tiny_llama)
    documents = [{"text": DOC, "id": "streams"}]
    whole = post(server, "/v1/completions", _body(model, documents, stream=False))
    body = _body(model, [{"id": "streams"}], stream=True)
    body["stream_options"] = {"include_usage": True}
    status, raw = request(server, "/v1/completions", body)
    assert status == 200
    events = _events(raw)
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last.get("choices") == [] and last["id"] == events[0]["id"], last
    counters = last["kv_transfer_params"]["lazyattention"]
    blocks = -(-len(DOC) // BLOCK)
    assert counters["document_blocks"] == counters["document_blocks_hit"] == blocks
    tokens = [t for e in events[:-2] for c in e.get("choices", []) for t in c.get("token_ids") or []]
    assert tokens == whole["choices"][0]["token_ids"]
    usage = next(e["usage"] for e in events[:-1] if e.get("usage"))
    assert usage["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"]


def test_chat_streams_carry_the_counters(server, tiny_llama):
    status, raw = request(server, "/v1/chat/completions", _body(str(tiny_llama), [{"text": DOC}], True, chat=True))
    assert status == 200
    events = _events(raw)
    assert events[-2]["object"] == "chat.completion.chunk"
    assert events[-2]["kv_transfer_params"]["lazyattention"]["document_blocks"] == -(-len(DOC) // BLOCK)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_a_refused_stream_streams_an_error(server, tiny_llama, chat):
    body = _body(str(tiny_llama), [{"id": "never-given-" + "x" * 200}], stream=True, chat=chat)
    status, raw = request(server, "/v1/chat/completions" if chat else "/v1/completions", body)
    assert status == 200  # a stream's status is sent before the engine answers, as vLLM's own stream errors
    events = _events(raw)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == 400 and error["param"] == "vllm_xargs.lazyattention"
    assert "unknown document id 'never-given-xxx" in error["message"]
    assert len(error["message"]) < 250, "the 211-character id was echoed whole"


def test_unstreamed_cached_tokens_count_the_prompt_only(server, tiny_llama):
    model = str(tiny_llama)
    body = _body(model, [{"text": DOC + " Again."}], stream=False)
    post(server, "/v1/completions", body)
    usage = post(server, "/v1/completions", body)["usage"]
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"]
