"""AKI-4B SFT on one 8-GPU host: FSDP over 4 GPUs x tensor parallel 2 (NVLink pairs), batch 4 per GPU.

  python train.py --config configs/mesh_gpu8.py --init-from /ckpt/aki-4b tokenizer=/ckpt/aki-4b

Any other layout is a mesh override: pure data parallel `mesh.data=-1 mesh.fsdp=1 mesh.tensor=1`,
full FSDP `mesh.data=1 mesh.fsdp=-1 mesh.tensor=1`.
"""

import dataclasses
from pathlib import Path

from aki_jax.sharding import MeshConfig
from aki_jax.training.config import load_config_file


def get_config():
    config = load_config_file(Path(__file__).with_name("aki4b_sft.py"))
    return dataclasses.replace(
        config,
        mesh=MeshConfig(data=1, fsdp=4, tensor=2),
        data=config.data.replace(batch_size=4 * 8, workers=4),
    )
