"""AKI-4B caption pretraining on a TPU v5p-128 slice (64 chips, 16 hosts): 8-way data parallel x 8-way FSDP.

Run the same command on every host (e.g. `gcloud compute tpus tpu-vm ssh ... --worker=all --command=...`):

  python train.py --config configs/mesh_tpu_pod.py tokenizer=/ckpt/aki-4b --init-from /ckpt/aki-4b

`jax.distributed.initialize()` runs automatically on a pod; each host feeds batch_size / 16 rows.
Checkpoints must go to storage every host sees (a shared filesystem mount): `checkpoint.dir=/mnt/shared/aki4b`.
"""

import dataclasses
from pathlib import Path

from aki_jax.sharding import MeshConfig
from aki_jax.training.config import load_config_file


def get_config():
    config = load_config_file(Path(__file__).with_name("aki4b_pretrain.py"))
    return dataclasses.replace(
        config,
        mesh=MeshConfig(data=8, fsdp=-1, tensor=1),
        data=config.data.replace(batch_size=1024),
    )
