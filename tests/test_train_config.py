"""Training config: dotted `key=value` overrides, aliases, type checks, JSON round trip, config files."""

from pathlib import Path

import pytest

from aki_jax.data import SourceConfig
from aki_jax.training.config import TrainConfig, apply_overrides, load_config_file

ROOT = Path(__file__).resolve().parents[1]


def test_dotted_overrides_reach_any_field_and_keep_types():
    config = apply_overrides(
        TrainConfig(),
        ["optim.lr=3e-4", "model.decoder.num_layers=4", "mesh.fsdp=-1", "mesh.data=1", "checkpoint.keep_best=true",
         "data.batch_size=64", "optim.warmup_steps=10.0", "mesh.rules.embed=null"],
    )  # fmt: skip
    assert config.optim.lr == 3e-4 and isinstance(config.optim.lr, float)
    assert config.model.decoder.num_layers == 4 and config.model.decoder.hidden_size == 3072
    assert (config.mesh.data, config.mesh.fsdp) == (1, -1)
    assert config.checkpoint.keep_best is True
    assert config.data.batch_size == 64
    assert config.optim.warmup_steps == 10 and isinstance(config.optim.warmup_steps, int)
    assert config.mesh.rules == {"embed": None}


def test_aliases_and_presets():
    config = apply_overrides(TrainConfig(), ["model=tiny", "attention=causal", "steps=7", "output_dir=/tmp/x"])
    assert config.model.decoder.hidden_size == 64
    assert config.model.attention == "causal"
    assert config.optim.total_steps == 7 and config.checkpoint.dir == "/tmp/x"


def test_bad_overrides_name_the_field_at_fault():
    with pytest.raises(ValueError, match="unknown field 'lrate'.*valid here"):
        apply_overrides(TrainConfig(), ["optim.lrate=1"])
    with pytest.raises(ValueError, match="optim.total_steps: 'many' is not a valid"):
        apply_overrides(TrainConfig(), ["optim.total_steps=many"])
    with pytest.raises(ValueError, match="must be 'mma' or 'causal'"):
        apply_overrides(TrainConfig(), ["attention=full"])
    with pytest.raises(ValueError, match="is not key=value"):
        apply_overrides(TrainConfig(), ["attention"])


def test_data_sources_from_a_json_list():
    config = apply_overrides(TrainConfig(), ['data.sources=[{"kind": "vqa", "path": "qa/*.jsonl", "weight": 2}]'])
    assert config.data.sources == (SourceConfig("vqa", "qa/*.jsonl", weight=2),)


def test_resolved_config_round_trips_through_json(tmp_path):
    config = apply_overrides(load_config_file(ROOT / "configs" / "tiny_digits.py"), ["attention=causal", "lr=1e-3"])
    config.to_json(tmp_path / "config.json")
    assert TrainConfig.from_json(tmp_path / "config.json") == config


@pytest.mark.parametrize(
    "name", ["tiny_digits", "tiny_digits_pairs", "aki4b_pretrain", "aki4b_sft", "mesh_gpu8", "mesh_tpu_pod"]
)
def test_every_config_file_loads_and_documents_its_command(name):
    path = ROOT / "configs" / f"{name}.py"
    config = load_config_file(path)
    assert isinstance(config, TrainConfig)
    text = path.read_text()
    assert "python train.py" in text or "aki-train" in text  # the command that runs it (both are the same)


def test_recipes_follow_the_paper():
    pretrain = load_config_file(ROOT / "configs" / "aki4b_pretrain.py")
    assert (pretrain.optim.weight_decay, pretrain.optim.warmup_steps, pretrain.optim.min_lr) == (0.01, 2000, 1e-5)
    assert pretrain.model.dtype == "bfloat16" and pretrain.model.param_dtype == "float32"
    sft = load_config_file(ROOT / "configs" / "aki4b_sft.py")
    assert (sft.optim.lr, sft.optim.min_lr, sft.optim.warmup_steps) == (2e-5, 1e-6, 150)
    assert (sft.optim.weight_decay, sft.optim.total_steps, sft.data.seq_len) == (1e-4, 50_000, 512)
