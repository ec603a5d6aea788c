"""AKI: SigLIP vision tower -> Perceiver resampler -> Phi-3 decoder, with modality-mutual attention.

Axis letters as in `aki_jax.layers`; here I is the number of images per row and T the number of
image tokens per image (the resampler's latents).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aki_jax.attention import attention_ranges, uses_ranges
from aki_jax.config import AKIConfig
from aki_jax.decoder import Decoder
from aki_jax.mask import IMAGE, TEXT, default_positions
from aki_jax.mask import attention_mask as attention_mask_from_modalities
from aki_jax.resampler import Resampler
from aki_jax.vision import VisionTower


class AKI(nn.Module):
    """The whole model; pure-functional: `model.apply({"params": params}, ...)`.

    Call: `(pixel_values, input_ids, modality_ids, segment_ids=None, positions=None)` -> logits.
      pixel_values: f[B, I, S, S, 3] normalised to [-1, 1], or None for text only.
      input_ids: int[B, L], the fused sequence; IMAGE positions hold any id and are filled, in order,
        with the image tokens of that row's images (`config.image_token_count` per image).
      modality_ids: int[B, L] of aki_jax.mask.{PAD, TEXT, IMAGE, QUERY}.
      segment_ids: int[B, L] or None; packed examples never attend across segments.
      positions: int[B, L] or None (0..n-1 within each segment).
      Returns logits f32[B, L, initial_tokenizer_len + 2].

    With `cache` (see `aki_jax.decoder.init_cache`) the call writes this call's keys/values at
    `cache_index` and returns `(logits, cache)`. Without `attention_mask` (bool[B, L, S]) the mask is
    the modality mask of this call placed at columns [cache_index, cache_index + L): a prefill.
    With a kernel `attention_impl` (see `aki_jax.attention`) that mask is passed as `AttentionRanges`.
    """

    config: AKIConfig

    def setup(self):
        c = self.config
        dt, pd = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        self.vision = VisionTower(c.vision, dt, pd, c.remat, c.attention_impl)
        self.resampler = Resampler(c.resampler, c.decoder.hidden_size, dt, pd, c.remat, c.attention_impl)
        self.decoder = Decoder(c)

    def encode_images(self, pixel_values):
        """pixel_values f[B, I, S, S, 3] -> image tokens f[B, I * T, D]."""
        if pixel_values.ndim != 5:
            raise ValueError(f"pixel_values must be f[B, I, H, W, 3], got shape {pixel_values.shape}")
        b, i = pixel_values.shape[:2]
        features = self.vision(pixel_values.reshape((b * i,) + pixel_values.shape[2:]))
        if self.config.freeze_vision:
            features = jax.lax.stop_gradient(features)
        tokens = self.resampler(features)
        return tokens.reshape(b, i * tokens.shape[1], tokens.shape[2])

    def __call__(
        self,
        pixel_values,
        input_ids,
        modality_ids,
        segment_ids=None,
        positions=None,
        *,
        cache=None,
        cache_index=0,
        attention_mask=None,
    ):
        c = self.config
        embeds = self.decoder.embed(input_ids)
        if pixel_values is not None and pixel_values.shape[1] > 0:
            embeds = fuse_image_tokens(embeds, self.encode_images(pixel_values), modality_ids)
        if positions is None:
            positions = default_positions(modality_ids, segment_ids)
        mask = attention_mask
        if mask is None and uses_ranges(c.attention_impl):
            # A kernel reads the mask as four int32[B, L] ranges: no [B, L, L] array is ever built.
            mask = attention_ranges(modality_ids, segment_ids, kind=c.attention)
            if cache is not None:
                mask = mask.with_key_offset(cache_index, cache["key"].shape[2])
        elif mask is None:
            mask = attention_mask_from_modalities(modality_ids, segment_ids, kind=c.attention)
            if cache is not None:
                full = jnp.zeros(mask.shape[:2] + (cache["key"].shape[2],), bool)
                mask = jax.lax.dynamic_update_slice_in_dim(full, mask, cache_index, axis=2)
        logits, cache_out = self.decoder(embeds, positions, mask, cache, cache_index)
        return logits if cache is None else (logits, cache_out)


def fuse_image_tokens(embeds, image_tokens, modality_ids):
    """Put image tokens f[B, I*T, D] into the IMAGE positions of embeds f[B, L, D], in order.

    The k-th IMAGE position of a row receives that row's k-th image token. Rows with fewer IMAGE
    positions than image tokens simply leave the rest unused (padding images).
    """
    is_image = modality_ids == IMAGE
    order = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_tokens.shape[1] - 1)
    gathered = jnp.take_along_axis(image_tokens, order[..., None], axis=1).astype(embeds.dtype)
    return jnp.where(is_image[..., None], gathered, embeds)


def dummy_inputs(config: AKIConfig, batch: int = 1, images: int = 1, text_length: int = 4):
    """Smallest inputs that touch every parameter (for init and shape evaluation)."""
    v = config.vision
    t = config.image_token_count * images
    pixel_values = np.zeros((batch, images, v.image_size, v.image_size, v.num_channels), np.float32)
    modality_ids = np.full((batch, t + text_length), TEXT, np.int32)
    modality_ids[:, :t] = IMAGE
    input_ids = np.zeros((batch, t + text_length), np.int32)
    return pixel_values, input_ids, modality_ids


def init_params(config: AKIConfig, rng) -> dict:
    """Randomly initialised parameters (plain arrays; see `aki_jax.sharding` for their logical axes)."""
    inputs = dummy_inputs(config)
    return jax.jit(lambda r: nn.unbox(AKI(config).init(r, *inputs)["params"]))(rng)


def boxed_abstract_params(config: AKIConfig):
    """The param tree as `nn.LogicallyPartitioned` boxes of jax.ShapeDtypeStruct (nothing allocated).

    Anything computed from it under `jax.eval_shape` (an optimizer state) keeps the boxes, so
    `nn.get_partition_spec` gives the logical names of every leaf derived from a parameter.
    """
    return jax.eval_shape(lambda r: AKI(config).init(r, *dummy_inputs(config)), jax.random.key(0))["params"]


def abstract_params(config: AKIConfig):
    """Parameter shapes/dtypes and logical axis names without allocating anything.

    Returns (jax.ShapeDtypeStruct tree, PartitionSpec tree of logical names).
    """
    boxed = boxed_abstract_params(config)
    return nn.unbox(boxed), nn.get_partition_spec(boxed)
