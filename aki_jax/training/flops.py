"""Model FLOPs of one train step, counted from the config (for MFU), and peak FLOP/s per device.

Per row of L positions holding I images (P patches, T latents each):

  decoder (trained)   6 * N_dec * L  +  3 * layers * 4 * L^2 * D
        N_dec = matmul weights of the decoder layers + the output heads (embedding lookups are free);
        4 * L^2 * D per layer forward = QK^T and AV (2 FLOPs per multiply-add each); the full L x L
        score matrix is computed whatever the mask, so MMA and causal count the same.
  resampler (trained) 3 * I * forward FLOPs, forward per image and layer =
        2*T*E*NH (q) + 2*(P+T)*E*2NH (kv over [media; latents]) + 4*T*(P+T)*NH (attention)
        + 2*T*NH*E (out) + 2*2*T*E*4E (MLP), plus the projection 2*T*E*D.
  vision (frozen)     1 * I * (2 * N_vis_layers * P + layers * 4 * P^2 * D_v + patch conv 2*P*p*p*3*D_v)
        forward only: no gradient flows into the frozen tower (x3 when it is trained).

Training = 3 x forward (backward costs twice the forward). Rematerialisation is not counted: this is
model FLOPs utilisation (MFU), not hardware FLOPs. Positions holding padding are counted (their FLOPs are
spent); the metric "tokens/s" counts all positions too, and "supervised tokens" only weighted ones.
"""

from __future__ import annotations

from aki_jax.config import AKIConfig

# Dense bf16 peak FLOP/s per chip (vendor figures) for MFU when no measurement is configured.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def decoder_matmul_params(config: AKIConfig) -> int:
    d = config.decoder
    per_layer = d.hidden_size * 3 * d.hidden_size + d.hidden_size * d.hidden_size
    per_layer += d.hidden_size * 2 * d.intermediate_size + d.intermediate_size * d.hidden_size
    heads = d.hidden_size * (config.initial_tokenizer_len + 2)
    return d.num_layers * per_layer + heads


def vision_forward_flops(config: AKIConfig) -> float:
    """FLOPs of the vision tower's forward for one image."""
    v = config.vision
    p, dv = v.num_patches, v.hidden_size
    per_layer = 2 * p * (4 * dv * dv + 2 * dv * v.intermediate_size) + 4 * p * p * dv
    patch = 2 * p * v.patch_size * v.patch_size * v.num_channels * dv
    return v.num_layers * per_layer + patch


def resampler_forward_flops(config: AKIConfig) -> float:
    """FLOPs of the resampler's forward for one image."""
    r, v = config.resampler, config.vision
    e, t, p, nh = v.hidden_size, r.num_latents, v.num_patches, r.num_heads * r.head_dim
    per_layer = 2 * t * e * nh + 2 * (p + t) * e * 2 * nh + 4 * t * (p + t) * nh + 2 * t * nh * e
    per_layer += 2 * 2 * t * e * r.ff_mult * e
    return r.depth * per_layer + 2 * t * e * config.decoder.hidden_size


def decoder_forward_flops(config: AKIConfig, length: int) -> float:
    """FLOPs of the decoder's forward for one row of `length` positions."""
    d = config.decoder
    return 2 * decoder_matmul_params(config) * length + d.num_layers * 4 * length * length * d.hidden_size


def train_step_flops(config: AKIConfig, batch: int, length: int, images_per_row: int) -> float:
    """Model FLOPs of one optimizer step over `batch` rows (all micro-batches together)."""
    vision_factor = 1 if config.freeze_vision else 3
    per_row = 3 * decoder_forward_flops(config, length)
    per_row += images_per_row * (3 * resampler_forward_flops(config) + vision_factor * vision_forward_flops(config))
    return float(batch * per_row)


def peak_flops_per_device(device) -> float | None:
    """Vendor peak for known accelerators, else None (measure it: `measure_matmul_peak`)."""
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops
    return None


def measure_matmul_peak(size: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
    """Best FLOP/s of a `size` x `size` matmul on the default device (whole machine on CPU)."""
    import time

    import jax

    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
