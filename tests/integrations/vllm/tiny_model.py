"""A tiny random Llama checkpoint with a byte-level tokenizer, written to a folder.

vLLM loads models from a folder (``config.json``, safetensors, a tokenizer); the tests
build one here instead of downloading. Head dim 32 and block size 32 are the smallest
the CPU attention of vLLM accepts. The tokenizer has one token per byte (no merges),
so any text tokenizes, and a chat template, so the OpenAI chat endpoint works.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB_BYTES = 256
BOS, EOS = VOCAB_BYTES, VOCAB_BYTES + 1
VOCAB_SIZE = VOCAB_BYTES + 2

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def llama_config(**overrides) -> dict:
    """A Llama config small enough for seconds on two CPU cores (GQA 4/2, D=32)."""
    config = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    config.update(overrides)
    return config


def byte_level_alphabet() -> list[str]:
    """The character byte-level BPE writes for each byte, indexed by the byte: printable
    bytes stand for themselves, the others for U+0100 upwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(VOCAB_BYTES)]


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer without merges: token i is byte i; ``<s>`` and ``</s>``
    follow; a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(byte_level_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def write_tiny_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    """Write config, random weights (safetensors) and the tokenizer to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = llama_config(**overrides)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the init, so logits are not flat
            p.mul_(4.0) if p.dim() > 1 else None
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), **config}))
    write_tokenizer(folder)
    return folder


def kv_bytes_per_token(**overrides) -> int:
    """KV bytes one token takes in the fp32 cache of :func:`llama_config`'s model."""
    c = llama_config(**overrides)
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * 4


def reference_generate(model, documents, starts, query, query_start, max_tokens: int):
    """Greedy tokens and their log-probabilities from transformers' eager forward.

    The documents are encoded apart (block-diagonal mask), each at its logical
    ``starts[d]``; the query tokens at ``query_start…`` see every document token and
    themselves causally, as do the generated tokens. Recomputed from scratch at each
    step (no cache): the definition, not an engine.

    Returns:
        ``(tokens, logprobs)``: lists of ``max_tokens`` ints and floats.
    """
    doc_tokens = [t for d in documents for t in d]
    doc_id = [d for d, doc in enumerate(documents) for _ in doc]
    doc_pos = [s + j for doc, s in zip(documents, starts, strict=True) for j in range(len(doc))]
    own = list(query)
    tokens, logprobs = [], []
    for _ in range(max_tokens):
        ids = torch.tensor([doc_tokens + own])
        n_doc, T = len(doc_tokens), len(doc_tokens) + len(own)
        pos = doc_pos + [query_start + i for i in range(len(own))]
        allowed = torch.zeros(T, T, dtype=torch.bool)
        for i in range(n_doc):
            for j in range(i + 1):
                allowed[i, j] = doc_id[i] == doc_id[j]
        allowed[n_doc:, :n_doc] = True
        allowed[n_doc:, n_doc:] = torch.tril(torch.ones(len(own), len(own), dtype=torch.bool))
        mask = torch.zeros(1, 1, T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=torch.tensor([pos])).logits[0, -1]
        lp = torch.log_softmax(logits.double(), dim=-1)
        token = int(torch.argmax(logits))
        tokens.append(token)
        logprobs.append(float(lp[token]))
        own.append(token)
    return tokens, logprobs
