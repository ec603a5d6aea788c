"""One entry point for every attention in the model: `dot_product_attention(q, k, v, mask)`.

`mask` is None (every key visible), a bool[B, T, S] mask, or `AttentionRanges`. Implementations
(`AKIConfig.attention_impl`, listed in `aki_jax.config.ATTENTION_IMPLEMENTATIONS`):

  None            `recomputing_attention` (dense, f32 scores, backward recomputes the probabilities)
  "auto"          "pallas_tpu" on TPU, "pallas_gpu" on GPU, None elsewhere (the default)
  "xla", "cudnn"  `jax.nn.dot_product_attention` with that implementation and the dense mask
  "pallas_tpu"    the flash kernel of `pallas_tpu` (Mosaic); "pallas_gpu" the one of `pallas_gpu` (Triton)
  "pallas_tpu_interpret", "pallas_gpu_interpret"
                  the same kernels run by Pallas' interpreters on any backend (tests, debugging)

The kernels take ranges only: a bool mask or None given to a kernel implementation falls back to
`recomputing_attention` (decode steps, evaluation's shared-prefix masks, the unmasked vision tower
and resampler). Ranges given to a dense implementation are expanded with `ranges_to_mask`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aki_jax.attention import pallas_gpu, pallas_tpu
from aki_jax.attention.dense import recomputing_attention
from aki_jax.attention.ranges import AttentionRanges, pad_ranges, ranges_to_mask, tile_classes
from aki_jax.config import ATTENTION_IMPLEMENTATIONS

KERNELS = ("pallas_tpu", "pallas_gpu", "pallas_tpu_interpret", "pallas_gpu_interpret")

# (block_q, block_k) per kernel: big enough to feed the matrix units, small enough that a 144-token
# image or a short segment still leaves whole tiles to skip.
DEFAULT_BLOCKS = {"pallas_tpu": (256, 256), "pallas_gpu": (64, 64)}


def resolve_implementation(implementation: str | None) -> str | None:
    """The implementation actually run: "auto" becomes a kernel name or None for this backend."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}")
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu"}.get(backend)


def uses_ranges(implementation: str | None) -> bool:
    """True when `implementation` runs a kernel, i.e. the model should pass ranges, not a bool mask."""
    return resolve_implementation(implementation) in KERNELS


def dot_product_attention(query, key, value, mask=None, *, implementation: str | None = None, blocks=None):
    """Softmax attention with scale head_dim**-0.5.

    query f[B, T, N, H], key/value f[B, S, N, H], mask None | bool[B, T, S] | AttentionRanges
    -> f[B, T, N, H]. A query that sees no key (PAD) yields the plain average of all S values,
    as the dense path does, on every implementation that supports the mask given.
    `blocks`: (block_q, block_k) for a kernel (default `DEFAULT_BLOCKS`).
    """
    impl = resolve_implementation(implementation)
    if impl in KERNELS and isinstance(mask, AttentionRanges):
        return kernel_attention(query, key, value, mask, kernel=impl, blocks=blocks)
    if isinstance(mask, AttentionRanges):
        mask = ranges_to_mask(mask)
    if impl is None or impl in KERNELS:
        return recomputing_attention(query, key, value, mask)
    if mask is not None:
        mask = mask[:, None, :, :]
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=impl)


def _interpret_params(kernel: str) -> bool:
    # Pallas' generic interpreter for both: it runs the TPU kernel's scalar prefetch, VMEM scratch and
    # grid order as written. `pltpu.InterpretParams()` would also simulate TPU DMAs and semaphores,
    # which these kernels do not use by hand, at ~1.5x the test time.
    return kernel.endswith("_interpret")


def kernel_attention(query, key, value, ranges: AttentionRanges, *, kernel: str, blocks=None):
    """A flash kernel over ranges (shapes as in `dot_product_attention`), inside a mesh via shard_map.

    Pads T and S to the blocks (the padding is never visible) and the head dim to what the kernel
    needs, and moves heads before positions ([B, N, T, H]) for the kernel's blocks.
    """
    b, t, n, h = query.shape
    s = key.shape[1]
    if ranges.k_start.shape != (b, t) or ranges.q_start.shape != (b, s):
        raise ValueError(
            f"attention ranges: k_start/k_end must be int32[B, T] = {(b, t)} and q_start/q_end int32[B, S] = "
            f"{(b, s)}, got {ranges.k_start.shape} and {ranges.q_start.shape}"
        )
    module = pallas_tpu if kernel.startswith("pallas_tpu") else pallas_gpu
    block_q, block_k = blocks or DEFAULT_BLOCKS[kernel.removesuffix("_interpret")]
    block_q, block_k = module.fit_block(block_q, t), module.fit_block(block_k, s)
    interpret = _interpret_params(kernel)

    def attend(query, key, value, ranges):
        tp, sp = -(-t // block_q) * block_q, -(-s // block_k) * block_k
        hp = module.padded_head_dim(h)
        padded = pad_ranges(ranges, tp, sp)
        tiles = tile_classes(padded, block_q, block_k)

        def prepare(x, length):  # [b, L, n, h] -> [b, n, Lp, hp]
            x = jnp.swapaxes(x, 1, 2)
            return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, hp - h)))

        out = module.flash_attention(
            prepare(query, tp),
            prepare(key, sp),
            prepare(value, sp),
            padded,
            tiles,
            scale=h**-0.5,
            block_q=block_q,
            block_k=block_k,
            interpret=interpret,
        )
        out = jnp.swapaxes(out[:, :, :t, :h], 1, 2)
        # The dense convention for a query that sees nothing: uniform weights over all S keys.
        sees_nothing = (ranges.k_start >= ranges.k_end)[:, :, None, None]
        mean_value = jnp.mean(value.astype(jnp.float32), axis=1, keepdims=True).astype(out.dtype)
        return jnp.where(sees_nothing, mean_value, out)

    return _in_mesh(attend, query, key, value, ranges)


def _in_mesh(fn, query, key, value, ranges):
    """fn under shard_map when a mesh is set: batch over the "act_batch" axes, heads over "act_heads".

    A Pallas call is opaque to XLA's partitioner, so without this it would gather every operand.
    Axes that do not divide the batch or the head count are left replicated.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(query, key, value, ranges)
    import flax.linen as nn
    from jax.sharding import PartitionSpec as P

    batch_axes, _, head_axes, _ = nn.logical_to_mesh_axes(("act_batch", None, "act_heads", None))

    def dividing(axes, dim):
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        size = 1
        for a in axes:
            size *= mesh.shape[a]
        return axes if axes and dim % size == 0 else None

    batch_axes = dividing(batch_axes, query.shape[0])
    head_axes = dividing(head_axes, query.shape[2])
    qkv = P(batch_axes, None, head_axes, None)
    rng = P(batch_axes, None)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(qkv, qkv, qkv, AttentionRanges(rng, rng, rng, rng)),
        out_specs=qkv,
        check_vma=False,
    )(query, key, value, ranges)
