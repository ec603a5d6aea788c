"""Learning-rate schedule and AdamW over the trainable parameters.

The frozen vision tower is not given to the optimizer at all (see `state.split_trainable`), so it has
no Adam moments and no weight decay; gradients never reach it (the model stops them at its output).
"""

from __future__ import annotations

import jax
import optax

from aki_jax.training.config import OptimizerConfig


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """Linear warmup 0 -> lr over `warmup_steps`, then cosine decay to `min_lr` at `total_steps`."""
    if config.total_steps <= config.warmup_steps:
        raise ValueError(
            f"optim.total_steps ({config.total_steps}) must exceed optim.warmup_steps ({config.warmup_steps})"
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=config.warmup_steps,
        decay_steps=config.total_steps,
        end_value=config.min_lr,
    )


def weight_decay_mask(params) -> dict:
    """True for leaves that get weight decay: everything but biases and norm scales/biases.

    (The convention of Hugging Face's Trainer, which the original AKI training used.)
    """

    def decays(path, _):
        names = [getattr(k, "key", str(k)) for k in path]
        in_norm = any("norm" in n for n in names[:-1])
        return not (names[-1].endswith("bias") or names[-1] == "scale" or in_norm)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the schedule (applied to already-averaged gradients)."""
    parts = []
    if config.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip))
    parts.append(
        optax.adamw(
            learning_rate=learning_rate_schedule(config),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=weight_decay_mask,
        )
    )
    return optax.chain(*parts)
