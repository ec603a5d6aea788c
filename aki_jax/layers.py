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

from aki_jax.config import ATTENTION_IMPLEMENTATIONS

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


def dot_product_attention(query, key, value, mask=None, *, implementation: str | None = None):
    """Softmax attention with scale head_dim**-0.5.

    query f[B, T, N, H], key/value f[B, S, N, H], mask bool[B, T, S] or None -> f[B, T, N, H].
    A fully masked row (a PAD query) yields the plain average of the values instead of NaN.

    `implementation` None (the default) is `recomputing_attention`: scores and softmax in float32,
    and a backward pass that recomputes the probabilities from q and k instead of keeping a
    [B, N, T, S] tensor per layer. "xla" and "cudnn" call `jax.nn.dot_product_attention` with that
    implementation (the place to swap in a platform kernel).
    """
    if implementation is None:
        return recomputing_attention(query, key, value, mask)
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}")
    if mask is not None:
        mask = mask[:, None, :, :]
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=implementation)


def _attention_scores(query, key, mask):
    """f32[B, N, T, S] scaled scores; masked entries at the lowest float32 (a fully masked row stays uniform)."""
    scale = query.shape[-1] ** -0.5
    scores = jnp.einsum("BTNH,BSNH->BNTS", query, key, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    return scores


def _attention_forward(query, key, value, mask):
    scores = _attention_scores(query, key, mask)
    row_max = jnp.max(scores, -1, keepdims=True)
    unnormalised = jnp.exp(scores - row_max)
    row_sum = jnp.sum(unnormalised, -1, keepdims=True)
    probs = (unnormalised / row_sum).astype(value.dtype)
    out = jnp.einsum("BNTS,BSNH->BTNH", probs, value)
    # Row max and sum rather than their log-sum-exp: with every key masked, max + log(sum) rounds
    # back to the mask value and the recomputed probabilities would be 1 instead of 1/S.
    return out, (query, key, value, mask, out, row_max, row_sum)


def _attention_backward(residuals, d_out):
    query, key, value, mask, out, row_max, row_sum = residuals
    scale = query.shape[-1] ** -0.5
    probs = jnp.exp(_attention_scores(query, key, mask) - row_max) / row_sum
    d_value = jnp.einsum("BNTS,BTNH->BSNH", probs.astype(d_out.dtype), d_out)
    d_probs = jnp.einsum("BTNH,BSNH->BNTS", d_out, value, preferred_element_type=jnp.float32)
    # softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O).
    row_dot = jnp.einsum("BTNH,BTNH->BNT", d_out.astype(jnp.float32), out.astype(jnp.float32))[..., None]
    d_scores = probs * (d_probs - row_dot) * scale
    if mask is not None:
        d_scores = jnp.where(mask[:, None], d_scores, 0.0)
    d_scores = d_scores.astype(query.dtype)
    d_query = jnp.einsum("BNTS,BSNH->BTNH", d_scores, key)
    d_key = jnp.einsum("BNTS,BTNH->BSNH", d_scores, query)
    return d_query, d_key, d_value, None


@jax.custom_vjp
def recomputing_attention(query, key, value, mask=None):
    """Softmax attention whose backward pass recomputes the probabilities (see `dot_product_attention`).

    Residuals are q, k, v, the output and per-row max and sum: O(T) per head instead of O(T * S).
    On XLA CPU this is also ~1.6x faster than `jax.nn.dot_product_attention` for a forward and
    backward pass at T = S = 512 (benchmarks/train_step.py measures the whole step).
    """
    return _attention_forward(query, key, value, mask)[0]


recomputing_attention.defvjp(_attention_forward, _attention_backward)


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
