import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lazyattention.serving.engine import Engine
from lazyattention.serving.loading import load_model

# A stand-in for a downloaded checkpoint: a tiny random Llama, saved the usual way.
folder = tempfile.mkdtemp()
config = LlamaConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
LlamaForCausalLM(config).save_pretrained(folder)  # config.json + model.safetensors

model = load_model(folder, backend="reference", dtype=torch.float32)
engine = Engine(model, strategy="lazy", num_blocks=64, block_size=16)

doc_a, doc_b = list(range(10, 40)), list(range(50, 70))  # token ids
first = engine.generate([1, 2, 3], documents=[doc_a, doc_b], max_new_tokens=4)
again = engine.generate([4, 5], documents=[doc_b, doc_a], max_new_tokens=4)  # reordered
print(first, again, f"segment cache hits: {engine.stats.hits}")
