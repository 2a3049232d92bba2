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
  default the end of the furthest document.

This module only parses and validates the shape (no vLLM import); the scheduler
resolves ids, tokenizes text and checks positions against the model's bound.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["FIELD", "PLAN_FIELD", "DocumentSpec", "LazyRequestSpec", "LazyRequestError", "parse_request"]

#: The key in ``SamplingParams.extra_args`` (and in ``vllm_xargs``).
FIELD = "lazyattention"

#: The key of the scheduler's plan in ``extra_args`` (written by the scheduler only;
#: a request that sends it is refused).
PLAN_FIELD = "lazyattention_plan"

_DOCUMENT_KEYS = {"text", "token_ids", "id", "start"}
_REQUEST_KEYS = {"documents", "query_start"}


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
    documents: tuple[DocumentSpec, ...]
    query_start: int | None


def _position(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LazyRequestError(f"{what} must be an int >= 0, got {value!r}")
    if value < 0:
        raise LazyRequestError(f"{what} must be >= 0, got {value}")
    return value


def _document(d: int, raw: Any) -> DocumentSpec:
    what = f"lazyattention.documents[{d}]"
    if not isinstance(raw, dict):
        raise LazyRequestError(f"{what} must be an object, got {type(raw).__name__}")
    unknown = set(raw) - _DOCUMENT_KEYS
    if unknown:
        raise LazyRequestError(f"{what} has unknown keys {sorted(unknown)}; allowed: {sorted(_DOCUMENT_KEYS)}")
    text, token_ids, doc_id = raw.get("text"), raw.get("token_ids"), raw.get("id")
    if text is not None and token_ids is not None:
        raise LazyRequestError(f"{what} gives both 'text' and 'token_ids'; give one")
    if text is None and token_ids is None and doc_id is None:
        raise LazyRequestError(f"{what} needs 'text', 'token_ids' or the 'id' of a document given earlier")
    if text is not None and (not isinstance(text, str) or not text):
        raise LazyRequestError(f"{what}.text must be a non-empty string, got {text!r}")
    if token_ids is not None:
        if not isinstance(token_ids, list | tuple) or not token_ids:
            raise LazyRequestError(f"{what}.token_ids must be a non-empty list of ints, got {token_ids!r}")
        for t in token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise LazyRequestError(f"{what}.token_ids must hold ints >= 0, got {t!r}")
        token_ids = tuple(token_ids)
    if doc_id is not None and (not isinstance(doc_id, str) or not doc_id):
        raise LazyRequestError(f"{what}.id must be a non-empty string, got {doc_id!r}")
    start = raw.get("start")
    if start is not None:
        start = _position(start, f"{what}.start")
    return DocumentSpec(text=text, token_ids=token_ids, id=doc_id, start=start)


def parse_request(extra_args: dict | None) -> LazyRequestSpec | None:
    """Read ``extra_args["lazyattention"]``; ``None`` when the request names no documents.

    Raises:
        LazyRequestError: the field is malformed; the message names the key and value.
    """
    if extra_args and PLAN_FIELD in extra_args:
        raise LazyRequestError(f"extra_args[{PLAN_FIELD!r}] is reserved for the scheduler")
    if not extra_args or FIELD not in extra_args:
        return None
    raw = extra_args[FIELD]
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise LazyRequestError(f"lazyattention: not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(raw, dict):
        raise LazyRequestError(f"lazyattention must be an object (or its JSON string), got {type(raw).__name__}")
    unknown = set(raw) - _REQUEST_KEYS
    if unknown:
        raise LazyRequestError(f"lazyattention has unknown keys {sorted(unknown)}; allowed: {sorted(_REQUEST_KEYS)}")
    docs = raw.get("documents")
    if not isinstance(docs, list) or not docs:
        raise LazyRequestError(f"lazyattention.documents must be a non-empty list, got {docs!r}")
    query_start = raw.get("query_start")
    if query_start is not None:
        query_start = _position(query_start, "lazyattention.query_start")
    return LazyRequestSpec(documents=tuple(_document(d, x) for d, x in enumerate(docs)), query_start=query_start)
