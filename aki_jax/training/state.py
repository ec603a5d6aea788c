"""Train state: a plain pytree {step, params, opt_state, rng}, created directly in its sharded layout.

`params` holds every parameter in float32 (master weights; the model casts to `AKIConfig.dtype` for
compute). `opt_state` covers only the trainable subtree (`split_trainable`): with a frozen vision tower
there is no optimizer state for it. `rng` is raw uint32 key data so that it checkpoints as an array.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from aki_jax.config import AKIConfig
from aki_jax.model import boxed_abstract_params, init_params
from aki_jax.sharding import boxed_shardings

FROZEN_WHEN_FREEZING_VISION = ("vision",)


def frozen_keys(config: AKIConfig) -> tuple[str, ...]:
    return FROZEN_WHEN_FREEZING_VISION if config.freeze_vision else ()


def split_trainable(params: dict, config: AKIConfig) -> tuple[dict, dict]:
    """(trainable, frozen) top-level subtrees of the param dict."""
    frozen = frozen_keys(config)
    return (
        {k: v for k, v in params.items() if k not in frozen},
        {k: v for k, v in params.items() if k in frozen},
    )


def merge(trainable: dict, frozen: dict) -> dict:
    return {**frozen, **trainable}


def init_state(config: AKIConfig, optimizer: optax.GradientTransformation, seed: int, params=None) -> dict:
    """A fresh state (params from `seed` unless given). Jit with `out_shardings` to create it sharded."""
    init_rng, train_rng = jax.random.split(jax.random.key(seed))
    if params is None:
        params = init_params(config, init_rng)
    params = jax.tree.map(lambda x: x.astype(jnp.dtype(config.param_dtype)), params)
    trainable, _ = split_trainable(params, config)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": optimizer.init(trainable),
        "rng": jax.random.key_data(train_rng),
    }


def state_shardings(config: AKIConfig, optimizer, mesh, rules, seed: int = 0):
    """(abstract state, sharding tree) without allocating.

    The optimizer is initialised abstractly on the logically boxed params, so its moments (mu, nu) carry
    their parameter's logical names and shard like it; scalars (count) are replicated. Only the tree
    structure of that abstract state is used (a mask that reads leaf names may see the boxes' names).
    """
    boxed = boxed_abstract_params(config)
    _, p_shardings = boxed_shardings(boxed, mesh, rules)
    _, opt_shardings = boxed_shardings(jax.eval_shape(optimizer.init, split_trainable(boxed, config)[0]), mesh, rules)
    abstract = jax.eval_shape(lambda: init_state(config, optimizer, seed))
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = {"step": replicated, "params": p_shardings, "opt_state": opt_shardings, "rng": replicated}
    return abstract, shardings


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
