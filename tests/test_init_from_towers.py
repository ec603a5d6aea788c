"""AKI assembled from two Hugging Face towers (`aki-init-from-towers`): the paper's starting point.

Tiny random towers are written by transformers' own `save_pretrained` (a `SiglipModel` with its text tower,
a `Phi3ForCausalLM` with LongRoPE), both forced into shards. The aki-jax folder must hold the towers bit for
bit, compute what transformers computes, extend the tokenizer by the original factory's rule, draw the new
parameters from the original's distributions, and start a training run whose loss falls.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import Phi3ForCausalLM, PreTrainedTokenizerFast, SiglipConfig, SiglipModel

import aki_jax
from aki_jax.checkpoint import iter_leaves, load_pretrained, params_metadata
from aki_jax.cli.init_from_towers import main as init_main
from aki_jax.convert.mapping import TABLE, params_to_torch, torch_keys
from aki_jax.convert.towers import draw_parameter, init_from_towers, new_parameter_inits
from aki_jax.mask import TEXT
from aki_jax.processing.tokenizer import END_OF_CHUNK_TOKEN, IMAGE_TOKEN, load_tokenizer
from aki_jax.testing.torch_reference import phi3_config

TINY = aki_jax.tiny()
SHARD = "60KB"  # forces several shards for both tiny towers
quiet = dict(log=lambda message: None)


def randomize(model: nn.Module, seed: int) -> None:
    """Random values everywhere (norm scales near 1), so that a swapped or transposed tensor cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)


def write_siglip(path: Path) -> SiglipModel:
    v = TINY.vision
    config = SiglipConfig(
        vision_config=dict(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
            layer_norm_eps=v.layer_norm_eps,
        ),
        text_config=dict(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
    )  # fmt: skip
    model = SiglipModel(config).eval()
    randomize(model, 1)
    model.save_pretrained(path, max_shard_size=SHARD)
    return model


def write_phi3(path: Path) -> Phi3ForCausalLM:
    model = Phi3ForCausalLM(phi3_config(TINY)).eval()
    randomize(model, 2)
    model.save_pretrained(path, max_shard_size=SHARD)
    return model


def write_tokenizer(path: Path, pad: str | None) -> Path:
    """A word-level tokenizer of 300 entries saved by transformers, `pad` as its pad token (None: no pad)."""
    words = ["<unk>", "<s>", "<|endoftext|>", "<|assistant|>", "<|end|>"] + [f"w{i}" for i in range(295)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {} if pad is None else {"pad_token": pad}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>", **kwargs
    )
    fast.save_pretrained(path)
    return path


def original_rule(folder: Path) -> dict:
    """The original factory's token additions, applied by transformers itself to the same folder."""
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    if tok.pad_token is None or tok.pad_token == tok.eos_token:
        tok.add_special_tokens({"pad_token": "<pad>"})
    initial = len(tok)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, END_OF_CHUNK_TOKEN]})
    return {
        "initial_tokenizer_len": initial,
        "pad": (tok.pad_token, tok.pad_token_id),
        IMAGE_TOKEN: tok.convert_tokens_to_ids(IMAGE_TOKEN),
        END_OF_CHUNK_TOKEN: tok.convert_tokens_to_ids(END_OF_CHUNK_TOKEN),
    }


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    siglip, phi3 = write_siglip(root / "siglip"), write_phi3(root / "phi3")
    write_tokenizer(root / "phi3", pad="<|endoftext|>")  # pad == eos, as Phi-3.5 ships it
    return root, siglip, phi3


@pytest.fixture(scope="module")
def initialised(towers):
    """The command line run on the towers (float32, the default 144 latents)."""
    root, _, _ = towers
    code = init_main(["--vision", str(root / "siglip"), "--lm", str(root / "phi3"), "--dst", str(root / "aki")])
    assert code == 0
    return root / "aki"


@pytest.fixture(scope="module")
def loaded(initialised):
    return load_pretrained(initialised)


def test_the_towers_are_sharded_and_the_folder_loads(towers, initialised, loaded):
    root, _, _ = towers
    for tower in ("siglip", "phi3"):
        assert len(json.loads((root / tower / "model.safetensors.index.json").read_text())["weight_map"]) > 1
        assert len(list((root / tower).glob("model-*-of-*.safetensors"))) > 1
    model, params, tokenizer = loaded
    c = model.config
    assert (c.vision, c.decoder) == (TINY.vision, TINY.decoder)  # shapes and LongRoPE from the config.json's
    assert c.resampler == aki_jax.config.ResamplerConfig()  # the original's resampler: 144 latents, depth 6
    assert tokenizer.initial_tokenizer_len == c.initial_tokenizer_len
    report = json.loads((initialised / "init_report.json").read_text())
    assert any(k.startswith("text_model.") for k in report["ignored"])
    assert any(k.startswith("vision_model.head.") for k in report["ignored"])


def test_tower_parameters_are_bit_exact(towers, loaded):
    _, siglip, phi3 = towers
    model, params, _ = loaded
    exported = params_to_torch(jax.tree.map(np.asarray, params), model.config)
    expected = {f"vision_encoder.{k[len('vision_model.') :]}": v for k, v in siglip.state_dict().items()}
    expected.update({f"lang_model.{k}": v for k, v in phi3.state_dict().items()})
    compared = 0
    for key, value in exported.items():
        if key in expected:
            assert np.array_equal(value, expected[key].numpy()), key
            compared += 1
    assert compared == sum(not k.startswith(("vision_tokenizer.",)) for k in exported) - 4  # all but the 4 new


def test_vision_tower_output_equals_siglip_vision_model(towers, loaded):
    _, siglip, _ = towers
    model, params, _ = loaded
    v = model.config.vision
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, v.image_size, v.image_size, 3)).astype(np.float32)
    ours = jax.jit(lambda p, x: model.apply({"params": p}, x, method=lambda m, x: m.vision(x)))(params, pixels)
    with torch.no_grad():
        theirs = siglip.vision_model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("length", [24, 80])  # below and above LongRoPE's original 64 positions
def test_text_only_logits_minus_head_bias_equal_phi3(towers, loaded, length):
    _, _, phi3 = towers
    model, params, _ = loaded
    n = model.config.initial_tokenizer_len
    ids = np.random.default_rng(length).integers(0, n, (2, length))
    logits = jax.jit(lambda p, i: model.apply({"params": p}, None, i, jnp.full(i.shape, TEXT)))(params, ids)
    ours = np.asarray(logits)[..., :n] - np.asarray(params["decoder"]["lm_head_bias"])[:n]
    with torch.no_grad():
        theirs = phi3(input_ids=torch.from_numpy(ids)).logits[..., :n].numpy()
    assert logits.shape[-1] == n + 2
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("pad", ["<|endoftext|>", None, "<unk>"], ids=["pad-is-eos", "no-pad", "own-pad"])
def test_special_token_ids_follow_the_original_rule(towers, tmp_path, pad):
    root, _, _ = towers
    folder = write_tokenizer(tmp_path / "tokenizer", pad)
    want = original_rule(folder)
    report = init_from_towers(root / "siglip", root / "phi3", tmp_path / "aki", tokenizer=folder, **quiet)
    model_config = aki_jax.AKIConfig.from_json(tmp_path / "aki" / "aki_config.json")
    saved = load_tokenizer(tmp_path / "aki")
    assert model_config.initial_tokenizer_len == want["initial_tokenizer_len"] == saved.initial_tokenizer_len
    assert (saved.pad_token, model_config.pad_token_id) == want["pad"]
    assert saved.image_token_id == want[IMAGE_TOKEN] == model_config.image_token_id
    assert saved.end_of_chunk_token_id == want[END_OF_CHUNK_TOKEN] == model_config.end_of_chunk_token_id
    assert report.special_tokens["initial_tokenizer_len"] == want["initial_tokenizer_len"]


def original_draw(key: str, shape: tuple[int, ...], config) -> torch.Tensor:
    """A fresh sample of what the original creates for `key`, built with the original's own torch modules.

    Rows beyond the first 2048 are left out (they are identically distributed); a 32064-row head would
    otherwise cost a 100M-element weight.
    """
    e, d = config.vision.hidden_size, config.decoder.hidden_size
    shape = (min(shape[0], 2048),) + tuple(shape[1:])
    if key == "vision_tokenizer.latents":
        return torch.randn(shape)
    if key.endswith(("norm_media.weight", "norm_latents.weight", "1.0.weight", "norm.weight")):
        return nn.LayerNorm(shape[0]).weight.detach()
    if key.endswith(("norm_media.bias", "norm_latents.bias", "1.0.bias", "norm.bias")):
        return nn.LayerNorm(shape[0]).bias.detach()
    if key == "vision_tokenizer.projection.bias":
        return nn.Linear(e, shape[0]).bias.detach()
    if key == "lang_model.lm_head.bias":
        return nn.Linear(d, shape[0], bias=True).bias.detach()
    if key.endswith("additional_embedding.weight"):
        table = nn.Embedding(*shape)
        table.weight.data.normal_(mean=0.0, std=0.02)  # VLM.__init__'s redraw with Phi-3's initializer_range
        return table.weight.detach()
    if key == "lang_model.lm_head.additional_fc.weight":
        fc = nn.Linear(shape[1], shape[0])
        fc.weight.data.normal_(mean=0.0, std=0.02)
        return fc.weight.detach()
    if key == "lang_model.lm_head.additional_fc.bias":
        return nn.Linear(d, shape[0]).bias.detach()
    return nn.Linear(shape[1], shape[0], bias=False).weight.detach()  # every other resampler Linear


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.sort(a.ravel()), np.sort(b.ravel())
    grid = np.concatenate([a, b])
    return float(
        np.max(np.abs(np.searchsorted(a, grid, "right") / a.size - np.searchsorted(b, grid, "right") / b.size))
    )


def test_new_parameters_follow_the_original_distributions_at_aki_4b_shapes():
    """Each new parameter, drawn at its real AKI-4B shape (one resampler layer), against a sample from the
    original's torch modules: same support, mean and std within 6 standard errors, and a two-sample
    Kolmogorov-Smirnov distance below its 1e-6 critical value."""
    config = aki_jax.aki_4b()
    torch.manual_seed(0)
    inits = new_parameter_inits(config)
    checked = set()
    for entry in TABLE:
        if entry.torch_key not in inits:
            continue
        key = torch_keys(entry, config)[0]
        shape = entry.transform.torch_shape(aki_jax.convert.mapping.leaf_shape(config, entry))
        ours = draw_parameter(key, inits[entry.torch_key], shape, seed=0).astype(np.float64)
        theirs = original_draw(key, shape, config).double().numpy()
        assert ours.shape[1:] == theirs.shape[1:], key
        checked.add(entry.torch_key)
        if inits[entry.torch_key].kind in ("ones", "zeros"):
            assert np.array_equal(ours[: len(theirs)], theirs), key
            continue
        n, m = ours.size, theirs.size
        sigma = theirs.std()
        assert abs(ours.mean() - theirs.mean()) < 6 * sigma * math.sqrt(1 / n + 1 / m), key
        assert abs(ours.std() - sigma) < 6 * sigma * math.sqrt(1 / (2 * n) + 1 / (2 * m)), key
        if inits[entry.torch_key].kind == "uniform":
            bound = inits[entry.torch_key].scale
            assert max(np.abs(ours).max(), np.abs(theirs).max()) <= bound * (1 + 1e-6), key  # float32 rounding
            assert np.abs(ours).max() > bound * (1 - 20 / n), key
        a, b = ours.ravel()[:200_000], theirs.ravel()[:200_000]  # enough for the KS test, and quick
        if min(a.size, b.size) >= 100:
            critical = math.sqrt(-math.log(1e-6 / 2) / 2) * math.sqrt((a.size + b.size) / (a.size * b.size))
            assert ks_statistic(a, b) < critical, key
    assert checked == set(inits)


def test_the_folder_holds_exactly_the_seeded_draws(loaded):
    model, params, _ = loaded
    exported = params_to_torch(jax.tree.map(np.asarray, params), model.config)
    inits = new_parameter_inits(model.config)
    for entry in TABLE:
        if entry.torch_key in inits:
            for key in torch_keys(entry, model.config):
                want = draw_parameter(key, inits[entry.torch_key], exported[key].shape, seed=0)
                assert np.array_equal(exported[key], want), key


def test_dtype_and_seed_options(towers, tmp_path):
    root, _, _ = towers
    args = ["--vision", str(root / "siglip"), "--lm", str(root / "phi3")]
    assert (
        init_main([*args, "--dst", str(tmp_path / "a"), "--dtype", "bfloat16", "--num-latents", "5", "--seed", "3"])
        == 0
    )
    model, params, _ = load_pretrained(tmp_path / "a")
    assert model.config.param_dtype == "bfloat16" and model.config.resampler.num_latents == 5
    assert params["resampler"]["latents"].shape == (5, TINY.vision.hidden_size)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    want = draw_parameter(
        "vision_tokenizer.latents", new_parameter_inits(model.config)["vision_tokenizer.latents"], (5, 48), 3
    )
    assert np.array_equal(
        np.asarray(params["resampler"]["latents"], np.float32), want.astype(jnp.bfloat16).astype(np.float32)
    )


def folder_contents(folder: Path) -> dict:
    """Everything a run writes that should depend on its inputs only: every parameter's bytes, every other
    file's bytes, and the report without its timing and destination. (Orbax names its data files at random,
    so the params folder is compared by what it restores to.)"""
    out = {"params": dict(iter_leaves(folder / "params", sorted(params_metadata(folder / "params"))))}
    out["params"] = {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in out["params"].items()}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != "init_report.json":
            out[path.name] = path.read_bytes()
    report = json.loads((folder / "init_report.json").read_text())
    out["report"] = {k: v for k, v in report.items() if k not in ("seconds", "dst")}
    return out


def test_the_same_seed_writes_the_same_folder_overlapped_or_serial(towers, initialised, tmp_path):
    """`initialised` is the command line's run (leaves built while earlier ones are saved); the same seed,
    overlapped again or written serially, gives the same parameters and files; another seed does not."""
    root, _, _ = towers
    first = folder_contents(initialised)
    for name, overlap, seed in [("again", True, 0), ("serial", False, 0), ("seed1", True, 1)]:
        init_from_towers(root / "siglip", root / "phi3", tmp_path / name, overlap=overlap, seed=seed, **quiet)
    assert folder_contents(tmp_path / "again") == first
    assert folder_contents(tmp_path / "serial") == first
    other = folder_contents(tmp_path / "seed1")["params"]
    changed = {k for k in other if other[k] != first["params"][k]}
    assert ("resampler", "latents") in changed and ("decoder", "embed_tokens") not in changed


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _break_shard(tmp_path, root):
    lm = _copy(root / "phi3", tmp_path / "phi3")
    index = json.loads((lm / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (lm / shard).unlink()
    return {"lm": lm}, [str(lm / "model.safetensors.index.json"), shard, "does not exist"]


def _wrong_width(tmp_path, root):
    lm = _copy(root / "phi3", tmp_path / "phi3")
    config = json.loads((lm / "config.json").read_text())
    config["intermediate_size"] = 96
    (lm / "config.json").write_text(json.dumps(config))
    return {"lm": lm}, ["model-0000", "mlp.gate_up_proj.weight", "(256, 64)", "(192, 64)", str(lm / "config.json")]


def _bad_tokenizer(tmp_path, root):
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{not json")
    return {"tokenizer": tokenizer}, [str(tokenizer), "cannot read the tokenizer"]


def _not_siglip(tmp_path, root):
    return {"vision": root / "phi3"}, [str(root / "phi3" / "config.json"), "model_type 'phi3' is not a SigLIP"]


def _not_phi3(tmp_path, root):
    return {"lm": root / "siglip"}, [str(root / "siglip" / "config.json"), "model_type 'siglip' is not a Phi-3"]


@pytest.mark.parametrize("damage", [_not_siglip, _not_phi3, _break_shard, _wrong_width, _bad_tokenizer])
def test_bad_inputs_are_one_line_errors_naming_the_file(towers, tmp_path, capsys, damage):
    root, _, _ = towers
    paths = {"vision": root / "siglip", "lm": root / "phi3"}
    changes, fragments = damage(tmp_path, root)
    paths.update(changes)
    argv = [f"--{k}={v}" for k, v in paths.items()] + ["--dst", str(tmp_path / "out")]
    assert init_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    for fragment in fragments:
        assert fragment in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_training_starts_from_the_folder_and_its_loss_falls(towers, tmp_path):
    """`aki-train --config configs/tiny_digits.py --init-from FOLDER`: the towers have tiny()'s shapes, so the
    digits job's model is this folder's; its tokenizer (the digits one, passed as --tokenizer) comes along."""
    from aki_jax.cli.train import main as train_main
    from aki_jax.data import digits_tokenizer

    root, _, _ = towers
    digits_tokenizer(tmp_path / "tokenizer")
    dst = tmp_path / "aki"
    init_from_towers(
        root / "siglip", root / "phi3", dst, tokenizer=tmp_path / "tokenizer", resampler=TINY.resampler, **quiet
    )
    overrides = [
        "steps=16", "optim.warmup_steps=2", "data.batch_size=8", f"checkpoint.dir={tmp_path / 'run'}",
        "checkpoint.every_steps=1000", "checkpoint.export_pretrained=false", "logging.every_steps=1",
        "logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false",
        "logging.peak_flops_per_device=1e12", "eval.every_steps=1000", "eval.max_batches=1",
        "model.vision.image_size=28", "model.vision.patch_size=7",  # tiny()'s tower (the digits job's: one 28x28 patch)
    ]  # fmt: skip
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny_digits.py"
    assert train_main(["--config", str(config), "--init-from", str(dst), *overrides]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == 16
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:2])
