"""Rows of fixed shape from processed examples: several examples per row (packing) or one (padding).

A row (numpy): input_ids, modality_ids, segment_ids, positions, targets int32[L], weights f32[L],
pixel_values f32[I, S, S, 3]. Example k of a row holds segment id k + 1 and positions 0..n_k - 1, so
`aki_jax.mask.attention_mask(modality_ids, segment_ids)` keeps attention (causal and MMA) inside each
example; its images fill the row's image slots in order, as the model fuses IMAGE positions in order.
Unused positions are PAD with segment id 0, weight 0; unused image slots are zeros.

Packing is next-fit: examples are appended in arrival order while the row has room for their tokens
and images; the first that does not fit starts the next row. No token is dropped or truncated (the
pipeline skips examples that could never fit before they get here).
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from aki_jax.mask import PAD

ROW_KEYS = ("input_ids", "modality_ids", "segment_ids", "positions", "targets", "weights", "pixel_values")


def make_row(examples: list[dict], length: int, images: int, image_shape: tuple, pad_id: int) -> dict:
    """Place examples one after another in a row of `length` tokens and `images` image slots."""
    row = {
        "input_ids": np.full(length, pad_id, np.int32),
        "modality_ids": np.full(length, PAD, np.int32),
        "segment_ids": np.zeros(length, np.int32),
        "positions": np.zeros(length, np.int32),
        "targets": np.full(length, pad_id, np.int32),
        "weights": np.zeros(length, np.float32),
        "pixel_values": np.zeros((images, *image_shape), np.float32),
    }
    start = 0
    image_start = 0
    for segment, example in enumerate(examples, start=1):
        n = len(example["input_ids"])
        k = len(example["pixel_values"])
        if start + n > length or image_start + k > images:
            raise ValueError(
                f"examples need {start + n} tokens / {image_start + k} images; row has {length} / {images}"
            )
        where = slice(start, start + n)
        for key in ("input_ids", "modality_ids", "targets", "weights"):
            row[key][where] = example[key]
        row["segment_ids"][where] = segment
        row["positions"][where] = np.arange(n, dtype=np.int32)
        row["pixel_values"][image_start : image_start + k] = example["pixel_values"]
        start += n
        image_start += k
    return row


def empty_row(length: int, images: int, image_shape: tuple, pad_id: int) -> dict:
    return make_row([], length, images, image_shape, pad_id)


class PackIterDataset(grain.IterDataset):
    """Packs (or, with `max_segments=1`, pads) a stream of processed examples into rows.

    Checkpointing: a row in progress holds one example fetched too early (the first that did not fit
    the previous row). The state therefore stores the parent's state from *before* that example was
    fetched; restoring re-reads it, and packing, being deterministic, continues with the same rows.
    """

    def __init__(self, parent, length: int, images: int, image_shape: tuple, pad_id: int, max_segments: int = 0):
        super().__init__(parent)
        self.length = length
        self.images = images
        self.image_shape = tuple(image_shape)
        self.pad_id = pad_id
        self.max_segments = max_segments or length

    def __iter__(self):
        return _PackIterator(self._parent.__iter__(), self)

    def __str__(self):
        return f"PackIterDataset(length={self.length}, images={self.images}, max_segments={self.max_segments})"


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent, spec: PackIterDataset):
        super().__init__(parent)
        self._spec = spec
        self._pending = None  # fetched, not yet placed
        self._pending_state = None  # parent state before fetching it

    def _fetch(self):
        if self._pending is None:
            state = self._parent.get_state()
            self._pending = next(self._parent)
            self._pending_state = state
        return self._pending

    def __next__(self):
        spec = self._spec
        row, tokens, images = [], 0, 0
        while len(row) < spec.max_segments:
            try:
                example = self._fetch()
            except StopIteration:
                if row:
                    break
                raise
            n, k = len(example["input_ids"]), len(example["pixel_values"])
            if tokens + n > spec.length or images + k > spec.images:
                if not row:
                    raise ValueError(
                        f"example of {n} tokens / {k} images can never fit a row of {spec.length} / {spec.images}"
                    )
                break
            row.append(example)
            tokens, images = tokens + n, images + k
            self._pending = None
        return make_row(row, spec.length, spec.images, spec.image_shape, spec.pad_id)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._pending_state if self._pending is not None else self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = None
        self._pending_state = None
