"""Malformed bodies against the live server: each is refused with HTTP 400 naming the
field, and the server stays healthy.

Hypothesis draws a well-formed completions or chat body, a place in it (the prompt, a
message, the model, the salt, a document's text or id inside the ``lazyattention``
JSON string) and a fault to plant there: a lone surrogate, a NUL, nesting past the
limit; whole-body faults (invalid UTF-8, truncated JSON, 100,000 levels, a body past
the size limit) are pinned as examples. After each body, ``/health`` answers 200 and a
canary request naming a registered document returns the same tokens as before.
Bounded: ``MAX_EXAMPLES`` bodies and ``BUDGET_S`` seconds, whichever comes first.
"""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

from tests.integrations.vllm.conftest import VLLM_MISSING, request

pytest.importorskip("vllm", reason=VLLM_MISSING)

MAX_EXAMPLES = 30
BUDGET_S = 120
CANARY_DOC = "The canary sings at dawn, every day, whatever the weather."

FAULTS = {"surrogate": "\ud800", "low surrogate": "\udfff", "nul": "\x00"}
PLACES = ["prompt", "message", "model", "cache_salt", "document text", "document id"]


def _canary(port, model) -> list[int]:
    body = {
        "model": model,
        "prompt": "Q: when?",
        "max_tokens": 2,
        "temperature": 0,
        "return_token_ids": True,
        "vllm_xargs": {"lazyattention": json.dumps({"documents": [{"id": "canary"}]})},
    }
    status, raw = request(port, "/v1/completions", body)
    assert status == 200, raw[:500]
    return json.loads(raw)["choices"][0]["token_ids"]


@pytest.fixture(scope="module")
def canary(server, tiny_llama):
    model = str(tiny_llama)
    body = {
        "model": model,
        "prompt": "Q: when?",
        "max_tokens": 1,
        "vllm_xargs": {"lazyattention": json.dumps({"documents": [{"id": "canary", "text": CANARY_DOC}]})},
    }
    status, raw = request(server, "/v1/completions", body)
    assert status == 200, raw[:500]
    return _canary(server, model)


def _body(model: str, place: str, bad: str) -> tuple[dict, str]:
    """A body with ``bad`` planted at ``place``, and the field the 400 must name."""
    document = {"text": "Some text.", "id": "doc"}
    body = {"model": model, "max_tokens": 2, "temperature": 0}
    field = f"body.{place}"
    if place == "message":
        body["messages"] = [{"role": "user", "content": "Hi " + bad}]
        return body, "body.messages[0].content"
    body["prompt"] = "Hello"
    if place == "prompt":
        body["prompt"] += bad
    elif place == "model":
        body["model"] += bad
    elif place == "cache_salt":
        body["cache_salt"] = "tenant" + bad
    else:
        key = "text" if place == "document text" else "id"
        document[key] += bad
        field = f"lazyattention.documents[0].{key}"
    body["vllm_xargs"] = {"lazyattention": json.dumps({"documents": [document]})}
    return body, field


def _path(body: dict) -> str:
    return "/v1/chat/completions" if "messages" in body else "/v1/completions"


def _check_healthy(port, model, canary_tokens):
    status, _ = request(port, "/health", timeout=30)
    assert status == 200, "the server is not healthy after the body"
    assert _canary(port, model) == canary_tokens, "the canary's answer changed"


def _deep(depth: int) -> bytes:
    return b'{"model": "m", "prompt": ' + b"[" * depth + b"1" + b"]" * depth + b"}"


WHOLE_BODY_FAULTS = {
    "invalid UTF-8": (b'{"model": "m", "prompt": "\xff\xfe"}', "body", "not valid UTF-8"),
    "truncated JSON": (b'{"model": "m", "prompt": "x', "body", "not valid JSON"),
    "100,000 levels": (_deep(100_000), "body", "nested deeper than 32 levels"),
    "40 levels": (_deep(40), "body.prompt", "nested deeper than 32 levels"),
    "too large": (b'{"prompt": "' + b"x" * (9 << 20) + b'"}', "body", "exceed the limit"),
}


@pytest.mark.parametrize("fault", list(WHOLE_BODY_FAULTS))
def test_whole_body_faults_get_400(server, tiny_llama, canary, fault):
    raw, field, message = WHOLE_BODY_FAULTS[fault]
    status, answer = request(server, "/v1/completions", raw)
    assert status == 400, answer[:500]
    error = json.loads(answer)["error"]
    assert error["param"].startswith(field) and message in error["message"], error
    _check_healthy(server, str(tiny_llama), canary)


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(place=st.sampled_from(PLACES), fault=st.sampled_from(sorted(FAULTS)), salt=st.booleans())
@example(place="document text", fault="surrogate", salt=False)  # the body that stopped the engine
def test_malformed_strings_get_400_and_the_server_stays_healthy(server, tiny_llama, canary, place, fault, salt):
    start = getattr(test_malformed_strings_get_400_and_the_server_stays_healthy, "_start", None)
    if start is None:
        start = test_malformed_strings_get_400_and_the_server_stays_healthy._start = time.monotonic()
    if time.monotonic() - start > BUDGET_S:
        return
    model = str(tiny_llama)
    body, field = _body(model, place, FAULTS[fault])
    if salt and place != "cache_salt":
        body["cache_salt"] = "tenant-fuzz"
    raw = json.dumps(body).encode()  # ensure_ascii: a surrogate travels as \ud800, a NUL as \u0000
    note(raw.decode())
    status, answer = request(server, _path(body), raw)
    assert status == 400, answer[:500]
    message = json.loads(answer)["error"]["message"]
    assert field in message, message
    assert ("NUL" in message) == (fault == "nul"), message
    _check_healthy(server, model, canary)
