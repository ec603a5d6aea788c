"""The digits "pairs" task: the question says which of two handwritten digits to read.

  python train.py --config configs/tiny_digits_pairs.py
  aki-ablation --config configs/tiny_digits_pairs.py --out runs/ablation_pairs

Not the default job: measured, this model does not learn to read its image (it ends at the text-only
baseline; README, "MMA against causal attention"). Kept to work on that.

A 0.43M-parameter AKI, all of it trained (the vision tower too: a randomly initialised tower that stays
frozen passes too little of the image on), on the built-in digits "pairs" task (`aki_jax.data.digits`):
two scans side by side in a 16-pixel image, one 8-pixel patch per digit; the question says which digit
to read ("What is the left digit?", "... right ...", "Is the left digit greater than the right digit?",
"What is the sum of the two digits?"). STEPS steps of 32 examples, held-out answer exact match every
EVAL steps; at the end, per question type beside a text-only and a shuffled-image baseline. Writes
runs/tiny_digits_pairs_<attention>/{checkpoints, model, metrics.jsonl, tensorboard, training.png,
summary.json}; run it again with --resume (a finished run just re-evaluates). The one-digit task (the default job) is
configs/tiny_digits.py.
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
        checkpoint=CheckpointConfig(dir="runs/tiny_digits_pairs_{attention}", every_steps=200, keep=2),
        logging=LogConfig(every_steps=10),
        eval=EvalConfig(every_steps=200, batch_size=128),
    )
