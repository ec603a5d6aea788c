"""AKI-4B caption pretraining, the paper's recipe (docs/original_model.md, "Training recipe").

The paper's whole recipe is four commands: towers -> pretraining (this file) -> SFT -> evaluation.

  # 1. assemble AKI from the public towers (SigLIP so400m/14@384, Phi-3.5-mini-instruct): fresh resampler,
  #    two added tokens and head bias drawn as the original does, tokenizer extended (aki_jax/convert/towers.py)
  aki-init-from-towers --vision /ckpt/siglip-so400m-patch14-384 --lm /ckpt/Phi-3.5-mini-instruct \\
      --dst /ckpt/aki-4b-init
  # 2. pretrain on captions (this config); the run exports runs/aki4b_pretrain/model at the end
  aki-train --config configs/aki4b_pretrain.py --init-from /ckpt/aki-4b-init \\
      'data.sources=[{"kind": "webdataset", "path": "/data/kale/{00000..09999}.tar"}]'
  # 3. supervised fine-tuning (configs/aki4b_sft.py)
  aki-train --config configs/aki4b_sft.py --init-from runs/aki4b_pretrain/model
  # 4. evaluate the fine-tuned model
  aki-evaluate --checkpoint runs/aki4b_sft/model --benchmark MMBench_DEV_EN.tsv

The `--init-from` folder carries its tokenizer (with `<pad>`, `<image>`, `<|endofchunk|>`), which the run
uses unless `tokenizer=` says otherwise. Next-token loss on captions (BLIP3-Kale, BLIP3-OCR-200m webdataset
shards), AdamW, weight decay 0.01, cosine schedule with warmup 2000 and min lr 1e-5, bf16 compute with fp32
master weights (step 1 writes float32 unless `--dtype` says otherwise), FSDP, frozen SigLIP tower. Point
`data.sources` at your shards and pick a mesh preset.

Multi-host (TPU pod slice / GPU cluster): run the same command on every host; `jax.distributed` is
initialised automatically and each host reads its own share of the shards. For the 8-GPU / pod layouts
see `configs/mesh_gpu8.py` and `configs/mesh_tpu_pod.py` (they wrap this config).
The peak learning rate and step count are not given in the reference; 1e-4 over 100k steps are placeholders.
"""

from aki_jax.config import aki_4b
from aki_jax.data import DataConfig, SourceConfig
from aki_jax.sharding import MeshConfig
from aki_jax.training.config import CheckpointConfig, EvalConfig, LogConfig, OptimizerConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model=aki_4b().replace(dtype="bfloat16", param_dtype="float32", remat="dots"),
        data=DataConfig(
            sources=(SourceConfig("webdataset", "/data/blip3-kale/{00000..09999}.tar"),),
            eval_sources=(SourceConfig("webdataset", "/data/blip3-kale-val/{00000..00003}.tar"),),
            seq_len=512,
            packing=True,
            batch_size=512,
            workers=8,
        ),
        optim=OptimizerConfig(lr=1e-4, min_lr=1e-5, warmup_steps=2000, total_steps=100_000, weight_decay=0.01),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        checkpoint=CheckpointConfig(dir="runs/aki4b_pretrain", every_steps=1000, keep=3),
        logging=LogConfig(every_steps=50),
        eval=EvalConfig(every_steps=5000, max_batches=50),
    )
