"""Every supported configuration of the fast path, compiled, at least once.

The property tests draw their configurations, so a compiled run may never meet one of
them: a float32 head dim 256 call once needed more shared memory than an sm_90 block
may have, and only failed when a user ran it. Here the grid is enumerated: every
function × head dim (64–256) × dtype (float16, bfloat16, float32), with the block size
that gives bulk tensor copies of key tiles and one that gives row gathers, each held to
the tolerance rule on one small case. Compiled only (``scripts/gpu_suite.sh`` runs it):
under the interpreter nothing is compiled, and the property tests cover the same
arithmetic there. ``benchmarks/compile_sm90.py`` checks the same grid's shared memory
and registers without a GPU.
"""

import pytest

from lazyattention.reference import RopeConfig
from tests.strategies import Case, DocSpec, RequestSpec, SegmentSpec

from .strategies import DEVICE, DTYPES
from .test_attention import check

FUNCTIONS = ("lazy_prefill", "raw_prefill", "eager_attention", "lazy_decode", "raw_decode")
HEAD_DIMS = (64, 80, 96, 128, 256)
#: 64: key tiles lie in one block (bulk tensor copies where the head dim is a power of
#: two); 5: tiles straddle blocks (row gathers).
BLOCK_SIZES = (64, 5)

pytestmark = pytest.mark.skipif(DEVICE.type != "cuda", reason="compiled kernels only (needs CUDA)")


def case(name: str, head_dim: int, block_size: int) -> Case:
    """Two requests over two shared documents (one placed past 65,536), GQA 4, partial
    interleaved rotary at head dim 256 (the configuration that once failed to load)."""
    queries = 1 if name.endswith("decode") else 70
    rope = RopeConfig(head_dim=head_dim)
    if head_dim == 256:
        rope = RopeConfig(head_dim=256, rotary_dim=128, style="interleaved")
    requests = (
        RequestSpec((SegmentSpec(0, 0), SegmentSpec(1, 300)), 80, 500, 500, queries),
        RequestSpec((SegmentSpec(1, 70_000),), 90, 70_200, 70_200, queries),
    )
    return Case((DocSpec(300), DocSpec(150)), requests, block_size, 8, 2, rope, seed=7)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_configuration_compiles_and_passes(name, head_dim, dtype, block_size):
    check(name, case(name, head_dim, block_size), dtype)


@pytest.mark.parametrize("block_size", (16, 32, 64))
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d.itemsize == 2], ids=str)
def test_head_dim_64_decode_tiles(block_size, dtype):
    """Decode at head dim 64 in 16-bit loads one block a key tile (16, 32 or 64 keys,
    bulk tensor copies, 4 or 5 pipeline stages): each block size the plan gives them."""
    check("lazy_decode", case("lazy_decode", 64, block_size), dtype)
