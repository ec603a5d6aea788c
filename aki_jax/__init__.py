"""aki-jax: AKI (modality-mutual attention multimodal LLM) in JAX/Flax."""

from aki_jax.config import AKIConfig, DecoderConfig, ResamplerConfig, RopeScaling, VisionConfig, aki_4b, preset, tiny
from aki_jax.decoder import init_cache
from aki_jax.losses import next_token_loss, shift_targets, token_accuracy
from aki_jax.mask import IMAGE, PAD, QUERY, TEXT, attention_mask, default_positions
from aki_jax.model import AKI, abstract_params, init_params

__all__ = [
    "AKI",
    "AKIConfig",
    "DecoderConfig",
    "IMAGE",
    "PAD",
    "QUERY",
    "ResamplerConfig",
    "RopeScaling",
    "TEXT",
    "VisionConfig",
    "abstract_params",
    "aki_4b",
    "attention_mask",
    "default_positions",
    "init_cache",
    "init_params",
    "next_token_loss",
    "preset",
    "shift_targets",
    "tiny",
    "token_accuracy",
]
