"""The document-id registry: ids scoped by ``cache_salt``, bounded, least recently used
evicted first, listable and deletable. No vLLM needed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lazyattention.integrations.vllm.registry import DocumentRegistry


def test_ids_belong_to_their_salt():
    r = DocumentRegistry(max_ids=10, max_tokens=100)
    r.put("tenant-a", "secret", (4, 2, 4, 2))
    assert r.get("tenant-b", "secret") is None
    assert r.get(None, "secret") is None
    r.put("tenant-b", "secret", (7,))
    assert r.get("tenant-a", "secret") == (4, 2, 4, 2) and r.get("tenant-b", "secret") == (7,)
    assert r.ids("tenant-a") == ["secret"] and r.ids("tenant-c") == []


def test_forget_deletes_only_the_salts_ids():
    r = DocumentRegistry(max_ids=10, max_tokens=100)
    r.put("a", "x", (1,))
    r.put("b", "x", (2,))
    assert r.forget("a", ["x", "never"]) == ["x"]
    assert r.get("a", "x") is None and r.get("b", "x") == (2,)
    assert r.tokens == 1


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", None]), st.sampled_from("pqrstu"), st.integers(1, 9)),
        max_size=40,
    ),
    st.integers(1, 5),
    st.integers(9, 30),
)
def test_bounds_hold_and_the_least_recently_used_goes_first(puts, max_ids, max_tokens):
    r = DocumentRegistry(max_ids=max_ids, max_tokens=max_tokens)
    order = []  # keys, least recently used first
    for salt, doc_id, n in puts:
        key = (salt or "", doc_id)
        r.put(salt, doc_id, tuple(range(n)))
        if key in order:
            order.remove(key)
        order.append(key)
        assert len(r) <= max_ids and r.tokens <= max_tokens
        kept = {k for k in order if r.get(k[0], k[1]) is not None}
        # what is kept is a most-recent suffix of the use order
        assert kept == set(order[len(order) - len(kept) :])
        order = [k for k in order if k in kept]


def test_a_document_larger_than_the_registry_is_refused():
    r = DocumentRegistry(max_ids=2, max_tokens=3)
    with pytest.raises(ValueError, match="4 tokens exceeds the registry's 3"):
        r.put(None, "big", (1, 2, 3, 4))
