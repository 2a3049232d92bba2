"""Limits on request input, checked where the input arrives, before anything is queued.

A request body is decoded and walked once, without recursion: every string (keys
included) must be valid Unicode without NUL, the nesting is bounded, the body's size
is bounded. The first violation raises :class:`BadInput`, which names the field by its
path (``vllm_xargs.lazyattention``, ``messages[0].content``) and echoes at most
:data:`ECHO_CHARS` characters of what was given. :mod:`.middleware` applies this to
every JSON body the OpenAI server receives; :mod:`.request` applies it to the
``lazyattention`` field, which travels as a JSON string inside the body. No vLLM import.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["ECHO_CHARS", "Limits", "BadInput", "check_value", "decode_json", "short"]

#: The most characters of a client's input that a message repeats.
ECHO_CHARS = 64

# A lone surrogate (U+D800..U+DFFF) is a str that cannot be encoded: JSON's \ud800 escape
# decodes to one. NUL ends strings in C code further down (tokenizers, logs).
_FORBIDDEN = re.compile("[\x00\ud800-\udfff]")


@dataclass(frozen=True)
class Limits:
    """What one request may hold.

    Attributes:
        max_body_bytes: size of the raw body.
        max_depth: nesting of objects and arrays (the top level is depth 1).
        max_string_chars: length of any one string.
    """

    max_body_bytes: int = 8 << 20
    max_depth: int = 32
    max_string_chars: int = 2 << 20


class BadInput(ValueError):
    """Input refused before it is queued; ``field`` is the path of the offending value."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def short(value: Any, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, saying how long it was."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def _check_string(text: str, field: str, limits: Limits) -> None:
    if len(text) > limits.max_string_chars:
        raise BadInput(field, f"a string of {len(text)} characters exceeds the limit of {limits.max_string_chars}")
    bad = _FORBIDDEN.search(text)
    if bad is None:
        return
    code = ord(bad.group())
    if code == 0:
        raise BadInput(field, f"contains a NUL character (U+0000) at character {bad.start()}")
    raise BadInput(field, f"is not valid Unicode: a lone surrogate U+{code:04X} at character {bad.start()}")


def check_value(value: Any, field: str, limits: Limits = Limits()) -> None:
    """Walk a decoded JSON value; raise :class:`BadInput` at the first violation.

    Args:
        value: what ``json.loads`` returned (dicts, lists, strings, numbers, bools, None).
        field: the path of ``value`` itself, the prefix of every path reported.
        limits: the bounds.
    """
    stack = [(value, field, 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            _check_string(item, path, limits)
            continue
        if not isinstance(item, dict | list):
            continue
        if depth > limits.max_depth:
            raise BadInput(path, f"nested deeper than {limits.max_depth} levels")
        if isinstance(item, dict):
            for key, child in item.items():
                plain = len(key) <= ECHO_CHARS and _FORBIDDEN.search(key) is None
                name = f"{path}.{key}" if plain else f"{path}.<key {short(key)}>"
                _check_string(key, name, limits)
                stack.append((child, name, depth + 1))
        else:
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))


def decode_json(raw: bytes | str, field: str, limits: Limits = Limits()) -> Any:
    """Decode a JSON document within ``limits`` and check every string in it.

    Args:
        raw: the document; bytes must be UTF-8.
        field: the name reported for the document as a whole.
        limits: the bounds.

    Raises:
        BadInput: too large, not UTF-8, not JSON, too deep, or a string that is not
            valid Unicode or holds NUL; the message names the field.
    """
    size = len(raw)
    if size > limits.max_body_bytes:
        raise BadInput(field, f"{size} bytes exceed the limit of {limits.max_body_bytes}")
    if isinstance(raw, bytes | bytearray):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadInput(field, f"is not valid UTF-8 (byte {e.start})") from None
    try:
        value = json.loads(raw)
    except RecursionError:
        raise BadInput(field, f"nested deeper than {limits.max_depth} levels") from None
    except json.JSONDecodeError as e:
        raise BadInput(field, f"is not valid JSON ({e.msg} at character {e.pos})") from None
    check_value(value, field, limits)
    return value
