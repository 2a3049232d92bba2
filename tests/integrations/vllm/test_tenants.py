"""Tenants on the live server: a document's id and its cached blocks belong to the
request's ``cache_salt``. Tenant B can neither read nor block tenant A's ids, the same
text under two salts is cached apart, and each tenant lists and deletes its own ids."""

from __future__ import annotations

import json

import pytest

from tests.integrations.vllm.conftest import BLOCK, VLLM_MISSING, post

pytest.importorskip("vllm", reason=VLLM_MISSING)

SECRET_A = "The launch code is 4242."
SECRET_B = "Tenant B keeps its own notes under the same name."


def _ask(port, model, field: dict, salt: str | None, prompt="Q: the code?", max_tokens=3) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": True,
        "vllm_xargs": {"lazyattention": json.dumps(field)},
        **({} if salt is None else {"cache_salt": salt}),
    }
    return post(port, "/v1/completions", body)


def _counters(reply: dict) -> dict:
    return reply["kv_transfer_params"]["lazyattention"]


def _blocks(text: str) -> int:
    return -(-len(text.encode()) // BLOCK)  # the tiny tokenizer: one token per byte


def test_tenants_neither_read_nor_block_each_others_ids(server, tiny_llama):
    model = str(tiny_llama)
    first_a = _ask(server, model, {"documents": [{"id": "secret", "text": SECRET_A}]}, "tenant-a")
    assert "error" not in _counters(first_a)

    b_reads = _ask(server, model, {"documents": [{"id": "secret"}]}, "tenant-b")
    assert b_reads["choices"][0]["finish_reason"] == "abort" and b_reads["choices"][0]["token_ids"] == []
    assert "unknown document id 'secret'" in _counters(b_reads)["error"]

    no_salt = _ask(server, model, {"documents": [{"id": "secret"}]}, None)
    assert "unknown document id 'secret'" in _counters(no_salt)["error"]

    b_registers = _ask(server, model, {"documents": [{"id": "secret", "text": SECRET_B}]}, "tenant-b")
    assert _counters(b_registers)["document_blocks"] == _blocks(SECRET_B)

    again_a = _ask(server, model, {"documents": [{"id": "secret"}]}, "tenant-a")
    assert _counters(again_a)["document_blocks"] == _counters(again_a)["document_blocks_hit"] == _blocks(SECRET_A)
    assert again_a["choices"][0]["token_ids"] == first_a["choices"][0]["token_ids"]


def test_the_same_text_under_two_salts_is_cached_apart(server, tiny_llama):
    model = str(tiny_llama)
    text = "A document both tenants happen to send, word for word."
    field = {"documents": [{"text": text}]}
    first_c = _counters(_ask(server, model, field, "tenant-c"))
    assert first_c["document_blocks_hit"] == 0
    first_d = _counters(_ask(server, model, field, "tenant-d"))
    assert first_d["document_blocks_hit"] == 0, "tenant d hit blocks that tenant c computed"
    again_d = _counters(_ask(server, model, field, "tenant-d"))
    assert again_d["document_blocks_hit"] == again_d["document_blocks"] == _blocks(text)


def test_each_tenant_lists_and_deletes_its_own_ids(server, tiny_llama):
    model = str(tiny_llama)
    for doc_id in ("one", "two"):
        _ask(server, model, {"documents": [{"id": doc_id, "text": f"Document {doc_id} of tenant e."}]}, "tenant-e")
    _ask(server, model, {"documents": [{"id": "one", "text": "Tenant f's one."}]}, "tenant-f")

    listed = _ask(server, model, {"list_ids": True}, "tenant-e", max_tokens=1)
    assert listed["choices"][0]["token_ids"] == []
    assert sorted(_counters(listed)["ids"]) == ["one", "two"]

    forgotten = _counters(_ask(server, model, {"forget": ["one", "never"]}, "tenant-e", max_tokens=1))
    assert forgotten == {"forgotten": ["one"]}
    assert _counters(_ask(server, model, {"list_ids": True}, "tenant-e", max_tokens=1))["ids"] == ["two"]
    assert (
        "unknown document id 'one'"
        in _counters(_ask(server, model, {"documents": [{"id": "one"}]}, "tenant-e"))["error"]
    )
    kept = _counters(_ask(server, model, {"documents": [{"id": "one"}]}, "tenant-f"))
    assert "error" not in kept and kept["document_blocks_hit"] == kept["document_blocks"]
