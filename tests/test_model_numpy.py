"""Resampler, added-token embedding/head and the whole model against NumPy written from the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

import aki_jax
from aki_jax.decoder import rope_cos_sin
from aki_jax.mask import IMAGE, PAD, QUERY, TEXT
from aki_jax.model import AKI


@pytest.fixture(scope="module")
def tiny(tiny_params):
    config, params = tiny_params
    # random (not init-default) norms and biases so that every term is exercised
    rng = np.random.default_rng(1)
    noisy = lambda x: (np.asarray(x) + 0.05 * rng.normal(size=x.shape)).astype(np.float32)  # noqa: E731
    return config, jax.tree.map(noisy, params)


def apply(config, params, *args, method=None):
    """model.apply under jit (one compile per distinct method and shapes)."""
    return _jitted(config, method)(params, *args)


_cache = {}


def _jitted(config, method):
    key = (config, method)
    if key not in _cache:
        model = AKI(config)
        _cache[key] = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=method))
    return _cache[key]


def vision(m, x):
    return m.vision(x)


def resampler(m, x):
    return m.resampler(x)


def embed(m, x):
    return m.decoder.embed(x)


def decoder_logits(m, *args):
    return m.decoder(*args)[0]


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_resampler(p, media, config):
    """Flamingo Perceiver resampler as docs/original_model.md describes it, on 2-D (in, out) matrices."""
    c = config.resampler
    eps, heads, dim_head = c.layer_norm_eps, c.num_heads, c.head_dim
    inner = heads * dim_head
    b = media.shape[0]
    lat = np.broadcast_to(p["latents"], (b,) + p["latents"].shape).astype(np.float64)
    x = media.astype(np.float64)
    L = p["layers"]
    for i in range(c.depth):
        xn = layer_norm(x, L["norm_media"]["scale"][i], L["norm_media"]["bias"][i], eps)
        ln = layer_norm(lat, L["norm_latents"]["scale"][i], L["norm_latents"]["bias"][i], eps)
        w_q = L["q_kernel"][i].reshape(-1, inner)
        w_kv = L["kv_kernel"][i].reshape(-1, 2 * inner)
        w_out = L["out_kernel"][i].reshape(inner, -1)
        q = ln @ w_q
        kv = np.concatenate([xn, ln], axis=1) @ w_kv
        k, v = kv[..., :inner], kv[..., inner:]  # torch .chunk(2, dim=-1)

        def split(t):
            return t.reshape(b, t.shape[1], heads, dim_head).transpose(0, 2, 1, 3)

        q, k, v = split(q) * dim_head**-0.5, split(k), split(v)
        attn = softmax(q @ k.transpose(0, 1, 3, 2)) @ v
        lat = attn.transpose(0, 2, 1, 3).reshape(b, -1, inner) @ w_out + lat
        h = layer_norm(lat, L["ff_norm"]["scale"][i], L["ff_norm"]["bias"][i], eps) @ L["ff1_kernel"][i]
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
        lat = h @ L["ff2_kernel"][i] + lat
    lat = layer_norm(lat, p["norm"]["scale"], p["norm"]["bias"], eps)
    return lat @ p["projection_kernel"] + p["projection_bias"]


def test_resampler_matches_numpy_reference(tiny):
    config, params = tiny
    media = np.random.default_rng(0).normal(size=(3, config.vision.num_patches, config.vision.hidden_size))
    media = media.astype(np.float32)
    got = apply(config, params, media, method=resampler)
    expected = numpy_resampler(params["resampler"], media, config)
    assert got.shape == (3, config.resampler.num_latents, config.decoder.hidden_size)
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5, rtol=1e-5)


def test_resampler_inner_width_is_8_heads_of_64_whatever_the_vision_width(tiny):
    config, params = tiny
    assert config.vision.hidden_size == 48
    assert params["resampler"]["layers"]["q_kernel"].shape[1:] == (48, 8, 64)


def test_added_tokens_read_the_separate_table(tiny):
    config, params = tiny
    n = config.initial_tokenizer_len
    ids = np.array([[0, 7, n - 1, n, n + 1, 3]])
    got = apply(config, params, ids, method=embed)
    table, added = params["decoder"]["embed_tokens"], params["decoder"]["additional_embedding"]
    expected = np.stack([table[0], table[7], table[n - 1], added[0], added[1], table[3]])[None]
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_output_head_is_main_head_cut_plus_added_columns(tiny):
    config, params = tiny
    n = config.initial_tokenizer_len
    rng = np.random.default_rng(1)
    embeds = rng.normal(size=(2, 5, config.decoder.hidden_size)).astype(np.float32)
    positions = np.tile(np.arange(5), (2, 1))
    mask = np.tril(np.ones((5, 5), bool))[None].repeat(2, 0)

    def hidden_and_logits(m, e, pos, msk):
        cos, sin = rope_cos_sin(pos, config.decoder)
        h, _ = m.decoder.layers(e, cos, sin, msk, 0, None)
        return m.decoder.norm(h), m.decoder(e, pos, msk)[0]

    hidden, logits = apply(config, params, embeds, positions, mask, method=hidden_and_logits)
    d = params["decoder"]
    hidden = np.asarray(hidden, np.float64)
    main = hidden @ d["lm_head_kernel"] + d["lm_head_bias"]
    added = hidden @ d["additional_head_kernel"] + d["additional_head_bias"]
    expected = np.concatenate([main[..., :n], added], axis=-1)
    assert logits.shape == (2, 5, n + 2) == (2, 5, config.logits_size)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=2e-5, rtol=1e-5)


def chat_like_inputs(config, rng, batch=2):
    """Rows with one image, a question (QUERY), an answer, and right padding in the second row."""
    t = config.image_token_count
    pre, question, answer = 3, 4, 5
    length = pre + t + question + answer + 2
    modality = np.full((batch, length), TEXT, np.int32)
    modality[:, pre : pre + t] = IMAGE
    modality[:, pre + t : pre + t + question] = QUERY
    if batch > 1:
        modality[1, -3:] = PAD
    ids = rng.integers(0, config.initial_tokenizer_len + 2, size=(batch, length)).astype(np.int32)
    s = config.vision.image_size
    pixels = rng.uniform(-1, 1, size=(batch, 1, s, s, 3)).astype(np.float32)
    return pixels, ids, modality


def test_whole_model_is_the_composition_of_its_parts(tiny):
    config, params = tiny
    pixels, ids, modality = chat_like_inputs(config, np.random.default_rng(2))
    logits = apply(config, params, pixels, ids, modality)

    b, i = pixels.shape[:2]
    features = apply(config, params, pixels.reshape((b * i,) + pixels.shape[2:]), method=vision)
    tokens = apply(config, params, features, method=resampler)
    tokens = np.asarray(tokens).reshape(b, -1, config.decoder.hidden_size)
    embeds = np.array(apply(config, params, ids, method=embed))
    for row in range(b):
        embeds[row, modality[row] == IMAGE] = tokens[row]
    positions = np.tile(np.arange(ids.shape[1]), (b, 1))
    mask = aki_jax.attention_mask(modality)
    expected = apply(config, params, embeds, positions, mask, method=decoder_logits)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5, rtol=1e-5)


def test_images_change_only_what_may_see_them(tiny):
    config, params = tiny
    pixels, ids, modality = chat_like_inputs(config, np.random.default_rng(3), batch=1)
    a = np.asarray(apply(config, params, pixels, ids, modality))
    b = np.asarray(apply(config, params, -pixels, ids, modality))
    first_image = int(np.argmax(modality[0] == IMAGE))
    np.testing.assert_array_equal(a[0, :first_image], b[0, :first_image])  # text before the image is untouched
    assert np.abs(a[0, first_image:] - b[0, first_image:]).max() > 1e-4


def test_mma_lets_the_question_change_image_token_outputs_and_causal_does_not(tiny):
    config, params = tiny
    pixels, ids, modality = chat_like_inputs(config, np.random.default_rng(4), batch=1)
    question = np.nonzero(modality[0] == QUERY)[0]
    changed = ids.copy()
    changed[0, question] = (changed[0, question] + 1) % config.initial_tokenizer_len
    image_rows = modality[0] == IMAGE
    for kind, should_change in (("mma", True), ("causal", False)):
        variant = config.replace(attention=kind)
        a = np.asarray(apply(variant, params, pixels, ids, modality))[0, image_rows]
        b = np.asarray(apply(variant, params, pixels, changed, modality))[0, image_rows]
        assert (np.abs(a - b).max() > 1e-4) == should_change, kind


def test_bf16_compute_tracks_fp32(tiny):
    config, params = tiny
    pixels, ids, modality = chat_like_inputs(config, np.random.default_rng(5))
    full = np.asarray(apply(config, params, pixels, ids, modality))
    half = apply(config.replace(dtype="bfloat16"), params, pixels, ids, modality)
    assert half.dtype == jnp.float32  # logits are returned in float32 for the loss
    real = modality != PAD
    assert np.abs(np.asarray(half) - full)[real].max() < 0.1 * np.abs(full[real]).max()


def test_every_parameter_has_logical_axes_and_layers_are_stacked():
    config = aki_jax.tiny()
    shapes, axes = aki_jax.abstract_params(config)
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(flat_shapes) == len(flat_axes)
    for (path, shape), spec in zip(flat_shapes, flat_axes, strict=True):
        assert len(spec) == len(shape.shape), (path, spec, shape.shape)
        if any(getattr(k, "key", None) == "layers" for k in path):
            assert spec[0] == "layers"
    assert shapes["decoder"]["layers"]["qkv_kernel"].shape[0] == config.decoder.num_layers
    assert shapes["vision"]["layers"]["q_kernel"].shape[0] == config.vision.num_layers
    assert shapes["resampler"]["layers"]["q_kernel"].shape[0] == config.resampler.depth


def test_aki_4b_has_the_published_size():
    shapes, _ = aki_jax.abstract_params(aki_jax.aki_4b())
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert 4.2e9 < total < 4.4e9
    assert shapes["decoder"]["embed_tokens"].shape == (32064, 3072)
    assert shapes["vision"]["embeddings"]["position_embedding"].shape == (729, 1152)


def test_config_json_round_trip_and_errors(tmp_path):
    config = aki_jax.aki_4b().replace(dtype="bfloat16", attention="causal")
    config.to_json(tmp_path / "c.json")
    assert aki_jax.AKIConfig.from_json(tmp_path / "c.json") == config
    with pytest.raises(ValueError, match=r"AKIConfig.decoder: unknown fields \['hidden'\]"):
        aki_jax.AKIConfig.from_dict({"decoder": {"hidden": 3}})
    with pytest.raises(ValueError, match="attention"):
        aki_jax.tiny(attention="full")
    with pytest.raises(ValueError, match="short_factor has 3 values"):
        aki_jax.tiny().replace(
            decoder=aki_jax.DecoderConfig(num_heads=32, rope_scaling=aki_jax.RopeScaling((1.0,) * 3, (1.0,) * 48))
        )
