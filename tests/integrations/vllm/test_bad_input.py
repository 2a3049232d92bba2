"""Bad input: each malformed or unservable request is refused with a message naming
the problem, nothing is allocated for it, and the cache serves the next request as
before. The schema checks run without vLLM too."""

from __future__ import annotations

import re

import pytest

from lazyattention.integrations.vllm.model import UnsupportedModel, model_rope
from lazyattention.integrations.vllm.request import ControlSpec, LazyRequestError, parse_request
from tests.integrations.vllm.conftest import documents_params, random_tokens, scheduler_of
from tests.integrations.vllm.tiny_model import llama_config

MALFORMED = {
    "not an object": ("[1, 2]", "must be an object"),
    "bad JSON": ('{"documents": [', "not valid JSON"),
    "no documents": ({"documents": []}, "non-empty list"),
    "unknown key": ({"documents": [{"text": "x"}], "offsets": [1]}, "unknown keys ['offsets']"),
    "unknown document key": ({"documents": [{"text": "x", "begin": 3}]}, "unknown keys ['begin']"),
    "text and ids": ({"documents": [{"text": "x", "token_ids": [1]}]}, "both 'text' and 'token_ids'"),
    "nothing": ({"documents": [{"start": 3}]}, "needs 'text', 'token_ids' or the 'id'"),
    "negative start": ({"documents": [{"text": "x", "start": -1}]}, "documents[0].start must be >= 0"),
    "string start": ({"documents": [{"text": "x", "start": "7"}]}, "start must be an int"),
    "bool start": ({"documents": [{"text": "x", "start": True}]}, "start must be an int"),
    "empty ids": ({"documents": [{"token_ids": []}]}, "non-empty list of ints"),
    "negative id": ({"documents": [{"token_ids": [3, -2]}]}, "ints >= 0, got -2"),
    "bad query_start": ({"documents": [{"text": "x"}], "query_start": 1.5}, "query_start must be an int"),
    "lone surrogate": ('{"documents": [{"text": "a\\ud800"}]}', "documents[0].text: is not valid Unicode"),
    "lone surrogate, decoded": ({"documents": [{"text": "a\udfff"}]}, "lone surrogate U+DFFF"),
    "NUL in an id": ({"documents": [{"text": "x", "id": "a\x00"}]}, "documents[0].id: contains a NUL"),
    "too deep": ({"documents": [{"token_ids": [[1]]}]}, "documents[0].token_ids[0]: nested deeper than 4"),
    "too deep, as JSON": ("[" * 100_000, "lazyattention: nested deeper than 4"),
    "too many documents": ({"documents": [{"text": "x"}] * 257}, "names 257 documents; the limit is 256"),
    "long id": ({"documents": [{"text": "x", "id": "i" * 257}]}, "id has 257 characters; the limit is 256"),
    "two operations": ({"forget": ["a"], "list_ids": True}, "one of ['list_ids', 'forget', 'account'] alone"),
    "empty forget": ({"forget": []}, "forget must be a list of 1 to 256 ids"),
    "list_ids not true": ({"list_ids": 1}, "list_ids must be true"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_field_is_named(case):
    raw, message = MALFORMED[case]
    with pytest.raises(LazyRequestError, match=re.escape(message)):
        parse_request({"lazyattention": raw})


def test_echoed_values_are_cut_short():
    with pytest.raises(LazyRequestError) as error:
        parse_request({"lazyattention": {"documents": [{"text": "x", "start": "9" * 1_000_000}]}})
    assert len(str(error.value)) < 200 and "(1000002 characters)" in str(error.value)


def test_registry_operations_parse():
    assert parse_request({"lazyattention": '{"list_ids": true}'}) == ControlSpec(list_ids=True)
    assert parse_request({"lazyattention": {"forget": ["a", "b"]}}) == ControlSpec(forget=("a", "b"))
    assert parse_request({"lazyattention": {"account": "t1"}}) == ControlSpec(account="t1")


def test_no_field_is_a_plain_request():
    assert parse_request(None) is None
    assert parse_request({"other": 1}) is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic NTK"),
        ({"architectures": ["GPTJForCausalLM"]}, "this model is ['GPTJForCausalLM']"),
        ({"sliding_window": 64}, "sliding-window attention"),
    ],
)
def test_models_the_plugin_cannot_serve(overrides, message):
    with pytest.raises(UnsupportedModel, match=re.escape(message)):
        model_rope(llama_config(**overrides))


def test_llama_rope_is_read():
    rope = model_rope(llama_config(rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert rope.head_dim == 32 and rope.scaling.factor == 2.0


# --------------------------------------------------------------------------- in the engine

ENGINE_CASES = {
    "unknown id": ([{"id": "never-given"}], None, "unknown document id 'never-given'"),
    "past the bound": ([{"token_ids": [1, 2, 3], "start": 5000}], None, "does not fit the model's length bound 2048"),
    "query past the bound": ([{"token_ids": [1, 2, 3]}], 2047, "does not fit the model's length bound 2048"),
    "outside the vocabulary": ([{"token_ids": [1, 9999]}], None, "9999 is outside the vocabulary"),
}


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_engine_refuses_clearly_and_stays_consistent(llm, case):
    docs, query_start, message = ENGINE_CASES[case]
    good = [{"token_ids": random_tokens(300, 45), "id": "good"}]
    prompt = {"prompt_token_ids": random_tokens(301, 8)}
    (before,) = llm.generate([prompt], documents_params(good), use_tqdm=False)
    free = scheduler_of(llm).kv_cache_manager.block_pool.get_num_free_blocks()

    (bad,) = llm.generate([prompt], documents_params(docs, query_start=query_start), use_tqdm=False)
    assert bad.outputs[0].finish_reason == "abort"
    assert bad.outputs[0].token_ids == []
    assert message in bad.kv_transfer_params["lazyattention"]["error"]
    assert scheduler_of(llm).kv_cache_manager.block_pool.get_num_free_blocks() == free

    (after,) = llm.generate([prompt], documents_params([{"id": "good"}]), use_tqdm=False)
    assert after.outputs[0].token_ids == before.outputs[0].token_ids
    counts = after.kv_transfer_params["lazyattention"]
    assert counts["document_blocks_hit"] == counts["document_blocks"] == 2


def test_the_engine_refuses_a_malformed_field_at_admission(llm):
    """The validator runs in the front end: ``generate`` raises, nothing reaches the engine."""
    from vllm.exceptions import VLLMValidationError

    free = scheduler_of(llm).kv_cache_manager.block_pool.get_num_free_blocks()
    with pytest.raises(VLLMValidationError, match=re.escape("needs 'text', 'token_ids' or the 'id'")):
        llm.generate([{"prompt_token_ids": [1, 2]}], documents_params([{"start": 1}]), use_tqdm=False)
    assert scheduler_of(llm).kv_cache_manager.block_pool.get_num_free_blocks() == free


def test_the_plan_field_is_reserved(llm):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    forged = SamplingParams(max_tokens=2, extra_args={"lazyattention_plan": {"documents": []}})
    with pytest.raises(VLLMValidationError, match="reserved for the scheduler"):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], forged, use_tqdm=False)


def test_the_same_id_twice_with_other_content_is_refused(llm):
    docs = [{"token_ids": random_tokens(310, 20), "id": "twice"}, {"token_ids": random_tokens(311, 20), "id": "twice"}]
    (out,) = llm.generate([{"prompt_token_ids": [1, 2]}], documents_params(docs), use_tqdm=False)
    assert out.outputs[0].finish_reason == "abort"
    assert "id 'twice' is given twice in this request" in out.kv_transfer_params["lazyattention"]["error"]
    (unknown,) = llm.generate([{"prompt_token_ids": [1, 2]}], documents_params([{"id": "twice"}]), use_tqdm=False)
    assert "unknown document id 'twice'" in unknown.kv_transfer_params["lazyattention"]["error"], "it was registered"


def test_max_tokens_cut_at_the_bound_is_said(llm):
    """A document placed near the bound of 2048 leaves 2048 - (2030 + 3 + 8) = 7 tokens."""
    docs = [{"token_ids": [5, 6, 7], "start": 2030}]
    params = documents_params(docs, max_tokens=20, ignore_eos=True)
    (out,) = llm.generate([{"prompt_token_ids": random_tokens(312, 8)}], params, use_tqdm=False)
    assert out.kv_transfer_params["lazyattention"]["max_tokens_cut_to"] == 7
    assert len(out.outputs[0].token_ids) == 7 and out.outputs[0].finish_reason == "length"
    (fits,) = llm.generate([{"prompt_token_ids": random_tokens(312, 8)}], documents_params(docs, max_tokens=5))
    assert fits.kv_transfer_params["lazyattention"]["max_tokens_cut_to"] is None


def test_registry_operations_in_the_engine(llm):
    salted = {"prompt_token_ids": [1, 2], "cache_salt": "engine-tenant"}
    llm.generate([salted], documents_params([{"token_ids": random_tokens(313, 10), "id": "kept"}]), use_tqdm=False)
    (listed,) = llm.generate([salted], documents_params(None, list_ids=True), use_tqdm=False)
    assert listed.kv_transfer_params["lazyattention"] == {"ids": ["kept"]}
    (plain,) = llm.generate([{"prompt_token_ids": [1, 2]}], documents_params(None, list_ids=True), use_tqdm=False)
    assert "kept" not in plain.kv_transfer_params["lazyattention"]["ids"]
    (gone,) = llm.generate([salted], documents_params(None, forget=["kept"]), use_tqdm=False)
    assert gone.kv_transfer_params["lazyattention"] == {"forgotten": ["kept"]} and gone.outputs[0].token_ids == []
