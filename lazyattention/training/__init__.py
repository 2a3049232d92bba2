"""``lazyattention.training``: block fine-tuning, so that a model reads documents encoded apart.

Lazy attention computes Block-Attention's function: each document encoded alone, the
question seeing all of them. A stock model was never trained on that function, so it
loses accuracy there; Block-Attention's recipe fine-tunes it on exactly that function
(and on ordinary prompts, so it stays a normal model). Here the recipe runs on the
project's own semantics — the request and mask :class:`~lazyattention.integrations.transformers.rag.LazyRAG`
serves — with LoRA adapters through ``peft``:

* :mod:`~lazyattention.training.examples`: training examples and batches;
* :mod:`~lazyattention.training.recipe`: the training loop (:func:`train`);
* :mod:`~lazyattention.training.lora`: adapters added, saved, loaded and merged;
* :mod:`~lazyattention.training.evaluate`: before/after on held-out questions;
* :mod:`~lazyattention.training.adapter`: the committed SmolLM2 adapter
  (:func:`load_block_ft`).

Install with ``pip install 'lazyattention[train]'``.
"""

from .adapter import block_ft_available, load_block_ft
from .lora import LoraSettings
from .recipe import TrainSettings, train

__all__ = ["TrainSettings", "LoraSettings", "train", "load_block_ft", "block_ft_available"]
