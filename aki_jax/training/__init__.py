"""Training: typed config, sharded train state and step, Orbax checkpoints, logging, the training loop."""

from aki_jax.training.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LogConfig,
    OptimizerConfig,
    TrainConfig,
    apply_overrides,
    load_config_file,
)
from aki_jax.training.optimizer import learning_rate_schedule, make_optimizer
from aki_jax.training.state import init_state, split_trainable, state_shardings
from aki_jax.training.step import eval_step, make_train_step, train_step

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "EvalConfig",
    "LogConfig",
    "OptimizerConfig",
    "TrainConfig",
    "apply_overrides",
    "eval_step",
    "init_state",
    "learning_rate_schedule",
    "load_config_file",
    "make_optimizer",
    "make_train_step",
    "split_trainable",
    "state_shardings",
    "train_step",
]
