"""Sharded, resumable execution of one benchmark; deterministic merge; scores.

Layout under `output_dir/<benchmark name>/`:
  run.json                 the settings of the run (mode, checkpoint, prompts, ...). A rerun with other
                           settings is refused instead of mixing predictions.
  shards/process-NNNNN.jsonl  raw predictions, appended by process NNNNN one item per line, flushed after
                           every model step. A run killed mid-write leaves at most one partial last line,
                           which is ignored (and cut off before appending), so that item is redone.
  predictions.jsonl        merged per-item predictions with their scores, sorted by index.
  scores.json              `metrics.benchmark_scores` of the merged predictions.

Work split: every process reads the same items and the same finished set, keeps the unfinished ones in
index order and takes every `process_count`-th (round robin, offset `process_index`). Each item is one
row (likelihood scoring puts all candidates of an item into one shared-prefix row; generation has one
prompt); items are cut into steps of `scorer.rows_per_step` rows per process. All processes run the
same number of steps (the maximum, idle processes run padding steps) because each step is one global
computation over the mesh.
Finished items recorded by any earlier run, with any process count, are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from aki_jax.evaluation import metrics
from aki_jax.evaluation.items import Item, index_sort_key, jsonable
from aki_jax.evaluation.readers import Benchmark

log = logging.getLogger(__name__)


class ItemFailed(Exception):
    """An item that cannot be run (prompt too long, ...): recorded, not fatal; it scores 0."""


class ItemUnreadable(ItemFailed):
    """An item whose input no longer reads or decodes: recorded with `unreadable`, never scored."""


class Scorer(Protocol):
    """What the runner needs from a prediction method (see `aki_jax.evaluation.scoring`)."""

    rows_per_step: int  # rows per model call per process

    def settings(self) -> dict: ...

    def prepare(self, item: Item) -> Any: ...  # may raise ItemFailed

    def run(self, prepared: list[Any]) -> list[Any]: ...  # one model output per prepared item (its row)

    def finish(self, item: Item, output: Any) -> dict: ...  # {"prediction": ..., ...}


@dataclasses.dataclass(frozen=True)
class Distribution:
    """Which share of the work this process does, and how processes agree (single process: no-ops)."""

    process_index: int = 0
    process_count: int = 1

    @classmethod
    def from_jax(cls) -> Distribution:
        import jax

        return cls(jax.process_index(), jax.process_count())

    def barrier(self, name: str) -> None:
        if self.process_count > 1:
            # The coordination service's barrier, not a collective: a gloo collective's first run waits
            # only 30 s for a host still loading the model (see `sync_processes`).
            from aki_jax.sharding import sync_processes

            sync_processes(name)

    def max(self, value: int) -> int:
        if self.process_count == 1:
            return value
        import numpy as np
        from jax.experimental import multihost_utils

        return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def _shard_records(shard_dir: Path) -> dict:
    """index -> raw record from every shard file, in file-name then line order; first record wins."""
    records = {}
    if not shard_dir.is_dir():
        return records
    for path in sorted(shard_dir.glob("process-*.jsonl")):
        lines = path.read_text(encoding="utf-8").split("\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # partial last line of a killed run: the item is redone
                    continue
                log.warning("%s:%d: unreadable prediction line ignored", path, number)
                continue
            key = _index_key(record.get("index"))
            records.setdefault(key, record)
    return records


def _index_key(index):
    return index if isinstance(index, int) else str(index)


class ShardWriter:
    """Appends one JSON line per finished item; cuts a partial last line left by a killed run first."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            data = path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end != len(data):
                with open(path, "r+b") as f:
                    f.truncate(end)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")

    def flush(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def _check_settings(path: Path, settings: dict, dist: Distribution) -> None:
    settings = json.loads(json.dumps(settings))
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise ValueError(
                f"{path.parent} holds predictions made with other settings ({', '.join(changed)}: "
                f"{ {k: previous.get(k) for k in changed} } before, { {k: settings.get(k) for k in changed} } now); "
                "use another --output folder or delete that one"
            )
    elif dist.process_index == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def plan_steps(items: list[Item], scorer: Scorer) -> list[list[Item]]:
    """`items` in order (one row each), cut into steps of at most `scorer.rows_per_step` rows."""
    size = scorer.rows_per_step
    return [items[i : i + size] for i in range(0, len(items), size)]


def run_predictions(
    benchmark: Benchmark,
    scorer: Scorer,
    output_dir,
    dist: Distribution | None = None,
    progress: bool = True,
) -> int:
    """Predict this process's share of the unfinished items; returns the number of items it finished."""
    dist = dist or Distribution()
    out = Path(output_dir) / benchmark.name
    _check_settings(out / "run.json", {**scorer.settings(), "benchmark": benchmark.path}, dist)
    done = _shard_records(out / "shards")
    dist.barrier(f"eval-read-{benchmark.name}")  # nobody appends before everyone has read the finished set
    remaining = [it for it in benchmark.items if _index_key(it.index) not in done]
    mine = remaining[dist.process_index :: dist.process_count]
    steps = plan_steps(mine, scorer)
    step_count = dist.max(len(steps))
    if dist.process_index == 0:
        log.info(
            "%s: %d items, %d done before, %d to run in %d steps",
            benchmark.name,
            len(benchmark.items),
            len(benchmark.items) - len(remaining),
            len(remaining),
            step_count,
        )
    writer = ShardWriter(out / "shards" / f"process-{dist.process_index:05d}.jsonl")
    bar = _progress(len(mine), benchmark.name, enabled=progress and dist.process_index == 0)
    finished = 0
    try:
        for step in range(step_count):
            records, runnable, prepared = [], [], []
            for item in steps[step] if step < len(steps) else []:
                try:
                    prepared.append(scorer.prepare(item))
                    runnable.append(item)
                except ItemFailed as e:
                    record = {"index": item.index, "prediction": None, "error": str(e)}
                    records.append((item, record | ({"unreadable": True} if isinstance(e, ItemUnreadable) else {})))
            for item, output in zip(runnable, scorer.run(prepared), strict=True):
                records.append((item, {"index": item.index, **scorer.finish(item, output)}))
            for _, record in sorted(records, key=lambda pair: index_sort_key(pair[0].index)):
                writer.write(record)
            finished += len(records)
            bar.update(len(records))
            writer.flush()
    finally:
        writer.close()
        bar.close()
    dist.barrier(f"eval-done-{benchmark.name}")
    return finished


def merge_predictions(benchmark: Benchmark, output_dir) -> list[dict]:
    """Join every shard's raw predictions with the items; one scored record per item, sorted by index.

    Items with no prediction yet are left out (the caller decides whether that is an error).
    """
    raw = _shard_records(Path(output_dir) / benchmark.name / "shards")
    known = {_index_key(it.index) for it in benchmark.items}
    stale = [k for k in raw if k not in known]
    if stale:
        log.warning("%s: %d predictions of items no longer in the file ignored", benchmark.name, len(stale))
    merged = []
    for item in benchmark.items:
        record = raw.get(_index_key(item.index))
        if record is None:
            continue
        prediction = record.get("prediction")
        merged.append(
            {
                **{k: v for k, v in record.items() if k not in ("index", "prediction")},
                "index": item.index,
                "task": item.task,
                "category": item.category,
                "group": item.group,
                "question": item.question,
                "options": dict(item.options),
                "answers": list(item.answers),
                "prediction": prediction,
                "score": None if record.get("unreadable") else metrics.item_score(item.task, item.answers, prediction),
                "extra": {k: jsonable(v) for k, v in item.extra.items()},
            }
        )
    merged.sort(key=lambda r: index_sort_key(r["index"]))
    return merged


def write_results(benchmark: Benchmark, output_dir, records: list[dict], dist: Distribution | None = None) -> dict:
    """scores.json and predictions.jsonl (process 0 writes; every process gets the scores)."""
    dist = dist or Distribution()
    scores = metrics.benchmark_scores(records, read_errors=len(benchmark.errors))
    missing = len(benchmark.items) - len(records)
    scores["missing"] = missing
    out = Path(output_dir) / benchmark.name
    if dist.process_index == 0:
        _atomic_write(out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        body = {"benchmark": benchmark.name, "file": benchmark.path, "scores": scores, "read_errors": benchmark.errors}
        _atomic_write(out / "scores.json", json.dumps(body, indent=2, ensure_ascii=False) + "\n")
    return scores


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def evaluate_benchmark(benchmark: Benchmark, scorer: Scorer, output_dir, dist=None, progress=True) -> dict:
    """Run (or resume) one benchmark, merge, score and write; returns its scores."""
    dist = dist or Distribution()
    for error in benchmark.errors:
        log.warning("skipped row: %s", error)
    run_predictions(benchmark, scorer, output_dir, dist, progress)
    return write_results(benchmark, output_dir, merge_predictions(benchmark, output_dir), dist)


def _progress(total: int, name: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, unit="item", disable=not enabled, dynamic_ncols=True)
