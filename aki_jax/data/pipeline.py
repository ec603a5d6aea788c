"""The training and evaluation input pipelines, built on grain.

    per source: records p, p+P, ... (shards p, p+P, ... for webdataset) -> shuffle(seed), repeat
                -> decode images, chat template, tokenise, check size (Encode)   one grain IterDataset each
    mix(weights) -> mp_prefetch(workers) -> count and drop bad records (BadRecordCounter)
    -> pack or pad into rows (PackIterDataset) -> batch -> background prefetch

Everything is deterministic given the config and the process index, and the iterator's state (a small
JSON-serialisable dict, `DataIterator.get_state`) restores the exact position, bad-record counts included.
"""

from __future__ import annotations

import collections
import json
import logging
import math
from typing import Any

import grain
import numpy as np

from aki_jax.data import records
from aki_jax.data.config import DataConfig, SourceConfig
from aki_jax.data.digits import DigitsSource
from aki_jax.data.packing import PackIterDataset, empty_row
from aki_jax.data.records import Bad
from aki_jax.data.shuffle import WindowShuffleIterDataset
from aki_jax.data.sources import (
    CAPTION_KEYS,
    LlavaSource,
    TfdsSource,
    VqaJsonlSource,
    WebDatasetShards,
    WebDatasetSource,
)

log = logging.getLogger(__name__)
_LOGGED_BAD = 20  # bad records logged one by one per iterator; the rest only counted


class BadDataError(RuntimeError):
    """Too large a fraction of the data was unusable."""


def build_source(source: SourceConfig, image_size: int, streaming: bool = False, digits_task: str = "pairs"):
    """SourceConfig -> a source (fails here, at start, on missing files or bad settings).

    All kinds are random-access sources; with `streaming`, webdataset shards are instead read shard by
    shard (`WebDatasetShards`), so that no index over all shards is built at start.
    """
    if source.kind == "digits":
        return DigitsSource(source.split, image_size, name=source.name, task=digits_task)
    if source.kind == "webdataset":
        keys = (source.features or {}).get("caption")
        reader = WebDatasetShards if streaming else WebDatasetSource
        return reader(source.path, name=source.name, caption_keys=(keys,) if keys else CAPTION_KEYS)
    if source.kind == "llava":
        return LlavaSource(source.path, source.image_root, name=source.name)
    if source.kind == "vqa":
        return VqaJsonlSource(source.path, source.image_root, name=source.name, template=source.template)
    if source.kind == "tfds":
        return TfdsSource(source.path, source.split, source.data_dir, source.features, source.name, source.template)
    raise ValueError(f"unknown data source kind {source.kind!r}")  # SourceConfig already checks; kept for callers


def _check_index_bad(sources, max_bad_fraction: float) -> None:
    for source in sources:
        if isinstance(source, WebDatasetShards):
            continue  # counted as the stream reaches each shard
        bad = sum(source.index_bad.values())
        if bad:
            log.warning("%s: skipped %d records while indexing: %s; e.g. %s", source.name, bad,
                        dict(source.index_bad), source.index_bad_examples)  # fmt: skip
        total = bad + len(source)
        if total == 0 or len(source) == 0:
            raise BadDataError(f"{source.name}: no usable records (skipped while indexing: {dict(source.index_bad)})")
        if bad / total > max_bad_fraction:
            raise BadDataError(
                f"{source.name}: {bad} of {total} records are bad ({dict(source.index_bad)}), more than "
                f"max_bad_fraction={max_bad_fraction}; e.g. {source.index_bad_examples}"
            )


class Encode:
    """Raw example -> processed example (or Bad): decode images, apply the chat template, check the size.

    Runs in the worker processes; holds only the (picklable) processor and limits.
    """

    def __init__(self, processor, seq_len: int, images_per_row: int):
        self.processor = processor
        self.seq_len = seq_len
        self.images_per_row = images_per_row

    def __call__(self, raw):
        if isinstance(raw, Bad):
            return raw
        if len(raw["images"]) > self.images_per_row:
            return Bad("too_many_images", raw["source"], raw["id"], f"{len(raw['images'])} > {self.images_per_row}")
        raw = records.decode_images(raw)
        if isinstance(raw, Bad):
            return raw
        try:
            if raw["task"] == "caption":
                example = self.processor.caption_example(raw["caption"], raw["images"])
            else:
                example = self.processor.sft_example(raw["conversation"], raw["images"])
        except (ValueError, KeyError) as e:
            return Bad("bad_example", raw["source"], raw["id"], str(e)[:300])
        n = len(example["input_ids"])
        if n > self.seq_len:
            return Bad("too_long", raw["source"], raw["id"], f"{n} tokens > seq_len {self.seq_len}")
        return example


class BadRecordCounter(grain.IterDataset):
    """Drops Bad records, counting them per "source/reason"; raises BadDataError past the threshold."""

    def __init__(self, parent, max_bad_fraction: float, check_after: int):
        super().__init__(parent)
        self.max_bad_fraction = max_bad_fraction
        self.check_after = check_after
        self.last_iterator = None

    def __iter__(self):
        self.last_iterator = _BadRecordIterator(self._parent.__iter__(), self)
        return self.last_iterator


class _BadRecordIterator(grain.DatasetIterator):
    def __init__(self, parent, spec: BadRecordCounter):
        super().__init__(parent)
        self._spec = spec
        self.seen = 0
        self.bad = collections.Counter()
        self.recent = collections.deque(maxlen=10)

    def __next__(self):
        while True:
            element = next(self._parent)
            self.seen += 1
            if not isinstance(element, Bad):
                return element
            self.bad[f"{element.source}/{element.reason}"] += 1
            self.recent.append(str(element))
            if sum(self.bad.values()) <= _LOGGED_BAD:
                log.warning("skipped bad record: %s", element)
            self._check()

    def _check(self):
        total_bad = sum(self.bad.values())
        if self.seen >= self._spec.check_after and total_bad / self.seen > self._spec.max_bad_fraction:
            raise BadDataError(
                f"{total_bad} of {self.seen} records read were bad ({dict(self.bad)}), more than "
                f"max_bad_fraction={self._spec.max_bad_fraction}; latest: {list(self.recent)}"
            )

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "seen": self.seen, "bad": dict(self.bad)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.seen = state["seen"]
        self.bad = collections.Counter(state["bad"])


class DataIterator:
    """Batches (dicts of numpy arrays, the contract's batch format) with a checkpointable position.

    `get_state()` -> JSON-serialisable dict; `set_state(state)` continues exactly after the batch that
    was last returned when the state was taken. `stats()` counts the records read and skipped (records
    read ahead by the prefetch thread included). Call `close()` to stop worker processes.
    """

    def __init__(self, dataset, counter: BadRecordCounter, sources, per_process_batch: int):
        self._dataset = dataset
        self._iterator = dataset.__iter__()
        self._counter = counter
        self.sources = sources
        self.batch_size = per_process_batch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._iterator)

    def get_state(self) -> dict:
        return _jsonable(self._iterator.get_state())

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state)

    def stats(self) -> dict:
        it = self._counter.last_iterator
        index_bad = {f"{s.name}/{reason}": n for s in self.sources for reason, n in s.index_bad.items()}
        return {
            "records_read": it.seen if it else 0,
            "bad": dict(it.bad) if it else {},
            "bad_while_indexing": index_bad,
            "records_available": {s.name: None if isinstance(s, WebDatasetShards) else len(s) for s in self.sources},
        }

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def _jsonable(state):
    """grain states are plain containers; make sure they survive a JSON round trip unchanged."""
    text = json.dumps(state)
    return json.loads(text)


def _process(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def _images_per_row(config: DataConfig, image_token_count: int) -> int:
    if config.images_per_row:
        return config.images_per_row
    if not config.packing:
        return 1
    return max(1, config.seq_len // image_token_count)


def _image_size(processor) -> int:
    return int(processor.image_size)


def _per_process_batch(batch_size: int, process_count: int) -> int:
    if batch_size % process_count:
        raise ValueError(f"DataConfig.batch_size {batch_size} is not divisible by the {process_count} processes")
    return batch_size // process_count


def _read_options(config: DataConfig) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.read_buffer)


def make_train_iterator(
    config: DataConfig,
    processor,
    model_config,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> DataIterator:
    """The training stream of this process: batches of `config.batch_size // process_count` rows.

    Args:
      config: the pipeline configuration.
      processor: `aki_jax.processing.Processor` (chat template, tokenizer, image preprocessing).
      model_config: `AKIConfig` (image token count; the pad id written at PAD positions).
      process_index, process_count: this JAX process and how many there are (default: from jax).
        Records are divided among processes before shuffling: process p reads records p, p+P, ...

    Returns a DataIterator yielding {"pixel_values" f32[B, I, S, S, 3], "input_ids", "modality_ids",
    "segment_ids", "positions", "targets" int32[B, L], "weights" f32[B, L]}.
    """
    process_index, process_count = _process(process_index, process_count)
    batch = _per_process_batch(config.batch_size, process_count)
    image_size = _image_size(processor)
    images = _images_per_row(config, model_config.image_token_count)
    sources = [
        build_source(s, config.digits_image_size or image_size, streaming=True, digits_task=config.digits_task)
        for s in config.sources
    ]
    _check_index_bad(sources, config.max_bad_fraction)
    encode = Encode(processor, config.seq_len, images)
    parts = [
        _train_stream(source, encode, config, config.seed * 1_000_003 + k, process_index, process_count)
        for k, source in enumerate(sources)
    ]
    weights = [s.weight for s in config.sources]
    ds = parts[0] if len(parts) == 1 else grain.IterDataset.mix(parts, weights)
    return _finish(ds, config, sources, batch, images, image_size, model_config, drop_remainder=True)


class ShardSamples(grain.experimental.FlatMapTransform):
    """Shard path -> references to its samples (and Bad records for its skipped members)."""

    def __init__(self, source: WebDatasetShards):
        self.source = source

    def flat_map(self, path):
        return self.source.shard_samples(path)


class ReadAndEncode:
    """Sample reference -> processed example (or Bad)."""

    def __init__(self, source: WebDatasetShards, encode: Encode):
        self.source = source
        self.encode = encode

    def __call__(self, ref):
        return self.encode(self.source.read(ref))


def _train_stream(source, encode: Encode, config: DataConfig, seed: int, process_index: int, process_count: int):
    """One source's endless (or `config.epochs`) stream of processed examples for this process.

    Random-access sources: records p, p+P, ... shuffled (reshuffled each epoch), encoded by reader threads.
    Streaming webdataset: shards p, p+P, ... shuffled, each indexed when reached, sample references
    shuffled in windows of `config.shuffle_buffer`, then read and encoded.
    """
    if isinstance(source, WebDatasetShards):
        shards = grain.MapDataset.source(source.shards)[process_index::process_count]
        if len(shards) == 0:
            raise ValueError(
                f"{source.name}: {len(source.shards)} shard(s) cannot be shared by {process_count} processes "
                "(each process reads whole shards: write at least one shard per process)"
            )
        ds = shards.shuffle(seed=seed).repeat(config.epochs).to_iter_dataset()
        ds = grain.experimental.FlatMapIterDataset(ds, ShardSamples(source))
        if config.shuffle_buffer > 1:
            ds = WindowShuffleIterDataset(ds, config.shuffle_buffer, seed)
        return ds.map(ReadAndEncode(source, encode))
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(f"{source.name}: {len(source)} records cannot be shared by {process_count} processes")
    ds = ds.shuffle(seed=seed).repeat(config.epochs).map(encode)
    return ds.to_iter_dataset(_read_options(config))


def _absl_flags_ready() -> None:
    """grain's worker processes read absl flags; outside an absl app nobody parses them, so use defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _finish(ds, config, sources, batch, images, image_size, model_config, drop_remainder, packing=None):
    """Encoded IterDataset -> workers, bad-record counting, packing or padding, batching, prefetch."""
    if config.workers > 0:
        _absl_flags_ready()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.workers))
    counter = BadRecordCounter(ds, config.max_bad_fraction, config.bad_check_after)
    packing = config.packing if packing is None else packing
    ds = PackIterDataset(
        counter, config.seq_len, images, (image_size, image_size, 3), model_config.pad_token_id,
        max_segments=0 if packing else 1, window=config.packing_window,
    )  # fmt: skip
    ds = ds.batch(batch, drop_remainder=drop_remainder)
    if config.prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=config.prefetch)
    return DataIterator(ds, counter, sources, batch)


class EvalIterator:
    """A finite pass over held-out data: the same number of padded batches on every process.

    Rows beyond the data are empty (all PAD, weight 0), so every process runs the same number of steps.
    `sources` gives the underlying sources (e.g. `DigitsSource.answer(i)` for generation-based scoring).
    """

    def __init__(self, data: DataIterator, num_batches: int, row_template: dict):
        self._data = data
        self.num_batches = num_batches
        self._row = row_template
        self.sources = data.sources

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        b = self._data.batch_size
        exhausted = False
        try:
            for _ in range(self.num_batches):
                out = None
                if not exhausted:
                    try:
                        out = next(self._data)
                    except StopIteration:
                        exhausted = True
                if out is None:
                    out = {k: np.zeros((0, *v.shape), v.dtype) for k, v in self._row.items()}
                short = b - len(out["input_ids"])
                if short:
                    out = {k: np.concatenate([v, np.repeat(self._row[k][None], short, 0)]) for k, v in out.items()}
                yield out
        finally:
            self._data.close()

    def stats(self) -> dict:
        return self._data.stats()


def make_eval_iterator(
    config: DataConfig,
    processor,
    model_config,
    *,
    sources: tuple[SourceConfig, ...] | None = None,
    batch_size: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalIterator:
    """One ordered pass (no shuffle, one example per row) over `sources` (default `config.eval_sources`).

    batch_size: global rows per step (default `config.batch_size`); each process gets its share. Process p
    reads records p, p+P, ... of each source in turn. Bad records are skipped and counted as in training.
    """
    process_index, process_count = _process(process_index, process_count)
    batch = _per_process_batch(batch_size or config.batch_size, process_count)
    image_size = _image_size(processor)
    images = max(1, config.images_per_row)
    built = [
        build_source(s, config.digits_image_size or image_size, digits_task=config.digits_task)
        for s in (sources or config.eval_sources)
    ]
    _check_index_bad(built, config.max_bad_fraction)
    parts = [grain.MapDataset.source(s)[process_index::process_count] for s in built]
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
    ds = ds.map(Encode(processor, config.seq_len, images)).to_iter_dataset(_read_options(config))
    largest_share = sum(math.ceil(len(s) / process_count) for s in built)
    data = _finish(ds, config, built, batch, images, image_size, model_config, drop_remainder=False, packing=False)
    row = empty_row(config.seq_len, images, (image_size, image_size, 3), model_config.pad_token_id)
    return EvalIterator(data, math.ceil(largest_share / batch), row)
