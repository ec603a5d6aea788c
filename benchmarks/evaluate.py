"""Likelihood evaluation throughput: all candidates in one shared-prefix row vs one full row per candidate.

  python benchmarks/evaluate.py                       # 16 MMBench-like items x 4 candidates, batch 8 rows
  python benchmarks/evaluate.py --items 32 --candidates 2 --continuation option

Both methods run the same model (the ~62M-parameter config of benchmarks/train_step.py, float32) on the
same items, in one process, with the same number of rows per model call (`--batch`): the shared-prefix
path of `aki_jax.evaluation.scoring` (what `tools/evaluate.py` runs) and the per-candidate path it
replaced (each candidate's SFT encoding as its own row, as `tests/test_eval_model.py` computes it).
Each is timed after a warm-up pass that compiles it. Also reports the largest score difference between
the two. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from train_step import bench_config

from aki_jax import AKI, init_params
from aki_jax.data import digits_tokenizer
from aki_jax.evaluation import prompts
from aki_jax.evaluation.items import Item
from aki_jax.evaluation.scoring import ModelRunner, shared_prefix_row
from aki_jax.processing import Processor
from aki_jax.training.data import fit_vocabulary

WORDS = "a cat dog cup man digit seven three zero one shown in the picture drawn with black ink on white".split()


def make_items(n: int, candidates: int, rng) -> list[Item]:
    letters = "ABCDEFGH"[:candidates]
    items = []
    for i in range(n):
        question = " ".join(rng.choice(WORDS, size=int(rng.integers(10, 40)))) + "?"
        options = tuple((k, " ".join(rng.choice(WORDS, size=int(rng.integers(2, 8))))) for k in letters)
        items.append(
            Item(index=i, task="multiple_choice", question=question, image=None, answers=("A",), options=options)
        )
    return items


@functools.partial(jax.jit, static_argnames=("model",))
def per_candidate_scores(params, batch, *, model):
    """One full row per candidate -> sum of log p(target) over its supervised positions f32[B]."""
    logits = model.apply({"params": params}, batch["pixel_values"], batch["input_ids"], batch["modality_ids"]).astype(
        jnp.float32
    )
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    return ((picked - log_z) * batch["weights"]).sum(-1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="rows per model call (both methods)")
    parser.add_argument("--continuation", default="letter", choices=["letter", "option"])
    parser.add_argument("--length-multiple", type=int, default=64)
    args = parser.parse_args()

    tokenizer = digits_tokenizer()
    config = fit_vocabulary(bench_config("float32"), tokenizer)
    model = AKI(config)
    params = init_params(config, jax.random.key(0))
    processor = Processor.from_config(config, tokenizer)
    rng = np.random.default_rng(0)
    items = make_items(args.items, args.candidates, rng)
    pixels = rng.uniform(-1, 1, (1, config.vision.image_size, config.vision.image_size, 3)).astype(np.float32)

    per_item = []
    for item in items:
        user = {"role": "user", "content": "<image>\n" + prompts.user_prompt(item)}  # as an item with an image
        per_item.append(
            [
                processor.sft_example([user, {"role": "assistant", "content": text}], pixel_values=pixels)
                for _, text in prompts.candidate_answers(item, args.continuation)
            ]
        )
    shared_rows = [shared_prefix_row(examples) for examples in per_item]
    candidate_rows = [e for examples in per_item for e in examples]
    longest = max(len(e["input_ids"]) for e in candidate_rows)
    length = math.ceil(longest / args.length_multiple) * args.length_multiple

    runner = ModelRunner(model, params, processor, rows_per_step=args.batch, length_multiple=args.length_multiple)

    def run_shared():
        out = []
        for i in range(0, len(shared_rows), args.batch):
            out += [np.asarray(s) for s in runner.log_likelihoods(shared_rows[i : i + args.batch])]
        return out

    def run_per_candidate():
        out = []
        for i in range(0, len(candidate_rows), args.batch):
            chunk = candidate_rows[i : i + args.batch]
            filler = chunk[-1:] * (args.batch - len(chunk))
            batch = processor.collate(chunk + filler, length, max_images=1)
            keys = ("pixel_values", "input_ids", "modality_ids", "targets", "weights")
            scores = per_candidate_scores(params, {k: jnp.asarray(batch[k]) for k in keys}, model=model)
            out += list(np.asarray(scores)[: len(chunk)])
        return out

    timings, results = {}, {}
    for name, fn in (("per-candidate rows", run_per_candidate), ("shared prefix", run_shared)):
        fn()  # compile
        start = time.perf_counter()
        results[name] = fn()
        timings[name] = time.perf_counter() - start

    flat_shared = np.concatenate(results["shared prefix"])
    max_diff = float(np.abs(flat_shared - np.asarray(results["per-candidate rows"])).max())
    shared_tokens = sum(args.batch * math.ceil(max(len(r["input_ids"]) for r in shared_rows[i : i + args.batch])
                                               / args.length_multiple) * args.length_multiple
                        for i in range(0, len(shared_rows), args.batch))  # fmt: skip
    per_tokens = math.ceil(len(candidate_rows) / args.batch) * args.batch * length

    device = jax.devices()[0]
    print(f"\nlikelihood scoring, {len(items)} items x {args.candidates} candidates ({args.continuation}), "
          f"{args.batch} rows per call, {device.platform} ({getattr(device, 'device_kind', '')})")  # fmt: skip
    print(f"{'method':<20} {'seconds':>8} {'items/s':>8} {'calls':>6} {'padded tokens':>14}")
    calls = {"per-candidate rows": -(-len(candidate_rows) // args.batch), "shared prefix": -(-len(items) // args.batch)}
    tokens = {"per-candidate rows": per_tokens, "shared prefix": shared_tokens}
    for name, seconds in timings.items():
        print(f"{name:<20} {seconds:>8.2f} {len(items) / seconds:>8.2f} {calls[name]:>6} {tokens[name]:>14}")
    speedup = timings["per-candidate rows"] / timings["shared prefix"]
    print(f"shared prefix / per-candidate speed-up: {speedup:.2f}x; largest score difference {max_diff:.2e}")
    print(
        json.dumps(
            {
                "items": len(items),
                "candidates": args.candidates,
                "continuation": args.continuation,
                "batch": args.batch,
                "per_candidate_s": round(timings["per-candidate rows"], 3),
                "shared_prefix_s": round(timings["shared prefix"], 3),
                "speedup": round(speedup, 3),
                "max_score_diff": max_diff,
            }
        )
    )


if __name__ == "__main__":
    main()
