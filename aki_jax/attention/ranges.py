"""The attention mask as four per-token ranges, and the tile classes they imply.

Every mask `aki_jax.mask.attention_mask` builds (causal or MMA, packed segments, padding, several
images per row) is exactly

    visible[t, s] = k_start[t] <= s < k_end[t]  and  q_start[s] <= t < q_end[s]

for four int32 arrays computed in O(L) from the modality and segment ids:

    k_start[t]  first non-PAD position of t's segment
    k_end[t]    end of t's IMAGE/QUERY run if t is IMAGE (mma), else t + 1
    q_start[s]  start of s's IMAGE/QUERY run if s is QUERY (mma), else s
    q_end[s]    one past the last non-PAD position of s's segment

A PAD position gets empty ranges (start == end == its own index): it sees nothing and nobody sees it.
Segments must be contiguous runs of equal ids (what packing produces); `attention_mask` would also
join two separated runs of one id, the ranges do not.

Worked example, layout `T I I Q Q T` (kind="mma", one segment), rows t, columns s:

    t  modality  k_start k_end | s  q_start q_end      mask
    0  T         0       1     | 0  0       6          1 . . . . .
    1  I         0       5     | 1  1       6          1 1 . 1 1 .   <- k_end = end of the I I Q Q run
    2  I         0       5     | 2  2       6          1 1 1 1 1 .
    3  Q         0       4     | 3  1       6          1 1 1 1 . .   <- q_start[3] = run start: images see it
    4  Q         0       5     | 4  1       6          1 1 1 1 1 .
    5  T         0       6     | 5  5       6          1 1 1 1 1 1

Because each condition is an interval, the minima and maxima of the four arrays over a block of
queries and a block of keys decide whether the tile is EMPTY (skipped), FULL (no mask needed) or
PARTIAL (mask computed from iota comparisons) without ever forming the mask (`tile_classes`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from aki_jax.mask import IMAGE, KINDS, PAD, QUERY

EMPTY, PARTIAL, FULL = 0, 1, 2

# Larger than any position: the neutral element of a minimum over an empty block.
_BIG = 2**30


class AttentionRanges(NamedTuple):
    """Query t may read key s iff k_start[t] <= s < k_end[t] and q_start[s] <= t < q_end[s].

    k_start, k_end: int32[B, T] (per query); q_start, q_end: int32[B, S] (per key).
    An entry with start >= end is empty (a PAD query or key).
    """

    k_start: jax.Array
    k_end: jax.Array
    q_start: jax.Array
    q_end: jax.Array

    def with_key_offset(self, offset, key_length: int) -> AttentionRanges:
        """These ranges with the keys moved to columns [offset, offset + T) of `key_length` keys.

        For a prefill into a KV cache: the other key columns are empty (never visible).
        """
        batch = self.q_start.shape[0]
        offset = jnp.asarray(offset, jnp.int32)
        empty = jnp.zeros((batch, key_length), jnp.int32)
        return AttentionRanges(
            self.k_start + offset,
            self.k_end + offset,
            jax.lax.dynamic_update_slice_in_dim(empty, self.q_start, offset, axis=1),
            jax.lax.dynamic_update_slice_in_dim(empty, self.q_end, offset, axis=1),
        )


def _reverse_cummin(x):
    return jnp.flip(jax.lax.cummin(jnp.flip(x, 1), axis=1), 1)


def attention_ranges(modality_ids, segment_ids=None, kind: str = "mma") -> AttentionRanges:
    """The four ranges of `aki_jax.mask.attention_mask(modality_ids, segment_ids, kind)` (see the module doc).

    modality_ids int[B, L], segment_ids int[B, L] or None -> AttentionRanges of int32[B, L] each.
    Pure and O(L): cumulative maxima/minima only.
    """
    if kind not in KINDS:
        raise ValueError(f"attention mask kind must be one of {KINDS}, got {kind!r}")
    modality_ids = jnp.asarray(modality_ids)
    if modality_ids.ndim != 2:
        raise ValueError(f"modality_ids must be int[B, L], got shape {modality_ids.shape}")
    segment_ids = jnp.zeros_like(modality_ids) if segment_ids is None else jnp.asarray(segment_ids)
    if segment_ids.shape != modality_ids.shape:
        raise ValueError(
            f"segment_ids shape {segment_ids.shape} does not match modality_ids shape {modality_ids.shape}"
        )
    batch, length = modality_ids.shape
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    real = modality_ids != PAD

    same_as_previous = jnp.zeros((batch, length), bool).at[:, 1:].set(segment_ids[:, 1:] == segment_ids[:, :-1])
    same_as_next = jnp.zeros((batch, length), bool).at[:, :-1].set(segment_ids[:, :-1] == segment_ids[:, 1:])
    segment_start = jax.lax.cummax(jnp.where(same_as_previous, 0, index), axis=1)
    segment_last = _reverse_cummin(jnp.where(same_as_next, length, index))
    # Leading and trailing PAD of a segment are skipped so that padded rows skip whole tiles.
    first_real_from = _reverse_cummin(jnp.where(real, index, length))  # first real position >= p
    last_real_upto = jax.lax.cummax(jnp.where(real, index, -1), axis=1)  # last real position <= p
    k_start = jnp.take_along_axis(first_real_from, segment_start, axis=1)
    q_end = jnp.take_along_axis(last_real_upto, segment_last, axis=1) + 1
    k_end = index + 1
    q_start = index

    if kind == "mma":
        in_run = (modality_ids == IMAGE) | (modality_ids == QUERY)
        continues = in_run & jnp.zeros_like(in_run).at[:, 1:].set(in_run[:, :-1]) & same_as_previous
        goes_on = in_run & jnp.zeros_like(in_run).at[:, :-1].set(in_run[:, 1:]) & same_as_next
        run_start = jax.lax.cummax(jnp.where(in_run & ~continues, index, 0), axis=1)
        run_end = _reverse_cummin(jnp.where(in_run & ~goes_on, index + 1, length))
        k_end = jnp.where(modality_ids == IMAGE, run_end, k_end)
        q_start = jnp.where(modality_ids == QUERY, run_start, q_start)

    def closed_on_pad(x):
        return jnp.where(real, x, index).astype(jnp.int32)

    return AttentionRanges(*(closed_on_pad(x) for x in (k_start, k_end, q_start, q_end)))


def ranges_to_mask(ranges: AttentionRanges):
    """bool[B, T, S]: the dense mask the ranges describe (for the dense fallback and for tests)."""
    t = jnp.arange(ranges.k_start.shape[1])[None, :, None]
    s = jnp.arange(ranges.q_start.shape[1])[None, None, :]
    return (
        (ranges.k_start[:, :, None] <= s)
        & (s < ranges.k_end[:, :, None])
        & (ranges.q_start[:, None, :] <= t)
        & (t < ranges.q_end[:, None, :])
    )


def pad_ranges(ranges: AttentionRanges, query_length: int, key_length: int) -> AttentionRanges:
    """The ranges extended with empty entries to `query_length` queries and `key_length` keys."""

    def pad(x, n):
        return jnp.pad(x, ((0, 0), (0, n - x.shape[1])))

    return AttentionRanges(
        pad(ranges.k_start, query_length),
        pad(ranges.k_end, query_length),
        pad(ranges.q_start, key_length),
        pad(ranges.q_end, key_length),
    )


def block_bounds(start, end):
    """Per-block statistics of ranges int32[..., n] -> five int32[...] arrays.

    (min start, max end) over the non-empty entries (the hull every visible cell lies in: an empty
    block has min >= max) and (max start, min end, all non-empty) for the full-tile test.
    Used on whole arrays here and on one loaded block inside the Triton kernel.
    """
    nonempty = start < end
    lo = jnp.min(jnp.where(nonempty, start, _BIG), axis=-1)
    hi = jnp.max(jnp.where(nonempty, end, -_BIG), axis=-1)
    start_max = jnp.max(start, axis=-1)
    end_min = jnp.min(end, axis=-1)
    all_nonempty = jnp.min(nonempty.astype(jnp.int32), axis=-1)
    return lo, hi, start_max, end_min, all_nonempty


def classify_tile(q_bounds, k_bounds, q_first, block_q: int, k_first, block_k: int):
    """EMPTY / PARTIAL / FULL (int32) for the tile of queries [q_first, q_first + block_q) and keys
    [k_first, k_first + block_k), from `block_bounds` of its query block and of its key block.

    Conservative: EMPTY only if no cell can be visible, FULL only if every cell is.
    """
    ks_lo, ke_hi, ks_max, ke_min, q_all = q_bounds
    qs_lo, qe_hi, qs_max, qe_min, k_all = k_bounds
    k_last, q_last = k_first + block_k, q_first + block_q
    empty = (ks_lo >= k_last) | (ke_hi <= k_first) | (qs_lo >= q_last) | (qe_hi <= q_first)
    full = (q_all * k_all > 0) & (ks_max <= k_first) & (ke_min >= k_last) & (qs_max <= q_first) & (qe_min >= q_last)
    return jnp.where(empty, EMPTY, jnp.where(full, FULL, PARTIAL)).astype(jnp.int32)


def tile_classes(ranges: AttentionRanges, block_q: int, block_k: int):
    """int32[B, ceil(T / block_q), ceil(S / block_k)] of EMPTY / PARTIAL / FULL (see `classify_tile`)."""
    t, s = ranges.k_start.shape[1], ranges.q_start.shape[1]
    n_q, n_k = -(-t // block_q), -(-s // block_k)
    padded = pad_ranges(ranges, n_q * block_q, n_k * block_k)
    batch = padded.k_start.shape[0]

    def blocks(x, n, size):
        return x.reshape(batch, n, size)

    q_bounds = block_bounds(blocks(padded.k_start, n_q, block_q), blocks(padded.k_end, n_q, block_q))
    k_bounds = block_bounds(blocks(padded.q_start, n_k, block_k), blocks(padded.q_end, n_k, block_k))
    q_bounds = tuple(x[:, :, None] for x in q_bounds)  # [B, n_q, 1]
    k_bounds = tuple(x[:, None, :] for x in k_bounds)  # [B, 1, n_k]
    q_first = (jnp.arange(n_q) * block_q)[None, :, None]
    k_first = (jnp.arange(n_k) * block_k)[None, None, :]
    return classify_tile(q_bounds, k_bounds, q_first, block_q, k_first, block_k)
