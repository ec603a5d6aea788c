"""Independent reference implementations that tests and benchmarks compare aki-jax against (need torch).

`aki_jax.testing.torch_reference` rebuilds the original PyTorch AKI from transformers' modules plus its own
resampler and decoupled embedding/head, without importing aki-jax's model code.
"""
