"""The per-request field: which documents a request reads, and where it places them.

A request names its documents in ``SamplingParams.extra_args["lazyattention"]`` (the
Python API), or in the request body of ``vllm serve``'s OpenAI endpoints as
``"vllm_xargs": {"lazyattention": "<the same object as a JSON string>"}`` (the server
forwards ``vllm_xargs`` into ``extra_args``; its values must be strings or numbers,
hence the JSON string). The object::

    {
      "documents": [
        {"text": "...", "id": "optional name", "start": 0},
        {"token_ids": [1, 2, 3]},
        {"id": "a name given earlier"}
      ],
      "query_start": 123
    }

* each document gives exactly one of ``text`` (tokenized with the model's tokenizer,
  no special tokens) or ``token_ids``, or only an ``id`` registered by an earlier
  request that gave its content;
* ``start`` (optional, an int >= 0) is the document's logical position; by default a
  document follows the one before it (the first starts at 0), so documents without
  starts are packed back to back in the order given. Reordered, gapped and
  overlapping starts are all valid;
* ``query_start`` (optional) is the logical position of the prompt's first token; by
  default the end of the furthest document;

An id belongs to the request's ``cache_salt``: one tenant's ids are invisible to
another. Instead of documents the field may hold one registry operation, answered at
once without generating (:class:`ControlSpec`)::

    {"list_ids": true}            the ids of the request's cache_salt
    {"forget": ["a", "b"]}        delete these ids of the request's cache_salt
    {"account": "<tag>"}          the counters of the finished request with that tag

This module only parses and validates the shape (no vLLM import): every string is
valid Unicode without NUL, the nesting and sizes are bounded (:mod:`.guard`). The
scheduler resolves ids, tokenizes text and checks positions against the model's bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .guard import BadInput, Limits, check_value, decode_json, short

__all__ = [
    "FIELD",
    "PLAN_FIELD",
    "TAG_FIELD",
    "MAX_DOCUMENTS",
    "MAX_ID_CHARS",
    "DocumentSpec",
    "LazyRequestSpec",
    "ControlSpec",
    "LazyRequestError",
    "parse_request",
    "request_tag",
]

#: The key in ``SamplingParams.extra_args`` (and in ``vllm_xargs``).
FIELD = "lazyattention"

#: The key of the scheduler's plan in ``extra_args`` (written by the scheduler only;
#: a request that sends it is refused).
PLAN_FIELD = "lazyattention_plan"

#: The key, beside the field, of a string that names the request for a later
#: ``account`` query (:mod:`.middleware` sets it on streamed requests); kept apart from
#: the field so that a request whose field is malformed still has it.
TAG_FIELD = "lazyattention_tag"

#: The most documents one request may name.
MAX_DOCUMENTS = 256

#: The longest document id.
MAX_ID_CHARS = 256

#: The bounds of the field itself (it is small: documents' content is its bulk).
FIELD_LIMITS = Limits(max_depth=4)

_DOCUMENT_KEYS = {"text", "token_ids", "id", "start"}
_REQUEST_KEYS = {"documents", "query_start"}
_CONTROL_KEYS = ("list_ids", "forget", "account")


class LazyRequestError(ValueError):
    """A request's ``lazyattention`` field is malformed or cannot be served."""


@dataclass(frozen=True)
class DocumentSpec:
    """One document as the request named it (content not yet resolved).

    Exactly one of ``text`` and ``token_ids`` is set, or neither (a reference by ``id``).
    """

    text: str | None
    token_ids: tuple[int, ...] | None
    id: str | None
    start: int | None


@dataclass(frozen=True)
class LazyRequestSpec:
    """A request that names documents."""

    documents: tuple[DocumentSpec, ...]
    query_start: int | None


@dataclass(frozen=True)
class ControlSpec:
    """A registry operation: exactly one of the three is set."""

    list_ids: bool = False
    forget: tuple[str, ...] = ()
    account: str | None = None


def _position(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LazyRequestError(f"{what} must be an int >= 0, got {short(value)}")
    if value < 0:
        raise LazyRequestError(f"{what} must be >= 0, got {value}")
    return value


def _document(d: int, raw: Any) -> DocumentSpec:
    what = f"lazyattention.documents[{d}]"
    if not isinstance(raw, dict):
        raise LazyRequestError(f"{what} must be an object, got {type(raw).__name__}")
    unknown = set(raw) - _DOCUMENT_KEYS
    if unknown:
        raise LazyRequestError(f"{what} has unknown keys {short(sorted(unknown))}; allowed: {sorted(_DOCUMENT_KEYS)}")
    text, token_ids, doc_id = raw.get("text"), raw.get("token_ids"), raw.get("id")
    if text is not None and token_ids is not None:
        raise LazyRequestError(f"{what} gives both 'text' and 'token_ids'; give one")
    if text is None and token_ids is None and doc_id is None:
        raise LazyRequestError(f"{what} needs 'text', 'token_ids' or the 'id' of a document given earlier")
    if text is not None and (not isinstance(text, str) or not text):
        raise LazyRequestError(f"{what}.text must be a non-empty string, got {short(text)}")
    if token_ids is not None:
        if not isinstance(token_ids, list | tuple) or not token_ids:
            raise LazyRequestError(f"{what}.token_ids must be a non-empty list of ints, got {short(token_ids)}")
        for t in token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise LazyRequestError(f"{what}.token_ids must hold ints >= 0, got {short(t)}")
        token_ids = tuple(token_ids)
    if doc_id is not None:
        _id(doc_id, f"{what}.id")
    start = raw.get("start")
    if start is not None:
        start = _position(start, f"{what}.start")
    return DocumentSpec(text=text, token_ids=token_ids, id=doc_id, start=start)


def _id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise LazyRequestError(f"{what} must be a non-empty string, got {short(value)}")
    if len(value) > MAX_ID_CHARS:
        raise LazyRequestError(f"{what} has {len(value)} characters; the limit is {MAX_ID_CHARS}")
    return value


def _control(raw: dict) -> ControlSpec:
    given = [k for k in _CONTROL_KEYS if k in raw]
    if len(given) != 1 or len(raw) != 1:
        raise LazyRequestError(
            f"lazyattention: a registry operation is one of {list(_CONTROL_KEYS)} alone, got keys {short(sorted(raw))}"
        )
    (key,) = given
    value = raw[key]
    if key == "list_ids":
        if value is not True:
            raise LazyRequestError(f"lazyattention.list_ids must be true, got {short(value)}")
        return ControlSpec(list_ids=True)
    if key == "account":
        return ControlSpec(account=_id(value, "lazyattention.account"))
    if not isinstance(value, list) or not value or len(value) > MAX_DOCUMENTS:
        raise LazyRequestError(f"lazyattention.forget must be a list of 1 to {MAX_DOCUMENTS} ids, got {short(value)}")
    return ControlSpec(forget=tuple(_id(x, f"lazyattention.forget[{i}]") for i, x in enumerate(value)))


def parse_request(extra_args: dict | None) -> LazyRequestSpec | ControlSpec | None:
    """Read ``extra_args["lazyattention"]``; ``None`` when the request names no documents.

    Raises:
        LazyRequestError: the field is malformed; the message names the key and
            repeats at most a few dozen characters of the value.
    """
    if extra_args and PLAN_FIELD in extra_args:
        raise LazyRequestError(f"extra_args[{PLAN_FIELD!r}] is reserved for the scheduler")
    if not extra_args or FIELD not in extra_args:
        return None
    raw = extra_args[FIELD]
    try:
        if isinstance(raw, str):
            raw = decode_json(raw, FIELD, FIELD_LIMITS)
        else:
            check_value(raw, FIELD, FIELD_LIMITS)
    except BadInput as e:
        raise LazyRequestError(str(e)) from None
    if not isinstance(raw, dict):
        raise LazyRequestError(f"lazyattention must be an object (or its JSON string), got {type(raw).__name__}")
    if any(k in raw for k in _CONTROL_KEYS):
        return _control(raw)
    unknown = set(raw) - _REQUEST_KEYS
    if unknown:
        raise LazyRequestError(
            f"lazyattention has unknown keys {short(sorted(unknown))}; allowed: {sorted(_REQUEST_KEYS)} "
            f"or one of {list(_CONTROL_KEYS)}"
        )
    docs = raw.get("documents")
    if not isinstance(docs, list) or not docs:
        raise LazyRequestError(f"lazyattention.documents must be a non-empty list, got {short(docs)}")
    if len(docs) > MAX_DOCUMENTS:
        raise LazyRequestError(f"lazyattention.documents names {len(docs)} documents; the limit is {MAX_DOCUMENTS}")
    query_start = raw.get("query_start")
    if query_start is not None:
        query_start = _position(query_start, "lazyattention.query_start")
    documents = tuple(_document(d, x) for d, x in enumerate(docs))
    return LazyRequestSpec(documents=documents, query_start=query_start)


def request_tag(extra_args: dict | None) -> str | None:
    """The request's :data:`TAG_FIELD`, if it is a usable string, else None."""
    tag = (extra_args or {}).get(TAG_FIELD)
    return tag if isinstance(tag, str) and 0 < len(tag) <= MAX_ID_CHARS else None
