"""Mesh construction, logical rules and param shardings on the 8 fake CPU devices (tests/conftest.py)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import aki_jax
from aki_jax import sharding as S


def test_mesh_shape_fills_minus_one_and_rejects_mismatches():
    assert S.resolve_mesh_shape(S.MeshConfig(data=-1), 8) == (8, 1, 1)
    assert S.resolve_mesh_shape(S.MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        S.resolve_mesh_shape(S.MeshConfig(data=-1, fsdp=-1), 8)
    with pytest.raises(ValueError, match="not divisible"):
        S.resolve_mesh_shape(S.MeshConfig(data=-1, tensor=3), 8)
    with pytest.raises(ValueError, match="but 8 are available"):
        S.resolve_mesh_shape(S.MeshConfig(data=2, fsdp=2, tensor=1), 8)


def test_every_logical_name_of_the_model_has_a_rule():
    _, specs = aki_jax.abstract_params(aki_jax.tiny())
    used = {name for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)) for name in spec}
    used.discard(None)
    assert used <= set(S.LOGICAL_NAMES)
    assert {"act_batch", "act_length", "act_embed", "act_heads", "act_vocab"} <= set(S.LOGICAL_NAMES)


def test_rule_overrides_are_checked():
    rules = dict(S.logical_rules(S.MeshConfig(rules={"embed": None, "act_batch": ["data"]})))
    assert rules["embed"] is None and rules["act_batch"] == ("data",)
    with pytest.raises(ValueError, match="unknown logical axis names"):
        S.logical_rules(S.MeshConfig(rules={"embedding": "fsdp"}))
    with pytest.raises(ValueError, match="unknown mesh axis"):
        S.logical_rules(S.MeshConfig(rules={"embed": "model"}))


def _specs(mesh_config):
    mesh = S.make_mesh(mesh_config)
    _, shardings = S.param_shardings(aki_jax.tiny(), mesh, S.logical_rules(mesh_config))
    return jax.tree.map(lambda s: s.spec, shardings)


def test_parallelism_is_chosen_by_mesh_sizes_alone():
    dp = _specs(S.MeshConfig(data=-1))
    assert all(all(a is None for a in spec) for spec in jax.tree.leaves(dp, is_leaf=lambda x: isinstance(x, P)))
    fsdp = _specs(S.MeshConfig(data=1, fsdp=-1))
    assert fsdp["decoder"]["layers"]["qkv_kernel"] == P(None, "fsdp", None, None, None)
    assert fsdp["decoder"]["embed_tokens"] == P(None, "fsdp")
    tp = _specs(S.MeshConfig(data=2, tensor=-1))
    assert tp["decoder"]["layers"]["qkv_kernel"] == P(None, None, None, "tensor", None)
    assert tp["decoder"]["layers"]["down_kernel"] == P(None, "tensor", None)
    # tiny has 4 decoder heads: not divisible by tensor=8, so that axis stays whole (MLP width 128 splits)
    tp8 = _specs(S.MeshConfig(data=1, tensor=-1))
    assert tp8["decoder"]["layers"]["o_kernel"] == P(None, None, None, None)
    assert tp8["decoder"]["layers"]["down_kernel"] == P(None, "tensor", None)


def test_params_are_really_sharded_on_a_2x2x2_mesh(tiny_params):
    config, reference = tiny_params
    mesh_config = S.MeshConfig(data=2, fsdp=2, tensor=2)
    mesh = S.make_mesh(mesh_config)
    shapes, shardings = S.param_shardings(config, mesh, S.logical_rules(mesh_config))
    params = jax.device_put(reference, shardings)
    qkv = params["decoder"]["layers"]["qkv_kernel"]  # (layers, D, 3, N, H): D over fsdp, N over tensor
    layers, d, _, n, h = qkv.shape
    assert {s.data.shape for s in qkv.addressable_shards} == {(layers, d // 2, 3, n // 2, h)}
    assert len(qkv.addressable_shards) == 8
    lm_head = params["decoder"]["lm_head_kernel"]  # (D, V): D over fsdp, V over tensor
    assert {s.data.shape for s in lm_head.addressable_shards} == {(d // 2, lm_head.shape[1] // 2)}
    fc1 = params["vision"]["layers"]["fc1_kernel"]  # (layers, Dv, F): Dv over fsdp, F over tensor
    assert {s.data.shape for s in fc1.addressable_shards} == {(fc1.shape[0], fc1.shape[1] // 2, fc1.shape[2] // 2)}
    np.testing.assert_array_equal(np.asarray(qkv), np.asarray(reference["decoder"]["layers"]["qkv_kernel"]))


def test_batches_are_split_over_data_and_fsdp():
    mesh_config = S.MeshConfig(data=2, fsdp=2, tensor=2)
    mesh = S.make_mesh(mesh_config)
    rules = S.logical_rules(mesh_config)
    assert S.batch_divisor(mesh, rules) == 4
    local = {"input_ids": np.arange(8 * 5, dtype=np.int32).reshape(8, 5)}
    batch = S.make_global_batch(local, mesh, rules)
    assert batch["input_ids"].shape == (8, 5)
    assert {s.data.shape for s in batch["input_ids"].addressable_shards} == {(2, 5)}
    np.testing.assert_array_equal(np.asarray(batch["input_ids"]), local["input_ids"])


def test_the_aki4b_recipe_shards_its_big_matrices_on_a_gpu8_mesh():
    """configs/mesh_gpu8.py's layout (fsdp 4 x tensor 2, here on the 8 fake devices), without allocating."""
    config = aki_jax.aki_4b()
    mesh_config = S.MeshConfig(data=1, fsdp=4, tensor=2)
    mesh = S.make_mesh(mesh_config)
    shapes, shardings = S.param_shardings(config, mesh, S.logical_rules(mesh_config))
    qkv = shardings["decoder"]["layers"]["qkv_kernel"]
    assert qkv.shard_shape(shapes["decoder"]["layers"]["qkv_kernel"].shape) == (32, 3072 // 4, 3, 32 // 2, 96)
    embed = shardings["decoder"]["embed_tokens"]
    assert embed.shard_shape(shapes["decoder"]["embed_tokens"].shape) == (32064 // 2, 3072 // 4)
    per_device = sum(
        np.prod(s.shard_shape(x.shape))
        for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(shapes), strict=True)
    )
    total = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
    assert per_device < total / 7  # nearly everything is split 8 ways


@pytest.mark.parametrize(
    "mesh_config", [S.MeshConfig(data=2, fsdp=2, tensor=2), S.MeshConfig(data=1, fsdp=1, tensor=8)]
)
@pytest.mark.parametrize("freeze_vision", [True, False])
def test_optimizer_moments_shard_like_their_parameter_and_counters_are_replicated(mesh_config, freeze_vision):
    from aki_jax.training.config import OptimizerConfig
    from aki_jax.training.optimizer import make_optimizer
    from aki_jax.training.state import state_shardings

    config = aki_jax.tiny(freeze_vision=freeze_vision)
    mesh, rules = S.make_mesh(mesh_config), S.logical_rules(mesh_config)
    _, shardings = state_shardings(config, make_optimizer(OptimizerConfig()), mesh, rules)
    by_path = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings["params"])}
    moments = 0
    for path, s in jax.tree_util.tree_leaves_with_path(shardings["opt_state"]):
        # a moment's path ends with its parameter's path: ...mu['decoder']['layers']['qkv_kernel']
        key = jax.tree_util.keystr(path)
        owner = [p for p in by_path if key.endswith(p) and (".mu" in key or ".nu" in key)]
        if owner:
            moments += 1
            assert s == by_path[max(owner, key=len)], key
        else:
            assert s.spec == P(), key
    trainable = [p for p in by_path if not (freeze_vision and p.startswith("['vision']"))]
    assert moments == 2 * len(trainable)  # mu and nu of every trained parameter, none of the frozen tower
    assert any(s.spec != P() for s in by_path.values())
