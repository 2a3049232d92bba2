"""The fast backend (Triton kernels; on CPU under ``TRITON_INTERPRET=1``) inside the model.

Same request, same model: its own-token logits must meet the tolerance rule against the
float64 oracle (transformers' block-diagonal forward), with the reference backend in
float32 as the rule's reference, and its greedy tokens must equal the reference's.
"""

import pytest
import torch

from lazyattention.integrations.transformers import LazyRAG, Request, Sampling, block_diagonal, check_model
from lazyattention.reference import assert_close

from .models import float64_ops, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REQUEST = Request(segments=((5, 6, 7, 8, 9, 10), (12, 13, 14)), starts=(70_000, 2), own=(20, 21, 22), own_start=70_010)


def test_fast_backend_matches_the_oracle(tmp_path):
    model64 = tiny_model(tmp_path, "qwen2", "yarn", dtype=torch.float64)
    float64_ops(model64, check_model(model64).rope)
    _, want = block_diagonal(model64, None, REQUEST, Sampling(max_new_tokens=1), "sdpa", keep_own_logits=True)
    model = tiny_model(tmp_path, "qwen2", "yarn", dtype=torch.float32)
    reference = LazyRAG(model, None, backend="reference", num_blocks=16, block_size=16)
    fast = LazyRAG(model, None, backend="fast", num_blocks=16, block_size=16)
    got, ref = fast.own_logits(REQUEST), reference.own_logits(REQUEST)
    assert_close(got, want, ref, torch.float32, "fast backend logits")
    greedy = Sampling(max_new_tokens=3, stop_token_ids=())
    assert fast.generate(REQUEST, "lazy", greedy).tokens == reference.generate(REQUEST, "lazy", greedy).tokens
