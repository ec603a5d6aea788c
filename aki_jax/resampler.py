"""Flamingo-style Perceiver resampler: a fixed set of learned latents reads the vision features.

Axis letters as in `aki_jax.layers`; here P is the number of media (patch) tokens, T the number of
latents, E the vision width, D the decoder width.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from aki_jax.config import ResamplerConfig
from aki_jax.layers import LayerNorm, default_kernel_init, dot_product_attention, param, scanned


class ResamplerLayer(nn.Module):
    """latents += attn(media, latents); latents += ff(latents). No biases in the linears.

    Keys and values come from one projection of [media; latents] (first half k, second half v),
    so the latents attend to the media and to themselves.
    """

    config: ResamplerConfig
    width: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, latents, media):
        c, e, pd, dt = self.config, self.width, self.param_dtype, self.dtype
        n, h = c.num_heads, c.head_dim
        media_n = LayerNorm(c.layer_norm_eps, dt, pd, name="norm_media")(media)
        latents_n = LayerNorm(c.layer_norm_eps, dt, pd, name="norm_latents")(latents)
        w_q = param(self, "q_kernel", default_kernel_init, (e, n, h), ("embed", "heads", "head_dim"), pd)
        w_kv = param(self, "kv_kernel", default_kernel_init, (e, 2, n, h), ("embed", None, "heads", "head_dim"), pd)
        w_out = param(self, "out_kernel", default_kernel_init, (n, h, e), ("heads", "head_dim", "embed"), pd)
        q = jnp.einsum("BTE,ENH->BTNH", latents_n, w_q.astype(dt))
        keys_in = jnp.concatenate([media_n, latents_n], axis=1)  # [B, P+T, E]
        kv = jnp.einsum("BSE,EKNH->KBSNH", keys_in, w_kv.astype(dt))
        attn = dot_product_attention(q, kv[0], kv[1], implementation=self.attention_impl)
        latents = latents + jnp.einsum("BTNH,NHE->BTE", attn, w_out.astype(dt))

        y = LayerNorm(c.layer_norm_eps, dt, pd, name="ff_norm")(latents)
        f = e * c.ff_mult
        w1 = param(self, "ff1_kernel", default_kernel_init, (e, f), ("embed", "mlp"), pd)
        w2 = param(self, "ff2_kernel", default_kernel_init, (f, e), ("mlp", "embed"), pd)
        y = nn.gelu(jnp.einsum("BTE,EF->BTF", y, w1.astype(dt)), approximate=False)
        return latents + jnp.einsum("BTF,FE->BTE", y, w2.astype(dt)), None


class Resampler(nn.Module):
    """media f[B, P, E] -> f[B, num_latents, output_width]."""

    config: ResamplerConfig
    output_width: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, media):
        c = self.config
        e = media.shape[-1]
        latents = param(
            self, "latents", nn.initializers.normal(1.0), (c.num_latents, e), (None, "embed"), self.param_dtype
        )
        x = jnp.broadcast_to(latents.astype(self.dtype)[None], (media.shape[0], c.num_latents, e))
        media = media.astype(self.dtype)
        layers = scanned(ResamplerLayer, c.depth, self.remat, broadcast_args=1)
        x, _ = layers(c, e, self.dtype, self.param_dtype, self.attention_impl, name="layers")(x, media)
        x = LayerNorm(c.layer_norm_eps, self.dtype, self.param_dtype, name="norm")(x)
        w = param(
            self, "projection_kernel", default_kernel_init, (e, self.output_width), ("embed", "embed"),
            self.param_dtype,
        )  # fmt: skip
        b = param(self, "projection_bias", nn.initializers.zeros, (self.output_width,), ("embed",), self.param_dtype)
        return jnp.einsum("BTE,ED->BTD", x, w.astype(self.dtype)) + b.astype(self.dtype)
