"""aki-jax: AKI (modality-mutual attention multimodal LLM) in JAX/Flax."""

from aki_jax.config import AKIConfig, DecoderConfig, ResamplerConfig, RopeScaling, VisionConfig, aki_4b, preset, tiny
from aki_jax.decoder import init_cache
from aki_jax.losses import next_token_loss, shift_targets, token_accuracy
from aki_jax.mask import IMAGE, PAD, QUERY, TEXT, attention_mask, default_positions
from aki_jax.model import AKI, abstract_params, init_params

# Heavier entry points (Orbax, generation) are imported on first use, so `import aki_jax` stays light.
_LAZY = {
    "load_pretrained": "aki_jax.checkpoint",
    "save_pretrained": "aki_jax.checkpoint",
    "generate": "aki_jax.generation",
    "generate_text": "aki_jax.generation",
    "Sampling": "aki_jax.generation",
    "MeshConfig": "aki_jax.sharding",
    "make_mesh": "aki_jax.sharding",
    "param_shardings": "aki_jax.sharding",
    "TrainConfig": "aki_jax.training",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aki_jax' has no attribute {name!r}")


__all__ = [
    "Sampling",
    "AKI",
    "AKIConfig",
    "DecoderConfig",
    "IMAGE",
    "MeshConfig",
    "PAD",
    "QUERY",
    "ResamplerConfig",
    "RopeScaling",
    "TEXT",
    "TrainConfig",
    "VisionConfig",
    "abstract_params",
    "aki_4b",
    "attention_mask",
    "default_positions",
    "generate",
    "generate_text",
    "init_cache",
    "init_params",
    "load_pretrained",
    "make_mesh",
    "next_token_loss",
    "param_shardings",
    "preset",
    "save_pretrained",
    "shift_targets",
    "tiny",
    "token_accuracy",
]
