"""Translate the original checkpoint's configs into an `AKIConfig`, and back.

A released AKI folder's `config.json` holds the constructor arguments of the original model
(`vision_encoder_path`, `lang_model_path`, `initial_tokenizer_len`, `pad_token_id`, `num_vision_tokens`,
...). The two towers' shapes live in *their* configs: a SigLIP `config.json` (full SiglipConfig with a
`vision_config` entry, or a SiglipVisionConfig) and a Phi-3 `config.json`. Hubs are often unreachable,
so each is looked up in this order:
  1. a file passed explicitly (`--vision-config`, `--lm-config`);
  2. `<vision_encoder_path>/config.json` / `<lang_model_path>/config.json` when those are local folders
     (absolute, or relative to the checkpoint folder);
  3. `vision_encoder/config.json` / `lang_model/config.json` inside the checkpoint folder (what
     `export_to_pytorch` writes);
  4. the built-in aki-4b preset for that tower, with a message saying so.
An `aki_config.json` inside the folder (written by aki-jax) wins over all of this.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

from aki_jax.config import AKIConfig, DecoderConfig, ResamplerConfig, RopeScaling, VisionConfig, aki_4b

# Defaults of transformers' SiglipVisionConfig / Phi3Config, used for fields a config.json omits.
SIGLIP_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
    image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
)  # fmt: skip
PHI3_DEFAULTS = dict(
    vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
    rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096, original_max_position_embeddings=4096,
    hidden_act="silu",
)  # fmt: skip
AKI_4B_VISION_HUB = "google/siglip-so400m-patch14-384"
AKI_4B_LM_HUB = "microsoft/Phi-3.5-mini-instruct"


def vision_from_siglip(data: dict, where: str = "vision config") -> VisionConfig:
    if "vision_config" in data:  # a full SiglipConfig
        data = data["vision_config"] or {}
    v = {**SIGLIP_DEFAULTS, **{k: val for k, val in data.items() if val is not None}}
    if v["hidden_act"] != "gelu_pytorch_tanh":
        raise ValueError(f"{where}: hidden_act {v['hidden_act']!r}; aki-jax's SigLIP uses gelu_pytorch_tanh")
    return VisionConfig(
        image_size=int(v["image_size"]),
        patch_size=int(v["patch_size"]),
        num_channels=int(v["num_channels"]),
        hidden_size=int(v["hidden_size"]),
        intermediate_size=int(v["intermediate_size"]),
        num_layers=int(v["num_hidden_layers"]),
        num_heads=int(v["num_attention_heads"]),
        layer_norm_eps=float(v["layer_norm_eps"]),
    )


def decoder_from_phi3(data: dict, where: str = "language-model config") -> DecoderConfig:
    d = {**PHI3_DEFAULTS, **{k: val for k, val in data.items() if val is not None}}
    heads = int(d["num_attention_heads"])
    kv_heads = int(d.get("num_key_value_heads") or heads)
    if kv_heads != heads:
        raise ValueError(f"{where}: num_key_value_heads {kv_heads} != num_attention_heads {heads} (GQA unsupported)")
    if d["hidden_act"] != "silu":
        raise ValueError(f"{where}: hidden_act {d['hidden_act']!r}; the Phi-3 decoder uses silu")
    # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older configs `rope_scaling`.
    scaling = d.get("rope_scaling") or d.get("rope_parameters") or {}
    theta = float(scaling.get("rope_theta", d["rope_theta"]))
    kind = scaling.get("rope_type", scaling.get("type"))
    if float(scaling.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported")
    rope = None
    if kind in ("longrope", "su"):
        original = int(scaling.get("original_max_position_embeddings", d["original_max_position_embeddings"]))
        rope = RopeScaling(
            short_factor=tuple(float(x) for x in scaling["short_factor"]),
            long_factor=tuple(float(x) for x in scaling["long_factor"]),
            original_max_position_embeddings=original,
        )
    elif kind not in (None, "default"):
        raise ValueError(f"{where}: rope scaling type {kind!r} is not supported (expected 'longrope', 'su' or none)")
    return DecoderConfig(
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=heads,
        rms_norm_eps=float(d["rms_norm_eps"]),
        rope_theta=theta,
        max_position_embeddings=int(d["max_position_embeddings"]),
        rope_scaling=rope,
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read config ({e})") from e


def read_original_args(folder: str | Path | None) -> dict:
    """The original constructor arguments from `folder/config.json`, or {} when there is none."""
    if folder is None or not (Path(folder) / "config.json").is_file():
        return {}
    return _read_json(Path(folder) / "config.json")


def _find_sub_config(explicit, folder: Path | None, hub_or_path, default_sub: str) -> Path | None:
    if explicit is not None:
        path = Path(explicit)
        return path / "config.json" if path.is_dir() else path
    candidates = []
    if hub_or_path:
        p = Path(hub_or_path)
        candidates.append(p if p.is_absolute() else (folder / p if folder else p))
    if folder is not None:
        candidates.append(folder / default_sub)
    for c in candidates:
        if (c / "config.json").is_file():
            return c / "config.json"
    return None


def translate_config(
    folder: str | Path | None,
    lm_config: str | Path | None = None,
    vision_config: str | Path | None = None,
    log: Callable[[str], None] = print,
    keys: Iterable[str] | None = None,
    shape: Callable[[str], tuple[int, ...]] | None = None,
    tokenizer_dir: str | Path | None = None,
) -> tuple[AKIConfig, dict]:
    """(AKIConfig, the original constructor arguments from config.json or {}) for a checkpoint folder.

    `folder` may be None (a bare .pt file): then only explicit sub-config files and the preset are used.
    `keys`: the checkpoint's state-dict keys (prefixes stripped). No config file records the resampler's
    depth, so it is counted from them; the towers' layer counts are checked against them.
    `shape`: the checkpoint's tensor shapes (`shape(key)`, from headers). With it, what the tensors
    determine replaces the aki-4b preset where no config says otherwise (`infer_vision`, `infer_decoder`,
    `infer_resampler`).
    `tokenizer_dir`: where to look for a tokenizer when no config.json gives `initial_tokenizer_len`.
    """
    folder = Path(folder) if folder is not None else None
    if folder is not None and (folder / "aki_config.json").is_file():
        log(f"using {folder / 'aki_config.json'} (written by aki-jax)")
        return AKIConfig.from_json(folder / "aki_config.json"), read_original_args(folder)
    original = read_original_args(folder)
    preset = aki_4b()
    keys = list(keys) if keys is not None else None
    # Tensor shapes replace the preset where no config file speaks; a tensor they need that is missing is
    # left to the key check that follows (it names every missing key).
    inferable = shape is not None and keys is not None and all(k in set(keys) for k in INFERENCE_KEYS)

    path = _find_sub_config(vision_config, folder, original.get("vision_encoder_path"), "vision_encoder")
    if path is not None:
        vision = vision_from_siglip(_read_json(path), str(path))
        log(f"vision tower config: {path}")
    elif inferable:
        vision, note = infer_vision(keys, shape, preset.vision)
        log(f"vision tower config: not found; from the tensors: {note}")
    else:
        vision = preset.vision
        log(
            f"vision tower config: not found (vision_encoder_path={original.get('vision_encoder_path')!r} is not a "
            "local folder and no --vision-config was given); using the built-in aki-4b preset (SigLIP so400m/14@384)"
        )
    path = _find_sub_config(lm_config, folder, original.get("lang_model_path"), "lang_model")
    if path is not None:
        decoder = decoder_from_phi3(_read_json(path), str(path))
        log(f"language model config: {path}")
    elif inferable:
        decoder, note = infer_decoder(keys, shape, preset.decoder)
        log(f"language model config: not found; from the tensors: {note}")
    else:
        decoder = preset.decoder
        log(
            f"language model config: not found (lang_model_path={original.get('lang_model_path')!r} is not a local "
            "folder and no --lm-config was given); using the built-in aki-4b preset (Phi-3.5-mini)"
        )
    resampler = preset.resampler
    if inferable:
        resampler, note = infer_resampler(keys, shape, preset.resampler, vision.hidden_size)
        log(f"resampler: from the tensors: {note}")
    if original.get("num_vision_tokens"):
        resampler = dataclasses.replace(resampler, num_latents=int(original["num_vision_tokens"]))
    if "initial_tokenizer_len" in original:
        initial, pad = int(original["initial_tokenizer_len"]), int(original.get("pad_token_id", preset.pad_token_id))
    else:
        initial, pad = _tokenizer_ids(tokenizer_dir, preset, decoder, log)
    config = AKIConfig(
        vision=vision, resampler=resampler, decoder=decoder, initial_tokenizer_len=initial, pad_token_id=pad
    )
    if keys is not None:
        config = reconcile_layer_counts(config, keys, log)
    return config, original


# The tensors `infer_*` read.
INFERENCE_KEYS = (
    "vision_encoder.embeddings.patch_embedding.weight",
    "vision_encoder.embeddings.position_embedding.weight",
    "vision_encoder.encoder.layers.0.mlp.fc1.weight",
    "lang_model.model.embed_tokens.weight",
    "lang_model.model.layers.0.mlp.gate_up_proj.weight",
    "vision_tokenizer.latents",
    "vision_tokenizer.layers.0.0.to_q.weight",
    "vision_tokenizer.layers.0.1.1.weight",
)


def _tokenizer_ids(tokenizer_dir, preset: AKIConfig, decoder: DecoderConfig, log) -> tuple[int, int]:
    """(initial_tokenizer_len, pad_token_id) when no config.json records them: no tensor's shape holds them
    (the embedding keeps the language model's rows), so they come from a tokenizer beside the checkpoint,
    else from the aki-4b preset when its vocabulary fits the embedding."""
    if tokenizer_dir is not None and any(
        (Path(tokenizer_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer.model")
    ):
        from aki_jax.processing.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)
        log(
            f"initial_tokenizer_len {tok.initial_tokenizer_len} and pad_token_id {tok.pad_token_id}: from the "
            f"tokenizer in {tokenizer_dir}"
        )
        return tok.initial_tokenizer_len, tok.pad_token_id
    if preset.initial_tokenizer_len > decoder.vocab_size:
        raise ValueError(
            f"initial_tokenizer_len is not determined by the tensors and aki-4b's {preset.initial_tokenizer_len} "
            f"exceeds the checkpoint's {decoder.vocab_size} embedding rows: put the tokenizer beside the "
            "checkpoint or pass --aki-config"
        )
    log(
        f"no config.json with the original constructor arguments and no tokenizer: initial_tokenizer_len "
        f"{preset.initial_tokenizer_len} / pad_token_id {preset.pad_token_id} from aki-4b (not in the tensors)"
    )
    return preset.initial_tokenizer_len, preset.pad_token_id


def infer_vision(
    keys: list[str], shape: Callable[[str], tuple[int, ...]], preset: VisionConfig
) -> tuple[VisionConfig, str]:
    """(VisionConfig, what came from where): width, MLP, layers, patch and image size from the tensors.

    Heads and the norm epsilon leave no trace in any shape: they are the preset's, and only while the
    width they divide is the preset's too; otherwise a config file is required.
    """
    e, channels, patch, _ = shape("vision_encoder.embeddings.patch_embedding.weight")
    patches = shape("vision_encoder.embeddings.position_embedding.weight")[0]
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(
            f"vision_encoder.embeddings.position_embedding.weight: {patches} positions is not a square grid"
        )
    if e != preset.hidden_size:
        raise ValueError(
            f"the vision tower is {e} wide (patch_embedding), not aki-4b's {preset.hidden_size}: its number of heads "
            "is not in the tensors; pass --vision-config"
        )
    # The grid fixes image_size // patch only (SigLIP so400m: 384 // 14 = 27): keep the preset's size when it fits.
    image_size = preset.image_size if preset.image_size // patch == side else side * patch
    vision = dataclasses.replace(
        preset, hidden_size=e, num_channels=channels, patch_size=patch, image_size=image_size,
        intermediate_size=shape("vision_encoder.encoder.layers.0.mlp.fc1.weight")[0],
        num_layers=_count_layers(keys, "vision_encoder.encoder.layers.") or preset.num_layers,
    )  # fmt: skip
    note = (
        f"width {e}, mlp {vision.intermediate_size}, {vision.num_layers} layers, patch {patch}, image "
        f"{vision.image_size}; heads {preset.num_heads} and eps {preset.layer_norm_eps} from aki-4b "
        "(not in the tensors)"
    )
    return vision, note


def infer_decoder(
    keys: list[str], shape: Callable[[str], tuple[int, ...]], preset: DecoderConfig
) -> tuple[DecoderConfig, str]:
    """(DecoderConfig, what came from where): width, MLP, layers and embedding rows from the tensors; heads,
    rotary settings and eps from the preset, while the width is the preset's (else a config file is required)."""
    rows, width = shape("lang_model.model.embed_tokens.weight")
    if width != preset.hidden_size:
        raise ValueError(
            f"the language model is {width} wide (embed_tokens), not aki-4b's {preset.hidden_size}: its number of "
            "heads and rotary factors are not in the tensors; pass --lm-config"
        )
    decoder = dataclasses.replace(
        preset, vocab_size=rows, hidden_size=width,
        intermediate_size=shape("lang_model.model.layers.0.mlp.gate_up_proj.weight")[0] // 2,
        num_layers=_count_layers(keys, "lang_model.model.layers.") or preset.num_layers,
    )  # fmt: skip
    note = (
        f"width {width}, mlp {decoder.intermediate_size}, {decoder.num_layers} layers, {rows} embedding rows; "
        f"heads {preset.num_heads}, rope theta / LongRoPE factors and eps from aki-4b (not in the tensors)"
    )
    return decoder, note


def infer_resampler(
    keys: list[str], shape: Callable[[str], tuple[int, ...]], preset: ResamplerConfig, width: int
) -> tuple[ResamplerConfig, str]:
    """(ResamplerConfig, what came from where): latents, depth and feed-forward multiple from the tensors.
    The attention is always 8 heads of 64 in the original (AKI never changes open_flamingo's defaults)."""
    inner = shape("vision_tokenizer.layers.0.0.to_q.weight")[0]
    if inner != preset.num_heads * preset.head_dim:
        raise ValueError(
            f"vision_tokenizer.layers.0.0.to_q.weight: resampler attention width {inner}, but the original always "
            f"uses {preset.num_heads} heads of {preset.head_dim}; pass --aki-config"
        )
    resampler = dataclasses.replace(
        preset, num_latents=shape("vision_tokenizer.latents")[0],
        depth=_count_layers(keys, "vision_tokenizer.layers.") or preset.depth,
        ff_mult=shape("vision_tokenizer.layers.0.1.1.weight")[0] // width,
    )  # fmt: skip
    note = (
        f"{resampler.num_latents} latents, depth {resampler.depth}, ff x{resampler.ff_mult}; "
        f"{preset.num_heads} heads of {preset.head_dim} as in the original"
    )
    return resampler, note


def _count_layers(keys, prefix: str) -> int | None:
    found = {int(k[len(prefix) :].split(".")[0]) for k in keys if k.startswith(prefix)}
    return max(found) + 1 if found else None


def reconcile_layer_counts(config: AKIConfig, keys: Iterable[str], log: Callable[[str], None] = print) -> AKIConfig:
    """Take the resampler depth from the keys; refuse tower configs whose layer count the keys contradict."""
    keys = list(keys)
    depth = _count_layers(keys, "vision_tokenizer.layers.")
    if depth is not None and depth != config.resampler.depth:
        log(f"resampler depth {depth} (counted from the checkpoint's keys)")
        config = config.replace(resampler=dataclasses.replace(config.resampler, depth=depth))
    for name, prefix, configured in (
        ("vision tower", "vision_encoder.encoder.layers.", config.vision.num_layers),
        ("language model", "lang_model.model.layers.", config.decoder.num_layers),
    ):
        found = _count_layers(keys, prefix)
        if found is not None and found != configured:
            raise ValueError(
                f"the {name} config says {configured} layers but the checkpoint has {found} ({prefix}0..{found - 1}); "
                "pass the matching config file"
            )
    return config


def siglip_config_dict(config: AKIConfig) -> dict:
    """A SiglipVisionConfig-style config.json for the vision tower."""
    v = config.vision
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "num_channels": v.num_channels,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": v.layer_norm_eps,
    }


def phi3_config_dict(config: AKIConfig) -> dict:
    """A Phi-3 config.json (the transformers 4.x `rope_scaling` spelling, which 5.x also reads)."""
    d = config.decoder
    out = {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "vocab_size": d.vocab_size,
        "hidden_size": d.hidden_size,
        "intermediate_size": d.intermediate_size,
        "num_hidden_layers": d.num_layers,
        "num_attention_heads": d.num_heads,
        "num_key_value_heads": d.num_heads,
        "hidden_act": "silu",
        "rms_norm_eps": d.rms_norm_eps,
        "rope_theta": d.rope_theta,
        "max_position_embeddings": d.max_position_embeddings,
        "tie_word_embeddings": False,
    }
    if d.rope_scaling is not None:
        out["original_max_position_embeddings"] = d.rope_scaling.original_max_position_embeddings
        out["rope_scaling"] = {
            "type": "longrope",
            "short_factor": list(d.rope_scaling.short_factor),
            "long_factor": list(d.rope_scaling.long_factor),
        }
    return out


def original_constructor_args(config: AKIConfig, recorded: dict | None = None) -> dict:
    """The original model's config.json (PyTorchModelHubMixin constructor arguments).

    Starts from the arguments recorded at import (if any) so unknown fields survive a round trip;
    the fields aki-jax knows are overwritten from `config`.
    """
    out = {"vision_encoder_path": AKI_4B_VISION_HUB, "lang_model_path": AKI_4B_LM_HUB}
    out.update(recorded or {})
    out.update(
        {
            "initial_tokenizer_len": config.initial_tokenizer_len,
            "pad_token_id": config.pad_token_id,
            "num_vision_tokens": config.resampler.num_latents,
        }
    )
    out.setdefault("decoder_layers_attr_name", "model.layers")
    return out
