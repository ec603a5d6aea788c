"""Flash attention over `AttentionRanges` for TPU (Pallas, Mosaic lowering): forward and backward.

Arrays inside (see `aki_jax.attention.kernel_attention`, which pads and transposes):
  q f[B, N, T, H], k/v f[B, N, S, H] with T, S multiples of the blocks and H a multiple of 128;
  query ranges int32[B, T, 2] (k_start, k_end), key ranges int32[B, 2, S] (q_start, q_end).

Grids: (B, N, query blocks, key blocks) for the forward and dq passes, (B, N, key blocks, query
blocks) for dk/dv; the last axis is the reduction ("arbitrary"), the others are parallel. Two scalar
prefetch arrays steer each step: the tile class (EMPTY steps do nothing, FULL steps skip the mask,
PARTIAL steps build it from iota comparisons) and the block to fetch, which for an EMPTY tile repeats
the last fetched block so that the pipeline issues no copy for it.

Softmax state is kept as in FlashAttention-2: running row max m, row sum l and an f32 accumulator;
the forward pass stores lse = m + log(l) per row and the backward pass recomputes the probabilities
from it. A row that sees no key at all ends with l = 0 and output 0 (the caller substitutes the dense
path's convention).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from aki_jax.attention.ranges import EMPTY, FULL, PARTIAL, AttentionRanges

# Finite "minus infinity": exp(NEG - m) is exactly 0 and NEG - NEG is 0, never NaN.
NEG = -1e30
HEAD_DIM_MULTIPLE = 128  # Mosaic's lane width: head dims (96 for Phi-3.5) are zero-padded to it
ROW_MULTIPLE = 16  # sublane tiling of bf16; blocks shorter than the default are rounded to it

_CompilerParams = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams


def padded_head_dim(head_dim: int) -> int:
    return -(-head_dim // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE


def fit_block(block: int, length: int) -> int:
    """The block size to use for `length` positions: `block`, or less for a short sequence."""
    return min(block, -(-length // ROW_MULTIPLE) * ROW_MULTIPLE)


def _precision(dtype):
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _dot(a, b, contract):
    """a @ b contracting a's axis contract[0] with b's axis contract[1], accumulated in f32."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, precision=_precision(a.dtype), preferred_element_type=jnp.float32)


def _tile_mask(q_ranges, k_ranges, q_first, k_first):
    """bool[bq, bk] from query ranges int32[bq, 2] and key ranges int32[2, bk]."""
    shape = (q_ranges.shape[0], k_ranges.shape[1])
    rows = q_first + lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = k_first + lax.broadcasted_iota(jnp.int32, shape, 1)
    return (
        (q_ranges[:, 0:1] <= cols) & (cols < q_ranges[:, 1:2]) & (k_ranges[0:1, :] <= rows) & (rows < k_ranges[1:2, :])
    )


def _on_visited_tiles(tile, step):
    """Run step(masked) on a FULL (masked=False) or PARTIAL (masked=True) tile; nothing on an EMPTY one."""
    pl.when(tile == FULL)(functools.partial(step, False))
    pl.when(tile == PARTIAL)(functools.partial(step, True))


def _scores(q, k, scale, masked, mask_fn):
    s = _dot(q, k, (1, 1)) * scale
    mask = mask_fn() if masked else None
    return (s if mask is None else jnp.where(mask, s, NEG)), mask


def _forward_kernel(
    tiles, fetch, q_ref, k_ref, v_ref, qr_ref, kr_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale, bq, bk
):
    del fetch
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step(masked):
        v = v_ref[...]
        s, mask = _scores(
            q_ref[...], k_ref[...], scale, masked, lambda: _tile_mask(qr_ref[...], kr_ref[...], i * bq, j * bk)
        )
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        if masked:  # a row with nothing visible yet has m_new = NEG and exp(0) = 1 in every cell
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v.dtype), v, (1, 0))
        m_sc[...] = m_new

    _on_visited_tiles(tiles[b, i, j], step)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        row_sum = l_sc[...]
        seen = row_sum > 0
        safe = jnp.where(seen, row_sum, 1.0)
        o_ref[...] = (acc_sc[...] / safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(safe), 0.0)


def _dq_kernel(
    tiles, fetch, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qr_ref, kr_ref, dq_ref, dq_sc, *, scale, bq, bk
):
    del fetch
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def step(masked):
        k = k_ref[...]
        s, mask = _scores(q_ref[...], k, scale, masked, lambda: _tile_mask(qr_ref[...], kr_ref[...], i * bq, j * bk))
        p = jnp.exp(s - lse_ref[...])
        if masked:
            p = jnp.where(mask, p, 0.0)
        dp = _dot(do_ref[...], v_ref[...], (1, 1))
        ds = p * (dp - delta_ref[...]) * scale
        dq_sc[...] += _dot(ds.astype(k.dtype), k, (1, 0))

    _on_visited_tiles(tiles[b, i, j], step)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(
    tiles_t,
    fetch_t,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    qr_ref,
    kr_ref,
    dk_ref,
    dv_ref,
    dk_sc,
    dv_sc,
    *,
    scale,
    bq,
    bk,
):
    # Grid (B, N, key block j, query block i): the query block visited is the fetched one.
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(masked):
        q, do = q_ref[...], do_ref[...]
        s, mask = _scores(q, k_ref[...], scale, masked, lambda: _tile_mask(qr_ref[...], kr_ref[...], i * bq, j * bk))
        p = jnp.exp(s - lse_ref[...])
        if masked:
            p = jnp.where(mask, p, 0.0)
        dv_sc[...] += _dot(p.astype(do.dtype), do, (0, 0))
        dp = _dot(do, v_ref[...], (1, 1))
        ds = p * (dp - delta_ref[...]) * scale
        dk_sc[...] += _dot(ds.astype(q.dtype), q, (0, 0))

    del fetch_t
    _on_visited_tiles(tiles_t[b, j, i], step)

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def fetch_blocks(tiles):
    """int32[..., n] -> for each step the block to load: its own if visited, else the last visited
    one before it (the first visited one for leading EMPTY steps), so EMPTY steps cost no copy."""
    n = tiles.shape[-1]
    index = jnp.arange(n, dtype=jnp.int32)
    visited = tiles != EMPTY
    last = lax.cummax(jnp.where(visited, index, -1), axis=tiles.ndim - 1)
    first = jnp.argmax(visited, axis=-1).astype(jnp.int32)[..., None]
    return jnp.where(last >= 0, last, first).astype(jnp.int32)


def _specs(bq, bk, hp, reduce_over_keys: bool):
    """BlockSpecs for q-like, k-like, row-vector, query-range and key-range operands.

    Program ids are (b, h, i, j) with i the query block when reducing over keys, (b, h, j, i) else.
    """

    def ids(grid_ids, fetch):
        b, h, x, y = grid_ids
        return (b, h, x, fetch[b, x, y]) if reduce_over_keys else (b, h, fetch[b, x, y], x)

    def q_map(*a):
        b, h, i, _ = ids(a[:4], a[5])
        return b, h, i, 0

    def k_map(*a):
        b, h, _, j = ids(a[:4], a[5])
        return b, h, j, 0

    def qr_map(*a):
        b, _, i, _ = ids(a[:4], a[5])
        return b, i, 0

    def kr_map(*a):
        b, _, _, j = ids(a[:4], a[5])
        return b, 0, j

    return dict(
        q=pl.BlockSpec((None, None, bq, hp), q_map),
        k=pl.BlockSpec((None, None, bk, hp), k_map),
        row=pl.BlockSpec((None, None, bq, 1), q_map),
        qr=pl.BlockSpec((None, bq, 2), qr_map),
        kr=pl.BlockSpec((None, 2, bk), kr_map),
    )


def _call(kernel, grid, specs_in, specs_out, shapes_out, scratch, interpret, *args):
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=grid, in_specs=specs_in, out_specs=specs_out, scratch_shapes=scratch
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=shapes_out,
        compiler_params=_CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(*args)


def _forward(q, k, v, qr, kr, tiles, fetch, *, scale, bq, bk, interpret):
    b, n, t, hp = q.shape
    sp = _specs(bq, bk, hp, reduce_over_keys=True)
    kernel = functools.partial(_forward_kernel, scale=scale, bq=bq, bk=bk)
    out, lse = _call(
        kernel,
        (b, n, t // bq, k.shape[2] // bk),
        [sp["q"], sp["k"], sp["k"], sp["qr"], sp["kr"]],
        [sp["q"], sp["row"]],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t, 1), jnp.float32)],
        [pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, hp), jnp.float32)],
        interpret,
        tiles,
        fetch,
        q,
        k,
        v,
        qr,
        kr,
    )
    return out, lse


def _backward(q, k, v, qr, kr, tiles, fetch, out, lse, d_out, *, scale, bq, bk, interpret):
    b, n, t, hp = q.shape
    s = k.shape[2]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    sp = _specs(bq, bk, hp, reduce_over_keys=True)
    dq = _call(
        functools.partial(_dq_kernel, scale=scale, bq=bq, bk=bk),
        (b, n, t // bq, s // bk),
        [sp["q"], sp["k"], sp["k"], sp["q"], sp["row"], sp["row"], sp["qr"], sp["kr"]],
        sp["q"],
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        [pltpu.VMEM((bq, hp), jnp.float32)],
        interpret,
        tiles,
        fetch,
        q,
        k,
        v,
        d_out,
        lse,
        delta,
        qr,
        kr,
    )
    tiles_t = jnp.swapaxes(tiles, 1, 2)
    sp = _specs(bq, bk, hp, reduce_over_keys=False)
    dk, dv = _call(
        functools.partial(_dkv_kernel, scale=scale, bq=bq, bk=bk),
        (b, n, s // bk, t // bq),
        [sp["q"], sp["k"], sp["k"], sp["q"], sp["row"], sp["row"], sp["qr"], sp["kr"]],
        [sp["k"], sp["k"]],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        [pltpu.VMEM((bk, hp), jnp.float32), pltpu.VMEM((bk, hp), jnp.float32)],
        interpret,
        tiles_t,
        fetch_blocks(tiles_t),
        q,
        k,
        v,
        d_out,
        lse,
        delta,
        qr,
        kr,
    )
    return dq, dk, dv


def flash_attention(q, k, v, ranges: AttentionRanges, tiles, *, scale: float, block_q: int, block_k: int, interpret):
    """Attention over padded operands (module doc) -> f[B, N, T, H]; differentiable in q, k, v.

    tiles: int32[B, T / block_q, S / block_k] from `tile_classes(ranges, block_q, block_k)`.
    interpret: False on a TPU, or `pltpu.InterpretParams()` / True to run on CPU.
    """
    qr = jnp.stack([ranges.k_start, ranges.k_end], axis=-1)  # [B, T, 2]
    kr = jnp.stack([ranges.q_start, ranges.q_end], axis=1)  # [B, 2, S]
    fetch = fetch_blocks(tiles)
    static = dict(scale=scale, bq=block_q, bk=block_k, interpret=interpret)

    @jax.custom_vjp
    def attend(q, k, v, qr, kr, tiles, fetch):
        return _forward(q, k, v, qr, kr, tiles, fetch, **static)[0]

    def attend_fwd(q, k, v, qr, kr, tiles, fetch):
        out, lse = _forward(q, k, v, qr, kr, tiles, fetch, **static)
        return out, (q, k, v, qr, kr, tiles, fetch, out, lse)

    def attend_bwd(residuals, d_out):
        dq, dk, dv = _backward(*residuals, d_out, **static)
        return dq, dk, dv, None, None, None, None

    attend.defvjp(attend_fwd, attend_bwd)
    return attend(q, k, v, qr, kr, tiles, fetch)
