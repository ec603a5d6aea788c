"""The train step: loss, gradients (optionally accumulated over micro-batches), AdamW update, metrics.

Batches follow the shared format: {"pixel_values": f32[B, I, S, S, 3], "input_ids", "modality_ids",
"segment_ids", "positions", "targets": int32[B, L], "weights": f32[B, L]}. Captions (pretraining) and
answer-only SFT differ only in `weights`, so one loss serves both.

Gradient accumulation sums token-weighted losses over micro-batches and divides by the total number
of supervised tokens once, so k micro-batches give exactly the gradient of one batch k times the size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from aki_jax.config import AKIConfig
from aki_jax.losses import next_token_loss
from aki_jax.model import AKI
from aki_jax.training.state import merge, split_trainable

MODEL_INPUTS = ("pixel_values", "input_ids", "modality_ids", "segment_ids", "positions")


def forward(params, batch, config: AKIConfig):
    """logits f32[B, L, V] for a batch dict (pixel_values may be absent or have I = 0)."""
    pixel_values = batch.get("pixel_values")
    return AKI(config).apply(
        {"params": params},
        pixel_values,
        batch["input_ids"],
        batch["modality_ids"],
        batch.get("segment_ids"),
        batch.get("positions"),
    )


def summed_loss(trainable, frozen, batch, config: AKIConfig):
    """Token-weighted loss *sum* (not mean) and (token count, correct-token count)."""
    logits = forward(merge(trainable, frozen), batch, config)
    mean, count = next_token_loss(logits, batch["targets"], batch["weights"])
    hits = ((jnp.argmax(logits, -1) == batch["targets"]) * batch["weights"]).sum()
    return mean * count, (count, hits)


def microbatches(batch: dict, k: int) -> dict:
    """[B, ...] -> [k, B/k, ...] with micro-batch i = rows i, i+k, i+2k, ...

    Strided rather than contiguous so that every device's slice of a batch-sharded array holds rows of
    every micro-batch: no resharding between micro-steps.
    """

    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} rows is not divisible by grad_accum={k}")
        return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def loss_and_grads(trainable, frozen, batch, config: AKIConfig, grad_accum: int):
    """(loss sum, token count, hits, grads of the loss sum) over the whole batch."""
    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)
    if grad_accum == 1:
        (loss_sum, (count, hits)), grads = grad_fn(trainable, frozen, batch, config)
        return loss_sum, count, hits, grads

    def micro_step(carry, micro):
        (loss_sum, (count, hits)), grads = grad_fn(trainable, frozen, micro, config)
        acc_loss, acc_count, acc_hits, acc_grads = carry
        acc_grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc_grads, grads)
        return (acc_loss + loss_sum, acc_count + count, acc_hits + hits, acc_grads), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
    init = (jnp.float32(0), jnp.float32(0), jnp.float32(0), zeros)
    (loss_sum, count, hits, grads), _ = jax.lax.scan(micro_step, init, microbatches(batch, grad_accum))
    return loss_sum, count, hits, grads


def train_step(state: dict, batch: dict, *, config: AKIConfig, optimizer, schedule, grad_accum: int = 1):
    """One optimizer step. Returns (new state, metrics dict of f32 scalars)."""
    trainable, frozen = split_trainable(state["params"], config)
    loss_sum, count, hits, grads = loss_and_grads(trainable, frozen, batch, config, grad_accum)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, trainable)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], trainable)
    trainable = optax.apply_updates(trainable, updates)
    new_state = {
        "step": state["step"] + 1,
        "params": merge(trainable, frozen),
        "opt_state": opt_state,
        "rng": state["rng"],  # no stochastic layers; kept (and checkpointed) for dropout-style extensions
    }
    metrics = {
        "loss": loss_sum / denom,
        "accuracy": hits / denom,
        "tokens": count,
        "grad_norm": grad_norm,
        "lr": schedule(state["step"]),
    }
    return new_state, metrics


def make_train_step(config: AKIConfig, optimizer, schedule, grad_accum: int, state_shardings, batch_shardings):
    """`train_step` jitted with explicit in/out shardings; the old state's buffers are donated."""
    fn = functools.partial(train_step, config=config, optimizer=optimizer, schedule=schedule, grad_accum=grad_accum)
    return jax.jit(
        fn,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )


def eval_step(params, batch, *, config: AKIConfig):
    """Per-row exact match of the supervised span, per-row loss sum and token count.

    Teacher-forced exact match equals greedy-decoding exact match: greedy decoding reproduces the
    answer (and its end token) iff every supervised position's argmax is the target.
    Returns (correct bool[B], loss_sum f32[B], count f32[B]).
    """
    logits = forward(params, batch, config)
    w = batch["weights"]
    wrong = (jnp.argmax(logits, -1) != batch["targets"]) & (w > 0)
    log_z = jax.nn.logsumexp(logits, -1)
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    loss_sum = ((log_z - target_logit) * w).sum(-1)
    count = w.sum(-1)
    return (~wrong.any(-1)) & (count > 0), loss_sum, count
