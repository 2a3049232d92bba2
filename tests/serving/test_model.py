"""The model against Hugging Face ``transformers``, and its loader's errors.

Parity. A tiny random config is saved with ``save_pretrained`` (safetensors) and loaded
by our :func:`load_model`. The tolerance rule then reads:

* ``oracle``: the Hugging Face model in float64 — independent of our code. (Its RoPE
  tables are float32 even then: at the ≤ 48 positions used here that is an error of
  about 1e-7 in the logits, two orders under the float32 floor, so it does not
  blur the check.)
* ``reference``: the Hugging Face model in float32, the dtype under test;
* ``actual``: our model in float32.

So our float32 logits may be off the oracle by at most twice what ``transformers``
itself loses in float32, plus the float32 floor. Weights use ``initializer_range=0.2``
so that logits are of order one and the check is not trivially met. Greedy tokens must
be identical.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lazyattention.reference.rope import Llama3Scaling, YarnScaling
from lazyattention.reference.tolerance import assert_close
from lazyattention.serving.config import ModelConfig
from lazyattention.serving.engine import Engine
from lazyattention.serving.loading import load_model, load_tokenizer
from lazyattention.serving.model import Model, RMSNorm

SMALL = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.2,
)

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "llama3-scaling": (
        LlamaConfig,
        LlamaForCausalLM,
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            "rope_theta": 500000.0,
        },
    ),
    "llama-yarn": (
        LlamaConfig,
        LlamaForCausalLM,
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
    ),
    "llama-linear-bias": (
        LlamaConfig,
        LlamaForCausalLM,
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "attention_bias": True, "mlp_bias": True},
    ),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 4096}),
}


def _save(tmp_path, name):
    config_cls, model_cls, extra = ARCHITECTURES[name]
    torch.manual_seed(0)
    hf = model_cls(config_cls(**SMALL, **extra)).eval()
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_logits_match_transformers(tmp_path, name):
    hf = _save(tmp_path, name)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf.float()(ids).logits[0]
        oracle = hf.double()(ids).logits[0]
    ours = load_model(tmp_path, dtype=torch.float32)
    assert ours.cfg.model_type == hf.config.model_type
    actual = ours.logits(ids[0])
    assert oracle.abs().max() > 0.5, "logits too small for the check to mean anything"
    assert_close(actual, oracle, reference, torch.float32, f"{name} logits (ours fp32)")
    ours64 = load_model(tmp_path, dtype=torch.float64)
    assert_close(ours64.logits(ids[0]), oracle, reference, torch.float32, f"{name} logits (ours fp64)")


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_greedy_tokens_match_transformers(tmp_path, name):
    hf = _save(tmp_path, name)
    prompt = torch.randint(0, SMALL["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10)[0, 12:].tolist()
    model = load_model(tmp_path, dtype=torch.float32)
    for strategy in ("recompute", "lazy"):
        got = Engine(model, strategy, num_blocks=8, block_size=4).generate(prompt[0], max_new_tokens=10)
        assert got == expected, f"{strategy}: {got} != transformers {expected}"


def test_config_reads_architecture_details():
    qwen = ModelConfig.from_hf(Qwen2Config(**SMALL).to_dict())
    assert qwen.qkv_bias and not qwen.o_bias and qwen.sliding_window is None
    mistral = ModelConfig.from_hf(MistralConfig(**SMALL, sliding_window=64).to_dict())
    assert mistral.sliding_window == 64 and mistral.num_kv_heads == 2
    llama3 = ModelConfig.from_hf(LlamaConfig(**{**SMALL, **ARCHITECTURES["llama3-scaling"][2]}).to_dict())
    assert isinstance(llama3.rope.scaling, Llama3Scaling) and llama3.rope.base == 500000.0
    yarn = ModelConfig.from_hf(LlamaConfig(**{**SMALL, **ARCHITECTURES["llama-yarn"][2]}).to_dict())
    assert isinstance(yarn.rope.scaling, YarnScaling) and yarn.rope.attention_scaling > 1.0
    assert ModelConfig.llama3_1b().head_dim == 64


def test_unsupported_architecture_and_rope_are_refused(tmp_path):
    config = LlamaConfig(**SMALL).to_dict()
    with pytest.raises(ValueError, match=r"unsupported architecture.*gemma"):
        ModelConfig.from_hf({**config, "model_type": "gemma"})
    with pytest.raises(ValueError, match="dynamic"):
        ModelConfig.from_hf({**config, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="activation"):
        ModelConfig.from_hf({**config, "hidden_act": "gelu"})
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(tmp_path)


def test_checkpoint_that_does_not_match_is_refused(tmp_path):
    from safetensors.torch import save_file

    hf = _save(tmp_path, "llama")
    state = {k: v for k, v in hf.state_dict().items() if "layers.1." not in k}
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        load_model(tmp_path)


def test_sliding_window_longer_requests_are_refused():
    cfg = ModelConfig(**{**ModelConfig.tiny().__dict__, "sliding_window": 16})
    engine = Engine(Model(cfg).init_random(0), "lazy", num_blocks=16, block_size=4)
    with pytest.raises(ValueError, match="sliding window 16"):
        engine.add_request([1] * 10, documents=[[2] * 8], max_new_tokens=2)


def test_backends(monkeypatch):
    assert Model(ModelConfig.tiny()).backend.name == "reference"
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        Model(ModelConfig.tiny(), backend="cuda")
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            Model(ModelConfig.tiny(), backend="fast")


def test_model_modules_never_import_triton():
    code = (
        "import sys; import lazyattention.serving.model, lazyattention.serving.loading, lazyattention.serving.engine, "
        "lazyattention.serving.workload, lazyattention.cli; "
        "assert 'triton' not in sys.modules, sorted(m for m in sys.modules if 'triton' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tokenizer_is_optional(tmp_path):
    assert load_tokenizer(tmp_path) is None
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).encode("hello world").ids == [1, 2]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_rounds_as_llamas(dtype):
    """The norm without cast kernels around PyTorch's ``rms_norm`` gives, bit for bit,
    ``transformers``' Llama RMSNorm: statistics in float32, rounded, then the weight."""
    g = torch.Generator().manual_seed(0)
    weight, x = torch.rand(512, generator=g) + 0.5, torch.randn(64, 512, generator=g) * 3
    ours, theirs = RMSNorm(512, 1e-5), LlamaRMSNorm(512, eps=1e-5)
    ours.weight.data.copy_(weight)
    theirs.weight.data.copy_(weight)
    got, expected = ours.to(dtype)(x.to(dtype)), theirs.to(dtype)(x.to(dtype))
    assert got.dtype == dtype and torch.equal(got, expected)


def test_random_init_is_seeded():
    a = Model(ModelConfig.tiny()).init_random(3)
    b = Model(ModelConfig.tiny()).init_random(3)
    ids = torch.tensor([1, 2, 3, 4])
    assert torch.equal(a.logits(ids), b.logits(ids))
    assert not torch.equal(a.logits(ids), Model(ModelConfig.tiny()).init_random(4).logits(ids))
