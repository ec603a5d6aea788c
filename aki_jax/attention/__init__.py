"""Attention for aki-jax: the mask as per-token ranges, dense attention, and flash kernels.

ranges.py      AttentionRanges from modality/segment ids, tile classes (EMPTY/PARTIAL/FULL)
dense.py       recomputing_attention over a bool mask (the reference and the CPU path)
pallas_tpu.py  flash attention over ranges for TPU (Pallas Mosaic)
pallas_gpu.py  flash attention over ranges for GPU (Pallas Triton)
api.py         dot_product_attention, the one entry point, and implementation selection
"""

from aki_jax.attention.api import (
    KERNELS,
    dot_product_attention,
    kernel_attention,
    resolve_implementation,
    uses_ranges,
)
from aki_jax.attention.dense import recomputing_attention
from aki_jax.attention.ranges import (
    EMPTY,
    FULL,
    PARTIAL,
    AttentionRanges,
    attention_ranges,
    ranges_to_mask,
    tile_classes,
)

__all__ = [
    "EMPTY",
    "FULL",
    "KERNELS",
    "PARTIAL",
    "AttentionRanges",
    "attention_ranges",
    "dot_product_attention",
    "kernel_attention",
    "ranges_to_mask",
    "recomputing_attention",
    "resolve_implementation",
    "tile_classes",
    "uses_ranges",
]
