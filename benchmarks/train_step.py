"""Train-step throughput and MFU of a ~60M-parameter AKI at sequence 512, against this machine's matmul peak,
a PyTorch implementation of the same step, and the same step with plain causal attention.

  python benchmarks/train_step.py                 # CPU, float32 (the defaults)
  python benchmarks/train_step.py --steps 5 --batch 4 --dtype bfloat16

Measured in one process, alternating in each of --steps rounds (medians reported): the FLOP/s of a 2048^3
jitted matmul (the machine's ceiling for the dominant op), the JAX step (MMA), the JAX step (causal), the PyTorch
step (transformers' Phi-3 and SigLIP + a torch Perceiver resampler, `aki_jax/testing/torch_reference.py`, AdamW,
frozen vision tower). FLOPs are the model FLOPs of `aki_jax.training.flops` (same count for all three). Prints a
table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from aki_jax import sharding as S
from aki_jax.config import AKIConfig, DecoderConfig, ResamplerConfig, VisionConfig
from aki_jax.training import flops
from aki_jax.training.config import OptimizerConfig
from aki_jax.training.optimizer import learning_rate_schedule, make_optimizer
from aki_jax.training.state import count_params, init_state, state_shardings
from aki_jax.training.step import make_train_step
from aki_jax.training.synthetic import SyntheticBatches


def bench_config(dtype: str) -> AKIConfig:
    """~62M parameters: SigLIP-like 112px/14 (64 patches) x4 layers, resampler 64 latents x2, Phi-3-like 8x640."""
    return AKIConfig(
        vision=VisionConfig(image_size=112, patch_size=14, hidden_size=384, intermediate_size=1536, num_layers=4,
                            num_heads=6),
        resampler=ResamplerConfig(num_latents=64, depth=2),
        decoder=DecoderConfig(vocab_size=8192, hidden_size=640, intermediate_size=1792, num_layers=8, num_heads=10,
                              max_position_embeddings=4096, rope_scaling=None),
        initial_tokenizer_len=8190,
        pad_token_id=8189,
        dtype=dtype,
    )  # fmt: skip


def time_interleaved(runs: dict, rounds: int) -> dict:
    """Median seconds per named call over `rounds` rounds, after one warm-up (compile) call of each.

    The calls alternate within each round (A B C A B C ...), so a change of machine load during the run hits all
    of them alike and the ratios between them stay meaningful on a shared machine.
    """
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def jax_step_fn(config: AKIConfig, batch: dict):
    """One JAX train step (state kept inside) as a closure that blocks until the step is done."""
    mesh_config = S.MeshConfig(data=1)
    mesh = S.make_mesh(mesh_config, jax.devices()[:1])
    rules = S.logical_rules(mesh_config)
    optim = OptimizerConfig(lr=1e-4, warmup_steps=0, total_steps=100)
    optimizer = make_optimizer(optim)
    _, shardings = state_shardings(config, optimizer, mesh, rules)
    state = {"s": jax.jit(lambda: init_state(config, optimizer, 0), out_shardings=shardings)()}
    batch_shardings = {k: S.batch_sharding(mesh, rules, v.ndim) for k, v in batch.items()}
    step = make_train_step(config, optimizer, learning_rate_schedule(optim), 1, shardings, batch_shardings)
    device_batch = S.make_global_batch(batch, mesh, rules)

    def run_one():
        with S.activation_context(mesh, rules):
            state["s"], metrics = step(state["s"], device_batch)
        jax.block_until_ready(metrics)

    return run_one


def torch_step_fn(config: AKIConfig, batch: dict):
    """One PyTorch train step of the same model as a closure (shared with benchmarks/profile_step.py)."""
    import torch
    import torch.nn.functional as F

    from aki_jax.testing.torch_reference import AKIReference, modality_mask

    ref = AKIReference(config)
    for p in ref.vision_encoder.parameters():
        p.requires_grad_(False)
    trainable = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
    b = batch["input_ids"].shape[0]
    pixels = torch.as_tensor(batch["pixel_values"]).permute(0, 1, 4, 2, 3).flatten(0, 1).contiguous()
    is_image = torch.as_tensor(batch["modality_ids"] == 2)
    ids = torch.where(is_image, 0, torch.as_tensor(batch["input_ids"], dtype=torch.long))
    order = (torch.cumsum(is_image.long(), 1) - 1).clamp(min=0)
    mask = torch.as_tensor(np.asarray(modality_mask(batch["modality_ids"])))
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)[:, None]
    positions = torch.as_tensor(batch["positions"], dtype=torch.long)
    targets = torch.as_tensor(batch["targets"], dtype=torch.long)
    weights = torch.as_tensor(batch["weights"])

    def run_one():
        with torch.no_grad():
            features = ref.vision_encoder(pixel_values=pixels).last_hidden_state
        tokens = ref.vision_tokenizer(features).reshape(b, -1, config.decoder.hidden_size)
        embeds = ref.lang_model.model.embed_tokens(ids)
        gathered = torch.gather(
            tokens, 1, order[..., None].expand(-1, -1, tokens.shape[-1]).clamp(max=tokens.shape[1] - 1)
        )
        embeds = torch.where(is_image[..., None], gathered, embeds)
        logits = ref.lang_model(
            inputs_embeds=embeds, attention_mask=additive, position_ids=positions, use_cache=False
        ).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        loss = (loss * weights.flatten()).sum() / weights.sum()
        loss.backward()
        with torch.profiler.record_function("optimizer: clip + AdamW"):
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
        opt.zero_grad(set_to_none=True)

    ref.train()
    return run_one


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-causal", action="store_true", help="leave out the plain-causal JAX step")
    args = parser.parse_args()

    config = bench_config(args.dtype)
    batch = next(SyntheticBatches(config, args.batch, args.seq, images_per_row=1, seed=0))
    batch.pop("example_ids")
    from aki_jax.model import abstract_params

    n_params = count_params(abstract_params(config)[0])
    step_flops = flops.train_step_flops(config, args.batch, args.seq, 1)
    tokens = args.batch * args.seq

    # The peak is timed in each round too (seconds of one 2048^3 matmul), beside the steps it divides.
    peak_size = 2048
    peak_a = jax.random.normal(jax.random.key(0), (peak_size, peak_size), args.dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    runs = {"peak": lambda: matmul(peak_a, peak_a).block_until_ready(), "jax mma": jax_step_fn(config, batch)}
    if not args.skip_causal:
        runs["jax causal"] = jax_step_fn(config.replace(attention="causal"), batch)
    if not args.skip_torch:
        import torch

        torch.manual_seed(0)
        runs["torch mma"] = torch_step_fn(config, batch)
    rows = time_interleaved(runs, args.steps)
    peak = 2 * peak_size**3 / rows.pop("peak")

    device = jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    print(f"\nAKI train step, {n_params / 1e6:.1f}M params, batch {args.batch} x {args.seq}, {args.dtype}, ", end="")
    print(f"{device.platform} ({kind}), model FLOPs/step {step_flops / 1e12:.3f} T")
    print(f"measured matmul peak: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'step':<12} {'s/step':>8} {'tokens/s':>10} {'GFLOP/s':>9} {'% of peak':>10}")
    result = {"params_m": round(n_params / 1e6, 2), "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
              "peak_gflops": round(peak / 1e9, 2), "step_tflop": round(step_flops / 1e12, 4)}  # fmt: skip
    for name, seconds in rows.items():
        rate = step_flops / seconds
        print(f"{name:<12} {seconds:>8.3f} {tokens / seconds:>10.0f} {rate / 1e9:>9.1f} {100 * rate / peak:>9.1f}%")
        key = name.replace(" ", "_")
        result[f"{key}_s"] = round(seconds, 4)
        result[f"{key}_tokens_per_s"] = round(tokens / seconds, 1)
        result[f"{key}_mfu_vs_matmul_peak"] = round(rate / peak, 4)
    if "torch mma" in rows:
        result["speedup_vs_torch"] = round(rows["torch mma"] / rows["jax mma"], 3)
        print(f"JAX / PyTorch speed-up: {result['speedup_vs_torch']:.2f}x")
    if "jax causal" in rows:
        result["mma_cost_vs_causal"] = round(rows["jax mma"] / rows["jax causal"], 3)
        print(f"MMA / causal step time: {result['mma_cost_vs_causal']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
