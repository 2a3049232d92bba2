"""Fixtures of the transformers integration tests.

Without a CUDA device the fast backend's kernels run under the Triton interpreter: this
sets ``TRITON_INTERPRET=1`` before anything here imports Triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
