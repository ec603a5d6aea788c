"""Typed model configuration: vision tower, resampler, decoder and the whole AKI model.

Configs are frozen dataclasses with defaults; presets are plain functions (`aki_4b()`, `tiny()`).
`AKIConfig.to_json` / `AKIConfig.from_json` write and read the JSON stored next to checkpoints
(through `aki_jax.serialization`, the one config (de)serialiser).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from aki_jax import serialization

# AKIConfig.attention_impl; what each name runs is documented in aki_jax/attention/api.py.
ATTENTION_IMPLEMENTATIONS = (
    None,
    "auto",
    "xla",
    "cudnn",
    "pallas_tpu",
    "pallas_gpu",
    "pallas_tpu_interpret",
    "pallas_gpu_interpret",
)

# Phi-3.5-mini-instruct's LongRoPE factors (48 each, one per rotary frequency of a 96-wide head).
PHI35_SHORT_FACTOR = (
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0499999523162842,
    1.0699999332427979, 1.0999999046325684, 1.1099998950958252, 1.1599998474121094,
    1.1599998474121094, 1.1699998378753662, 1.2899998426437378, 1.339999794960022,
    1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
    1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0199997425079346, 2.0199997425079346, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533,
    2.729999542236328, 2.749999523162842, 2.8399994373321533,
)  # fmt: skip
PHI35_LONG_FACTOR = (
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601,
    1.5899999141693115, 1.600000023841858, 1.6200000047683716, 2.620000123977661,
    3.2300000190734863, 3.2300000190734863, 4.789999961853027, 7.400000095367432,
    7.700000286102295, 9.09000015258789, 12.199999809265137, 17.670000076293945,
    24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992,
    50.340003967285156, 50.45000457763672, 57.55000305175781, 57.93000411987305,
    58.21000289916992, 60.1400032043457, 62.61000442504883, 62.62000274658203,
    62.71000289916992, 63.1400032043457, 63.1400032043457, 63.77000427246094,
    63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938,
    64.4800033569336, 64.51000213623047, 64.52999877929688, 64.83999633789062,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower (Hugging Face `SiglipVisionTransformer`)."""

    image_size: int = 384
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class ResamplerConfig:
    """Flamingo-style Perceiver resampler. Heads and head size do not depend on the input width."""

    num_latents: int = 144
    depth: int = 6
    num_heads: int = 8
    head_dim: int = 64
    ff_mult: int = 4
    layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """LongRoPE: per-frequency divisors, short below `original_max_position_embeddings`, long above."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int = 4096

    def attention_factor(self, max_position_embeddings: int) -> float:
        """cos/sin multiplier sqrt(1 + ln(max/original) / ln(original)); 1 when not extended."""
        scale = max_position_embeddings / self.original_max_position_embeddings
        if scale <= 1.0:
            return 1.0
        return math.sqrt(1.0 + math.log(scale) / math.log(self.original_max_position_embeddings))


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Phi-3 decoder (Hugging Face `Phi3ForCausalLM`); `vocab_size` is the embedding table's row count."""

    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_layers: int = 32
    num_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 131072
    rope_scaling: RopeScaling | None = RopeScaling(PHI35_SHORT_FACTOR, PHI35_LONG_FACTOR, 4096)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class AKIConfig:
    """The whole model plus its numeric policy.

    `initial_tokenizer_len` is the tokenizer size before `<image>` and `<|endofchunk|>` are appended;
    logits have `initial_tokenizer_len + 2` columns. `dtype` is the compute dtype, `param_dtype` the
    storage dtype of parameters. `attention` is "mma" (the paper) or "causal" (the ablation).
    `remat` is "none", "full" or "dots" (save matmul outputs, recompute the rest) for the scanned layers.
    `attention_impl` is "auto" (a flash kernel over mask ranges on TPU and GPU, dense elsewhere), null
    (the dense recomputing attention everywhere) or a name from `ATTENTION_IMPLEMENTATIONS`.
    """

    vision: VisionConfig = VisionConfig()
    resampler: ResamplerConfig = ResamplerConfig()
    decoder: DecoderConfig = DecoderConfig()
    initial_tokenizer_len: int = 32012
    pad_token_id: int = 32011
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "mma"
    attention_impl: str | None = "auto"
    remat: str = "none"
    freeze_vision: bool = True

    @property
    def image_token_count(self) -> int:
        return self.resampler.num_latents

    @property
    def logits_size(self) -> int:
        return self.initial_tokenizer_len + 2

    @property
    def image_token_id(self) -> int:
        return self.initial_tokenizer_len

    @property
    def end_of_chunk_token_id(self) -> int:
        return self.initial_tokenizer_len + 1

    def __post_init__(self):
        if self.attention not in ("mma", "causal"):
            raise ValueError(f"AKIConfig.attention must be 'mma' or 'causal', got {self.attention!r}")
        if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"AKIConfig.attention_impl must be one of {list(ATTENTION_IMPLEMENTATIONS)} (null: dense "
                f"recomputing attention), got {self.attention_impl!r}"
            )
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"AKIConfig.remat must be 'none', 'full' or 'dots', got {self.remat!r}")
        if self.initial_tokenizer_len > self.decoder.vocab_size:
            raise ValueError(
                f"AKIConfig.initial_tokenizer_len ({self.initial_tokenizer_len}) exceeds the decoder's "
                f"embedding rows ({self.decoder.vocab_size})"
            )
        scaling = self.decoder.rope_scaling
        if scaling is not None:
            half = self.decoder.head_dim // 2
            for name in ("short_factor", "long_factor"):
                if len(getattr(scaling, name)) != half:
                    raise ValueError(
                        f"rope_scaling.{name} has {len(getattr(scaling, name))} values, expected head_dim/2 = {half}"
                    )

    def replace(self, **changes) -> AKIConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return serialization.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AKIConfig:
        return serialization.from_dict(cls, data)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(serialization.to_json(self))

    @classmethod
    def from_json(cls, path: str | Path) -> AKIConfig:
        return serialization.from_json(cls, path)


def aki_4b() -> AKIConfig:
    """AKI-4B: SigLIP-so400m/14@384 -> resampler (144 latents) -> Phi-3.5-mini."""
    return AKIConfig()


def tiny(vocab_size: int = 512, initial_tokenizer_len: int = 500, **changes) -> AKIConfig:
    """A few-hundred-thousand-parameter AKI with every feature of the real one, for tests."""
    head_dim = 16
    n_freq = head_dim // 2
    short = tuple(1.0 + 0.1 * i for i in range(n_freq))
    long = tuple(1.5 + 0.7 * i for i in range(n_freq))
    config = AKIConfig(
        vision=VisionConfig(
            image_size=28, patch_size=7, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4
        ),
        resampler=ResamplerConfig(num_latents=6, depth=2),
        decoder=DecoderConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            max_position_embeddings=256,
            rope_scaling=RopeScaling(short, long, original_max_position_embeddings=64),
        ),
        initial_tokenizer_len=initial_tokenizer_len,
        pad_token_id=initial_tokenizer_len - 1,
    )
    return config.replace(**changes) if changes else config


PRESETS = {"aki-4b": aki_4b, "tiny": tiny}


def preset(name: str) -> AKIConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()
