"""Phi-3 decoder with AKI's two added tokens, LongRoPE, and an optional preallocated KV cache.

Axis letters as in `aki_jax.layers` (B batch, T query length, S key length, N heads, H head dim,
D width, F MLP width, K fused index, V vocabulary rows).

Token ids below `initial_tokenizer_len` read the original embedding table; the two ids after it
(`<image>`, `<|endofchunk|>`) read a separate 2-row table. The output head is `x @ W + b` cut to the
first `initial_tokenizer_len` columns, followed by the 2 columns of the added head.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from aki_jax.config import AKIConfig, DecoderConfig
from aki_jax.layers import RMSNorm, constrain, default_kernel_init, dot_product_attention, param, scanned

ACT = ("act_batch", "act_length", "act_embed")


@jax.custom_vjp
def _head_product(x, kernel):
    return jnp.einsum("BTD,DV->BTV", x, kernel)


def _head_product_forward(x, kernel):
    return _head_product(x, kernel), (x, kernel)


def _head_product_backward(residuals, d_out):
    x, kernel = residuals
    d_x = jnp.einsum("BTV,DV->BTD", d_out, kernel)
    # The kernel's gradient as x^T @ dO with x^T written out (the barrier keeps XLA from folding the
    # transpose back into the product): left to itself, XLA:CPU transposes the V-wide dO instead and runs
    # the product outside its fast dot library (benchmarks/step_products.py: 60 against 135 GFLOP/s).
    x_t = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)
    d_kernel = x_t @ d_out.reshape(-1, d_out.shape[-1])
    return d_x, d_kernel.astype(kernel.dtype)


_head_product.defvjp(_head_product_forward, _head_product_backward)


def head_product(x, kernel):
    """f[B, T, D] @ f[D, V] -> f[B, T, V] for the output head (V the vocabulary: the widest product).

    On CPU with a backward pass that XLA runs as two plain row-major matrix products (the head's forward
    and backward 1.37x faster alone, the benchmark's train step 1.02-1.04x); elsewhere the einsum as it is,
    since the rewrite was only measured on CPU.
    """
    if jax.default_backend() == "cpu":
        return _head_product(x, kernel)
    return jnp.einsum("BTD,DV->BTV", x, kernel)


def rope_cos_sin(positions, config: DecoderConfig):
    """cos, sin f32[B, T, H] for integer positions int[B, T] (rotate-half layout).

    With LongRoPE the factor set is picked from the highest position in the call, as the original
    does: short factors while max(positions) + 1 <= original_max_position_embeddings, else long.
    cos and sin carry the attention factor sqrt(1 + ln(max/original) / ln(original)).
    """
    head_dim = config.head_dim
    exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    base = jnp.power(jnp.float32(config.rope_theta), exponent)
    scaling = config.rope_scaling
    if scaling is None:
        inv_freq = 1.0 / base
        factor = 1.0
    else:
        short = 1.0 / (jnp.asarray(scaling.short_factor, jnp.float32) * base)
        long = 1.0 / (jnp.asarray(scaling.long_factor, jnp.float32) * base)
        use_long = jnp.max(positions) + 1 > scaling.original_max_position_embeddings
        inv_freq = jnp.where(use_long, long, short)
        factor = scaling.attention_factor(config.max_position_embeddings)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def unfuse(x, parts: int) -> list:
    """The `parts` outputs of a fused projection f[B, T, K, ...] (K = parts), each f[B, T, ...].

    A split rather than K index slices: the gradient of a split is one concatenation, while the slices'
    gradients are K zero-padded copies of the whole fused output summed together (on CPU that was two
    extra passes over the largest activation of the layer, in the backward of both qkv and gate-up).
    """
    return [jnp.squeeze(part, 2) for part in jnp.split(x, parts, axis=2)]


def apply_rope(x, cos, sin):
    """x f[B, T, N, H] rotated by cos/sin f32[B, T, H] (the two halves of each head pair up)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class DecoderLayer(nn.Module):
    """`x + o(attn(RMSNorm(x)))`, `x + down(silu(gate) * up)`; fused qkv [q;k;v] and gate-up [gate;up]."""

    config: DecoderConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_index, cache):
        c, pd, dt = self.config, self.param_dtype, self.dtype
        d, n, h, f = c.hidden_size, c.num_heads, c.head_dim, c.intermediate_size
        w_qkv = param(self, "qkv_kernel", default_kernel_init, (d, 3, n, h), ("embed", None, "heads", "head_dim"), pd)
        w_o = param(self, "o_kernel", default_kernel_init, (n, h, d), ("heads", "head_dim", "embed"), pd)
        w_gate_up = param(self, "gate_up_kernel", default_kernel_init, (d, 2, f), ("embed", None, "mlp"), pd)
        w_down = param(self, "down_kernel", default_kernel_init, (f, d), ("mlp", "embed"), pd)

        y = RMSNorm(c.rms_norm_eps, pd, name="input_layernorm")(x)
        # Keep the fused index after B, T: a K-first output makes XLA transpose the weight on every call.
        qkv = jnp.einsum("BTD,DKNH->BTKNH", y, w_qkv.astype(dt))
        q, k, v = unfuse(qkv, 3)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_cache = None
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache["key"], k.astype(cache["key"].dtype), cache_index, 1)
            v = jax.lax.dynamic_update_slice_in_dim(cache["value"], v.astype(cache["value"].dtype), cache_index, 1)
            new_cache = {"key": k, "value": v}
            k, v = k.astype(dt), v.astype(dt)
        attn = dot_product_attention(q, k, v, mask, implementation=self.attention_impl)
        # BTNH,NHD->BTD contracting (N, H) in that order: jnp.einsum would contract (H, N), which makes XLA
        # copy the weight into that order on every call (the whole o weight once per token when decoding).
        out = jax.lax.dot_general(attn, w_o.astype(dt), (((2, 3), (0, 1)), ((), ())))
        x = constrain(x + out, ACT)

        y = RMSNorm(c.rms_norm_eps, pd, name="post_attention_layernorm")(x)
        gate_up = jnp.einsum("BTD,DKF->BTKF", y, w_gate_up.astype(dt))
        gate, up = unfuse(gate_up, 2)
        x = x + jnp.einsum("BTF,FD->BTD", nn.silu(gate) * up, w_down.astype(dt))
        return constrain(x, ACT), new_cache


class Decoder(nn.Module):
    """Embedding (with the 2 added rows), Phi-3 layers, final RMSNorm, split output head.

    scan_layers True (training, checkpoints, prefill): the layers are one `nn.scan` over weights stacked on
    a leading "layers" axis (params["layers"], f[layers, ...] leaves). False (the decode step of
    `aki_jax.generation`): one `DecoderLayer` per layer, params["layers_0"], params["layers_1"], ... as
    `unrolled_params` makes them, and the cache a list of per-layer {"key", "value"}. The scan reads each
    layer's weights through a slice of the stack, which XLA (on CPU) copies before every matrix product;
    at one token per call that copy costs about as much as the products, with separate arrays it is gone.
    """

    config: AKIConfig
    scan_layers: bool = True

    def setup(self):
        c = self.config
        dec, pd = c.decoder, jnp.dtype(c.param_dtype)
        self.embed_tokens = param(
            self, "embed_tokens", default_kernel_init, (dec.vocab_size, dec.hidden_size), ("vocab", "embed"), pd
        )
        self.additional_embedding = param(
            self, "additional_embedding", default_kernel_init, (2, dec.hidden_size), (None, "embed"), pd
        )
        if self.scan_layers:
            layers = scanned(DecoderLayer, dec.num_layers, c.remat, broadcast_args=4, scanned_args=1)
            self.layers = layers(dec, jnp.dtype(c.dtype), pd, c.attention_impl)
        else:  # flax names the list's modules layers_0, layers_1, ...
            self.layers = [DecoderLayer(dec, jnp.dtype(c.dtype), pd, c.attention_impl) for _ in range(dec.num_layers)]
        self.norm = RMSNorm(dec.rms_norm_eps, pd)
        self.lm_head_kernel = param(
            self, "lm_head_kernel", default_kernel_init, (dec.hidden_size, dec.vocab_size), ("embed", "vocab"), pd
        )
        # The original wrapper gives the main head a bias (Phi-3 has none); released checkpoints carry it.
        self.lm_head_bias = param(self, "lm_head_bias", nn.initializers.zeros, (dec.vocab_size,), ("vocab",), pd)
        self.additional_head_kernel = param(
            self, "additional_head_kernel", default_kernel_init, (dec.hidden_size, 2), ("embed", None), pd
        )
        self.additional_head_bias = param(self, "additional_head_bias", nn.initializers.zeros, (2,), (None,), pd)

    def embed(self, input_ids):
        """int[B, T] -> f[B, T, D]. Ids >= initial_tokenizer_len + 2 are clipped (IMAGE slots hold any id)."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        n_orig = c.initial_tokenizer_len
        ids = jnp.clip(input_ids, 0, n_orig + 1)
        # Gather from whole rows: a table split along embed (FSDP) would leave the lookup split along
        # embed, and its gradient would have to go from batch-split to embed-split by full replication.
        table = constrain(self.embed_tokens, ("vocab", None))
        added_table = constrain(self.additional_embedding, (None, None))
        original = jnp.take(table, jnp.minimum(ids, n_orig - 1), axis=0)
        added = jnp.take(added_table, jnp.clip(ids - n_orig, 0, 1), axis=0)
        x = jnp.where((ids >= n_orig)[..., None], added, original).astype(dt)
        return constrain(x, ACT)

    def __call__(self, embeds, positions, mask, cache=None, cache_index=0):
        """embeds f[B, T, D], positions int[B, T], mask bool[B, T, S] or AttentionRanges (S = T, or the cache length).

        Returns logits f32[B, T, initial_tokenizer_len + 2] and the updated cache (None without one).
        `cache` is {"key", "value"}: f[layers, B, S, N, H] (with scan_layers False: a list of one such dict
        per layer, f[B, S, N, H]); this call's keys are written at `cache_index`.
        """
        c = self.config
        dt = jnp.dtype(c.dtype)
        cos, sin = rope_cos_sin(positions, c.decoder)
        x = embeds.astype(dt)
        if self.scan_layers:
            x, cache = self.layers(x, cos, sin, mask, cache_index, cache)
        else:
            layer_caches = []
            for i, layer in enumerate(self.layers):
                x, layer_cache = layer(x, cos, sin, mask, cache_index, None if cache is None else cache[i])
                layer_caches.append(layer_cache)
            cache = None if cache is None else layer_caches
        x = self.norm(x)
        n_orig = c.initial_tokenizer_len
        # Multiply by the whole head and cut the logits: slicing the kernel would copy it on every call.
        main = head_product(x, self.lm_head_kernel.astype(dt)) + self.lm_head_bias.astype(dt)
        main = main[..., :n_orig]
        added = jnp.einsum("BTD,DV->BTV", x, self.additional_head_kernel.astype(dt))
        added = added + self.additional_head_bias.astype(dt)
        logits = jnp.concatenate([main, added], axis=-1).astype(jnp.float32)
        return constrain(logits, ("act_batch", "act_length", "act_vocab")), cache


def unstack_layers(tree) -> list:
    """A tree of f[layers, ...] leaves -> one tree per layer (the leaves' slices along axis 0).

    Under jit each slice is a copy: take them once (before a token loop), not in every step.
    """
    num_layers = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda leaf, i=i: leaf[i], tree) for i in range(num_layers)]


def unrolled_params(decoder_params: dict) -> dict:
    """Decoder params of the scanned layout (`Decoder`) -> those of `Decoder(config, scan_layers=False)`."""
    params = {name: value for name, value in decoder_params.items() if name != "layers"}
    for i, layer in enumerate(unstack_layers(decoder_params["layers"])):
        params[f"layers_{i}"] = layer
    return params


def init_cache(config: AKIConfig, batch: int, length: int, dtype=None):
    """An empty KV cache {"key", "value"}: zeros f[layers, B, length, N, H] in `dtype` (default: compute dtype)."""
    dec = config.decoder
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (dec.num_layers, batch, length, dec.num_heads, dec.head_dim)
    return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}


CACHE_AXES = ("layers", "act_batch", None, "act_heads", None)
