"""Learning-rate schedule and AdamW over the trainable parameters.

The frozen vision tower is not given to the optimizer at all (see `state.split_trainable`), so it has
no Adam moments and no weight decay; gradients never reach it (the model stops them at its output).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def lr_factors(params, multipliers: dict[str, float]):
    """The learning-rate factor of each leaf of `params`: that of its longest matching path prefix, else 1.

    A prefix that names no parameter is an error (a typo would otherwise silently train at the base rate).
    """
    names = [_path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for prefix in multipliers:
        if not any(n == prefix or n.startswith(prefix + "/") for n in names):
            tops = sorted({n.split("/")[0] for n in names})
            raise ValueError(
                f"optim.lr_multipliers: {prefix!r} names no trainable parameter (paths start with one of {tops}, "
                f"levels joined by '/')"
            )

    def factor(path, _):
        name = _path_name(path)
        matches = [p for p in multipliers if name == p or name.startswith(p + "/")]
        return float(multipliers[max(matches, key=len)]) if matches else 1.0

    return jax.tree_util.tree_map_with_path(factor, params)


def scale_by_lr_factors(multipliers: dict[str, float]) -> optax.GradientTransformation:
    """Multiply each leaf's update by its `lr_factors` factor (after AdamW: scales its lr and decay)."""

    def init(params):
        lr_factors(params, multipliers)  # validate the prefixes once, where the parameter tree is known
        return optax.EmptyState()

    def update(updates, state, params=None):
        factors = lr_factors(updates, multipliers)
        return jax.tree.map(lambda u, f: u if f == 1.0 else u * jnp.asarray(f, u.dtype), updates, factors), state

    return optax.GradientTransformation(init, update)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the schedule (applied to already-averaged gradients), then the
    per-path learning-rate factors (`lr_multipliers`), if any."""
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
    if config.lr_multipliers:
        parts.append(scale_by_lr_factors(dict(config.lr_multipliers)))
    return optax.chain(*parts)
