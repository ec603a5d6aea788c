"""Token-level losses and metrics (pure functions, float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_loss(logits, targets, weights):
    """Weighted mean cross-entropy over tokens.

    logits f[B, L, V]; targets int[B, L] (the token that should follow each position, i.e. already
    shifted); weights f[B, L] (0 for positions without a loss: images, prompt, padding).
    Returns (mean loss f32[], token count f32[]); the mean is 0 when no token carries weight.
    """
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    count = weights.sum()
    loss = ((log_z - target_logit) * weights).sum() / jnp.maximum(count, 1.0)
    return loss, count


def token_accuracy(logits, targets, weights):
    """Weighted fraction of positions whose argmax equals the target (f32[])."""
    weights = weights.astype(jnp.float32)
    hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return (hits * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def shift_targets(input_ids, loss_mask):
    """Targets and weights for next-token prediction from unshifted labels.

    input_ids int[B, L], loss_mask bool[B, L] (True where the token itself is to be predicted) ->
    targets int[B, L] with targets[:, t] = input_ids[:, t + 1], weights f32[B, L] = loss_mask[:, t + 1]
    (the last position predicts nothing).
    """
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    weights = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
    return targets, weights.astype(jnp.float32)
