"""Data pipeline configuration: typed, frozen, JSON-friendly (embedded in the training config).

    DataConfig(sources=(SourceConfig("llava", "data/llava_v1_5_mix665k.json", image_root="data/images"),
                        SourceConfig("vqa", "data/vqa-{0..3}.jsonl", weight=0.5, template="short_answer")),
               seq_len=512, packing=True, batch_size=32)

`DataConfig.from_dict` (JSON, overrides) turns source dicts into SourceConfigs (`aki_jax.serialization`).
"""

from __future__ import annotations

import dataclasses

from aki_jax import serialization

SOURCE_KINDS = ("digits", "webdataset", "llava", "vqa", "tfds")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One dataset of the mixture.

    kind: one of SOURCE_KINDS.
    path: file pattern (braces and globs: `shards/{00000..01000}.tar`, `qa/*.jsonl`) for webdataset,
      llava and vqa; the dataset name (`name/config:version`) for tfds; unused for digits.
    weight: sampling weight; weights are normalised over the mixture.
    image_root: llava / vqa: the directory image file names are relative to.
    split: digits: "train" | "heldout"; tfds: the split (`train`, `train[:90%]`, ...).
    data_dir: tfds: where the prepared dataset lives (nothing is downloaded).
    features: tfds: role -> feature key, roles `image` + `question` + `answer` (+ `choices`) or `caption`;
      webdataset: {"caption": key} picks the caption's key in `.json` members (default: caption, text, txt).
    template: vqa / tfds question template: "plain", "short_answer", "multiple_choice" (aki_jax.data.templates).
    name: shown in statistics; defaults to "<kind>:<path>".
    """

    kind: str = "digits"
    path: str = ""
    weight: float = 1.0
    image_root: str = ""
    split: str = "train"
    data_dir: str = ""
    features: dict | None = None
    template: str = "plain"
    name: str = ""

    def __post_init__(self):
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"unknown data source kind {self.kind!r}; known: {SOURCE_KINDS}")
        if self.kind != "digits" and not self.path:
            raise ValueError(f"data source of kind {self.kind!r} needs a path")
        if not self.weight > 0:
            raise ValueError(
                f"data source {self.name or self.path or self.kind}: weight must be > 0, got {self.weight}"
            )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The input pipeline.

    sources: the training mixture.
    eval_sources: held-out data for `make_eval_iterator` (default: the digits held-out split).
    batch_size: global rows per step; each of P processes yields batch_size // P rows.
    seq_len: row length L; an example longer than L is skipped and counted ("too_long").
    packing: several examples per row (segment ids 1, 2, ...) instead of one padded example per row.
    packing_window: examples packed together (first-fit decreasing); larger fills rows better.
    images_per_row: image slots I per row (pixel_values f32[B, I, S, S, 3]); 0 picks 1 without packing and
      seq_len // image_token_count with packing. An example with more images than I is skipped.
    seed: shuffling seed (each source shuffles with its own seed derived from it, reshuffled each epoch).
    epochs: passes over each source; None repeats forever (training). With several sources the mixture
      ends when the first of them (relative to its weight) runs out.
    workers: grain worker processes decoding and tokenising (0: in the calling process).
    read_threads: threads reading and encoding records, per random-access source and worker.
    read_buffer: examples each of those sources keeps ready.
    shuffle_buffer: streaming webdataset: sample references are shuffled in windows of this many (the
      shard order is shuffled too); a window spanning many tiny shards re-indexes each, so keep it near
      the samples per shard or below.
    prefetch: batches kept ready by a background thread (0: none).
    max_bad_fraction: fail when more than this fraction of the records read were bad ...
    bad_check_after: ... once at least this many records were read (and at start for records skipped
      while indexing).
    digits_image_size: size the digits are drawn at (0: the model's image size).
    """

    sources: tuple[SourceConfig, ...] = (SourceConfig(),)
    eval_sources: tuple[SourceConfig, ...] = (SourceConfig(split="heldout"),)
    batch_size: int = 32
    seq_len: int = 64
    packing: bool = False
    packing_window: int = 32
    images_per_row: int = 0
    seed: int = 0
    epochs: int | None = None
    workers: int = 0
    read_threads: int = 2
    read_buffer: int = 16
    shuffle_buffer: int = 1000
    prefetch: int = 2
    max_bad_fraction: float = 0.05
    bad_check_after: int = 100
    digits_image_size: int = 0

    def __post_init__(self):
        for name in ("sources", "eval_sources"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(s, SourceConfig) for s in value):
                raise TypeError(
                    f"DataConfig.{name} must be a tuple of SourceConfig, got {value!r:.80} "
                    "(dicts from JSON: DataConfig.from_dict)"
                )
        if not self.sources:
            raise ValueError("DataConfig.sources is empty")
        for name in ("batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"DataConfig.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")

    def replace(self, **changes) -> DataConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return serialization.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DataConfig:
        return serialization.from_dict(cls, data)
