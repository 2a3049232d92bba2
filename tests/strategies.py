"""The project's Hypothesis strategies, for the tests.

They live in the package (:mod:`lazyattention.testing.strategies`), where
``lazyattention check`` uses the same ones on a user's machine; this module only gives
the tests their short import path.
"""

from lazyattention.testing.strategies import (
    BLOCK_SIZES,
    GQA_RATIOS,
    HEAD_DIMS,
    Built,
    Case,
    DocSpec,
    RequestSpec,
    SegmentSpec,
    build,
    cases,
    edge_cases,
    kernel_edge_cases,
    realistic_cases,
    rope_configs,
    scalings,
    shifted,
    starts,
)

__all__ = [
    "BLOCK_SIZES",
    "GQA_RATIOS",
    "HEAD_DIMS",
    "Built",
    "Case",
    "DocSpec",
    "RequestSpec",
    "SegmentSpec",
    "build",
    "cases",
    "edge_cases",
    "kernel_edge_cases",
    "realistic_cases",
    "rope_configs",
    "scalings",
    "shifted",
    "starts",
]
