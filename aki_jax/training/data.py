"""What training reads, built from `TrainConfig.data`: a resumable batch iterator and held-out batches.

The sources themselves live in `aki_jax.data` (the data package); this module only adapts them to the
loop: per-process batches in the shared batch format, an iterator with `get_state()/set_state()`, and
held-out batches padded to whole eval batches (`valid` marks real rows).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import numpy as np

from aki_jax.config import AKIConfig
from aki_jax.training.synthetic import SyntheticBatches


@dataclasses.dataclass
class DataBundle:
    train: Iterator  # yields per-process batch dicts; has get_state() / set_state(state)
    eval_batches: list[dict]  # global batches with a bool "valid" row mask
    model_config: AKIConfig  # the configured model, with vocabulary sizes fitted to the tokenizer
    tokenizer_dir: str | None = None
    description: str = ""


def build_data(config) -> DataBundle:
    kind = config.data.kind
    if kind == "synthetic":
        return synthetic_data(config)
    if kind == "digits":
        from aki_jax.training.digits import digits_data

        return digits_data(config)
    raise ValueError(f"data.kind={kind!r}: known kinds are 'digits' and 'synthetic'")


def synthetic_data(config) -> DataBundle:
    d = config.data
    common = dict(seq_len=d.seq_len, images_per_row=d.images_per_row)
    train = SyntheticBatches(
        config.model, d.batch_size, seed=d.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), **common,
    )  # fmt: skip
    held_out = SyntheticBatches(config.model, d.eval_batch_size, seed=d.seed + 10_000, **common)
    n_batches = max(1, -(-d.eval_examples // d.eval_batch_size)) if d.eval_examples else 1
    evals = []
    for _ in range(n_batches):
        batch = next(held_out)
        batch["valid"] = np.ones(d.eval_batch_size, bool)
        evals.append(batch)
    return DataBundle(train, evals, config.model, None, f"synthetic (seed {d.seed})")


def pad_eval_batches(examples: list[dict], batch_size: int, seq_len: int, collate) -> list[dict]:
    """Fixed-size eval batches from processed examples; the last is filled with invisible rows (valid=False)."""
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        n_real = len(chunk)
        chunk = chunk + [chunk[0]] * (batch_size - n_real)
        batch = collate(chunk, seq_len)
        batch["valid"] = np.arange(batch_size) < n_real
        batches.append(batch)
    return batches
