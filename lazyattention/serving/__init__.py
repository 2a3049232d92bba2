"""``lazyattention.serving``: what serves requests over the definition.

The model (a Llama-family decoder whose attention calls a backend), the engine
(continuous batching over a paged, shared KV budget), the reuse strategies, the
workload and its metrics, the sweep and the quality check. None of it is part of the
definition, so none of it lives in :mod:`lazyattention.reference`.
"""
