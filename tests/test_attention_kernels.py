"""Mask ranges and the Pallas flash kernels (run by Pallas' interpreters) against the dense path.

The dense references are `aki_jax.mask.attention_mask` (the mask) and `recomputing_attention` (the
attention); both were tested on their own in test_mask.py and test_attention.py. Shapes are fixed per
test so that each kernel compiles once and hypothesis only changes the layout (data, not code).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aki_jax.attention import (
    EMPTY,
    FULL,
    PARTIAL,
    AttentionRanges,
    attention_ranges,
    dot_product_attention,
    ranges_to_mask,
    recomputing_attention,
    tile_classes,
)
from aki_jax.mask import IMAGE, PAD, QUERY, TEXT, attention_mask

# benchmarks/device_check.sh sets AKI_ATTENTION_KERNELS=pallas_gpu (or pallas_tpu) to run these natively.
KERNELS = os.environ.get("AKI_ATTENTION_KERNELS", "pallas_tpu_interpret,pallas_gpu_interpret").split(",")
B, L, N, H = 2, 56, 2, 8  # L is not a multiple of the 16-wide blocks
BLOCKS = (16, 16)


@st.composite
def rows(draw, length=L):
    """One row as a pipeline builds it: optional left padding, 1-3 packed segments of text runs and
    image runs (IMAGE tokens then QUERY tokens, either possibly empty of QUERY), right padding."""
    modality, segment = [PAD] * draw(st.integers(0, 5)), []
    segment += [0] * len(modality)
    for seg in range(draw(st.integers(1, 3))):
        for piece in draw(st.lists(st.sampled_from(["text", "image"]), min_size=1, max_size=4)):
            if piece == "text":
                run = [TEXT] * draw(st.integers(1, 8))
            else:
                run = [IMAGE] * draw(st.integers(1, 10)) + [QUERY] * draw(st.integers(0, 6))
            modality += run
            segment += [seg] * len(run)
    if draw(st.booleans()):  # a fully masked tail, or a row with no images at all when it stays short
        modality += [PAD] * draw(st.integers(1, 8))
        segment += [segment[-1]] * (len(modality) - len(segment))
    modality, segment = modality[:length], segment[:length]
    tail = length - len(modality)
    return modality + [PAD] * tail, segment + [segment[-1]] * tail


batches = st.tuples(rows(), rows()).map(lambda pair: tuple(np.array(x, np.int32) for x in zip(*pair, strict=True)))
kinds = st.sampled_from(["mma", "causal"])


@functools.partial(jax.jit, static_argnames="kind")
def _ranges_and_mask(modality, segment, kind):
    ranges = attention_ranges(modality, segment, kind)
    return ranges, ranges_to_mask(ranges), attention_mask(modality, segment, kind)


@settings(max_examples=60, deadline=None)
@given(batches, kinds)
def test_ranges_reproduce_the_dense_mask_cell_for_cell(batch, kind):
    _, got, expected = _ranges_and_mask(*batch, kind)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


random_rows = st.integers(1, 24).flatmap(
    lambda n: st.tuples(
        st.lists(st.sampled_from([PAD, TEXT, IMAGE, QUERY]), min_size=n, max_size=n),
        st.lists(st.integers(0, 3), min_size=n, max_size=n).map(sorted),
    )
)


@settings(max_examples=80, deadline=None)
@given(random_rows, kinds)
def test_ranges_reproduce_the_mask_on_arbitrary_token_sequences(row, kind):
    # Padded to one length (PAD in a segment of its own changes no other cell): one compilation.
    modality, segment = (list(x) + [v] * (24 - len(x)) for x, v in zip(row, (PAD, 4), strict=True))
    modality, segment = np.array([modality], np.int32), np.array([segment], np.int32)
    _, got, expected = _ranges_and_mask(modality, segment, kind)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_worked_example_of_the_module_docstring():
    modality = np.array([[TEXT, IMAGE, IMAGE, QUERY, QUERY, TEXT]])
    r = attention_ranges(modality)
    np.testing.assert_array_equal(np.asarray(r.k_start)[0], [0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(r.k_end)[0], [1, 5, 5, 4, 5, 6])
    np.testing.assert_array_equal(np.asarray(r.q_start)[0], [0, 1, 2, 1, 1, 5])
    np.testing.assert_array_equal(np.asarray(r.q_end)[0], [6, 6, 6, 6, 6, 6])
    pad = attention_ranges(np.array([[TEXT, PAD]]))
    assert int(pad.k_start[0, 1]) == int(pad.k_end[0, 1]) and int(pad.q_start[0, 1]) == int(pad.q_end[0, 1])


_tile_classes = jax.jit(lambda ranges, blocks: tile_classes(ranges, *blocks), static_argnums=1)


@settings(max_examples=40, deadline=None)
@given(batches, kinds, st.sampled_from([(8, 8), (16, 8), (8, 32)]))
def test_tile_classes_never_skip_a_visible_cell_nor_call_a_masked_tile_full(batch, kind, blocks):
    ranges, _, mask = _ranges_and_mask(*batch, kind)
    classes = np.asarray(_tile_classes(ranges, blocks))
    mask = np.asarray(mask)
    bq, bk = blocks
    for b, i, j in np.ndindex(classes.shape):
        tile = mask[b, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
        if classes[b, i, j] == EMPTY:
            assert not tile.any(), (b, i, j)
        if classes[b, i, j] == FULL:
            assert tile.shape == blocks and tile.all(), (b, i, j)


def _qkv(dtype, seed=0, b=B, length=L, n=N, h=H):
    keys = jax.random.split(jax.random.key(seed), 4)
    return tuple(jax.random.normal(key, (b, length, n, h), jnp.float32).astype(dtype) for key in keys)


@functools.partial(jax.jit, static_argnames=("implementation", "blocks"))
def _value_and_grads(q, k, v, d_out, mask, implementation, blocks=BLOCKS):
    def loss(q, k, v):
        if implementation == "dense":
            out = recomputing_attention(q, k, v, mask)
        else:
            out = dot_product_attention(q, k, v, mask, implementation=implementation, blocks=blocks)
        return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32)), out

    (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return (out, *grads)


def relative_error(got, want):
    """Largest absolute error over the reference's largest value, floored at 1 (the scale of the
    unit-normal inputs: a gradient that is exactly 0 in the reference is compared absolutely)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1.0))


@pytest.mark.parametrize("kernel", KERNELS)
@settings(max_examples=12, deadline=None)
@given(batch=batches, kind=kinds)
def test_kernel_output_and_gradients_equal_dense_attention_fp32(kernel, batch, kind):
    ranges, _, mask = _ranges_and_mask(*batch, kind)
    q, k, v, d_out = _qkv(jnp.float32)
    got = _value_and_grads(q, k, v, d_out, ranges, kernel)
    want = _value_and_grads(q, k, v, d_out, mask, "dense")
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, want, strict=True):
        assert relative_error(a, b) <= 1e-5, (name, relative_error(a, b))


def _fixed_layout():
    """Two rows that produce EMPTY, FULL and PARTIAL tiles: packed text + two images, and left padding."""
    row0 = [TEXT] * 20 + [IMAGE] * 6 + [QUERY] * 4 + [TEXT] * 6 + [IMAGE] * 5 + [QUERY] * 3 + [TEXT] * 12
    seg0 = [0] * 36 + [1] * 20
    row1 = [PAD] * 7 + [TEXT] * 3 + [IMAGE] * 12 + [QUERY] * 6 + [TEXT] * 20 + [PAD] * 8
    return np.array([row0, row1], np.int32), np.array([seg0, [0] * L], np.int32)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_in_bfloat16_stays_within_the_dense_bfloat16_error(kernel):
    ranges, _, mask = _ranges_and_mask(*_fixed_layout(), "mma")
    classes = set(np.asarray(tile_classes(ranges, *BLOCKS)).ravel().tolist())
    assert classes == {EMPTY, PARTIAL, FULL}
    q, k, v, d_out = _qkv(jnp.bfloat16, seed=1)
    exact = _value_and_grads(*(x.astype(jnp.float32) for x in (q, k, v, d_out)), mask, "dense")
    got = _value_and_grads(q, k, v, d_out, ranges, kernel)
    dense = _value_and_grads(q, k, v, d_out, mask, "dense")
    for name, a, b, ref in zip(["out", "dq", "dk", "dv"], got, dense, exact, strict=True):
        assert a.dtype == jnp.bfloat16, name
        # Stated bound: 2x the dense bf16 path's own error plus one bf16 ulp of the largest value.
        assert relative_error(a, ref) <= 2 * relative_error(b, ref) + 2**-8, (name, relative_error(a, ref))


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
def test_phi35_head_dim_96_is_padded_and_gives_the_dense_result(kernel):
    modality, segment = _fixed_layout()
    ranges, _, mask = _ranges_and_mask(modality[:1, :40], segment[:1, :40], "mma")
    q, k, v, d_out = _qkv(jnp.float32, b=1, length=40, n=1, h=96)
    got = _value_and_grads(q, k, v, d_out, ranges, kernel, blocks=(32, 16))
    want = _value_and_grads(q, k, v, d_out, mask, "dense")
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, want, strict=True):
        assert relative_error(a, b) <= 1e-5, name


def test_pad_queries_average_all_values_like_the_dense_path():
    ranges, _, mask = _ranges_and_mask(*_fixed_layout(), "mma")
    q, k, v, d_out = _qkv(jnp.float32)
    out, dq, _, _ = _value_and_grads(q, k, v, d_out, ranges, KERNELS[-1])
    np.testing.assert_allclose(out[1, :7], np.broadcast_to(v[1].mean(0), (7, N, H)), atol=1e-6)
    assert np.all(np.asarray(dq[1, :7]) == 0) and np.all(np.isfinite(np.asarray(out)))


def test_bool_mask_with_a_kernel_implementation_uses_the_dense_path():
    _, _, mask = _ranges_and_mask(*_fixed_layout(), "mma")
    q, k, v, _ = _qkv(jnp.float32)
    for kernel in KERNELS:
        got = dot_product_attention(q, k, v, mask, implementation=kernel)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(recomputing_attention(q, k, v, mask)))


def test_ranges_with_a_dense_implementation_are_expanded_to_the_mask():
    ranges, _, mask = _ranges_and_mask(*_fixed_layout(), "causal")
    q, k, v, _ = _qkv(jnp.float32)
    got = dot_product_attention(q, k, v, ranges, implementation=None)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(recomputing_attention(q, k, v, mask)))


def test_auto_is_the_dense_path_on_cpu_and_bad_ranges_are_named():
    from aki_jax.attention import resolve_implementation

    assert resolve_implementation("auto") is None  # these tests run on CPU (tests/conftest.py)
    q, k, v, _ = _qkv(jnp.float32)
    short = AttentionRanges(*(jnp.zeros((B, L - 1), jnp.int32) for _ in range(4)))
    with pytest.raises(ValueError, match=r"attention ranges: k_start/k_end must be int32\[B, T\]"):
        dot_product_attention(q, k, v, short, implementation="pallas_gpu_interpret")


def test_prefill_ranges_placed_in_a_longer_cache_match_the_placed_mask():
    @jax.jit
    def both(modality, segment, offset):
        ranges = attention_ranges(modality, segment).with_key_offset(offset, L + 10)
        mask = attention_mask(modality, segment)
        placed = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((B, L, L + 10), bool), mask, offset, axis=2)
        return ranges_to_mask(ranges), placed

    got, placed = both(*_fixed_layout(), 3)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(placed))


def _model_batch(config, batch_size=4, length=24):
    from aki_jax.training.synthetic import SyntheticBatches

    batch = next(SyntheticBatches(config, batch_size, length, images_per_row=1, seed=3))
    batch.pop("example_ids")
    image_end = config.image_token_count
    batch["modality_ids"][:, image_end : image_end + 3] = QUERY  # the question the image may read
    batch["segment_ids"][1, 16:] = np.where(batch["modality_ids"][1, 16:] != PAD, 2, 0)  # a packed row
    return batch


@pytest.mark.slow
def test_model_forward_prefill_and_sharded_train_step_with_a_kernel_equal_the_default_path():
    import dataclasses

    import aki_jax
    from aki_jax import sharding as S
    from aki_jax.decoder import init_cache
    from aki_jax.model import AKI, init_params
    from aki_jax.training.config import OptimizerConfig
    from aki_jax.training.optimizer import learning_rate_schedule, make_optimizer
    from aki_jax.training.state import init_state, state_shardings
    from aki_jax.training.step import make_train_step

    dense = aki_jax.tiny()
    kernel = dataclasses.replace(dense, attention_impl="pallas_gpu_interpret")
    batch = _model_batch(dense)
    params = init_params(dense, jax.random.key(0))
    inputs = (batch["pixel_values"], batch["input_ids"], batch["modality_ids"], batch["segment_ids"])

    def logits(config):
        return jax.jit(lambda p: AKI(config).apply({"params": p}, *inputs))(params)

    assert relative_error(logits(kernel), logits(dense)) <= 1e-5

    def prefill(config):
        cache = init_cache(config, 4, 30)
        return jax.jit(lambda p, c: AKI(config).apply({"params": p}, *inputs[:3], cache=c, cache_index=0))(
            params, cache
        )

    (got, got_cache), (want, want_cache) = prefill(kernel), prefill(dense)
    assert relative_error(got, want) <= 1e-5 and relative_error(got_cache["key"], want_cache["key"]) <= 1e-6

    optim = OptimizerConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0, total_steps=10, eps=1e-4)
    mesh_config = S.MeshConfig(data=2, fsdp=2, tensor=2)  # batch over data x fsdp, heads over tensor
    mesh, rules = S.make_mesh(mesh_config), S.logical_rules(mesh_config)
    optimizer = make_optimizer(optim)
    initial = jax.device_get(init_state(dense, optimizer, seed=0))

    def one_step(config):
        _, shardings = state_shardings(config, optimizer, mesh, rules)
        state = jax.device_put(jax.tree.map(np.array, initial), shardings)
        batch_shardings = {k: S.batch_sharding(mesh, rules, v.ndim) for k, v in batch.items()}
        step = make_train_step(config, optimizer, learning_rate_schedule(optim), 1, shardings, batch_shardings)
        with S.activation_context(mesh, rules):
            state, metrics = step(state, S.make_global_batch(batch, mesh, rules))
        return jax.device_get(state), jax.device_get(metrics)

    (state_k, metrics_k), (state_d, metrics_d) = one_step(kernel), one_step(dense)
    assert abs(float(metrics_k["loss"]) - float(metrics_d["loss"])) <= 1e-5 * abs(float(metrics_d["loss"]))
    for a, b in zip(jax.tree.leaves(state_k), jax.tree.leaves(state_d), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-4, atol=1e-6)


def test_inside_a_mesh_the_kernel_runs_under_shard_map_with_batch_and_heads_split():
    from aki_jax import sharding as S

    mesh_config = S.MeshConfig(data=2, fsdp=2, tensor=2)
    mesh, rules = S.make_mesh(mesh_config), S.logical_rules(mesh_config)
    ranges, _, _ = _ranges_and_mask(*_fixed_layout(), "mma")
    q, k, v, _ = _qkv(jnp.float32, b=4)
    ranges = AttentionRanges(*(jnp.concatenate([x, x]) for x in ranges))

    def attend(q, k, v, ranges):
        return dot_product_attention(q, k, v, ranges, implementation=KERNELS[-1], blocks=BLOCKS)

    with S.activation_context(mesh, rules):
        jaxpr = str(jax.make_jaxpr(attend)(q, k, v, ranges))
    assert "shard_map" in jaxpr and "('data', 'fsdp')" in jaxpr and "'tensor'" in jaxpr
