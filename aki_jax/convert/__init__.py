"""Conversion between original PyTorch AKI checkpoints and aki-jax parameters.

`mapping` holds the one table (original key <-> aki-jax path, transform) used in both directions.
"""

from aki_jax.convert.mapping import ConversionError, params_to_torch, torch_to_params

__all__ = ["ConversionError", "params_to_torch", "torch_to_params"]
