"""``LazyGuard``: the OpenAI server's middleware for the plugin (``--middleware``).

It runs in the API-server process, in front of vLLM's routes:

* **Every JSON body** (POST, PUT, PATCH; multipart and form bodies pass as they are)
  is decoded and checked before vLLM reads it (:mod:`.guard`): at most
  ``limits.max_body_bytes``, valid UTF-8, valid JSON, at most ``limits.max_depth``
  levels, every string valid Unicode without NUL. A violation is answered HTTP 400 in
  vLLM's error format, ``param`` naming the field (``vllm_xargs.lazyattention``,
  ``messages[0].content``, ``body``); nothing is queued and the engine never sees it.
  The ``lazyattention`` field inside ``vllm_xargs`` is a JSON string of its own; the
  validator checks it the same way (:mod:`.validator`).
* **Streamed requests that name documents** get the plugin's counters in a last chunk
  before ``data: [DONE]`` (``"choices": []`` and ``kv_transfer_params``), and a request
  the scheduler refuses streams an error event with its reason. vLLM's streams carry
  neither, so the middleware tags the request and, when its stream ends, asks the
  scheduler for the tag's counters with a registry request (``{"account": tag}``,
  :mod:`.request`) sent to the same server.

The limits are a class attribute: for others, subclass and pass the subclass's path.
No vLLM import.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import ClassVar

from .guard import BadInput, Limits, decode_json, short
from .request import FIELD, TAG_FIELD

__all__ = ["LazyGuard"]

_STREAMED_PATHS = {"/v1/completions", "/v1/chat/completions"}
_FORM_TYPES = (b"multipart/form-data", b"application/x-www-form-urlencoded")


def _error_body(message: str, param: str | None, code: int = 400) -> bytes:
    kind = "BadRequestError" if code == 400 else "InternalServerError"
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


async def _respond(send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _header(scope, name: bytes) -> bytes:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return b""


#: A body past the limit is read on (and dropped) up to this many bytes before the 400
#: is sent, so that a client still sending reads the answer instead of a reset connection.
DRAIN_BYTES = 64 << 20


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole body, or None if the client left; raises :class:`BadInput` past ``limit``."""
    body, size, more = bytearray(), 0, True
    while more and size <= DRAIN_BYTES:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= limit:
            body += chunk
        more = message.get("more_body", False)
    if size > limit:
        raise BadInput("body", f"{'more than ' if more else ''}{size} bytes exceed the limit of {limit}")
    return bytes(body)


class LazyGuard:
    """ASGI middleware; see the module docstring. ``vllm serve … --middleware
    lazyattention.integrations.vllm.middleware.LazyGuard``."""

    limits: ClassVar[Limits] = Limits()

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in ("POST", "PUT", "PATCH")
            or _header(scope, b"content-type").lower().startswith(_FORM_TYPES)
        ):
            await self.app(scope, receive, send)
            return
        try:
            body = await _read_body(receive, self.limits.max_body_bytes)
            if body is None:
                return
            value = decode_json(body, "body", self.limits) if body.strip() else None
        except BadInput as e:
            await _respond(send, 400, _error_body(str(e), e.field))
            return
        tag = None
        if scope["path"] in _STREAMED_PATHS and isinstance(value, dict) and value.get("stream") is True:
            tag, body = _tagged(value, body)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        if tag is None:
            await self.app(_with_length(scope, len(body)), replay, send)
            return
        stream = _CountedStream(self, scope, value, tag, send)
        await self.app(_with_length(scope, len(body)), replay, stream.send)

    async def ask(self, scope, value: dict, tag: str) -> dict:
        """The scheduler's answer for ``tag``: a registry request to this server's
        completions route, with the streamed request's model, salt and headers."""
        field = json.dumps({"account": tag})
        question = {"model": value.get("model"), "prompt": ".", "max_tokens": 1, "vllm_xargs": {FIELD: field}}
        if value.get("cache_salt") is not None:
            question["cache_salt"] = value["cache_salt"]
        body = json.dumps(question).encode()
        headers = [(k, v) for k, v in scope.get("headers", ()) if k.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        inner = {**scope, "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b""}
        inner["headers"] = headers
        status, chunks, sent = 500, [], False

        async def receive():
            nonlocal sent
            if sent:  # the question's client never leaves: vLLM cancels a request whose client leaves
                await asyncio.Event().wait()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def collect(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(inner, receive, collect)
        reply = b"".join(chunks)
        try:
            return json.loads(reply)["kv_transfer_params"][FIELD]
        except (ValueError, KeyError, TypeError):
            return {"error": f"lazyattention could not read the request's counters (HTTP {status}: {short(reply)})"}


def _with_length(scope, length: int):
    """``scope`` with its Content-Length set to ``length`` (the body may have been rewritten)."""
    headers = [(k, v) for k, v in scope.get("headers", ()) if k.lower() != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(length).encode())]}


def _tagged(value: dict, body: bytes) -> tuple[str | None, bytes]:
    """A fresh tag and the body with it beside the ``lazyattention`` field in
    ``vllm_xargs``; (None, body) when the request has no such field."""
    xargs = value.get("vllm_xargs")
    if not isinstance(xargs, dict) or FIELD not in xargs:
        return None, body
    tag = uuid.uuid4().hex
    return tag, json.dumps({**value, "vllm_xargs": {**xargs, TAG_FIELD: tag}}).encode()


class _CountedStream:
    """Passes a server-sent-event stream through; before ``data: [DONE]`` it sends the
    tag's counters as a last chunk, or the refusal as an error event."""

    def __init__(self, guard: LazyGuard, scope, value: dict, tag: str, send) -> None:
        self.guard, self.scope, self.value, self.tag, self._send = guard, scope, value, tag, send
        self.pending = b""
        self.last_chunk: dict | None = None
        self.streaming = False

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            content_type = dict((k.lower(), v) for k, v in message.get("headers", ())).get(b"content-type", b"")
            self.streaming = message["status"] == 200 and content_type.startswith(b"text/event-stream")
        if not self.streaming or message["type"] != "http.response.body":
            await self._send(message)
            return
        self.pending += message.get("body", b"")
        events = self.pending.split(b"\n\n")
        self.pending = events.pop()
        out = []
        for event in events:
            if event.strip() == b"data: [DONE]":
                out.append(await self._closing_event())
            else:
                self._note(event)
            out.append(event + b"\n\n")
        more = message.get("more_body", False)
        if not more and self.pending:
            out.append(self.pending)
            self.pending = b""
        await self._send({"type": "http.response.body", "body": b"".join(out), "more_body": more})

    def _note(self, event: bytes) -> None:
        if not event.startswith(b"data: "):
            return
        try:
            chunk = json.loads(event[6:])
        except ValueError:
            return
        if isinstance(chunk, dict) and "id" in chunk:
            self.last_chunk = chunk

    async def _closing_event(self) -> bytes:
        answer = await self.guard.ask(self.scope, self.value, self.tag)
        if "error" in answer:
            event = json.loads(_error_body(answer["error"], f"vllm_xargs.{FIELD}"))
        else:
            last = self.last_chunk or {}
            event = {
                "id": last.get("id"),
                "object": last.get("object"),
                "created": last.get("created"),
                "model": last.get("model", self.value.get("model")),
                "choices": [],
                "kv_transfer_params": {FIELD: answer},
            }
        return b"data: " + json.dumps(event).encode() + b"\n\n"
