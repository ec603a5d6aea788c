"""The default job (configs/tiny_digits.py) on the one-digit task: one scan per image, four question types.

  python train.py --config configs/tiny_digits_single.py
  aki-ablation --config configs/tiny_digits_single.py --out runs/ablation_single

"What digit is this?", "Is it even?" / "Is it odd?" (which one is asked does not depend on the digit),
"Is it greater than N?", "What is this digit plus N?". Every question is about the only digit there is,
so what to read does not depend on the question: MMA has less to work with than on the pairs task.
"""

import dataclasses
from pathlib import Path

from aki_jax.training.config import TrainConfig, load_config_file


def get_config() -> TrainConfig:
    config = load_config_file(Path(__file__).with_name("tiny_digits.py"))
    return dataclasses.replace(
        config,
        data=config.data.replace(digits_task="single"),
        checkpoint=dataclasses.replace(config.checkpoint, dir="runs/tiny_digits_single_{attention}"),
    )
