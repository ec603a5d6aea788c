"""AKI-4B supervised fine-tuning, the paper's recipe (docs/original_model.md, "Training recipe").

11 instruction datasets mixed by sampling weights, max length 512, batch 4 per device, lr 2e-5 down to
1e-6 with warmup 150, weight decay 1e-4, 50k steps; loss on answer tokens only (the processor gives
system, user and image tokens weight 0). Start from the pretrained checkpoint:

  python train.py --config configs/aki4b_sft.py --init-from runs/aki4b_pretrain/model \\
      tokenizer=runs/aki4b_pretrain/model

`data.batch_size` is global: 4 per device x 64 devices here; set it to 4 x your device count
(`data.batch_size=32` on one 8-GPU host). The mixture below lists the LLaVA-style sources; add yours with
`data.sources=[...]` (JSON list of {"kind", "path", "image_root", "weight", ...}).
"""

from aki_jax.config import aki_4b
from aki_jax.data import DataConfig, SourceConfig
from aki_jax.sharding import MeshConfig
from aki_jax.training.config import CheckpointConfig, EvalConfig, LogConfig, OptimizerConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model=aki_4b().replace(dtype="bfloat16", param_dtype="float32", remat="dots"),
        data=DataConfig(
            sources=(
                SourceConfig("llava", "/data/sft/llava_v1_5_mix665k.json", image_root="/data/sft/images", weight=4),
                SourceConfig(
                    "vqa", "/data/sft/vqav2/*.jsonl", image_root="/data/sft/coco", weight=1, template="short_answer"
                ),
                SourceConfig(
                    "vqa",
                    "/data/sft/aokvqa/*.jsonl",
                    image_root="/data/sft/coco",
                    weight=0.5,
                    template="multiple_choice",
                ),
            ),  # fmt: skip
            eval_sources=(SourceConfig("vqa", "/data/sft/val/*.jsonl", image_root="/data/sft/coco"),),
            seq_len=512,
            packing=False,
            batch_size=4 * 64,
            workers=8,
        ),
        optim=OptimizerConfig(lr=2e-5, min_lr=1e-6, warmup_steps=150, total_steps=50_000, weight_decay=1e-4),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        checkpoint=CheckpointConfig(dir="runs/aki4b_sft", every_steps=1000, keep=3, keep_best=False),
        logging=LogConfig(every_steps=50),
        eval=EvalConfig(every_steps=5000, max_batches=50),
    )
