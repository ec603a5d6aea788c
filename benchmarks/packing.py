"""Our packer (`aki_jax.data.packing.PackIterDataset`) against grain's `FirstFitPackIterDataset`.

    python benchmarks/packing.py [--examples 4000] [--seq-len 512] [--window 32] [--image-size 32]

Both pack the same stream of processed SFT-like examples (each: 144 image tokens + 20..300 text tokens
with one image, or 20..300 text tokens and no image, 1 in 5) into rows of seq_len tokens and
seq_len // 144 image slots, with the same window / bin count. Reported per packer: rows made, fill rate
(real tokens / row tokens) and examples/s of the packing stage alone (the examples are built before
timing). grain's packer is fed the same features plus `pixel_values` with the image count as its length,
so both respect the image-slot limit; its segment ids and positions come out per feature
(`input_ids_segment_ids`, ...) and are not converted to our row layout (that would only add to its time).
`--image-size` is small by default so that the copy of pixels does not hide the packing itself.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import grain
import numpy as np

from aki_jax.data.packing import PackIterDataset
from aki_jax.mask import IMAGE, TEXT

IMAGE_TOKENS = 144


def make_examples(count: int, image_size: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        text = int(rng.integers(20, 300))
        images = 0 if rng.random() < 0.2 else 1
        n = text + IMAGE_TOKENS * images
        modality = np.full(n, TEXT, np.int32)
        modality[: IMAGE_TOKENS * images] = IMAGE
        out.append(
            {
                "input_ids": rng.integers(1, 1000, n).astype(np.int32),
                "modality_ids": modality,
                "targets": rng.integers(1, 1000, n).astype(np.int32),
                "weights": (rng.random(n) < 0.3).astype(np.float32),
                "pixel_values": np.zeros((images, image_size, image_size, 3), np.float32),
            }
        )
    return out


def run_ours(examples, length: int, images: int, window: int, image_size: int):
    parent = grain.MapDataset.source(examples).to_iter_dataset()
    packed = PackIterDataset(parent, length, images, (image_size, image_size, 3), pad_id=0, window=window)
    start = time.perf_counter()
    rows = list(packed)
    seconds = time.perf_counter() - start
    real = sum(int((r["segment_ids"] > 0).sum()) for r in rows)
    return len(rows), real, seconds


def run_grain(examples, length: int, images: int, window: int):
    parent = grain.MapDataset.source(examples).to_iter_dataset()
    lengths = {
        "input_ids": length,
        "modality_ids": length,
        "targets": length,
        "weights": length,
        "pixel_values": images,
    }
    packed = grain.experimental.FirstFitPackIterDataset(
        parent, length_struct=lengths, num_packing_bins=window, shuffle_bins=False
    )
    start = time.perf_counter()
    rows = list(packed)
    seconds = time.perf_counter() - start
    real = sum(int((r["input_ids_segment_ids"] > 0).sum()) for r in rows)
    return len(rows), real, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--window", type=int, default=32, help="our window = grain's num_packing_bins")
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()
    images = args.seq_len // IMAGE_TOKENS
    examples = make_examples(args.examples, args.image_size)
    tokens = sum(len(e["input_ids"]) for e in examples)
    results = {}
    for name, run in (
        ("aki_jax PackIterDataset (FFD per window)", lambda: run_ours(examples, args.seq_len, images, args.window,
                                                                      args.image_size)),
        ("grain FirstFitPackIterDataset", lambda: run_grain(examples, args.seq_len, images, args.window)),
    ):  # fmt: skip
        rows, real, seconds = run()
        assert real == tokens, f"{name}: packed {real} of {tokens} tokens"
        results[name] = {
            "rows": rows,
            "fill_rate": real / (rows * args.seq_len),
            "examples_per_s": len(examples) / seconds,
        }
    print(f"{len(examples)} examples, {tokens} tokens, rows of {args.seq_len} tokens / {images} images, "
          f"window {args.window}")  # fmt: skip
    print(f"{'packer':44s} {'rows':>6s} {'fill':>7s} {'examples/s':>11s}")
    for name, r in results.items():
        print(f"{name:44s} {r['rows']:6d} {r['fill_rate']:7.1%} {r['examples_per_s']:11.0f}")
    print(json.dumps({"benchmark": "packing", "args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
