"""One bf16 train step of an AKI-4B-shaped model (SigLIP-so400m, 144-latent resampler, Phi-3.5 decoder)
on synthetic SFT rows, with the MMA kernel ("auto") and MFU. Built for one accelerator.

  PYTHONPATH=$PWD python benchmarks/train_step_4b.py --layers 32 16 8 --batch 4 --length 2048

Random weights (no checkpoint), frozen vision tower, AdamW over the resampler and decoder, remat
"full". The first layer count in --layers that fits in memory is measured. Imports no data or training
modules (those need grain), so it runs on a machine with jax, flax and optax only.
MFU = model FLOPs / time / peak: 6 x trainable matmul parameters x tokens + 2 x vision parameters x
patches + 12 x layers x heads x head_dim x visible mask cells (attention forward 4 + backward 8).
Prints a table and one JSON line (also written to $OUT/train_step_4b.json when OUT is set).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import aki_jax
from aki_jax.losses import next_token_loss
from aki_jax.mask import IMAGE, PAD, QUERY, TEXT, attention_mask
from aki_jax.model import AKI, init_params

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v4": 275e12}


def synthetic_batch(config, batch: int, length: int, seed: int = 0) -> dict:
    """Packed SFT rows: [prefix, image (144 tokens), question (QUERY), answer] repeated, then padding."""
    rng = np.random.default_rng(seed)
    n_img = config.image_token_count
    modality = np.full((batch, length), PAD, np.int32)
    segment = np.zeros((batch, length), np.int32)
    images_per_row = []
    for r in range(batch):
        at, seg = 0, 0
        while True:
            ex = (
                [TEXT] * 16
                + [IMAGE] * n_img
                + [QUERY] * int(rng.integers(16, 64))
                + [TEXT] * int(rng.integers(64, 400))
            )
            if at + len(ex) > length:
                break
            modality[r, at : at + len(ex)], segment[r, at : at + len(ex)] = ex, seg
            at, seg = at + len(ex), seg + 1
        segment[r, at:] = seg
        images_per_row.append(seg)
    images = max(images_per_row)
    v = config.vision
    vocab = config.initial_tokenizer_len
    input_ids = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    input_ids[modality == IMAGE] = config.image_token_id
    targets = np.roll(input_ids, -1, axis=1)
    weights = (modality == TEXT).astype(np.float32)
    pixels = rng.uniform(-1, 1, (batch, images, v.image_size, v.image_size, 3)).astype(np.float32)
    positions = np.zeros((batch, length), np.int32)
    for r in range(batch):
        for s in np.unique(segment[r]):
            idx = np.nonzero(segment[r] == s)[0]
            positions[r, idx] = np.arange(len(idx))
    return dict(pixel_values=pixels, input_ids=input_ids, modality_ids=modality, segment_ids=segment,
                positions=positions, targets=targets, weights=weights)  # fmt: skip


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def model_flops(config, params, batch) -> float:
    dec = config.decoder
    b, length = batch["input_ids"].shape
    trainable = count(params["decoder"]) - dec.vocab_size * dec.hidden_size  # the embedding lookup is no matmul
    trainable += count(params["resampler"])
    patches = batch["pixel_values"].shape[0] * batch["pixel_values"].shape[1] * config.vision.num_patches
    cells = float(np.asarray(attention_mask(batch["modality_ids"], batch["segment_ids"])).sum())
    attn = 12 * dec.num_layers * dec.num_heads * dec.head_dim * cells
    return 6 * trainable * b * length + 2 * count(params["vision"]) * patches + attn


def make_step(config, optimizer):
    model = AKI(config)

    def loss_fn(trainable, frozen, batch):
        params = {**trainable, "vision": frozen}
        logits = model.apply(
            {"params": params},
            batch["pixel_values"],
            batch["input_ids"],
            batch["modality_ids"],
            batch["segment_ids"],
            batch["positions"],
        )
        return next_token_loss(logits, batch["targets"], batch["weights"])[0]

    @jax.jit
    def step(trainable, frozen, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def run(layers: int, args) -> dict:
    base = aki_jax.aki_4b() if args.preset == "aki_4b" else aki_jax.tiny()
    config = dataclasses.replace(
        base,
        decoder=dataclasses.replace(base.decoder, num_layers=layers),
        dtype="bfloat16",
        param_dtype="float32",
        remat="full",
        attention_impl=args.attention_impl,
    )
    params = init_params(config, jax.random.key(0))
    frozen = params.pop("vision")
    optimizer = optax.adamw(1e-5, weight_decay=0.1)
    opt_state = jax.jit(optimizer.init)(params)
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(config, args.batch, args.length).items()}
    step = make_step(config, optimizer)
    start = time.perf_counter()
    params, opt_state, loss = step(params, frozen, opt_state, batch)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        params, opt_state, loss = step(params, frozen, opt_state, batch)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    flops = model_flops(config, {**params, "vision": frozen}, batch)
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_BF16.items() if k in kind), None)
    return {
        "device": kind,
        "layers": layers,
        "batch": args.batch,
        "length": args.length,
        "attention_impl": args.attention_impl,
        "first_step_s": compile_s,
        "step_s": seconds,
        "tokens_per_s": args.batch * args.length / seconds,
        "model_tflops": flops / seconds / 1e12,
        "mfu": None if peak is None else flops / seconds / peak,
        "loss": float(loss),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[32, 16, 8], help="tried in order until one fits")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--attention-impl", default="auto")
    parser.add_argument("--preset", choices=["aki_4b", "tiny"], default="aki_4b", help="tiny: a CPU smoke run")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    result, errors = None, []
    for layers in args.layers:
        try:
            result = run(layers, args)
            break
        except Exception as e:  # noqa: BLE001 - out of memory: try fewer layers
            errors.append(f"{layers} layers: {type(e).__name__}: {str(e)[:300]}")
            print(errors[-1])
    if result is None:
        print(json.dumps({"error": errors}))
        return 1
    result["skipped"] = errors
    print(f"{'device':<24} {'layers':>6} {'B x L':>10} {'step s':>8} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6}")
    mfu = "n/a" if result["mfu"] is None else f"{result['mfu']:.1%}"
    shape = f"{args.batch:>4} x {args.length:<5}"
    print(f"{result['device']:<24} {result['layers']:>6} {shape} {result['step_s']:>8.3f}"
          f" {result['tokens_per_s']:>9.0f} {result['model_tflops']:>8.1f} {mfu:>6}")  # fmt: skip
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "train_step_4b.json").write_text(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
