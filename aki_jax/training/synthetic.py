"""Deterministic synthetic batches in the shared batch format, with example ids and a resumable state.

For tests, benchmarks and smoke runs: example `i` is generated from `(seed, i)` alone, so any process can
produce any slice of any step, and the iterator state is just the next step index. Each row holds
`images_per_row` random images followed by a token sequence whose next token is a fixed function of the
current one (learnable), supervised on every text position.
"""

from __future__ import annotations

import numpy as np

from aki_jax.config import AKIConfig
from aki_jax.mask import IMAGE, TEXT


class SyntheticBatches:
    """Iterator of per-process batches: dict of numpy arrays plus "example_ids" int64[B_local].

    Step s holds global examples [s * batch_size, (s + 1) * batch_size); process p of P takes the p-th
    contiguous block of rows (matching `jax.make_array_from_process_local_data`).
    """

    def __init__(
        self,
        config: AKIConfig,
        batch_size: int,
        seq_len: int,
        images_per_row: int = 1,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if batch_size % process_count:
            raise ValueError(f"data.batch_size={batch_size} is not divisible by {process_count} processes")
        image_len = images_per_row * config.image_token_count
        if seq_len <= image_len + 1:
            raise ValueError(f"data.seq_len={seq_len} leaves no text after {image_len} image tokens")
        self.config, self.batch_size, self.seq_len = config, batch_size, seq_len
        self.images, self.seed = images_per_row, seed
        self.local = batch_size // process_count
        self.offset = process_index * self.local
        self.step = 0

    def example(self, index: int) -> dict:
        """One padded row for global example `index`."""
        c = self.config
        rng = np.random.default_rng([self.seed, index])
        size = c.vision.image_size
        pixels = rng.uniform(-1, 1, (self.images, size, size, c.vision.num_channels)).astype(np.float32)
        n_image = self.images * c.image_token_count
        n_text = int(rng.integers((self.seq_len - n_image) // 2, self.seq_len - n_image + 1))
        vocab = min(c.initial_tokenizer_len, 64)
        text = np.empty(n_text + 1, np.int64)
        text[0] = rng.integers(vocab)
        for t in range(1, n_text + 1):  # a learnable rule: next = 3 * current + 1 mod vocab
            text[t] = (3 * text[t - 1] + 1) % vocab
        length = n_image + n_text
        row = {
            "input_ids": np.zeros(self.seq_len, np.int32),
            "modality_ids": np.zeros(self.seq_len, np.int32),
            "segment_ids": np.zeros(self.seq_len, np.int32),
            "positions": np.zeros(self.seq_len, np.int32),
            "targets": np.zeros(self.seq_len, np.int32),
            "weights": np.zeros(self.seq_len, np.float32),
        }
        row["input_ids"][:n_image] = c.image_token_id
        row["input_ids"][n_image:length] = text[:-1]
        row["modality_ids"][:n_image] = IMAGE
        row["modality_ids"][n_image:length] = TEXT
        row["segment_ids"][:length] = 1
        row["positions"][:length] = np.arange(length)
        row["targets"][n_image:length] = text[1:]
        row["weights"][n_image:length] = 1.0
        row["pixel_values"] = pixels
        return row

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        start = self.step * self.batch_size + self.offset
        ids = np.arange(start, start + self.local, dtype=np.int64)
        rows = [self.example(int(i)) for i in ids]
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        batch["example_ids"] = ids
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])
