"""SigLIP vision tower (the `vision_model` of SigLIP so400m): patches -> pre-norm encoder -> LayerNorm.

Axis letters as in `aki_jax.layers` (B batch, P patches, D width, N heads, H head dim, F MLP width).
The SigLIP attention-pooling head is not part of this module: AKI uses `last_hidden_state`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from aki_jax.config import VisionConfig
from aki_jax.layers import LayerNorm, default_kernel_init, dot_product_attention, param, scanned


class PatchEmbedding(nn.Module):
    """Stride-`patch` convolution plus a learned position embedding per patch (no class token)."""

    config: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, pixel_values):
        """pixel_values f[B, S, S, C] in [-1, 1] -> f[B, P, D]."""
        c = self.config
        kernel = param(
            self,
            "patch_kernel",
            default_kernel_init,
            (c.patch_size, c.patch_size, c.num_channels, c.hidden_size),
            (None, None, None, "embed"),
            self.param_dtype,
        )
        bias = param(self, "patch_bias", nn.initializers.zeros, (c.hidden_size,), ("embed",), self.param_dtype)
        position = param(
            self, "position_embedding", default_kernel_init, (c.num_patches, c.hidden_size), (None, "embed"),
            self.param_dtype,
        )  # fmt: skip
        x = jax.lax.conv_general_dilated(
            pixel_values.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=(c.patch_size, c.patch_size),
            padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        x = x + bias.astype(self.dtype)
        x = x.reshape(x.shape[0], -1, c.hidden_size)  # row-major patches, as torch's flatten(2)
        if x.shape[1] != c.num_patches:
            raise ValueError(
                f"pixel_values of size {pixel_values.shape[1:3]} give {x.shape[1]} patches, "
                f"the vision config expects {c.num_patches} ({c.image_size}x{c.image_size})"
            )
        return x + position.astype(self.dtype)[None]


class VisionLayer(nn.Module):
    """`x + attn(LN1(x))`, then `x + fc2(gelu_tanh(fc1(LN2(x))))`; all projections biased."""

    config: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x):
        c = self.config
        d, n, h, f = c.hidden_size, c.num_heads, c.head_dim, c.intermediate_size
        pd, dt = self.param_dtype, self.dtype

        y = LayerNorm(c.layer_norm_eps, dt, pd, name="layer_norm1")(x)
        qkv = {}
        for name in ("q", "k", "v"):
            w = param(self, f"{name}_kernel", default_kernel_init, (d, n, h), ("embed", "heads", "head_dim"), pd)
            b = param(self, f"{name}_bias", nn.initializers.zeros, (n, h), ("heads", "head_dim"), pd)
            qkv[name] = jnp.einsum("BPD,DNH->BPNH", y, w.astype(dt)) + b.astype(dt)
        attn = dot_product_attention(qkv["q"], qkv["k"], qkv["v"], implementation=self.attention_impl)
        w_out = param(self, "out_kernel", default_kernel_init, (n, h, d), ("heads", "head_dim", "embed"), pd)
        b_out = param(self, "out_bias", nn.initializers.zeros, (d,), ("embed",), pd)
        x = x + jnp.einsum("BPNH,NHD->BPD", attn, w_out.astype(dt)) + b_out.astype(dt)

        y = LayerNorm(c.layer_norm_eps, dt, pd, name="layer_norm2")(x)
        w1 = param(self, "fc1_kernel", default_kernel_init, (d, f), ("embed", "mlp"), pd)
        b1 = param(self, "fc1_bias", nn.initializers.zeros, (f,), ("mlp",), pd)
        w2 = param(self, "fc2_kernel", default_kernel_init, (f, d), ("mlp", "embed"), pd)
        b2 = param(self, "fc2_bias", nn.initializers.zeros, (d,), ("embed",), pd)
        y = nn.gelu(jnp.einsum("BPD,DF->BPF", y, w1.astype(dt)) + b1.astype(dt), approximate=True)
        return x + jnp.einsum("BPF,FD->BPD", y, w2.astype(dt)) + b2.astype(dt), None


class VisionTower(nn.Module):
    """pixel_values f[B, S, S, 3] -> last_hidden_state f[B, P, D] (post-LayerNorm)."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        x = PatchEmbedding(c, self.dtype, self.param_dtype, name="embeddings")(pixel_values)
        layers = scanned(VisionLayer, c.num_layers, self.remat, broadcast_args=0)
        x, _ = layers(c, self.dtype, self.param_dtype, self.attention_impl, name="layers")(x)
        return LayerNorm(c.layer_norm_eps, self.dtype, self.param_dtype, name="post_layernorm")(x)
