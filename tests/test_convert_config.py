"""Config translation: the released config.json plus SigLIP / Phi-3 configs -> AKIConfig, and back."""

from __future__ import annotations

import dataclasses
import json

import pytest

import aki_jax
from aki_jax.convert.hf_config import phi3_config_dict, siglip_config_dict, translate_config
from aki_jax.convert.mapping import expected_torch_shapes
from aki_jax.testing.torch_reference import phi3_config, siglip_config

CONFIG = aki_jax.tiny()
KEYS = list(expected_torch_shapes(CONFIG))


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def released_args(**changes):
    args = {
        "vision_encoder_path": "google/siglip-so400m-patch14-384",
        "lang_model_path": "microsoft/Phi-3.5-mini-instruct",
        "pad_token_id": CONFIG.pad_token_id,
        "initial_tokenizer_len": CONFIG.initial_tokenizer_len,
        "num_vision_tokens": CONFIG.resampler.num_latents,
    }
    return {**args, **changes}


def legacy_phi3(kind: str) -> dict:
    """A Phi-3 config.json as transformers 4.x / the Phi-3 remote code wrote it."""
    data = phi3_config_dict(CONFIG)
    data["rope_scaling"]["type"] = kind
    return data


@pytest.mark.parametrize("lm_source", ["transformers5", "longrope", "su"])
def test_sub_configs_given_by_path_translate_to_the_same_model(tmp_path, lm_source):
    # a full SiglipConfig (vision_config nested) as the hub ships it
    vision = write(tmp_path / "siglip.json", {"model_type": "siglip", "vision_config": siglip_config(CONFIG).to_dict()})
    if lm_source == "transformers5":
        phi3_config(CONFIG).to_json_file(tmp_path / "phi3.json")  # writes `rope_parameters`
        lm = tmp_path / "phi3.json"
    else:
        lm = write(tmp_path / "phi3.json", legacy_phi3(lm_source))
    write(tmp_path / "released" / "config.json", released_args())
    messages = []
    config, original = translate_config(tmp_path / "released", lm, vision, log=messages.append, keys=KEYS)
    assert config == CONFIG
    assert original["lang_model_path"] == "microsoft/Phi-3.5-mini-instruct"
    assert any(str(lm) in m for m in messages)


def test_sub_configs_are_found_in_local_folders_named_by_the_released_config(tmp_path):
    root = tmp_path / "released"
    write(root / "siglip" / "config.json", siglip_config_dict(CONFIG))
    write(root / "lang_model" / "config.json", phi3_config_dict(CONFIG))
    write(root / "config.json", released_args(vision_encoder_path="siglip", lang_model_path="/nonexistent/phi"))
    config, _ = translate_config(root, log=lambda m: None, keys=KEYS)
    assert config == CONFIG


def test_layer_counts_contradicting_the_checkpoint_are_refused(tmp_path):
    write(tmp_path / "config.json", released_args())
    lm = write(tmp_path / "phi3.json", {**phi3_config_dict(CONFIG), "num_hidden_layers": 3})
    vision = write(tmp_path / "siglip.json", siglip_config_dict(CONFIG))
    with pytest.raises(ValueError, match="language model config says 3 layers but the checkpoint has 2"):
        translate_config(tmp_path, lm, vision, log=lambda m: None, keys=KEYS)


def test_missing_sub_configs_fall_back_to_the_aki_4b_preset_with_a_message(tmp_path):
    write(tmp_path / "config.json", {"initial_tokenizer_len": 32012, "pad_token_id": 32011, "num_vision_tokens": 144})
    messages = []
    config, _ = translate_config(tmp_path, log=messages.append)
    assert config == aki_jax.aki_4b()
    assert sum("built-in aki-4b preset" in m for m in messages) == 2


def test_aki_config_json_in_the_folder_wins(tmp_path):
    CONFIG.to_json(tmp_path / "aki_config.json")
    write(tmp_path / "config.json", released_args(initial_tokenizer_len=7))
    config, original = translate_config(tmp_path, log=lambda m: None)
    assert config == CONFIG and original["initial_tokenizer_len"] == 7


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_key_value_heads": 2}, "GQA unsupported"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope scaling type 'yarn' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ],
)
def test_unsupported_language_model_configs_are_refused(tmp_path, change, message):
    lm = write(tmp_path / "phi3.json", {**phi3_config_dict(CONFIG), **change})
    with pytest.raises(ValueError, match=message):
        translate_config(None, lm_config=lm, log=lambda m: None)


def four_b_shapes(**changes) -> tuple[list[str], dict]:
    """Keys and shapes of an AKI with aki-4b's widths (nothing is allocated) with `changes` to its parts."""
    base = aki_jax.aki_4b()
    config = base.replace(**{k: dataclasses.replace(getattr(base, k), **v) for k, v in changes.items()})
    shapes = expected_torch_shapes(config)
    return list(shapes), shapes


def test_a_training_checkpoint_without_configs_gets_its_shapes_from_the_tensors():
    keys, shapes = four_b_shapes(
        vision={"num_layers": 3, "intermediate_size": 1000},
        resampler={"num_latents": 64, "depth": 2},
        decoder={"num_layers": 4, "vocab_size": 32100},
    )
    messages = []
    config, original = translate_config(None, log=messages.append, keys=keys, shape=shapes.__getitem__)
    preset = aki_jax.aki_4b()
    assert original == {}
    assert config.vision == dataclasses.replace(preset.vision, num_layers=3, intermediate_size=1000)
    assert config.resampler == dataclasses.replace(preset.resampler, num_latents=64, depth=2)
    assert config.decoder == dataclasses.replace(preset.decoder, num_layers=4, vocab_size=32100)
    assert config.initial_tokenizer_len == preset.initial_tokenizer_len  # no tensor holds it: said so
    said = "\n".join(messages)
    assert "64 latents, depth 2" in said and "from aki-4b (not in the tensors)" in said
    assert "initial_tokenizer_len 32012 / pad_token_id 32011 from aki-4b (not in the tensors)" in said


def test_initial_tokenizer_len_comes_from_a_tokenizer_beside_the_checkpoint(tmp_path):
    from aki_jax.processing.tokenizer import train_tokenizer

    tok = train_tokenizer(["the cat sat on the mat"] * 4, 280, tmp_path)
    keys, shapes = four_b_shapes()
    config, _ = translate_config(None, log=lambda m: None, keys=keys, shape=shapes.__getitem__, tokenizer_dir=tmp_path)
    assert (config.initial_tokenizer_len, config.pad_token_id) == (tok.initial_tokenizer_len, tok.pad_token_id)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"vision": {"hidden_size": 768, "num_heads": 12}}, "vision tower is 768 wide .* pass --vision-config"),
        ({"decoder": {"hidden_size": 2048, "num_heads": 16}}, "language model is 2048 wide .* pass --lm-config"),
    ],
)
def test_widths_the_tensors_cannot_complete_ask_for_a_config(change, message):
    base = aki_jax.aki_4b()
    part, values = next(iter(change.items()))
    sub = dataclasses.replace(getattr(base, part), **values)
    if part == "decoder":
        sub = dataclasses.replace(sub, rope_scaling=None)
    shapes = expected_torch_shapes(base.replace(**{part: sub}))
    with pytest.raises(ValueError, match=message):
        translate_config(None, log=lambda m: None, keys=list(shapes), shape=shapes.__getitem__)
