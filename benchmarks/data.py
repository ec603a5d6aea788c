"""Input pipeline throughput against what a train step consumes.

    python benchmarks/data.py [--workers 2] [--seq-len 512] [--image-size 384] [--seconds 30]

Measures examples/s of the SFT pipeline (LLaVA-format JSON, JPEG photos of 640x480 decoded, resized to
384 with antialiasing, normalised; multi-turn chat template; tokenised; packed into rows of seq_len with
aki-4b's 144 image tokens per image) on this machine's CPUs, and compares it with the examples/s one
accelerator's train step would consume:

    consumed examples/s = peak FLOP/s * MFU / (model FLOPs per row / examples per row)

with model FLOPs per row from `aki_jax.training.flops.train_step_flops(aki_4b(), 1, seq_len, I)` (the
frozen vision tower forward only, resampler and decoder forward + backward; padding and empty image
slots count since their FLOPs are spent) and examples per row as measured. Assumed accelerator: one
NVIDIA H100 (989 TFLOP/s dense bf16) at 40% MFU; change with --peak-tflops / --mfu.
A ratio above 1 means the pipeline keeps up. Also reported: the CPU time one example costs in a single
process (its inverse times the cores bounds what they can deliver) and the load average, since other
work on the same cores lowers the measured rate. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import skimage.data
from PIL import Image

WORDS = (
    "the a of in on with what where which color shape picture image person people table street man woman "
    "dog cat car sign left right behind front two three many small large red blue green white black wearing "
    "holding sitting standing near under above is are there this that it does how why describe detail"
).split()
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "hubble_deep_field", "retina")


def sentence(rng, low, high) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(low, high)))).capitalize()


def write_sft_data(directory: str, records: int, seed: int = 0) -> tuple[str, str, list[str]]:
    """LLaVA-format JSON of multi-turn chats over 640x480 JPEG photos; returns (json path, image root, texts)."""
    rng = np.random.default_rng(seed)
    root = os.path.join(directory, "images")
    os.makedirs(root, exist_ok=True)
    for i, name in enumerate(PHOTOS):
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((640, 480))
        photo.save(os.path.join(root, f"{i}.jpg"), quality=90)
    data, texts = [], []
    for r in range(records):
        turns = []
        for t in range(int(rng.integers(1, 4))):
            question, answer = sentence(rng, 6, 20) + "?", sentence(rng, 4, 40) + "."
            turns += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + question},
                      {"from": "gpt", "value": answer}]  # fmt: skip
            texts += [question, answer]
        data.append({"id": str(r), "image": f"{r % len(PHOTOS)}.jpg", "conversations": turns})
    path = os.path.join(directory, "sft.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path, root, texts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--records", type=int, default=4000)
    parser.add_argument("--seconds", type=float, default=30.0, help="measure for about this long after warm-up")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator dense bf16 peak (H100)")
    parser.add_argument("--mfu", type=float, default=0.4)
    args = parser.parse_args()

    import aki_jax
    from aki_jax.data import DataConfig, SourceConfig, make_train_iterator
    from aki_jax.processing import SYSTEM_MESSAGE, Processor, train_tokenizer
    from aki_jax.training.flops import train_step_flops

    model = aki_jax.aki_4b()
    with tempfile.TemporaryDirectory() as tmp:
        path, root, texts = write_sft_data(tmp, args.records)
        tokenizer = train_tokenizer(texts + [SYSTEM_MESSAGE] * 100, 2000)  # the template as words, like Phi-3.5's
        processor = Processor(tokenizer, model.image_token_count, args.image_size)
        data = DataConfig(
            sources=(SourceConfig("llava", path, image_root=root),),
            seq_len=args.seq_len,
            packing=True,
            batch_size=args.batch_size,
            workers=args.workers,
            prefetch=2,
        )
        # CPU cost of one example in this process (decode, resize, normalise, template, tokenise), no workers
        from aki_jax.data.pipeline import Encode
        from aki_jax.data.sources import LlavaSource

        source, encode = LlavaSource(path, root), Encode(processor, args.seq_len, 3)
        start = time.perf_counter()
        for i in range(100):
            encode(source[i])
        encode_ms = (time.perf_counter() - start) * 10
        load = os.getloadavg()[0]

        it = make_train_iterator(data, processor, model, process_index=0, process_count=1)
        start = time.perf_counter()
        batch = next(it)
        first = time.perf_counter() - start
        images_per_row = batch["pixel_values"].shape[1]
        rows = examples = tokens = images = 0
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            batch = next(it)
            rows += len(batch["segment_ids"])
            examples += int(sum(len(np.unique(r[r > 0])) for r in batch["segment_ids"]))
            tokens += int((batch["segment_ids"] > 0).sum())
            images += int((batch["modality_ids"] == aki_jax.IMAGE).sum()) // model.image_token_count
        elapsed = time.perf_counter() - start
        it.close()

    produced = examples / elapsed
    per_row = examples / rows
    flops_per_row = train_step_flops(model, 1, args.seq_len, images_per_row)
    consumed = args.peak_tflops * 1e12 * args.mfu / flops_per_row * per_row
    result = {
        "benchmark": "data_sft_pipeline",
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "image_size": args.image_size,
        "seq_len": args.seq_len,
        "images_per_row": images_per_row,
        "examples_per_row": round(per_row, 3),
        "fill": round(tokens / (rows * args.seq_len), 3),
        "load_average_1min": round(load, 2),
        "encode_ms_per_example_1_process": round(encode_ms, 2),
        "first_batch_s": round(first, 2),
        "pipeline_examples_per_s": round(produced, 2),
        "train_tflop_per_row": round(flops_per_row / 1e12, 2),
        "assumed_peak_tflops": args.peak_tflops,
        "assumed_mfu": args.mfu,
        "train_examples_per_s": round(consumed, 2),
        "ratio": round(produced / consumed, 3),
    }
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
