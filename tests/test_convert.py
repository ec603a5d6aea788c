"""Conversion PyTorch AKI <-> aki-jax: parity with a PyTorch forward, bit-exact round trips, bad inputs.

A tiny random `AKIReference` (aki_jax/testing/torch_reference.py: transformers' SigLIP and Phi-3 plus an
independent resampler and added-token head, original key names) plays the released checkpoint.
"""

from __future__ import annotations

import json
import pickle
import struct

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import aki_jax
from aki_jax.checkpoint import load_pretrained, save_pretrained
from aki_jax.convert import ConversionError, convert_pytorch_to_orbax, export_orbax_to_pytorch
from aki_jax.convert.hf_config import phi3_config_dict, siglip_config_dict
from aki_jax.convert.mapping import TABLE, params_to_torch, torch_to_params
from aki_jax.convert.sources import open_checkpoint
from aki_jax.model import abstract_params
from aki_jax.testing.torch_reference import IMAGE, PAD, QUERY, TEXT, AKIReference, expand_text, original_mma_mask

CONFIG = aki_jax.tiny()
ASSISTANT = 7  # stands in for <|assistant|> in the tiny vocabulary
HEAD = "vision_encoder.head."
quiet = dict(log=lambda message: None)


@pytest.fixture(scope="module")
def reference():
    return AKIReference(CONFIG)


@pytest.fixture(scope="module")
def state_dict(reference):
    return {k: v.detach().clone().contiguous() for k, v in reference.state_dict().items()}


def released_folder(path, tensors, tokenizer_dir=None):
    """A folder like a released AKI checkpoint: config.json (constructor args) + model.safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    args = {
        "vision_encoder_path": "google/siglip-so400m-patch14-384",
        "lang_model_path": "microsoft/Phi-3.5-mini-instruct",
        "pad_token_id": CONFIG.pad_token_id,
        "initial_tokenizer_len": CONFIG.initial_tokenizer_len,
        "num_vision_tokens": CONFIG.resampler.num_latents,
        "decoder_layers_attr_name": "model.layers",
    }
    (path / "config.json").write_text(json.dumps(args))
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            (path / f.name).write_bytes(f.read_bytes())
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_tokenizer_dir):
    return tiny_tokenizer_dir


@pytest.fixture(scope="module")
def converted(tmp_path_factory, state_dict, tokenizer_dir):
    """The fp32 reference saved as a released folder and converted with the library function."""
    root = tmp_path_factory.mktemp("fp32")
    src = released_folder(root / "released", state_dict, tokenizer_dir)
    report = convert_pytorch_to_orbax(src, root / "jax", config=CONFIG, **quiet)
    return src, root / "jax", report


def mixed_batch(rng):
    """Three rows of the original's inputs and aki-jax's, one image each, text length 14.

    Rows 0 and 1 follow the chat template (text, <image>, question, <|assistant|>, answer; row 1 is
    right-padded); row 2 is a caption (<image> first, no <|assistant|>: the original's mask is plain
    causal) ending in <|endofchunk|> and padding. Returns (text ids, text padding, fused ids, modality ids).
    """
    n, t = 14, CONFIG.image_token_count
    text = rng.integers(2, CONFIG.initial_tokenizer_len, (3, n))
    text[text == ASSISTANT] = 3
    text[:2, 2] = CONFIG.image_token_id
    text[0, 9], text[1, 7] = ASSISTANT, ASSISTANT
    text[0, 12] = CONFIG.end_of_chunk_token_id  # an added-token id outside the image
    text[2, 0], text[2, 10] = CONFIG.image_token_id, CONFIG.end_of_chunk_token_id
    padding = np.ones((3, n), bool)
    padding[1, 11:] = False
    padding[2, 11:] = False
    fused = expand_text(text, CONFIG.image_token_id, t)
    modality = np.full(fused.shape, TEXT, np.int32)
    modality[:2, 2 : 2 + t] = IMAGE
    modality[0, 2 + t : 9 + t] = QUERY  # after the image up to and including <|assistant|>
    modality[1, 2 + t : 7 + t] = QUERY
    modality[2, :t] = IMAGE
    modality[1:, 11 + t - 1 :] = PAD
    return text, padding, fused, modality


def test_mapping_table_covers_every_parameter_and_original_key_once(state_dict):
    shapes, _ = abstract_params(CONFIG)
    paths = {tuple(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(shapes)}
    assert sorted(e.path for e in TABLE) == sorted(paths)
    params = torch_to_params(state_dict, CONFIG)  # torch tensors are accepted as well as numpy arrays
    exported = params_to_torch(params, CONFIG)
    assert set(exported) == {k for k in state_dict if not k.startswith(HEAD)}
    assert all(np.array_equal(exported[k], state_dict[k].numpy()) for k in exported)


def test_logits_match_pytorch_forward_with_the_original_mma_mask(reference, converted):
    _, dst, _ = converted
    model, params, tokenizer = load_pretrained(dst)
    assert tokenizer is not None
    rng = np.random.default_rng(0)
    text, padding, fused, modality = mixed_batch(rng)
    mask = original_mma_mask(text, padding, CONFIG.image_token_id, ASSISTANT, CONFIG.image_token_count)
    np.testing.assert_array_equal(mask[2], np.tril(mask[2]))  # the caption row: no rectangle
    # the mask aki-jax derives from modality ids equals the original's on every real position
    jax_mask = np.asarray(aki_jax.attention_mask(modality))
    real = modality != PAD
    for row in range(3):
        keep = np.ix_(real[row], real[row])
        np.testing.assert_array_equal(jax_mask[row][keep], mask[row][keep])

    pixels = rng.uniform(-1, 1, (3, 1, 28, 28, 3)).astype(np.float32)
    torch_logits = reference(pixels.transpose(0, 1, 4, 2, 3), fused, attention_mask=mask).numpy()  # NCHW
    np.testing.assert_array_equal(reference(pixels, fused, attention_mask=mask).numpy(), torch_logits)  # NHWC
    jax_logits = np.asarray(jax.jit(model.apply)({"params": params}, pixels, fused, modality))
    assert jax_logits.shape == (3, fused.shape[1], CONFIG.logits_size)
    assert np.abs(jax_logits - torch_logits)[real].max() <= 1e-4


def test_import_reports_the_siglip_pooling_head_as_skipped(converted):
    _, dst, report = converted
    assert report.skipped and all(k.startswith(HEAD) for k in report.skipped)
    assert "vision_encoder.head.probe" in json.loads((dst / "conversion_report.json").read_text())["skipped"]
    assert (dst / "tokenizer.json").is_file() and (dst / "config.json").is_file()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_pytorch_orbax_pytorch_is_bit_exact(tmp_path, state_dict, dtype):
    tensors = {k: v.to(dtype) for k, v in state_dict.items()}
    src = released_folder(tmp_path / "released", tensors)
    convert_pytorch_to_orbax(src, tmp_path / "jax", config=CONFIG, **quiet)
    export_orbax_to_pytorch(tmp_path / "jax", tmp_path / "with_head", vision_head_from=src, **quiet)
    back = load_file(tmp_path / "with_head" / "model.safetensors")
    assert set(back) == set(tensors)
    for key, value in tensors.items():
        assert back[key].dtype == dtype and torch.equal(back[key], value), key
    export_orbax_to_pytorch(tmp_path / "jax", tmp_path / "no_head", **quiet)
    assert set(load_file(tmp_path / "no_head" / "model.safetensors")) == {k for k in tensors if not k.startswith(HEAD)}
    # the export folder converts again to the same config (its aki_config.json is found)
    again = convert_pytorch_to_orbax(tmp_path / "no_head", tmp_path / "again", **quiet)
    assert again.config == CONFIG.to_dict()


def test_training_pt_with_module_prefix_and_sharded_safetensors_read_like_the_folder(tmp_path, state_dict):
    expected = torch_to_params({k: v.numpy() for k, v in state_dict.items()}, CONFIG)
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in state_dict.items()}, "step": 3}, tmp_path / "a.pt")
    keys = sorted(state_dict)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    (tmp_path / "sharded").mkdir()
    for name, part in shards.items():
        save_file({k: state_dict[k] for k in part}, tmp_path / "sharded" / name)
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    for src in (tmp_path / "a.pt", tmp_path / "sharded"):
        got = torch_to_params(open_checkpoint(src)[0], CONFIG)
        jax.tree.map(np.testing.assert_array_equal, got, expected)


def test_training_pt_without_config_json_takes_latents_and_tokenizer_len_from_what_lies_beside_it(
    tmp_path, state_dict, tokenizer_dir
):
    """A `.pt` with only the towers' configs: the resampler (6 latents, depth 2, not aki-4b's 144 / 6) comes
    from the tensors and `initial_tokenizer_len` from the tokenizer beside the file, as the log says."""
    from aki_jax.processing.tokenizer import load_tokenizer

    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, run / "checkpoint_3.pt")
    for f in tokenizer_dir.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    (tmp_path / "lm.json").write_text(json.dumps(phi3_config_dict(CONFIG)))
    (tmp_path / "vision.json").write_text(json.dumps(siglip_config_dict(CONFIG)))
    messages = []
    convert_pytorch_to_orbax(
        run / "checkpoint_3.pt", tmp_path / "jax", lm_config=tmp_path / "lm.json",
        vision_config=tmp_path / "vision.json", log=messages.append,
    )  # fmt: skip
    config = aki_jax.AKIConfig.from_json(tmp_path / "jax" / "aki_config.json")
    tok = load_tokenizer(tokenizer_dir)
    assert config == CONFIG.replace(initial_tokenizer_len=tok.initial_tokenizer_len, pad_token_id=tok.pad_token_id)
    assert any("6 latents, depth 2" in m for m in messages)
    assert any(f"initial_tokenizer_len {tok.initial_tokenizer_len}" in m and str(run) in m for m in messages)


def test_load_pretrained_casts_dtype_and_applies_shardings(converted):
    _, dst, _ = converted
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(8), ("model",))

    def by_path(path, leaf):
        spec = ("model", None) if path == ("decoder", "embed_tokens") else ()
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    model, params, _ = load_pretrained(dst, dtype="bfloat16", sharding=by_path)
    assert model.config.param_dtype == "bfloat16"
    assert all(leaf.dtype == jax.numpy.bfloat16 for leaf in jax.tree.leaves(params))
    table = params["decoder"]["embed_tokens"]
    assert table.sharding.spec == jax.sharding.PartitionSpec("model", None)
    assert table.addressable_shards[0].data.shape == (CONFIG.decoder.vocab_size // 8, CONFIG.decoder.hidden_size)


def test_save_pretrained_round_trips_params_with_relative_paths(tmp_path, state_dict, monkeypatch):
    params = torch_to_params({k: v.numpy() for k, v in state_dict.items()}, CONFIG)
    monkeypatch.chdir(tmp_path)  # Orbax itself wants absolute paths; users pass relative ones
    save_pretrained("p", CONFIG, params)
    _, restored, tokenizer = load_pretrained("p")
    assert tokenizer is None
    jax.tree.map(np.testing.assert_array_equal, restored, params)


# ---- bad inputs -------------------------------------------------------------------------------------------


def _convert(src, dst):
    return convert_pytorch_to_orbax(src, dst, config=CONFIG, **quiet)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sd: sd.pop("lang_model.lm_head.bias"), "missing key(s): lang_model.lm_head.bias"),
        (
            lambda sd: sd.update({"vision_tokenizer.extra.weight": torch.zeros(2)}),
            "unexpected key(s): vision_tokenizer.extra.weight",
        ),
        (
            lambda sd: sd.update({"lang_model.model.norm.weight": torch.zeros(63)}),
            "'lang_model.model.norm.weight': shape (63,) in the checkpoint, expected (64,)",
        ),
        (
            lambda sd: sd.update({"vision_tokenizer.latents": torch.zeros(6, 48, dtype=torch.int32)}),
            "'vision_tokenizer.latents': dtype int32 in the checkpoint, expected a float dtype",
        ),
    ],
    ids=["missing", "unexpected", "shape", "dtype"],
)
def test_bad_state_dicts_are_refused_with_the_tensor_named(tmp_path, state_dict, change, message):
    tensors = dict(state_dict)
    change(tensors)
    src = released_folder(tmp_path / "src", tensors)
    with pytest.raises(ConversionError) as error:
        _convert(src, tmp_path / "dst")
    assert message in str(error.value)
    assert not (tmp_path / "dst").exists()


def test_failure_while_streaming_leaves_nothing_at_dst(tmp_path, state_dict):
    # the second decoder layer's qkv has another dtype: found only while the stacked leaf is assembled,
    # after earlier leaves were written to the temporary folder
    tensors = dict(state_dict)
    key = "lang_model.model.layers.1.self_attn.qkv_proj.weight"
    tensors[key] = tensors[key].half()
    src = released_folder(tmp_path / "src", tensors)
    with pytest.raises(ConversionError, match=r"layers\.1\.self_attn\.qkv_proj\.weight.*float16.*float32"):
        convert_pytorch_to_orbax(src, tmp_path / "out" / "dst", config=CONFIG, **quiet)
    assert list((tmp_path / "out").iterdir()) == []


def test_truncated_and_corrupt_safetensors_are_refused(tmp_path, state_dict):
    src = released_folder(tmp_path / "src", state_dict)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ConversionError, match="truncated"):
        _convert(src, tmp_path / "dst")
    (n,) = struct.unpack("<Q", data[:8])
    (src / "model.safetensors").write_bytes(data[:8] + b"{" * n + data[8 + n :])
    with pytest.raises(ConversionError, match="corrupt safetensors header"):
        _convert(src, tmp_path / "dst")
    (src / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + data[8:])
    with pytest.raises(ConversionError, match="corrupt or truncated safetensors header"):
        _convert(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


class Payload:
    """Unpickling this would call os.system: weights_only loading must refuse it."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_pickle_that_needs_code_is_refused(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model_state_dict": {"x": Payload()}}, f)
    torch.save({"model_state_dict": {"x": torch.zeros(1)}, "obj": Payload()}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(ConversionError, match="refused: this pickle needs arbitrary code"):
            open_checkpoint(tmp_path / name)


def test_existing_destination_is_not_overwritten(tmp_path, converted):
    src, _, _ = converted
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        _convert(src, tmp_path / "dst")
    assert (tmp_path / "dst" / "keep.txt").read_text() == "mine"


def test_command_line_tools_convert_and_export(tmp_path, converted, capsys):
    from aki_jax.cli import convert as convert_tool
    from aki_jax.cli import export as export_tool

    src, _, _ = converted  # a released folder whose config.json names hub paths: sub-configs given by file
    (tmp_path / "lm.json").write_text(json.dumps(phi3_config_dict(CONFIG)))
    (tmp_path / "vision.json").write_text(json.dumps(siglip_config_dict(CONFIG)))
    argv = ["--src", str(src), "--dst", str(tmp_path / "j"), "--dtype", "bfloat16"]
    argv += ["--lm-config", str(tmp_path / "lm.json"), "--vision-config", str(tmp_path / "vision.json")]
    assert convert_tool.main(argv) == 0
    assert aki_jax.AKIConfig.from_json(tmp_path / "j" / "aki_config.json") == CONFIG.replace(param_dtype="bfloat16")
    assert export_tool.main(["--src", str(tmp_path / "j"), "--dst", str(tmp_path / "t")]) == 0
    back = load_file(tmp_path / "t" / "model.safetensors")
    assert back["lang_model.lm_head.bias"].dtype == torch.bfloat16
    assert (
        json.loads((tmp_path / "t" / "config.json").read_text())["initial_tokenizer_len"]
        == CONFIG.initial_tokenizer_len
    )
    assert convert_tool.main(["--src", str(tmp_path / "nothing"), "--dst", str(tmp_path / "x")]) == 1
    assert "no such file or folder" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape", [(5, 7), (1000, 1537), (2049, 700)])
def test_transpose_into_equals_numpy_transpose(shape, threads, dtype):
    from aki_jax.convert.mapping import transpose_into

    src = np.random.default_rng(0).integers(0, 60000, shape).astype(dtype)
    dst = np.zeros(shape[::-1], dtype)
    transpose_into(src, dst, threads=threads)
    np.testing.assert_array_equal(dst, src.T)
    with pytest.raises(ValueError, match=r"transpose_into: \(5, 7\) -> \(5, 7\)"):
        transpose_into(np.zeros((5, 7), dtype), np.zeros((5, 7), dtype))
