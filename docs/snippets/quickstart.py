import torch

import lazyattention.reference as la  # attention, defined in pure PyTorch
from lazyattention.reference import Layout, Placement, RequestLayout, RopeConfig  # layout types of both backends

# import lazyattention.fast as la     # instead of the first import: Triton kernels, same names and signatures

torch.set_default_device("cuda" if torch.cuda.is_available() else "cpu")
S, H, HKV, D = 16, 8, 2, 64  # block size, query heads, KV heads, head dim
rope = RopeConfig(head_dim=D)
k_cache = torch.zeros(8, S, HKV, D)  # [N, S, Hkv, D]: 8 physical blocks
v_cache = torch.zeros_like(k_cache)

# A 20-token document prefilled alone: keys rotated at 0..19, in blocks 0, 1.
doc_k, doc_v = torch.randn(20, HKV, D), torch.randn(20, HKV, D)
pos = torch.arange(20)
la.write_kv(doc_k, doc_v, k_cache, v_cache, slots=pos, positions=pos, rope=rope)

# Two requests read that one copy at offsets 0 and 500, plus 4 own tokens each.
requests = []
for r, start in enumerate((0, 500)):
    blk, own_pos = 2 + r, torch.arange(start + 20, start + 24)
    own_k, own_v = torch.randn(4, HKV, D), torch.randn(4, HKV, D)
    slots = blk * S + torch.arange(4)
    la.write_kv(own_k, own_v, k_cache, v_cache, slots, own_pos, rope)
    doc = Placement(blocks=(0, 1), length=20, start=start)  # shift = start
    own = Placement((blk,), length=4, start=start + 20, stored_start=start + 20)
    requests.append(RequestLayout(segments=(doc,), own=own, num_queries=4))
layout = Layout(requests, block_size=S)

q = torch.randn(layout.num_queries, H, D)  # pre-RoPE queries [Tq, H, D]
out = la.lazy_prefill(q, k_cache, v_cache, layout, rope)  # zero copy
eager = la.eager_attention(q, k_cache, v_cache, layout, rope)  # the definition
print(f"max |lazy - eager| = {(out - eager).abs().max():.1e}")
