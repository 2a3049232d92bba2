"""The cache write and the log-sum-exp merge of the fast path against the reference."""

import pytest
import torch
from hypothesis import example, given, note, settings, target
from hypothesis import strategies as st

import lazyattention.fast as fast
import lazyattention.reference as reference
from lazyattention.reference import RopeConfig, assert_close
from tests.strategies import rope_configs

from .strategies import DEVICE, DTYPES, examples

F64 = torch.float64


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=examples(15, 20))
@example(rope=RopeConfig(head_dim=64), rotate=True, tokens=1, block_size=1, start=2**20, seed=0)
@example(
    rope=RopeConfig(head_dim=96, rotary_dim=32, style="interleaved"),
    rotate=False,
    tokens=9,
    block_size=4,
    start=0,
    seed=1,
)
@given(
    rope=rope_configs(),
    rotate=st.booleans(),
    tokens=st.integers(0, 40),
    block_size=st.sampled_from((1, 3, 16)),
    start=st.sampled_from((0, 17, 65_536, 2**20 - 3, 2**31 - 50)),
    seed=st.integers(0, 2**32 - 1),
)
def test_write_kv_matches_reference(dtype, rope, rotate, tokens, block_size, start, seed):
    note(f"rope={rope} rotate={rotate} T={tokens} S={block_size} start={start} seed={seed}")
    gen = torch.Generator().manual_seed(seed)
    hkv, d = 2, rope.head_dim
    blocks = tokens // block_size + 2
    k64 = torch.randn(tokens, hkv, d, generator=gen, dtype=F64).to(dtype)
    v64 = torch.randn(tokens, hkv, d, generator=gen, dtype=F64).to(dtype)
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens]
    positions = torch.arange(tokens, dtype=torch.int64) + start
    spec = rope if rotate else None

    def run(module, dt):
        kc = torch.full((blocks, block_size, hkv, d), float("nan"), dtype=dt, device=DEVICE)
        vc = torch.full_like(kc, float("nan"))
        module.write_kv(
            k64.to(dt).to(DEVICE), v64.to(dt).to(DEVICE), kc, vc, slots.to(DEVICE), positions.to(DEVICE), spec
        )
        return kc, vc

    (kc, vc), (rk, rv), (ok, ov) = run(fast, dtype), run(reference, dtype), run(reference, F64)
    written = torch.zeros(blocks * block_size, dtype=torch.bool)
    written[slots] = True
    for name, ours, ref, want in (("k", kc, rk, ok), ("v", vc, rv, ov)):
        flat = ours.view(blocks * block_size, hkv, d).cpu()
        assert torch.isnan(flat[~written]).all(), f"{name}: a slot outside `slots` was written"
        target(
            assert_close(
                flat[written],
                want.view(-1, hkv, d).cpu()[written],
                ref.view(-1, hkv, d).cpu()[written],
                dtype,
                f"write_kv {name}",
            ),
            label=f"write_kv {name}",
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=examples(15, 20))
@given(
    tokens=st.integers(1, 20),
    heads=st.integers(1, 4),
    d=st.sampled_from((64, 80, 128)),
    empty=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_merge_attention_matches_reference(dtype, tokens, heads, d, empty, seed):
    gen = torch.Generator().manual_seed(seed)
    out_a, out_b = (torch.randn(tokens, heads, d, generator=gen, dtype=F64).to(dtype) for _ in range(2))
    lse_a, lse_b = (4 * torch.randn(tokens, heads, generator=gen, dtype=F64) for _ in range(2))
    if empty:  # a part that saw no key: lse = −inf, weight 0; and a row where both are empty
        lse_a[0] = float("-inf")
        lse_b[-1, 0] = float("-inf")
        lse_a[-1, 0] = float("-inf")
    args = [t.to(DEVICE) for t in (out_a, lse_a.float(), out_b, lse_b.float())]
    out, lse = fast.merge_attention(*args)
    ref_out, ref_lse = reference.merge_attention(*args)
    want_out, want_lse = reference.merge_attention(
        out_a.double(), lse_a.float().double(), out_b.double(), lse_b.float().double()
    )
    assert_close(out, want_out, ref_out, dtype, "merge out")
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse).cpu(), finite.cpu())
    assert_close(
        lse[finite.to(lse.device)], want_lse[finite], ref_lse[finite.to(lse.device)], torch.float32, "merge lse"
    )
