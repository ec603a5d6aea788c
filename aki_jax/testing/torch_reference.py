"""A PyTorch AKI forward with exactly the original state-dict key names, for parity and conversion tests.

Assembled from transformers' `SiglipVisionModel` (the vision tower), `Phi3ForCausalLM` (the decoder) and,
written here independently of aki-jax, the open_flamingo Perceiver resampler and the decoupled
embedding / output head that carry AKI's two added tokens. A random tiny instance's `state_dict()` is a
realistic original checkpoint (pooling head included).

    ref = AKIReference(aki_jax.tiny())            # random weights, eval mode, float32
    sd = ref.numpy_state_dict()                   # {original key: np.ndarray}
    logits = ref(pixel_values, input_ids, modality_ids=...)        # or attention_mask=bool[B, L, L]
    mask = original_mma_mask(text_ids, ...)       # the original's image-rectangle mask, for comparison

Inputs follow aki-jax: `input_ids` is the fused sequence (one slot per image token); image slots are the
positions where `modality_ids == IMAGE` or, without modality ids, where `input_ids == image_token_id`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Phi3Config, Phi3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from aki_jax.config import AKIConfig

PAD, TEXT, IMAGE, QUERY = 0, 1, 2, 3  # same values as aki_jax.mask, restated to stay independent


def siglip_config(config: AKIConfig) -> SiglipVisionConfig:
    v = config.vision
    return SiglipVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        num_channels=v.num_channels,
        image_size=v.image_size,
        patch_size=v.patch_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=v.layer_norm_eps,
        attn_implementation="eager",
    )


def phi3_config(config: AKIConfig) -> Phi3Config:
    d = config.decoder
    kwargs = {}
    if d.rope_scaling is not None:
        kwargs["original_max_position_embeddings"] = d.rope_scaling.original_max_position_embeddings
        kwargs["rope_scaling"] = {
            "type": "longrope",
            "rope_theta": d.rope_theta,
            "short_factor": list(d.rope_scaling.short_factor),
            "long_factor": list(d.rope_scaling.long_factor),
        }
    else:
        kwargs["rope_theta"] = d.rope_theta
    return Phi3Config(
        vocab_size=d.vocab_size,
        hidden_size=d.hidden_size,
        intermediate_size=d.intermediate_size,
        num_hidden_layers=d.num_layers,
        num_attention_heads=d.num_heads,
        num_key_value_heads=d.num_heads,
        rms_norm_eps=d.rms_norm_eps,
        max_position_embeddings=d.max_position_embeddings,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
        attn_implementation="eager",
        **kwargs,
    )


class PerceiverAttention(nn.Module):
    """open_flamingo's PerceiverAttention: latents read [media; latents]; 8 heads of 64, no biases."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media, latents):
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)

        def heads(t):  # [b, n, h*d] -> [b, h, n, d]
            return t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = heads(q) * self.scale, heads(k), heads(v)
        attn = (q @ k.transpose(-1, -2)).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(latents.shape[0], latents.shape[1], -1)
        return self.to_out(out)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


class PerceiverResampler(nn.Module):
    """Learned latents; per layer `latents += attn(media, latents)`, `latents += ff(latents)`; then projection."""

    def __init__(self, dim: int, out_dim: int, depth: int, num_latents: int, heads: int, dim_head: int, mult: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            [nn.ModuleList([PerceiverAttention(dim, heads, dim_head), feed_forward(dim, mult)]) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.projection = nn.Linear(dim, out_dim)

    def forward(self, media):
        latents = self.latents[None].expand(media.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(media, latents) + latents
            latents = ff(latents) + latents
        return self.projection(self.norm(latents))


class DecoupledEmbedding(nn.Embedding):
    """The original table plus `additional_embedding` rows for ids >= initial_tokenizer_len."""

    def __init__(self, num_embeddings: int, dim: int, initial_tokenizer_len: int, num_additional: int = 2):
        super().__init__(num_embeddings, dim)
        self.initial_tokenizer_len = initial_tokenizer_len
        self.additional_embedding = nn.Embedding(num_additional, dim)

    def forward(self, input_ids):
        n = self.initial_tokenizer_len
        is_added = input_ids >= n
        original = F.embedding(torch.where(is_added, 0, input_ids), self.weight)
        added = self.additional_embedding(torch.where(is_added, input_ids - n, 0))
        return torch.where(is_added[..., None], added, original)


class DecoupledLinear(nn.Linear):
    """`x @ W.T + b` cut to the first initial_tokenizer_len columns, then the added head's 2 columns."""

    def __init__(self, dim: int, vocab_rows: int, initial_tokenizer_len: int, num_additional: int = 2):
        super().__init__(dim, vocab_rows, bias=True)
        self.initial_tokenizer_len = initial_tokenizer_len
        self.additional_fc = nn.Linear(dim, num_additional)

    def forward(self, x):
        main = F.linear(x, self.weight, self.bias)[..., : self.initial_tokenizer_len]
        return torch.cat([main, self.additional_fc(x)], dim=-1)


class AKIReference(nn.Module):
    """PyTorch AKI with the original module paths: vision_encoder, vision_tokenizer, lang_model."""

    def __init__(self, config: AKIConfig, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = config
        self.vision_encoder = SiglipVisionModel(siglip_config(config))
        r, d = config.resampler, config.decoder
        self.vision_tokenizer = PerceiverResampler(
            config.vision.hidden_size, d.hidden_size, r.depth, r.num_latents, r.num_heads, r.head_dim, r.ff_mult
        )
        self.lang_model = Phi3ForCausalLM(phi3_config(config))
        self.lang_model.model.embed_tokens = DecoupledEmbedding(
            d.vocab_size, d.hidden_size, config.initial_tokenizer_len
        )
        self.lang_model.lm_head = DecoupledLinear(d.hidden_size, d.vocab_size, config.initial_tokenizer_len)
        self._randomize()
        self.eval()

    @torch.no_grad()
    def _randomize(self):
        # transformers' init leaves norms at 1/0 and biases at 0; randomise everything so a mapping error
        # (a transposed kernel, a swapped LayerNorm scale/bias) cannot hide. Norm scales stay near 1.
        norm_scales = {
            f"{name}.weight"
            for name, m in self.named_modules()
            if isinstance(m, nn.LayerNorm) or "RMSNorm" in type(m).__name__
        }
        g = torch.Generator().manual_seed(1234)
        for name, p in self.named_parameters():
            noise = torch.randn(p.shape, generator=g) * (0.5 if name.endswith("latents") else 0.1)
            p.copy_(1.0 + noise if name in norm_scales else noise)

    def numpy_state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().float().numpy().copy() for k, v in self.state_dict().items()}

    @torch.no_grad()
    def encode_images(self, pixel_values):
        """pixel_values NCHW f[N, C, S, S] -> image tokens f[N, T, D]."""
        features = self.vision_encoder(pixel_values=pixel_values).last_hidden_state
        return self.vision_tokenizer(features)

    @torch.no_grad()
    def forward(self, pixel_values, input_ids, modality_ids=None, attention_mask=None, position_ids=None):
        """Logits f32[B, L, initial_tokenizer_len + 2].

        pixel_values: NHWC f[B, I, S, S, C] (as aki-jax), NCHW f[B, I, C, S, S] or f[B, C, S, S], or None.
        attention_mask: bool[B, L, L] (True = may attend); without it the mask is built from
        `modality_ids` by `modality_mask` below.
        """
        c = self.config
        input_ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
        b, length = input_ids.shape
        if modality_ids is not None:
            modality_ids = np.asarray(modality_ids)
            is_image = torch.as_tensor(modality_ids == IMAGE)
        else:
            is_image = input_ids == c.image_token_id
        embeds = self.lang_model.model.embed_tokens(torch.where(is_image, 0, input_ids))
        if pixel_values is not None:
            pixels = _to_nchw(torch.as_tensor(np.asarray(pixel_values), dtype=torch.float32), c.vision.num_channels)
            per_row = pixels.shape[1]
            if per_row:
                tokens = self.encode_images(pixels.reshape((b * per_row,) + pixels.shape[2:]))
                tokens = tokens.reshape(b, -1, tokens.shape[-1])
                for row in range(b):
                    slots = torch.nonzero(is_image[row]).flatten()
                    embeds[row, slots] = tokens[row, : len(slots)]
        if attention_mask is None:
            if modality_ids is None:
                raise ValueError("pass modality_ids or attention_mask")
            attention_mask = modality_mask(modality_ids)
        allowed = torch.as_tensor(np.asarray(attention_mask), dtype=torch.bool)
        additive = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
        if position_ids is None:
            position_ids = torch.arange(length)[None].expand(b, -1)
        out = self.lang_model(
            inputs_embeds=embeds,
            attention_mask=additive[:, None],
            position_ids=torch.as_tensor(np.asarray(position_ids), dtype=torch.long),
            use_cache=False,
        )
        return out.logits


def _to_nchw(pixels, channels: int):
    if pixels.ndim == 4:  # one image per row
        pixels = pixels[:, None]
    if pixels.shape[-1] == channels and pixels.shape[2] != channels:
        pixels = pixels.permute(0, 1, 4, 2, 3)
    return pixels.contiguous()


def modality_mask(modality_ids) -> np.ndarray:
    """bool[B, L, L] from modality ids, by a direct loop over the rule (no segments).

    Causal; PAD rows and columns closed; an IMAGE row also reads the QUERY columns after it that lie in
    the same contiguous IMAGE/QUERY run.
    """
    modality_ids = np.asarray(modality_ids)
    b, length = modality_ids.shape
    mask = np.zeros((b, length, length), bool)
    for row in range(b):
        m = modality_ids[row]
        for t in range(length):
            if m[t] == PAD:
                continue
            for s in range(t + 1):
                mask[row, t, s] = m[s] != PAD
            if m[t] == IMAGE:
                s = t + 1
                while s < length and m[s] in (IMAGE, QUERY):
                    mask[row, t, s] = m[s] == QUERY
                    s += 1
    return mask


def original_mma_mask(
    text_ids, text_padding, image_token_id: int, assistant_token_id: int, num_image_tokens: int
) -> np.ndarray:
    """The original's mask, from the unexpanded text (one `<image>` per row), for the fused sequence.

    text_ids int[B, n] and text_padding bool/int[B, n] (1 = real token). The fused length is
    n - 1 + num_image_tokens. Causal with padding columns closed, plus the image rows reading columns
    [image_end, assistant_index_in_text + num_image_tokens): one past `<|assistant|>` in the fused
    sequence, so the assistant token is included. No `<|assistant|>`: plain causal.
    """
    text_ids, text_padding = np.asarray(text_ids), np.asarray(text_padding).astype(bool)
    b, n = text_ids.shape
    length = n - 1 + num_image_tokens
    causal = np.tril(np.ones((length, length), bool))
    masks = []
    for row in range(b):
        start = int(np.flatnonzero(text_ids[row] == image_token_id)[0])
        fused_padding = np.concatenate(
            [text_padding[row, :start], np.ones(num_image_tokens, bool), text_padding[row, start + 1 :]]
        )
        mask = causal & fused_padding[None, :]
        assistant = np.flatnonzero(text_ids[row] == assistant_token_id)
        if assistant.size:
            end = int(assistant[0]) + num_image_tokens
            mask[start : start + num_image_tokens, start + num_image_tokens : end] = True
        masks.append(mask)
    return np.stack(masks)


def expand_text(text_ids, image_token_id: int, num_image_tokens: int) -> np.ndarray:
    """int[B, n] with one `<image>` per row -> the fused int[B, n - 1 + T] (image slots keep the image id)."""
    rows = []
    for ids in np.asarray(text_ids):
        start = int(np.flatnonzero(ids == image_token_id)[0])
        rows.append(np.concatenate([ids[:start], np.full(num_image_tokens, image_token_id), ids[start + 1 :]]))
    return np.stack(rows).astype(np.int32)
