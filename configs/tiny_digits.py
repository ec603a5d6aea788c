"""The default job: a tiny AKI learns to answer questions about handwritten digits, in minutes on a CPU.

  python train.py                       # this config (MMA, the paper's attention)
  python train.py attention=causal      # the same job with plain causal attention (the paper's ablation)
  aki-ablation                          # both, over seeds 0 1 2, with a table of the differences

A 0.54M-parameter AKI (every part trains) on the built-in digits "single" task (`aki_jax.data.digits`): one
scan per image and four question types ("What digit is this?", "Is it even?" / "Is it odd?" asked regardless
of the digit, "Is it greater than N?", "What is this digit plus N?"). 2000 steps of 32 examples, held-out
answer exact match every 400 steps; at the end, per question type beside a text-only and a shuffled-image baseline.

What makes this tiny model read the image (measured, README "Training"): its randomly initialised vision
tower trains (`freeze_vision=False`; frozen random features reach the decoder too weakly), it sees the 28x28
scan as one patch (`patch_size=28`: with 4x4 patches of 7 pixels the resampler's nearly uniform attention
averages the patches and the digit's layout is lost before it learns to attend), and the learning rate is
1e-3 (at 3e-3 the image path collapses and the model keeps to the answer priors). Writes
runs/tiny_digits_<attention>/{checkpoints, model, metrics.jsonl, tensorboard, training.png, summary.json};
run it again with --resume (a finished run just re-evaluates). The two-digit task, where the question says
which digit to read, is configs/tiny_digits_pairs.py.
"""

import dataclasses

from aki_jax.config import tiny
from aki_jax.data import DataConfig
from aki_jax.training.config import CheckpointConfig, EvalConfig, LogConfig, OptimizerConfig, TrainConfig


def get_config() -> TrainConfig:
    model = tiny(freeze_vision=False)
    return TrainConfig(
        model=model.replace(vision=dataclasses.replace(model.vision, patch_size=28)),
        data=DataConfig(batch_size=32, seq_len=64, digits_task="single"),
        optim=OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=50, total_steps=2000, weight_decay=0.01),
        checkpoint=CheckpointConfig(dir="runs/tiny_digits_{attention}", every_steps=200, keep=2),
        logging=LogConfig(every_steps=10),
        eval=EvalConfig(every_steps=400),
    )
