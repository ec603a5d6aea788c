"""Numerical parity (fp32) of the vision tower and the decoder with Hugging Face transformers."""

import jax
import numpy as np
import pytest
import torch

import aki_jax
from aki_jax.convert.mapping import torch_to_params
from aki_jax.mask import TEXT
from aki_jax.model import AKI
from aki_jax.testing.torch_reference import AKIReference

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference():
    config = aki_jax.tiny()
    ref = AKIReference(config, seed=3)
    params = jax.tree.map(np.asarray, torch_to_params(ref.numpy_state_dict(), config))
    return config, ref, params


def test_vision_tower_matches_transformers_siglip(reference):
    config, ref, params = reference
    s = config.vision.image_size
    pixels = np.random.default_rng(0).uniform(-1, 1, size=(3, s, s, 3)).astype(np.float32)
    with torch.no_grad():
        expected = ref.vision_encoder(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state
    got = jax.jit(lambda p, x: AKI(config).apply({"params": p}, x, method=lambda m, y: m.vision(y)))(params, pixels)
    assert got.shape == (3, config.vision.num_patches, config.vision.hidden_size)
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("length", [40, 100], ids=["short-factors", "long-factors"])
def test_decoder_matches_transformers_phi3_longrope(reference, length):
    config, ref, params = reference
    original = config.decoder.rope_scaling.original_max_position_embeddings
    assert (length > original) == (length == 100)
    rng = np.random.default_rng(length)
    ids = rng.integers(0, config.initial_tokenizer_len + 2, size=(2, length)).astype(np.int32)
    with torch.no_grad():
        expected = ref.lang_model(input_ids=torch.from_numpy(ids).long(), use_cache=False).logits.numpy()
    modality = np.full(ids.shape, TEXT, np.int32)
    got = jax.jit(lambda p, i, m: AKI(config).apply({"params": p}, None, i, m))(params, ids, modality)
    assert got.shape == expected.shape == (2, length, config.logits_size)
    np.testing.assert_allclose(np.asarray(got), expected, atol=TOLERANCE, rtol=0)


def test_factor_set_is_chosen_by_the_highest_position_of_the_call(reference):
    """Guards the test above: positions 0..9 rotate differently when the call reaches past 64."""
    config, _, _ = reference
    cos_sin = aki_jax.decoder.rope_cos_sin
    alone = np.asarray(cos_sin(np.arange(10)[None], config.decoder)[0])
    in_long_call = np.asarray(cos_sin(np.arange(100)[None], config.decoder)[0])[:, :10]
    in_short_call = np.asarray(cos_sin(np.arange(64)[None], config.decoder)[0])[:, :10]
    np.testing.assert_array_equal(alone, in_short_call)
    assert np.abs(alone - in_long_call).max() > 1e-3


def test_longrope_attention_factor_is_the_published_value():
    scaling = aki_jax.aki_4b().decoder.rope_scaling
    factor = scaling.attention_factor(131072)
    assert abs(factor - np.sqrt(1 + np.log(32) / np.log(4096))) < 1e-12
    assert 1.18 < factor < 1.20


def test_decoder_gradients_match_pytorch_autograd(reference):
    """d(sum(logits * R)) / d(decoder params) equals PyTorch autograd of transformers' Phi-3 (the output
    head's and the attention's hand-written backward passes included)."""
    config, ref, params = reference
    rng = np.random.default_rng(11)
    ids = rng.integers(0, config.initial_tokenizer_len + 2, size=(2, 40)).astype(np.int32)
    ids[ids == config.pad_token_id] = 0  # the reference's embedding gives its padding row no gradient
    weights = rng.standard_normal((2, 40, config.logits_size)).astype(np.float32)
    ref.zero_grad()
    logits = ref.lang_model(input_ids=torch.from_numpy(ids).long(), use_cache=False).logits
    (logits * torch.from_numpy(weights)).sum().backward()
    grads = ref.numpy_state_dict()
    for name, p in ref.named_parameters():
        grads[name] = np.zeros(p.shape, np.float32) if p.grad is None else p.grad.numpy().copy()
    expected = torch_to_params(grads, config)["decoder"]

    def loss(p):
        logits = AKI(config).apply({"params": p}, None, ids, np.full(ids.shape, TEXT, np.int32))
        return (logits * weights).sum()

    got = jax.jit(jax.grad(loss))(params)["decoder"]
    flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected))
    for path, value in jax.tree_util.tree_leaves_with_path(got):
        want = np.asarray(flat_expected[path])
        scale = max(float(np.abs(want).max()), 1e-6)
        np.testing.assert_allclose(np.asarray(value), want, atol=TOLERANCE * scale, rtol=0, err_msg=str(path))
