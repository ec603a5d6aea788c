"""Generation on a device mesh (8 fake CPU devices, see conftest): the KV cache is split like the
model's activations (batch over data, heads over tensor) and the tokens equal the single-device ones."""

import jax
import numpy as np
import pytest

from aki_jax import AKI, init_params, tiny
from aki_jax.generation import Sampling, _sampling_args, _stream_prefill, generate
from aki_jax.mask import IMAGE, PAD, QUERY, TEXT
from aki_jax.sharding import MeshConfig, activation_context, logical_rules, make_mesh, param_shardings


def prompts(config):
    rng = np.random.default_rng(5)
    ids = rng.integers(0, config.initial_tokenizer_len, (2, 13)).astype(np.int32)
    modality = np.full((2, 13), TEXT, np.int32)
    modality[:, 2:8] = IMAGE
    modality[:, 8:11] = QUERY
    modality[1, :2] = PAD
    size = config.vision.image_size
    return rng.uniform(-1, 1, (2, 1, size, size, 3)).astype(np.float32), ids, modality


@pytest.mark.slow
def test_cache_is_sharded_like_activations_and_tokens_match():
    assert jax.device_count() == 8
    config = tiny()
    model = AKI(config)
    params = init_params(config, jax.random.key(1))
    params["decoder"]["lm_head_kernel"] = params["decoder"]["lm_head_kernel"] * 20.0
    pixels, ids, modality = prompts(config)
    expected = np.asarray(generate(model, params, pixels, ids, modality, 5))

    mesh_config = MeshConfig(data=2, fsdp=1, tensor=4)
    mesh, rules = make_mesh(mesh_config), logical_rules(mesh_config)
    _, shardings = param_shardings(config, mesh, rules)
    sharded = jax.device_put(params, shardings)
    with activation_context(mesh, rules):
        tokens = np.asarray(generate(model, sharded, pixels, ids, modality, 4))
        cache, *_ = _stream_prefill(
            sharded,
            pixels,
            ids,
            modality,
            jax.random.key(0),
            _sampling_args(Sampling()),
            model=model,
            cache_length=17,
            cache_dtype=None,
        )
    np.testing.assert_array_equal(tokens, expected[:, :4])
    layers, batch, length, heads, head_dim = cache["key"].shape
    shard = cache["key"].addressable_shards[0].data.shape
    assert shard == (layers, batch // 2, length, heads // 4, head_dim)
