"""Switching a model's attention implementation for the length of a block."""

import pytest
import torch
from transformers import PreTrainedModel

from lazyattention.integrations.transformers.attention import ATTENTION_NAME, attention_implementation, register

from .models import tiny_model


def _implementations(model) -> list[str]:
    return [m.config._attn_implementation for m in model.modules() if isinstance(m, PreTrainedModel)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_switch_sets_what_transformers_sets_and_restores_it(tmp_path, arch):
    """The first switch goes through ``set_attn_implementation``; the later ones set the
    configs directly: both leave every submodel as transformers itself would."""
    model = tiny_model(tmp_path, arch)
    register()
    model.set_attn_implementation("sdpa")
    expected = []
    for name in (ATTENTION_NAME, "eager"):
        reference = tiny_model(tmp_path, arch)
        reference.set_attn_implementation(name)
        expected.append(_implementations(reference))
    for _ in range(3):  # the first round checks the names, the later ones switch directly
        for name, want in zip((ATTENTION_NAME, "eager"), expected, strict=True):
            with attention_implementation(model, name):
                assert _implementations(model) == want
            assert _implementations(model) == ["sdpa"] * len(want)


def test_the_switch_restores_after_an_error_and_refuses_an_unknown_name(tmp_path):
    model = tiny_model(tmp_path, "llama")
    model.set_attn_implementation("eager")
    with pytest.raises(RuntimeError, match="inside the block"), attention_implementation(model, "sdpa"):
        raise RuntimeError("inside the block")
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError), attention_implementation(model, "no-such-attention"):
        pass
    assert model.config._attn_implementation == "eager"
    with attention_implementation(model, "sdpa"), torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
