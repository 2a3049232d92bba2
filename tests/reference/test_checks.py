"""Bad input to the attention functions and to ``write_kv``: each call raises an error
naming the problem, before any arithmetic or write (``reference/checks.py``)."""

import pytest
import torch

from lazyattention.reference import (
    ATTENTION_API,
    Layout,
    Placement,
    RequestLayout,
    RopeConfig,
    eager_attention,
    lazy_decode,
    lazy_prefill,
    raw_decode,
    raw_prefill,
    write_kv,
)

D, S, HKV, H, N = 8, 2, 1, 2, 4
ROPE = RopeConfig(head_dim=D)
PREFILL = Layout([RequestLayout((Placement((0,), 2, 5),), Placement((1, 2), 3, 7), 2)], S)
DECODE = Layout([RequestLayout((Placement((0,), 2, 5),), Placement((1, 2), 3, 7), 1)], S)
PREFILL_FUNCTIONS = [lazy_prefill, raw_prefill, eager_attention]
DECODE_FUNCTIONS = [lazy_decode, raw_decode]


def inputs(rows=2, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(rows, H, D, generator=gen).to(dtype),
        torch.randn(N, S, HKV, D, generator=gen).to(dtype),
        torch.randn(N, S, HKV, D, generator=gen).to(dtype),
    )


def test_the_valid_calls_work():
    for fn in PREFILL_FUNCTIONS:
        assert fn(*inputs(), PREFILL, ROPE).shape == (2, H, D)
    for fn in DECODE_FUNCTIONS:
        assert fn(*inputs(1), DECODE, ROPE).shape == (1, H, D)


BAD_PREFILL = [
    # (how to break (q, k, v), layout, rope, scale, error, match)
    (lambda q, k, v: (q[0], k, v), PREFILL, ROPE, None, ValueError, r"q must be \[Tq, H, D\]"),
    (lambda q, k, v: (q, k[0], v), PREFILL, ROPE, None, ValueError, r"k_cache must be \[N, S, Hkv, D\]"),
    (lambda q, k, v: (q, k, v[:3]), PREFILL, ROPE, None, ValueError, "v_cache shape"),
    (lambda q, k, v: (q[..., :6], k, v), PREFILL, ROPE, None, ValueError, "head dim mismatch: q has D=6"),
    (lambda q, k, v: (q, k, v), PREFILL, RopeConfig(head_dim=16), None, ValueError, "rope.head_dim=16"),
    (
        lambda q, k, v: (q[:, :1].expand(2, 3, D), k.expand(N, S, 2, D), v.expand(N, S, 2, D)),
        PREFILL,
        ROPE,
        None,
        ValueError,
        "H=3 must be a multiple of KV heads Hkv=2",
    ),
    (lambda q, k, v: (q, k[:, :1], v[:, :1]), PREFILL, ROPE, None, ValueError, "cache block size 1 != layout"),
    (lambda q, k, v: (q[:1], k, v), PREFILL, ROPE, None, ValueError, "q has 1 rows but there are 2 query tokens"),
    (lambda q, k, v: (q.double(), k, v), PREFILL, ROPE, None, TypeError, "dtype mismatch"),
    (lambda q, k, v: (q.int(), k, v), PREFILL, ROPE, None, TypeError, "q has unsupported dtype torch.int32"),
    (lambda q, k, v: (q.to("meta"), k, v), PREFILL, ROPE, None, ValueError, "device mismatch: q meta"),
    (lambda q, k, v: (q, k, v.to("meta")), PREFILL, ROPE, None, ValueError, "device mismatch"),
    (lambda q, k, v: (q.numpy(), k, v), PREFILL, ROPE, None, TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: (q, k, v), PREFILL, ROPE, -1.0, ValueError, "scale must be a positive number"),
    (lambda q, k, v: (q, k, v), PREFILL, ROPE, "0.1", ValueError, "scale must be a positive number"),
    (lambda q, k, v: (q, k, v), "layout", ROPE, None, TypeError, "layout must be a Layout"),
    (lambda q, k, v: (q, k, v), PREFILL, {"head_dim": D}, None, TypeError, "rope must be a RopeConfig"),
    (lambda q, k, v: (q, k[:2], v[:2]), PREFILL, ROPE, None, ValueError, "block 2 is outside the cache"),
]


@pytest.mark.parametrize("fn", PREFILL_FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(("breaker", "layout", "rope", "scale", "error", "match"), BAD_PREFILL)
def test_bad_attention_input_is_rejected(fn, breaker, layout, rope, scale, error, match):
    q, k, v = breaker(*inputs())
    with pytest.raises(error, match=match):
        fn(q, k, v, layout, rope, scale)


@pytest.mark.parametrize("fn", DECODE_FUNCTIONS, ids=lambda f: f.__name__)
def test_decode_rejects_several_queries_per_request(fn):
    q, k, v = inputs(2)
    with pytest.raises(ValueError, match="q has 2 rows but there are 1 requests"):
        fn(q, k, v, PREFILL, ROPE)
    two = Layout([*PREFILL.requests, *PREFILL.requests], S)
    with pytest.raises(ValueError, match=r"decode takes one query per request; requests \[0, 1\]"):
        fn(*inputs(2), two, ROPE)


# --------------------------------------------------------------------------- write_kv


def write_inputs():
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(3, HKV, D, generator=gen), torch.randn(3, HKV, D, generator=gen)
    return k, v, torch.zeros(N, S, HKV, D), torch.zeros(N, S, HKV, D), torch.tensor([0, 1, 5]), torch.tensor([0, 1, 2])


BAD_WRITES = [
    (lambda k, v, kc, vc, sl, p: (k[0], v[0], kc, vc, sl, p), ValueError, r"k and v must both be \[T, Hkv, D\]"),
    (lambda k, v, kc, vc, sl, p: (k, v[:2], kc, vc, sl, p), ValueError, "k and v must both be"),
    (lambda k, v, kc, vc, sl, p: (k, v, kc[0], vc, sl, p), ValueError, r"caches must be \[N, S, Hkv, D\]"),
    (lambda k, v, kc, vc, sl, p: (k.expand(3, 2, D), v.expand(3, 2, D), kc, vc, sl, p), ValueError, "cache holds"),
    (lambda k, v, kc, vc, sl, p: (k.double(), v, kc, vc, sl, p), TypeError, "dtype mismatch"),
    (lambda k, v, kc, vc, sl, p: (k, v, kc, vc, sl.to("meta"), p), ValueError, "must be on one device"),
    (lambda k, v, kc, vc, sl, p: (k, v, kc, vc, sl.float(), p), ValueError, "slots must be an int32/int64 tensor"),
    (lambda k, v, kc, vc, sl, p: (k, v, kc, vc, sl[:2], p), ValueError, r"slots must be .* of shape \[3\]"),
    (lambda k, v, kc, vc, sl, p: (k, v, kc, vc, sl, p[:2]), ValueError, r"positions must be .* of shape \[3\]"),
    (lambda k, v, kc, vc, sl, p: (k, v, kc, vc, sl + 3, p), ValueError, r"slots must lie in \[0, 8\)"),
    (lambda k, v, kc, vc, sl, p: (k, v, kc, vc, sl - 1, p), ValueError, r"got range \[-1, 4\]"),
    (lambda k, v, kc, vc, sl, p: (k, v, kc, vc, torch.tensor([0, 1, 1]), p), ValueError, "slots must be distinct"),
    (
        lambda k, v, kc, vc, sl, p: (k, v, kc, vc, sl, p - 1),
        ValueError,
        r"positions must lie in \[0, 2147483647\), got range \[-1, ",
    ),
    (
        lambda k, v, kc, vc, sl, p: (k, v, kc, vc, sl, p + 2**31 - 3),
        ValueError,
        r"positions must lie in \[0, 2147483647\)",
    ),
    (lambda k, v, kc, vc, sl, p: (k.numpy(), v, kc, vc, sl, p), TypeError, "k must be a torch.Tensor"),
]


@pytest.mark.parametrize(("breaker", "error", "match"), BAD_WRITES)
def test_bad_write_is_rejected_and_writes_nothing(breaker, error, match):
    args = breaker(*write_inputs())
    k_cache, v_cache = args[2], args[3]
    before = k_cache.clone(), v_cache.clone()
    with pytest.raises(error, match=match):
        write_kv(*args, ROPE)
    if k_cache.device.type != "meta":
        assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_write_rejects_a_rope_for_another_head_dim():
    with pytest.raises(ValueError, match=r"rope\.head_dim=16 but k has D=8"):
        write_kv(*write_inputs(), RopeConfig(head_dim=16))


def test_write_puts_rotated_and_raw_keys_at_the_slots():
    k, v, k_cache, v_cache, slots, pos = write_inputs()
    write_kv(k, v, k_cache, v_cache, slots, pos, None)
    assert torch.equal(k_cache.view(-1, HKV, D)[slots], k) and torch.equal(v_cache.view(-1, HKV, D)[slots], v)
    write_kv(k, v, k_cache, v_cache, slots, pos + 9, ROPE)
    assert not torch.equal(k_cache.view(-1, HKV, D)[slots], k)
    untouched = torch.ones(N * S, dtype=torch.bool)
    untouched[slots] = False
    assert (k_cache.view(-1, HKV, D)[untouched] == 0).all()


def test_public_attention_functions_have_no_var_keyword_arguments():
    """STYLE: no ``**kwargs`` on public functions (the fast twins copy these signatures)."""
    import inspect

    import lazyattention.reference as ref

    for name in ATTENTION_API:
        params = inspect.signature(getattr(ref, name)).parameters.values()
        assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in params), name
    assert set(ATTENTION_API) <= set(ref.__all__)
    assert all(hasattr(ref, name) for name in ref.__all__)
