"""Held-out exact match per question type, beside two baselines that show whether the model reads the image.

For data whose records know their question type (the built-in digits: `DigitsSource.question_type`),
`train()` reports the held-out accuracy per type and, at the end of a run:

- text only: the best answer from the question alone (the most frequent training answer of each
  question), computed from the data without any model;
- shuffled image: the trained model on the held-out questions, each shown another example's image.

A model that reads the image is well above both; one that only learned answer priors sits at the first
and scores the same on the second.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Sequence

import numpy as np


@dataclasses.dataclass
class QuestionTypes:
    """What the loop needs to break the held-out figures down by question type.

    types_of_process(p, P): the question type of each held-out record process p of P evaluates, in the
      order it reads them (`make_eval_iterator`: records p, p+P, ... of each eval source in turn).
    make_shuffled_eval: a held-out pass like `DataBundle.make_eval`, images shuffled across examples.
    text_only: {type: accuracy, "all": accuracy} of the question-only guess.
    """

    types_of_process: Callable[[int, int], list[str]]
    make_shuffled_eval: Callable[[], Iterable[dict]]
    text_only: Callable[[], dict[str, float]]


def accuracy_by_type(
    correct: Sequence[np.ndarray], real: Sequence[np.ndarray], process_count: int, types_of_process
) -> dict[str, float] | None:
    """{type: exact match} from an evaluation pass's per-row results, or None when rows cannot be matched.

    correct, real: one bool[B] per global batch (row correct; row holds an example, not padding). A
    global batch is the processes' local batches in process order, each holding its records in reading
    order, padding rows last. If a process has fewer real rows than records (some were skipped as bad),
    which row is which record is unknown and None is returned.
    """
    if not correct:
        return None
    rows = len(correct[0])
    local = rows // process_count
    hits, totals = collections.Counter(), collections.Counter()
    for p in range(process_count):
        ok = np.concatenate([np.asarray(c)[p * local : (p + 1) * local] for c in correct])
        present = np.concatenate([np.asarray(r)[p * local : (p + 1) * local] for r in real])
        types = types_of_process(p, process_count)
        if present.sum() != len(types) or not present[: len(types)].all():
            return None
        for kind, hit in zip(types, ok[: len(types)], strict=True):
            hits[kind] += bool(hit)
            totals[kind] += 1
    return {kind: hits[kind] / totals[kind] for kind in totals}
