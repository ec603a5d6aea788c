"""Attention masks from a per-token modality-ID array: causal and modality-mutual (MMA).

Every fused position carries one modality id:

  PAD    padding; attends to nothing and is seen by nobody.
  TEXT   ordinary text; causal.
  IMAGE  an image token (a resampler output); causal, and may also read the QUERY tokens that
         follow it within the same contiguous run of IMAGE/QUERY tokens of the same segment.
  QUERY  text that the preceding image may read (for the chat template: the question, from the
         newline after `<image>` up to and including `<|assistant|>`); otherwise causal, like TEXT.

The data pipeline decides which text is QUERY; this module never looks at token ids.

Worked examples (1 = may attend; rows are queries, columns keys). Layout `T I I Q Q T`
(text, two image tokens, two query tokens, answer text), one segment:

    kind="causal"          kind="mma"
    T  1 . . . . .         T  1 . . . . .
    I  1 1 . . . .         I  1 1 . 1 1 .     <- image rows read the query columns ahead of them
    I  1 1 1 . . .         I  1 1 1 1 1 .
    Q  1 1 1 1 . .         Q  1 1 1 1 . .     <- query rows stay causal
    Q  1 1 1 1 1 .         Q  1 1 1 1 1 .
    T  1 1 1 1 1 1         T  1 1 1 1 1 1     <- the answer is never visible to the image

Packed rows: segment ids `0 0 0 1 1` with modalities `I Q T I Q` give two independent blocks; the
second image reads only its own query:

    I  1 1 . . .
    Q  1 1 . . .
    T  1 1 1 . .
    I  . . . 1 1
    Q  . . . 1 1

Padding: `T T P` -> the PAD column is closed for everyone and the PAD row attends to nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PAD = 0
TEXT = 1
IMAGE = 2
QUERY = 3

KINDS = ("mma", "causal")


def attention_mask(modality_ids, segment_ids=None, kind: str = "mma"):
    """Boolean attention mask, True where query position t may attend to key position s.

    Args:
      modality_ids: int[B, L], values in {PAD, TEXT, IMAGE, QUERY}.
      segment_ids: int[B, L] or None (one segment per row). Packed examples get distinct ids;
        attention never crosses a segment boundary.
      kind: "mma" (modality-mutual attention) or "causal".

    Returns:
      bool[B, L, L].
    """
    if kind not in KINDS:
        raise ValueError(f"attention mask kind must be one of {KINDS}, got {kind!r}")
    modality_ids = jnp.asarray(modality_ids)
    if modality_ids.ndim != 2:
        raise ValueError(f"modality_ids must be int[B, L], got shape {modality_ids.shape}")
    if segment_ids is None:
        segment_ids = jnp.zeros_like(modality_ids)
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != modality_ids.shape:
        raise ValueError(
            f"segment_ids shape {segment_ids.shape} does not match modality_ids shape {modality_ids.shape}"
        )
    length = modality_ids.shape[1]
    position = jnp.arange(length)
    causal = position[:, None] >= position[None, :]  # [T, S]
    visible = modality_ids != PAD  # [B, L]
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = causal[None] & same_segment & visible[:, :, None] & visible[:, None, :]
    if kind == "causal":
        return mask

    in_run = (modality_ids == IMAGE) | (modality_ids == QUERY)
    continues = jnp.zeros_like(in_run).at[:, 1:].set(in_run[:, :-1] & (segment_ids[:, 1:] == segment_ids[:, :-1]))
    run_id = jnp.cumsum(in_run & ~continues, axis=1)  # equal within one IMAGE/QUERY run
    same_run = (run_id[:, :, None] == run_id[:, None, :]) & in_run[:, :, None] & in_run[:, None, :]
    image_reads_query = (modality_ids == IMAGE)[:, :, None] & (modality_ids == QUERY)[:, None, :]
    return mask | (image_reads_query & same_run & ~causal[None])


def default_positions(modality_ids, segment_ids=None):
    """Positions 0..n-1 counted within each segment (int32[B, L]).

    Without segment ids every row uses 0..L-1, padding included, as the original does.
    """
    modality_ids = jnp.asarray(modality_ids)
    batch, length = modality_ids.shape
    if segment_ids is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    segment_ids = jnp.asarray(segment_ids)
    starts = jnp.ones((batch, length), bool).at[:, 1:].set(segment_ids[:, 1:] != segment_ids[:, :-1])
    index = jnp.arange(length, dtype=jnp.int32)
    segment_start = jax.lax.cummax(jnp.where(starts, index[None], 0), axis=1)
    return index[None] - segment_start
