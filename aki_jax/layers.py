"""Building blocks shared by the vision tower, the resampler and the decoder.

Einsum axis letters used across the model files:
  B batch, T query length, S key length, N heads, H head dim, D model width, F MLP width,
  P patches, V vocabulary, K fused-projection index (q/k/v or gate/up).

Every parameter is created through `param`, which attaches logical axis names
(`nn.with_logical_partitioning`); `aki_jax.sharding` maps those names to mesh axes.
Logical names used: "layers" (scan axis), "embed" (a model width), "heads", "head_dim", "mlp",
"vocab"; None for axes that are never sharded. Activations are constrained with the names
"act_batch", "act_length", "act_embed", "act_heads", "act_vocab".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from aki_jax.attention import dot_product_attention, recomputing_attention  # noqa: F401  (re-exported)

default_kernel_init = nn.initializers.normal(stddev=0.02)


def param(module: nn.Module, name: str, init: Callable, shape: Sequence[int], axes: Sequence, dtype):
    """A parameter with logical axis names (one name or None per dimension)."""
    if len(axes) != len(shape):
        raise ValueError(f"{name}: {len(axes)} axis names for shape {tuple(shape)}")
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def constrain(x, axes: Sequence):
    """Activation sharding constraint by logical names (a no-op outside a mesh/rules context)."""
    return nn.with_logical_constraint(x, tuple(axes))


class LayerNorm(nn.Module):
    """PyTorch-style LayerNorm (biased variance), computed in float32."""

    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        scale = param(self, "scale", nn.initializers.ones, (width,), ("embed",), self.param_dtype)
        bias = param(self, "bias", nn.initializers.zeros, (width,), ("embed",), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class RMSNorm(nn.Module):
    """Phi-3 RMSNorm: normalise in float32, cast back to the input dtype, then scale."""

    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * y.astype(x.dtype)


def scanned(layer: type[nn.Module], length: int, remat: str, broadcast_args: int, scanned_args: int = 0):
    """`layer` repeated `length` times by `nn.scan` over parameters stacked on a leading "layers" axis.

    The wrapped layer is called as `layer(carry, *broadcast, *scanned) -> (carry, per_layer_out)`;
    `broadcast_args` arguments are shared by all layers, `scanned_args` are sliced along axis 0.
    `remat`: "none", "full" (recompute everything in the backward pass) or "dots" (keep matmul
    results without batch dimensions, recompute the rest).
    """
    if remat != "none":
        policy = None if remat == "full" else jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
        layer = nn.remat(layer, policy=policy, prevent_cse=False)
    return nn.scan(
        layer,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * broadcast_args + (0,) * scanned_args,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
