"""Deferred positional encoding inside engines people already run.

Each integration is an optional extra with a package of its own (``transformers``:
``pip install 'lazyattention[transformers]'``); importing this package imports none of them.
"""
