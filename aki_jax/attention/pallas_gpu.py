"""Flash attention over `AttentionRanges` for GPU (Pallas, Triton lowering): forward and backward.

Arrays inside (see `aki_jax.attention.kernel_attention`, which pads and transposes):
  q f[B, N, T, H], k/v f[B, N, S, H] with T, S multiples of the blocks and H a power of two (>= 16);
  the four ranges int32[B, T] / int32[B, S].

One program per (batch, head, query block) for the forward and dq passes, per (batch, head, key
block) for dk/dv. A program first reduces its own ranges to the hull of the blocks it can see
(`block_bounds`), loops only over those, and classifies each tile on the fly from both sides' bounds
(`classify_tile`): EMPTY tiles inside the hull are skipped by a branch, FULL tiles run without a
mask, PARTIAL tiles build it from iota comparisons. The arithmetic is FlashAttention-2's (running max
and sum, lse stored for the backward pass); a row that sees no key ends with output 0 (the caller
substitutes the dense path's convention).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from aki_jax.attention.ranges import EMPTY, FULL, AttentionRanges, block_bounds, classify_tile

NEG = -1e30  # finite "minus infinity", as in pallas_tpu
MIN_BLOCK = 16  # Triton's smallest matrix-multiply operand

_CompilerParams = getattr(pltriton, "CompilerParams", None) or pltriton.TritonCompilerParams


def _power_of_two(n: int) -> int:
    return max(MIN_BLOCK, 1 << (max(n, 1) - 1).bit_length())


def padded_head_dim(head_dim: int) -> int:
    """Triton loads power-of-two shapes: 96 (Phi-3.5) -> 128, 8 -> 16."""
    return _power_of_two(head_dim)


def fit_block(block: int, length: int) -> int:
    return min(block, _power_of_two(length))


def _dot(a, b, contract):
    dims = (((contract[0],), (contract[1],)), ((), ()))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None  # no TF32 for float32 inputs
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _tile_mask(ks, ke, qs, qe, q_first, k_first):
    """bool[bq, bk] from query ranges int32[bq] and key ranges int32[bk]."""
    shape = (ks.shape[0], qs.shape[0])
    rows = q_first + lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = k_first + lax.broadcasted_iota(jnp.int32, shape, 1)
    return (ks[:, None] <= cols) & (cols < ke[:, None]) & (qs[None, :] <= rows) & (rows < qe[None, :])


def _block_span(lo, hi, block: int, count: int):
    """Blocks [first, last) of size `block` covering positions [lo, hi); empty when lo >= hi."""
    first = jnp.clip(lo // block, 0, count)
    last = jnp.clip((hi + block - 1) // block, first, count)
    return first, last


def _visit(tile, carry, step):
    """step(carry, masked) on FULL / PARTIAL tiles, carry unchanged on EMPTY ones."""

    def visited(c):
        return lax.cond(tile == FULL, lambda c: step(c, False), lambda c: step(c, True), c)

    return lax.cond(tile == EMPTY, lambda c: c, visited, carry)


def _forward_kernel(q_ref, k_ref, v_ref, ks_ref, ke_ref, qs_ref, qe_ref, o_ref, lse_ref, *, scale, bq, bk):
    i = pl.program_id(2)
    q_first = i * bq
    q, ks, ke = q_ref[...], ks_ref[...], ke_ref[...]
    q_bounds = block_bounds(ks, ke)
    first, last = _block_span(q_bounds[0], q_bounds[1], bk, k_ref.shape[0] // bk)

    def body(j, carry):
        k_first = pl.multiple_of(j * bk, bk)
        cols = pl.ds(k_first, bk)
        qs, qe = qs_ref[cols], qe_ref[cols]
        tile = classify_tile(q_bounds, block_bounds(qs, qe), q_first, bq, k_first, bk)

        def step(carry, masked):
            m_prev, l_prev, acc = carry
            v = v_ref[cols, :]
            s = _dot(q, k_ref[cols, :], (1, 1)) * scale
            if masked:
                mask = _tile_mask(ks, ke, qs, qe, q_first, k_first)
                s = jnp.where(mask, s, NEG)
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
            p = jnp.exp(s - m_new[:, None])
            if masked:
                p = jnp.where(mask, p, 0.0)
            alpha = jnp.exp(m_prev - m_new)
            acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, (1, 0))
            return m_new, alpha * l_prev + jnp.sum(p, axis=1), acc

        return _visit(tile, carry, step)

    init = (
        jnp.full((bq,), NEG, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros(q.shape, jnp.float32),
    )
    m, row_sum, acc = lax.fori_loop(first, last, body, init)
    seen = row_sum > 0
    safe = jnp.where(seen, row_sum, 1.0)
    o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe), 0.0)


def _dq_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ks_ref, ke_ref, qs_ref, qe_ref, dq_ref, *, scale, bq, bk
):
    i = pl.program_id(2)
    q_first = i * bq
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    ks, ke = ks_ref[...], ke_ref[...]
    q_bounds = block_bounds(ks, ke)
    first, last = _block_span(q_bounds[0], q_bounds[1], bk, k_ref.shape[0] // bk)

    def body(j, dq):
        k_first = pl.multiple_of(j * bk, bk)
        cols = pl.ds(k_first, bk)
        qs, qe = qs_ref[cols], qe_ref[cols]
        tile = classify_tile(q_bounds, block_bounds(qs, qe), q_first, bq, k_first, bk)

        def step(dq, masked):
            k = k_ref[cols, :]
            s = _dot(q, k, (1, 1)) * scale
            p = jnp.exp(s - lse[:, None])
            if masked:
                p = jnp.where(_tile_mask(ks, ke, qs, qe, q_first, k_first), p, 0.0)
            dp = _dot(do, v_ref[cols, :], (1, 1))
            ds = p * (dp - delta[:, None]) * scale
            return dq + _dot(ds.astype(k.dtype), k, (1, 0))

        return _visit(tile, dq, step)

    dq = lax.fori_loop(first, last, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ks_ref, ke_ref, qs_ref, qe_ref, dk_ref, dv_ref, *, scale, bq, bk
):
    j = pl.program_id(2)
    k_first = j * bk
    k, v, qs, qe = k_ref[...], v_ref[...], qs_ref[...], qe_ref[...]
    k_bounds = block_bounds(qs, qe)
    first, last = _block_span(k_bounds[0], k_bounds[1], bq, q_ref.shape[0] // bq)

    def body(i, carry):
        q_first = pl.multiple_of(i * bq, bq)
        rows = pl.ds(q_first, bq)
        ks, ke = ks_ref[rows], ke_ref[rows]
        tile = classify_tile(block_bounds(ks, ke), k_bounds, q_first, bq, k_first, bk)

        def step(carry, masked):
            dk, dv = carry
            q, do = q_ref[rows, :], do_ref[rows, :]
            s = _dot(q, k, (1, 1)) * scale
            p = jnp.exp(s - lse_ref[rows][:, None])
            if masked:
                p = jnp.where(_tile_mask(ks, ke, qs, qe, q_first, k_first), p, 0.0)
            dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
            dp = _dot(do, v, (1, 1))
            ds = p * (dp - delta_ref[rows][:, None]) * scale
            return dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv

        return _visit(tile, carry, step)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(first, last, body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(b_len: int, hp: int):
    """BlockSpecs for grid (b, h, x): a block of `b_len` rows at x, or the whole sequence."""
    return dict(
        block=pl.BlockSpec((None, None, b_len, hp), lambda b, h, x: (b, h, x, 0)),
        row_block=pl.BlockSpec((None, None, b_len), lambda b, h, x: (b, h, x)),
        range_block=pl.BlockSpec((None, b_len), lambda b, h, x: (b, x)),
    )


def _whole(shape):
    if len(shape) == 4:
        return pl.BlockSpec((None, None) + tuple(shape[2:]), lambda b, h, x: (b, h, 0, 0))
    if len(shape) == 3:
        return pl.BlockSpec((None, None, shape[2]), lambda b, h, x: (b, h, 0))
    return pl.BlockSpec((None, shape[1]), lambda b, h, x: (b, 0))


def _call(kernel, grid, in_specs, out_specs, out_shape, interpret, num_warps, *args):
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
    )(*args)


def _forward(q, k, v, ks, ke, qs, qe, *, scale, bq, bk, interpret):
    b, n, t, hp = q.shape
    sp = _specs(bq, hp)
    return _call(
        functools.partial(_forward_kernel, scale=scale, bq=bq, bk=bk),
        (b, n, t // bq),
        [sp["block"], _whole(k.shape), _whole(v.shape), sp["range_block"], sp["range_block"]]
        + [_whole(qs.shape), _whole(qe.shape)],
        [sp["block"], sp["row_block"]],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
        interpret,
        4 if bq <= 64 else 8,
        q,
        k,
        v,
        ks,
        ke,
        qs,
        qe,
    )


def _backward(q, k, v, ks, ke, qs, qe, out, lse, d_out, *, scale, bq, bk, interpret):
    b, n, t, hp = q.shape
    s = k.shape[2]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    sq = _specs(bq, hp)
    dq = _call(
        functools.partial(_dq_kernel, scale=scale, bq=bq, bk=bk),
        (b, n, t // bq),
        [sq["block"], _whole(k.shape), _whole(v.shape), sq["block"], sq["row_block"], sq["row_block"]]
        + [sq["range_block"], sq["range_block"], _whole(qs.shape), _whole(qe.shape)],
        sq["block"],
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret,
        4,
        q,
        k,
        v,
        d_out,
        lse,
        delta,
        ks,
        ke,
        qs,
        qe,
    )
    sk = _specs(bk, hp)
    dk, dv = _call(
        functools.partial(_dkv_kernel, scale=scale, bq=bq, bk=bk),
        (b, n, s // bk),
        [_whole(q.shape), sk["block"], sk["block"], _whole(d_out.shape), _whole(lse.shape), _whole(delta.shape)]
        + [_whole(ks.shape), _whole(ke.shape), sk["range_block"], sk["range_block"]],
        [sk["block"], sk["block"]],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret,
        4,
        q,
        k,
        v,
        d_out,
        lse,
        delta,
        ks,
        ke,
        qs,
        qe,
    )
    return dq, dk, dv


def flash_attention(q, k, v, ranges: AttentionRanges, tiles, *, scale: float, block_q: int, block_k: int, interpret):
    """Attention over padded operands (module doc) -> f[B, N, T, H]; differentiable in q, k, v.

    `tiles` is unused (each program classifies its tiles itself); it keeps the TPU signature.
    interpret: False on a GPU, True to run Pallas' interpreter on any backend.
    """
    del tiles
    static = dict(scale=scale, bq=block_q, bk=block_k, interpret=interpret)

    @jax.custom_vjp
    def attend(q, k, v, ks, ke, qs, qe):
        return _forward(q, k, v, ks, ke, qs, qe, **static)[0]

    def attend_fwd(q, k, v, ks, ke, qs, qe):
        out, lse = _forward(q, k, v, ks, ke, qs, qe, **static)
        return out, (q, k, v, ks, ke, qs, qe, out, lse)

    def attend_bwd(residuals, d_out):
        dq, dk, dv = _backward(*residuals, d_out, **static)
        return dq, dk, dv, None, None, None, None

    attend.defvjp(attend_fwd, attend_bwd)
    return attend(q, k, v, *ranges)
