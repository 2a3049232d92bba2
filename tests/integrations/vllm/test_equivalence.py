"""The plugin in vLLM computes what the definition says: transformers' eager forward of
block-diagonal documents at their logical positions (DESIGN §1).

Documents of 29, 40 and 50 tokens (blocks of 32: none is whole blocks) in new orders,
at new offsets, overlapping and repeated; greedy tokens equal, fp32 log-probabilities
within 1e-4. A control serves the same documents with every shift 0 (each document
where it was cached) and must differ from the reference: the test can fail.
"""

from __future__ import annotations

import random

import pytest

from tests.integrations.vllm.conftest import VLLM_MISSING

pytest.importorskip("vllm", reason=VLLM_MISSING)

TOLERANCE = 1e-4
MAX_TOKENS = 6

rng = random.Random(0)
DOCS = {name: [rng.randrange(256) for _ in range(n)] for name, n in (("a", 40), ("b", 50), ("c", 29))}
QUERY = [rng.randrange(256) for _ in range(11)]

# (document names, their starts or None for packed, query_start or None)
CASES = {
    "packed": (("a", "b"), None, None),
    "reordered": (("b", "a", "c"), None, None),
    "offsets": (("c", "a"), (300, 77), 500),
    "overlapping": (("a", "b"), (0, 0), None),
    "repeated": (("a", "c", "a"), (0, 40, 200), None),
}


@pytest.fixture(scope="module")
def hf_model(tiny_llama):
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager", dtype=torch.float32).eval()


def _starts(names, starts):
    if starts is not None:
        return list(starts)
    out, running = [], 0
    for n in names:
        out.append(running)
        running += len(DOCS[n])
    return out


def _serve(llm, names, starts, query_start):
    from vllm import SamplingParams

    docs = [
        {"token_ids": DOCS[n], **({} if starts is None else {"start": s})}
        for n, s in zip(names, starts or [None] * len(names), strict=True)
    ]
    field = {"documents": docs, **({} if query_start is None else {"query_start": query_start})}
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, extra_args={"lazyattention": field})
    (out,) = llm.generate([{"prompt_token_ids": QUERY}], params, use_tqdm=False)
    completion = out.outputs[0]
    logprobs = [lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs, strict=True)]
    return list(completion.token_ids), logprobs, out


def _reference(hf_model, names, starts, query_start):
    from tests.integrations.vllm.tiny_model import reference_generate

    s = _starts(names, starts)
    qs = query_start if query_start is not None else max(x + len(DOCS[n]) for x, n in zip(s, names, strict=True))
    return reference_generate(hf_model, [DOCS[n] for n in names], s, QUERY, qs, MAX_TOKENS)


@pytest.mark.parametrize("case", list(CASES))
def test_same_tokens_and_logprobs_as_block_diagonal_eager(llm, hf_model, case):
    names, starts, query_start = CASES[case]
    tokens, logprobs, _ = _serve(llm, names, starts, query_start)
    ref_tokens, ref_logprobs = _reference(hf_model, names, starts, query_start)
    assert tokens == ref_tokens, f"{case}: vLLM {tokens} vs reference {ref_tokens}"
    worst = max(abs(a - b) for a, b in zip(logprobs, ref_logprobs, strict=True))
    assert worst <= TOLERANCE, f"{case}: max |Δlogprob| = {worst:.2e}"


def test_no_shift_control_differs(llm, hf_model):
    """Every document at start 0 (no shift) against the packed reference: must differ."""
    names = ("a", "b", "c")
    ref_tokens, ref_logprobs = _reference(hf_model, names, None, None)
    query_start = sum(len(DOCS[n]) for n in names)
    tokens, logprobs, _ = _serve(llm, names, (0, 0, 0), query_start)
    worst = max(abs(a - b) for a, b in zip(logprobs, ref_logprobs, strict=True))
    assert tokens != ref_tokens or worst > 100 * TOLERANCE, f"the control matched the reference (Δ={worst:.2e})"


def test_the_packed_head_major_layout_gives_the_same_answer(tiny_llama, hf_model):
    """vLLM asked for the ``LBHNC`` physical layout (the packed ``[num_blocks, num_kv_heads,
    block_size, 2 * head_size]`` stored as it reads) instead of its default ``LBNHC``."""
    import vllm.envs

    from tests.integrations.vllm.conftest import make_llm, scheduler_of

    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_KV_CACHE_LAYOUT", "LBHNC")
        vllm.envs.disable_envs_cache()  # an earlier engine in this process froze vLLM's environment
        engine = make_llm(tiny_llama)
    assert scheduler_of(engine).vllm_config.cache_config.kv_cache_layout == "LBHNC"
    names, starts, query_start = CASES["offsets"]
    tokens, logprobs, _ = _serve(engine, names, starts, query_start)
    ref_tokens, ref_logprobs = _reference(hf_model, names, starts, query_start)
    assert tokens == ref_tokens
    assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs, strict=True)) <= TOLERANCE
