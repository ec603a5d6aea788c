"""Conversion between original PyTorch AKI checkpoints and aki-jax parameters.

mapping          the one table (original key <-> aki-jax path, transform), used in both directions
safetensors_io   streaming, validating safetensors reader/writer (bfloat16 via ml_dtypes)
sources          open a released folder / .safetensors / training .pt as a lazy state dict
hf_config        released config.json + SigLIP/Phi-3 configs <-> AKIConfig
torch_import     PyTorch checkpoint -> pretrained folder (streamed, all-or-nothing)
torch_export     pretrained folder -> config.json + model.safetensors in the original layout
towers           Hugging Face SigLIP + Phi-3 folders -> a freshly assembled AKI (the paper's starting point)
"""

from aki_jax.convert.mapping import ConversionError, params_to_torch, torch_to_params
from aki_jax.convert.torch_export import export_orbax_to_pytorch
from aki_jax.convert.torch_import import convert_pytorch_to_orbax
from aki_jax.convert.towers import init_from_towers

__all__ = [
    "ConversionError",
    "convert_pytorch_to_orbax",
    "export_orbax_to_pytorch",
    "init_from_towers",
    "params_to_torch",
    "torch_to_params",
]
