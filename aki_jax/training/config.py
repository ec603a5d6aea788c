"""Typed training configuration, `key=value` overrides with dotted paths, and JSON round trips.

A config file under `configs/` is plain Python defining `get_config() -> TrainConfig`. Any field can be
overridden from the command line with its dotted path (`optim.lr=3e-4`, `model.decoder.num_layers=4`,
`mesh.fsdp=-1`); values are parsed as JSON when they parse (numbers, true/false, null, lists, dicts)
and taken as strings otherwise. A few short aliases exist for common knobs (`ALIASES`), notably
`attention=causal` for the paper's ablation. `model=<preset>` swaps in a named preset ("tiny", "aki-4b").
An override edits the config's dict form; the result is built once by `aki_jax.serialization.from_dict`,
so type errors name the dotted path and cross-field checks see all overrides together.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import types
import typing
from pathlib import Path
from typing import Any

from aki_jax import serialization
from aki_jax.config import AKIConfig, preset
from aki_jax.data.config import DataConfig
from aki_jax.sharding import MeshConfig

PRETRAINED_SUBDIR = "model"  # under the run directory: the exported `save_pretrained` folder

ALIASES = {
    "attention": "model.attention",
    "remat": "model.remat",
    "dtype": "model.dtype",
    "steps": "optim.total_steps",
    "lr": "optim.lr",
    "batch_size": "data.batch_size",
    "seq_len": "data.seq_len",
    "output_dir": "checkpoint.dir",
}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with a warmup + cosine schedule down to `min_lr`; decay is skipped for biases and norm scales.

    grad_accum: micro-batches per step (the global batch is split into this many; same result, less memory).
    """

    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 50
    total_steps: int = 1000
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    # Learning-rate factors by parameter path prefix, the longest matching prefix wins:
    # {"resampler": 10.0, "decoder/embed": 0.5}. Weight decay scales with them (it is part of the update).
    lr_multipliers: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under `dir/checkpoints`, the resolved config at `dir/config.json`, the final
    model (`save_pretrained` layout) at `dir/model`. every_steps=0 saves only at the end.
    "{attention}" in `dir` is replaced by the model's attention kind ("mma" / "causal")."""

    dir: str = "runs/tiny_digits"
    every_steps: int = 200
    keep: int = 3
    keep_best: bool = False  # also keep the checkpoint with the best held-out accuracy (eval runs at every save)
    async_save: bool = True
    export_pretrained: bool = True

    def run_dir(self, attention: str) -> Path:
        """`dir` with "{attention}" filled in: where the run of a model with that attention writes."""
        return Path(self.dir.format(attention=attention))

    def pretrained_dir(self, attention: str) -> Path:
        """Where a finished run exports its model (the folder `aki_jax.load_pretrained` reads)."""
        return self.run_dir(attention) / PRETRAINED_SUBDIR


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Progress bar, `dir/metrics.jsonl`, TensorBoard events in `dir/tensorboard`, and a PNG plot.

    peak_flops_per_device: for MFU; 0 picks a table value for known accelerators, or measures a large
    matmul on CPU at startup (so MFU is relative to what this machine really reaches).
    """

    every_steps: int = 10
    progress_bar: bool = True
    tensorboard: bool = True
    plot: bool = True
    peak_flops_per_device: float = 0.0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation (`data.eval_sources`): answer exact-match accuracy and loss.

    every_steps: 0 evaluates only at the end. batch_size: global rows per eval step (0: data.batch_size).
    max_batches: stop after this many eval batches (0: the whole held-out set).
    """

    every_steps: int = 0
    batch_size: int = 0
    max_batches: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; `model` is an AKIConfig (config files call a preset: `aki_4b()`, `tiny()`)."""

    model: AKIConfig = AKIConfig()
    data: DataConfig = DataConfig()
    optim: OptimizerConfig = OptimizerConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LogConfig = LogConfig()
    eval: EvalConfig = EvalConfig()
    seed: int = 0  # parameter init and the train RNG (data shuffling has its own data.seed)
    tokenizer: str | None = None  # tokenizer folder; None: for digits-only data, build the digits tokenizer
    synthetic_data: bool = False  # deterministic random batches with example ids instead of `data` (tests)
    init_from: str | None = None  # a pretrained folder (`aki_jax.load_pretrained`) to start from
    resume: bool = False  # continue from the latest checkpoint in checkpoint.dir

    def to_dict(self) -> dict[str, Any]:
        return serialization.to_dict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(serialization.to_json(self, sort_keys=True))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return serialization.from_dict(cls, data)

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        return serialization.from_json(cls, path)


def load_config_file(path: str | Path) -> TrainConfig:
    """Run a config file and call its `get_config()`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"aki_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: a config file must define get_config() -> TrainConfig")
    config = module.get_config()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"{path}: get_config() returned {type(config).__name__}, expected TrainConfig")
    return config


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `key=value` strings in order; errors name the unknown key and list the valid ones.

    Cross-field checks (e.g. rope factors vs head size) run once on the result, so coupled fields can be
    changed together (`model.decoder.hidden_size=128 model.decoder.num_heads=8`).
    """
    if not overrides:
        return config
    tree = config.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. optim.lr=3e-4)")
        key, text = item.split("=", 1)
        key = ALIASES.get(key.strip(), key.strip())
        set_path(tree, TrainConfig, key.split("."), parse_value(text), key)
    return TrainConfig.from_dict(tree)


def set_path(tree: dict, hint, path: list[str], value, full: str) -> None:
    """Set `value` at `path` in `tree`, the dict form of the dataclass type `hint` (checked and coerced)."""
    name = path[0]
    if dataclasses.is_dataclass(hint):
        types_ = serialization.field_types(hint)
        if name not in types_:
            close = difflib.get_close_matches(name, list(types_), n=1)
            suggestion = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"override {full}: unknown field {name!r}; {suggestion}valid here: {', '.join(types_)}")
        sub = types_[name]
    elif isinstance(tree, dict) and _allowed_types(hint) & {dict}:  # free-form dicts (mesh.rules) take any key
        sub = Any
    else:
        raise ValueError(f"override {full}: {_hint_name(hint)} has no field {name!r}")
    if len(path) > 1:
        if not isinstance(tree.get(name), dict):
            if not (sub is Any or _allowed_types(sub) & {dict}):
                raise ValueError(f"override {full}: {name!r} is not a group of fields")
            tree[name] = {}
        set_path(tree[name], sub, path[1:], value, full)
    elif hint is TrainConfig and name == "model" and isinstance(value, str):
        tree[name] = preset(value).to_dict()
    else:
        tree[name] = value if sub is Any else _coerce(tree.get(name), value, sub, full)


def _hint_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint)


def _coerce(current, value, hint, full: str):
    allowed = _allowed_types(hint)
    if value is None:
        if type(None) in allowed or current is None:
            return None
        raise ValueError(f"override {full}: null is not allowed here")
    if bool in allowed and isinstance(value, bool):
        return value
    if float in allowed and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if int in allowed and isinstance(value, int) and not isinstance(value, bool):
        return value
    if int in allowed and isinstance(value, float) and value.is_integer():
        return int(value)
    if str in allowed:
        return str(value) if not isinstance(value, dict | list) else json.dumps(value)
    if tuple in allowed and isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict) and (dict in allowed or any(dataclasses.is_dataclass(t) for t in allowed)):
        return value  # a dataclass's fields as a dict: built (and checked) by from_dict
    raise ValueError(f"override {full}: {value!r} is not a valid value (expected {_describe(allowed)})")


def _describe(allowed: set) -> str:
    """'a number', 'true or false', ... for an override's error message."""
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", tuple: "a JSON list",
             dict: "a JSON object", type(None): "null"}  # fmt: skip
    named = [words.get(t, getattr(t, "__name__", str(t))) for t in sorted(allowed, key=lambda t: t.__name__)]
    return " or ".join(named) if named else "something else"


def _allowed_types(hint) -> set:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        out = set()
        for arg in typing.get_args(hint):
            out |= _allowed_types(arg)
        return out
    if origin is not None:
        return {origin}
    return {hint}
