"""Document ids, scoped by tenant and bounded.

A request may give a document's content once with an ``id`` and name it by the id
afterwards. An id belongs to the request's ``cache_salt``, as vLLM's prefix cache keys
blocks by it: a tenant can neither read nor block another tenant's ids. The registry
keeps at most ``max_ids`` ids and ``max_tokens`` tokens of content over all tenants and
evicts the least recently used id past either bound (eviction forgets the name only;
the document's blocks stay in vLLM's cache until vLLM evicts them). The registry lives
in the scheduler's memory, like the KV cache itself: a restarted server knows no ids,
and a request naming one is refused until the content is given again.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["DocumentRegistry"]

Key = tuple[str, str]  # (cache_salt or "", id)


class DocumentRegistry:
    """Ids to token ids, per ``cache_salt``, least recently used evicted first.

    Args:
        max_ids: the most ids kept (all tenants together).
        max_tokens: the most tokens of content kept (all tenants together).
    """

    def __init__(self, max_ids: int, max_tokens: int) -> None:
        if max_ids < 1 or max_tokens < 1:
            raise ValueError(f"max_ids and max_tokens must be >= 1, got {max_ids} and {max_tokens}")
        self.max_ids = max_ids
        self.max_tokens = max_tokens
        self._entries: OrderedDict[Key, tuple[int, ...]] = OrderedDict()
        self._tokens = 0
        self.evicted = 0

    @staticmethod
    def _key(salt: str | None, doc_id: str) -> Key:
        return (salt or "", doc_id)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tokens(self) -> int:
        """Tokens of content held."""
        return self._tokens

    def get(self, salt: str | None, doc_id: str) -> tuple[int, ...] | None:
        """The content of ``doc_id`` under ``salt`` (marked as recently used), or None."""
        key = self._key(salt, doc_id)
        tokens = self._entries.get(key)
        if tokens is not None:
            self._entries.move_to_end(key)
        return tokens

    def put(self, salt: str | None, doc_id: str, tokens: tuple[int, ...]) -> None:
        """Register ``doc_id`` under ``salt``; evict the least recently used past the bounds.

        Raises:
            ValueError: ``tokens`` alone exceed ``max_tokens``.
        """
        if len(tokens) > self.max_tokens:
            raise ValueError(f"a document of {len(tokens)} tokens exceeds the registry's {self.max_tokens}")
        key = self._key(salt, doc_id)
        old = self._entries.pop(key, None)
        if old is not None:
            self._tokens -= len(old)
        self._entries[key] = tokens
        self._tokens += len(tokens)
        while len(self._entries) > self.max_ids or self._tokens > self.max_tokens:
            _, dropped = self._entries.popitem(last=False)
            self._tokens -= len(dropped)
            self.evicted += 1

    def ids(self, salt: str | None) -> list[str]:
        """The ids registered under ``salt``, least recently used first."""
        scope = salt or ""
        return [doc_id for s, doc_id in self._entries if s == scope]

    def forget(self, salt: str | None, doc_ids) -> list[str]:
        """Delete ``doc_ids`` under ``salt``; returns those that were registered."""
        gone = []
        for doc_id in doc_ids:
            tokens = self._entries.pop(self._key(salt, doc_id), None)
            if tokens is not None:
                self._tokens -= len(tokens)
                gone.append(doc_id)
        return gone
