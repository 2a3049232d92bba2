"""lazyattention: deferred positional encoding for KV-cache reuse.

Two backends with one API: ``lazyattention.reference`` (pure PyTorch, the
definition) and ``lazyattention.fast`` (Triton kernels). Import the one you want;
neither is imported here, so ``import lazyattention`` never pulls in Triton.
"""

__version__ = "0.1.0"
