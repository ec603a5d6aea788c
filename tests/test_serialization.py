"""The one config (de)serialiser: round trips of every config, typed conversion, errors naming the dotted path."""

import dataclasses
import json

import pytest

import aki_jax
from aki_jax.data import DataConfig, SourceConfig
from aki_jax.serialization import ConfigError, from_dict, from_json, to_dict
from aki_jax.training.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Inner:
    size: int = 1
    scale: float = 1.0
    name: str = ""


@dataclasses.dataclass(frozen=True)
class Outer:
    inner: Inner = Inner()
    inners: tuple[Inner, ...] = ()
    pair: tuple[int, str] = (0, "")
    maybe: Inner | None = None
    limit: int | None = None
    flags: dict = dataclasses.field(default_factory=dict)


def _json_round_trip(config):
    return json.loads(json.dumps(to_dict(config)))


@pytest.mark.parametrize(
    "config",
    [
        aki_jax.aki_4b(),
        aki_jax.tiny(attention="causal", attention_impl="xla"),
        aki_jax.tiny().replace(decoder=aki_jax.DecoderConfig(rope_scaling=None)),
        DataConfig(sources=(SourceConfig("vqa", "a.jsonl", features={"image": "img"}),), epochs=2),
        TrainConfig(model=aki_jax.tiny(), data=DataConfig(epochs=None), init_from="x"),
    ],
    ids=["aki4b", "tiny", "no-rope-scaling", "data", "train"],
)
def test_every_config_survives_a_json_round_trip_exactly(config):
    data = _json_round_trip(config)
    back = from_dict(type(config), data)
    assert back == config
    if isinstance(config, aki_jax.AKIConfig):  # tuples come back as tuples: still a hashable jit cache key
        assert hash(back) == hash(config)


def test_the_layout_older_checkpoints_wrote_still_loads(tmp_path):
    """aki_config.json used to be `json.dumps(dataclasses.asdict(config))`: the same file loads to the same config."""
    config = aki_jax.tiny(dtype="bfloat16")
    (tmp_path / "aki_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    assert aki_jax.AKIConfig.from_json(tmp_path / "aki_config.json") == config


def test_nested_tuples_optionals_and_free_dicts_are_built_from_plain_values():
    data = {
        "inner": {"size": 3},
        "inners": [{"name": "a"}, {"scale": 2}],
        "pair": [4, "b"],
        "maybe": {"size": 5},
        "limit": None,
        "flags": {"anything": [1, 2]},
    }
    out = from_dict(Outer, data)
    assert out == Outer(Inner(3), (Inner(name="a"), Inner(scale=2.0)), (4, "b"), Inner(5), None, {"anything": [1, 2]})
    assert isinstance(out.inners[1].scale, float)  # an int where a float is declared becomes a float
    assert from_dict(Outer, {}) == Outer()  # missing fields keep their defaults
    assert from_dict(Outer, {"inner": Inner(7)}).inner == Inner(7)  # an instance is taken as it is


@pytest.mark.parametrize(
    "data, message",
    [
        ({"inner": {"sise": 3}}, r"Outer.inner: unknown fields \['sise'\]; known: \['name', 'scale', 'size'\]"),
        ({"inners": [{}, {"size": "big"}]}, r"Outer.inners\[1\].size: expected int, got str 'big'"),
        ({"inner": {"size": True}}, r"Outer.inner.size: expected int, got bool True"),
        ({"inner": {"size": 2.5}}, r"Outer.inner.size: expected int, got float 2.5"),
        ({"pair": [1]}, r"Outer.pair: expected 2 values, got 1"),
        ({"maybe": 3}, r"Outer.maybe: expected Inner \(a dict of its fields\), got int 3"),
        ({"limit": "ten"}, r"Outer.limit: expected int, got str 'ten'"),
        ({"inner": None}, r"Outer.inner: expected Inner \(a dict of its fields\), got NoneType None"),
        ({"flags": [1]}, r"Outer.flags: expected a dict, got list \[1\]"),
        ({"inners": {"size": 1}}, r"Outer.inners: expected a list, got dict"),
    ],
)
def test_errors_name_the_dotted_path_and_the_value(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_real_configs_name_their_paths_and_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"TrainConfig.model.decoder.rope_scaling.short_factor\[1\]: expected float"):
        TrainConfig.from_dict({"model": {"decoder": {"rope_scaling": {"short_factor": [1.0, "x"], "long_factor": []}}}})
    with pytest.raises(ValueError, match=r"DataConfig.sources\[0\]: unknown fields \['kindd'\]"):
        DataConfig.from_dict({"sources": [{"kindd": "vqa"}]})
    path = tmp_path / "bad.json"
    path.write_text('{"optim": {"lr": "fast"}}')
    with pytest.raises(ValueError, match=r"bad.json: TrainConfig.optim.lr: expected float, got str 'fast'"):
        from_json(TrainConfig, path)
    path.write_text("{")
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON"):
        TrainConfig.from_json(path)


def test_cross_field_checks_still_run_when_built_from_a_dict():
    with pytest.raises(ValueError, match="must be 'mma' or 'causal'"):
        aki_jax.AKIConfig.from_dict({"attention": "full"})
    with pytest.raises(TypeError, match="DataConfig.sources must be a tuple of SourceConfig"):
        DataConfig(sources=[SourceConfig()])  # a list would make the frozen config unhashable
