"""The decode over per-layer weights (generation's default) equals the decode through the layers' scan:
the same parameters under the other layout, the same logits at every step, the same greedy tokens."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from aki_jax import AKI
from aki_jax.decoder import Decoder, unrolled_params, unstack_layers
from aki_jax.generation import _decode_step, _for_decoding, _prefill, generate, stream_generate
from aki_jax.mask import IMAGE, PAD, QUERY, TEXT

NEW = 5


@pytest.fixture(scope="module")
def setup(tiny_params):
    config, shared = tiny_params
    params = jax.tree.map(lambda x: x, shared)
    params["decoder"]["lm_head_kernel"] = params["decoder"]["lm_head_kernel"] * 20.0  # no near-ties in argmax
    return config, AKI(config), params


def mma_prompts(config):
    """Two left-padded rows, each with an image, a QUERY span and text (the modality mask at work)."""
    rng = np.random.default_rng(3)
    t, length = config.image_token_count, 15
    ids = rng.integers(0, config.initial_tokenizer_len, (2, length)).astype(np.int32)
    modality = np.full((2, length), TEXT, np.int32)
    modality[:, 2 : 2 + t] = IMAGE
    modality[:, 2 + t : 5 + t] = QUERY
    modality[1, :3] = PAD
    size = config.vision.image_size
    return rng.uniform(-1, 1, (2, 1, size, size, 3)).astype(np.float32), ids, modality


def test_unrolled_params_are_the_unrolled_decoders_own_tree(setup):
    config, _, params = setup
    decoder = params["decoder"]
    layers = config.decoder.num_layers
    embeds = np.zeros((1, 3, config.decoder.hidden_size), np.float32)
    positions, mask = np.arange(3)[None], np.ones((1, 3, 3), bool)
    own = jax.eval_shape(
        lambda: nn.unbox(Decoder(config, scan_layers=False).init(jax.random.key(0), embeds, positions, mask))
    )["params"]
    converted = unrolled_params(decoder)
    assert jax.tree.structure(converted) == jax.tree.structure(own)
    assert jax.tree.map(np.shape, converted) == jax.tree.map(lambda s: s.shape, own)
    for i in range(layers):
        for got, stacked in zip(
            jax.tree.leaves(converted[f"layers_{i}"]), jax.tree.leaves(decoder["layers"]), strict=True
        ):
            np.testing.assert_array_equal(got, stacked[i])
    assert [c["key"].shape for c in unstack_layers({"key": np.zeros((layers, 2, 5))})] == [(2, 5)] * layers


@pytest.mark.slow
def test_decode_logits_and_greedy_tokens_equal_the_scanned_decode(setup):
    config, model, params = setup
    pixels, ids, modality = mma_prompts(config)

    @functools.partial(jax.jit, static_argnames="scan_layers")
    def teacher_forced(params, tokens, scan_layers):
        """Logits of NEW decode steps fed the same tokens f32[NEW, B, V], after one prefill."""
        cache, _, real, lengths = _prefill(model, params, pixels, ids, modality, ids.shape[1] + NEW, None)
        decoder_params, cache = _for_decoding(params, cache, scan_layers)
        steps = []
        for step in range(NEW):
            logits, cache = _decode_step(
                model, decoder_params, cache, tokens[:, step], step, real, lengths, scan_layers
            )
            steps.append(logits)
        return jax.numpy.stack(steps)

    tokens = np.asarray(generate(model, params, pixels, ids, modality, NEW + 1, scan_layers=True))
    scanned = np.asarray(teacher_forced(params, tokens, True))
    unrolled = np.asarray(teacher_forced(params, tokens, False))
    np.testing.assert_allclose(unrolled, scanned, atol=1e-6, rtol=0)
    assert (scanned.std(axis=-1) > 1.0).all()  # logits far apart: a tolerance of 1e-6 means something
    np.testing.assert_array_equal(scanned.argmax(-1).T, tokens[:, 1:])  # teacher forcing followed generate

    np.testing.assert_array_equal(np.asarray(generate(model, params, pixels, ids, modality, NEW + 1)), tokens)
    streamed = np.stack(list(stream_generate(model, params, pixels, ids, modality, NEW + 1)), axis=1)
    np.testing.assert_array_equal(streamed, tokens)
    streamed_scanned = list(stream_generate(model, params, pixels, ids, modality, NEW + 1, scan_layers=True))
    np.testing.assert_array_equal(np.stack(streamed_scanned, axis=1), tokens)
