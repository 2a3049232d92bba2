"""Input limits (:mod:`lazyattention.integrations.vllm.guard`): every malformed body is
refused with the path of the offending field, every well-formed one passes unchanged.
No vLLM needed."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from lazyattention.integrations.vllm.guard import ECHO_CHARS, BadInput, Limits, check_value, decode_json, short

LIMITS = Limits(max_body_bytes=4096, max_depth=6, max_string_chars=300)

# Well-formed JSON within LIMITS: valid Unicode without NUL or surrogates.
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=12,
)


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@given(VALUES)
def test_well_formed_bodies_pass_unchanged(value):
    raw = json.dumps(value)
    if len(raw) > LIMITS.max_body_bytes or _depth(value) > LIMITS.max_depth:
        return
    assert decode_json(raw.encode(), "body", LIMITS) == value


@given(VALUES, st.sampled_from(["\ud800", "\udfff", "\x00"]), st.data())
def test_a_bad_string_anywhere_is_named(value, bad, data):
    """The bad string planted at a drawn path inside a well-formed value, as JSON
    escapes (how a client sends it): the error names exactly that path."""
    path, holder = "body", {"k": value}
    node = holder
    key = "k"
    while isinstance(node[key], dict | list) and node[key] and data.draw(st.booleans()):
        child = node[key]
        if isinstance(child, dict):
            sub = data.draw(st.sampled_from(sorted(child)))
            path += f".{sub}" if len(sub) <= ECHO_CHARS else f".<key {short(sub)}>"
        else:
            sub = data.draw(st.integers(0, len(child) - 1))
            path += f"[{sub}]"
        node, key = child, sub
    node[key] = "ok" + bad
    raw = json.dumps(holder["k"])  # ensure_ascii: the surrogate travels as \ud800, as clients send it
    note(raw)
    with pytest.raises(BadInput) as error:
        decode_json(raw, "body", Limits(max_depth=64))
    assert error.value.field == path
    assert ("NUL" in str(error.value)) == (bad == "\x00")


@pytest.mark.parametrize(
    ("raw", "field", "message"),
    [
        ("[" * 2000 + "]" * 2000, "body", "nested deeper than 6 levels"),
        ('{"a": [[[[[[1]]]]]]}', "body.a[0][0][0][0][0]", "nested deeper than 6 levels"),
        (b'{"a": "\xff"}', "body", "not valid UTF-8 (byte 7)"),
        ('{"a": ', "body", "not valid JSON"),
        ('"' + "x" * 5000 + '"', "body", "5002 bytes exceed the limit of 4096"),
        ('{"a": "' + "x" * 301 + '"}', "body.a", "301 characters exceeds the limit of 300"),
        ('{"\\u0000": 1}', "body.<key '\\x00'>", "NUL character"),
    ],
)
def test_limits_name_the_field(raw, field, message):
    with pytest.raises(BadInput, match=re.escape(message)) as error:
        decode_json(raw, "body", LIMITS)
    assert error.value.field == field


@pytest.mark.parametrize("opening", ["[", '{"a":'])
def test_a_body_100000_levels_deep_is_refused(opening):
    raw = opening * 100_000 + "1" + ("]" if opening == "[" else "}") * 100_000
    with pytest.raises(BadInput, match="nested deeper than 32 levels"):
        decode_json(raw, "body")


def test_a_decoded_value_is_checked_the_same_way():
    with pytest.raises(BadInput, match="lone surrogate U\\+D800 at character 1") as error:
        check_value({"documents": [{"text": "a\ud800"}]}, "lazyattention", LIMITS)
    assert error.value.field == "lazyattention.documents[0].text"


@given(st.text(min_size=0, max_size=500))
def test_echoes_are_short(text):
    assert len(short(text)) <= ECHO_CHARS + len("… (100000 characters)")
    assert short(text) == repr(text) or short(text).endswith(f"({len(repr(text))} characters)")
