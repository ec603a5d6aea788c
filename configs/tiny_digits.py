"""The default job: a tiny AKI learns to answer questions about pairs of handwritten digits, in minutes on a CPU.

  python train.py                       # this config (MMA, the paper's attention)
  python train.py attention=causal      # the same job with plain causal attention (the paper's ablation)
  aki-ablation                          # both, over seeds 0 1 2, with a table of the differences

A 0.43M-parameter AKI, all of it trained (the vision tower too: a randomly initialised tower that stays
frozen passes too little of the image on), on the built-in digits "pairs" task (`aki_jax.data.digits`):
two scans side by side in a 16-pixel image, one 8-pixel patch per digit; the question says which digit
to read ("What is the left digit?", "... right ...", "Is the left digit greater than the right digit?",
"What is the sum of the two digits?"). STEPS steps of 32 examples, held-out answer exact match every
EVAL steps; at the end, per question type beside a text-only and a shuffled-image baseline. Writes
runs/tiny_digits_<attention>/{checkpoints, model, metrics.jsonl, tensorboard, training.png,
summary.json}; run it again with --resume (a finished run just re-evaluates). The one-digit task is
configs/tiny_digits_single.py.
"""

from aki_jax.config import VisionConfig, tiny
from aki_jax.data import DataConfig
from aki_jax.training.config import CheckpointConfig, EvalConfig, LogConfig, OptimizerConfig, TrainConfig

STEPS = 800


def get_config() -> TrainConfig:
    model = tiny(freeze_vision=False)
    vision = VisionConfig(image_size=16, patch_size=8, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4)
    return TrainConfig(
        model=model.replace(vision=vision),
        data=DataConfig(batch_size=32, seq_len=48, digits_task="pairs"),
        optim=OptimizerConfig(lr=3e-3, min_lr=1e-4, warmup_steps=50, total_steps=STEPS, weight_decay=0.01),
        checkpoint=CheckpointConfig(dir="runs/tiny_digits_{attention}", every_steps=200, keep=2),
        logging=LogConfig(every_steps=10),
        eval=EvalConfig(every_steps=200, batch_size=128),
    )
