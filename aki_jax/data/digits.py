"""Built-in data that needs no download: scikit-learn's handwritten digits as small VQA tasks.

The 1,797 real 8x8 scans (UCI optical recognition of handwritten digits, bundled with scikit-learn)
are drawn white on black, upscaled to `image_size` and repeated over three channels. Two tasks
(`TASKS`), four question types each (`QUESTION_TYPES`), every answer a function of the image:

  "pairs" (two scans side by side; which half to read depends on the question):
    left          "What is the left digit?"                          -> "7"
    right         "What is the right digit?"                         -> "2"
    left_greater  "Is the left digit greater than the right digit?"  -> "yes" | "no"   (equal: "no")
    sum           "What is the sum of the two digits?"               -> "9"
  "single" (one scan):
    digit         "What digit is this?"                  -> "7"
    parity        "Is it even?" | "Is it odd?"           -> "yes" | "no"  (which one is asked does not
                                                                           depend on the digit)
    greater_than  "Is it greater than 4?"                -> "yes" | "no"  (the number varies per image)
    plus          "What is this digit plus 3?"           -> "10"          (the number varies per image)

Scans are split once, by a fixed permutation that does not depend on the training seed, into "train"
(80%) and "heldout" (20%); a pair never mixes the splits. "heldout_shuffled" asks the held-out
questions with their answers unchanged but shows each the image of another held-out example: a model
that reads the image drops to chance there (the shuffled-image baseline). `text_only_accuracy` gives
the other baseline: the best one can do from the question alone (the most frequent training answer
of each question).
"""

from __future__ import annotations

import collections
import functools

import numpy as np
from PIL import Image

from aki_jax.data import records

TASKS = ("pairs", "single")
QUESTION_TYPES = {
    "pairs": ("left", "right", "left_greater", "sum"),
    "single": ("digit", "parity", "greater_than", "plus"),
}
QUESTIONS_PER_IMAGE = 4
SPLITS = ("train", "heldout", "heldout_shuffled")
# Partners of each scan in "pairs": each training scan appears in this many pairs on each side, each
# held-out scan once on each side (more distinct pairs to learn from, one pass to evaluate).
PAIRS_PER_SCAN = {"train": 4, "heldout": 1}
_SPLIT_SEED = 20240917


@functools.lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def split_indices(split: str, holdout_fraction: float = 0.2) -> np.ndarray:
    """Indices of the scikit-learn digits in `split` ("train" or "heldout"), int64[N], sorted."""
    split = _scan_split(split)
    n = len(_digits()[1])
    order = np.random.default_rng(_SPLIT_SEED).permutation(n)
    n_heldout = int(round(n * holdout_fraction))
    chosen = order[:n_heldout] if split == "heldout" else order[n_heldout:]
    return np.sort(chosen)


def _scan_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"digits split must be one of {SPLITS}, got {split!r}")
    return "train" if split == "train" else "heldout"


def render(scan, image_size: int) -> np.ndarray:
    """f32[h, w] scan with values 0..16 -> uint8[image_size, image_size, 3], white on black.

    A wide scan (a pair: [8, 16]) is drawn along the top of a black square canvas, so both digits keep
    their proportions; with a patch as wide as one digit (`tiny_digits`: 16-pixel images, 8-pixel
    patches) each digit is exactly one patch.
    """
    scan = np.asarray(scan)
    side = max(scan.shape)
    canvas = np.zeros((side, side), np.float32)
    canvas[: scan.shape[0], : scan.shape[1]] = scan
    gray = Image.fromarray(np.clip(np.round(canvas * (255.0 / 16.0)), 0, 255).astype(np.uint8))
    gray = gray.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.repeat(np.asarray(gray)[..., None], 3, axis=-1)


def single_question(kind: int, digit: int, number: int) -> tuple[str, str]:
    """Question `kind` (0..3, `QUESTION_TYPES["single"]`) about `digit`, with its answer.

    `number` parametrises kinds 1 (0: "even", 1: "odd"), 2 (0..8) and 3 (1..9).
    """
    yes_no = ("no", "yes")
    if kind == 0:
        return "What digit is this?", str(digit)
    if kind == 1:
        if number == 0:
            return "Is it even?", yes_no[digit % 2 == 0]
        return "Is it odd?", yes_no[digit % 2 == 1]
    if kind == 2:
        return f"Is it greater than {number}?", yes_no[digit > number]
    if kind == 3:
        return f"What is this digit plus {number}?", str(digit + number)
    raise ValueError(f"digits question kind must be 0..3, got {kind}")


def pair_question(kind: int, left: int, right: int) -> tuple[str, str]:
    """Question `kind` (0..3, `QUESTION_TYPES["pairs"]`) about the digits `left` and `right`, with its answer."""
    if kind == 0:
        return "What is the left digit?", str(left)
    if kind == 1:
        return "What is the right digit?", str(right)
    if kind == 2:
        return "Is the left digit greater than the right digit?", ("no", "yes")[left > right]
    if kind == 3:
        return "What is the sum of the two digits?", str(left + right)
    raise ValueError(f"digits question kind must be 0..3, got {kind}")


def _single_numbers(scan_index: int) -> tuple[int, int, int]:
    """(even/odd choice, "greater than" number, "plus" number) asked about one scan; fixed per scan."""
    rng = np.random.default_rng((_SPLIT_SEED, scan_index))
    return int(rng.integers(0, 2)), int(rng.integers(0, 9)), int(rng.integers(1, 10))


def _partners(split: str, n: int) -> np.ndarray:
    """int64[PAIRS_PER_SCAN[split] * n]: pair g shows scan g % n on the left and scan partners[g] on the right."""
    rounds = PAIRS_PER_SCAN[split]
    return np.concatenate(
        [np.random.default_rng((_SPLIT_SEED, SPLITS.index(split), r)).permutation(n) for r in range(rounds)]
    )


class DigitsSource:
    """Random-access source of digit questions: index i asks question type i % 4 about image i // 4.

    `task` is one of `TASKS`; `split` one of `SPLITS`. Images of "pairs" are two scans side by side.
    """

    def __init__(
        self,
        split: str = "train",
        image_size: int = 28,
        holdout_fraction: float = 0.2,
        name: str = "",
        task: str = "pairs",
    ):
        if task not in TASKS:
            raise ValueError(f"digits task must be one of {TASKS}, got {task!r}")
        self.name = name or f"digits:{split}"
        self.split = split
        self.task = task
        self.image_size = image_size
        self.scans = split_indices(split, holdout_fraction)
        scan_split = _scan_split(split)
        self.partners = _partners(scan_split, len(self.scans)) if task == "pairs" else None
        self.index_bad = {}
        self.index_bad_examples = []

    @property
    def num_images(self) -> int:
        return len(self.scans) if self.partners is None else len(self.partners)

    def __len__(self) -> int:
        return self.num_images * QUESTIONS_PER_IMAGE

    def question_type(self, index: int) -> str:
        """The question type (`QUESTION_TYPES[task]`) of example `index`."""
        return QUESTION_TYPES[self.task][int(index) % QUESTIONS_PER_IMAGE]

    def _scans_of(self, image: int) -> tuple[int, ...]:
        """Indices into scikit-learn's digits of the scans drawn in image `image` (left to right)."""
        if self.partners is None:
            return (int(self.scans[image]),)
        return int(self.scans[image % len(self.scans)]), int(self.scans[self.partners[image]])

    def answer(self, index: int) -> tuple[tuple[int, ...], str, str]:
        """(digits shown, question, answer) of example `index`, without rendering the image."""
        index = int(index)
        scans = self._scans_of(index // QUESTIONS_PER_IMAGE)
        digits = tuple(int(_digits()[1][s]) for s in scans)
        kind = index % QUESTIONS_PER_IMAGE
        if self.task == "pairs":
            return (digits, *pair_question(kind, *digits))
        parity, greater_than, plus = _single_numbers(scans[0])
        return (digits, *single_question(kind, digits[0], (parity, greater_than, plus)[kind - 1] if kind else 0))

    def shown_image(self, index: int) -> int:
        """The image example `index` shows: its own, or for "heldout_shuffled" that of another example."""
        image = int(index) // QUESTIONS_PER_IMAGE
        if self.split == "heldout_shuffled":
            # A fixed shift by half the images: never the example's own image, and unrelated to it.
            return (image + self.num_images // 2) % self.num_images
        return image

    def image(self, image: int) -> np.ndarray:
        """uint8[S, S, 3]: image `image` drawn at `image_size`."""
        scans = _digits()[0][list(self._scans_of(image))]
        return render(np.concatenate(list(scans), axis=1), self.image_size)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        _, text, answer = self.answer(index)
        image = self.image(self.shown_image(index))
        return records.chat_example(self.name, f"{self.name}#{index}", [image], records.question_answer(text, answer))


def text_only_accuracy(task: str = "pairs", holdout_fraction: float = 0.2) -> dict[str, float]:
    """Held-out exact match of the best guess from the question text alone, per question type and "all".

    The guess for a question is its most frequent answer in the training split (ties: the smallest
    answer string); a question never seen in training gets its type's most frequent answer.
    """
    train = DigitsSource("train", task=task, holdout_fraction=holdout_fraction)
    by_question, by_type = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
    for i in range(len(train)):
        _, question, answer = train.answer(i)
        by_question[question][answer] += 1
        by_type[train.question_type(i)][answer] += 1

    def best(counter):
        return min(counter, key=lambda a: (-counter[a], a))

    heldout = DigitsSource("heldout", task=task, holdout_fraction=holdout_fraction)
    hits, totals = collections.Counter(), collections.Counter()
    for i in range(len(heldout)):
        _, question, answer = heldout.answer(i)
        kind = heldout.question_type(i)
        guess = best(by_question[question]) if question in by_question else best(by_type[kind])
        hits[kind] += guess == answer
        totals[kind] += 1
    out = {kind: hits[kind] / totals[kind] for kind in QUESTION_TYPES[task]}
    out["all"] = sum(hits.values()) / sum(totals.values())
    return out


def digits_texts() -> list[str]:
    """Every question and answer the digits tasks can produce (for training their tokenizer)."""
    texts = set()
    for a in range(10):
        for kind in range(QUESTIONS_PER_IMAGE):
            for b in range(10):
                texts.update(single_question(kind, a, b))
                texts.update(pair_question(kind, a, b))
    return sorted(texts)


DIGITS_VOCAB_SIZE = 448


def digits_tokenizer(out_dir=None, vocab_size: int = DIGITS_VOCAB_SIZE):
    """A small Phi-3-like tokenizer trained on the digits texts and the chat template's system message.

    With the default size `initial_tokenizer_len` is 454 (fits `aki_jax.tiny()`'s 512 embedding rows).
    Saved to `out_dir` when given.
    """
    from aki_jax.processing import SYSTEM_MESSAGE, train_tokenizer

    # The system message repeats so that BPE learns it as a few long pieces rather than letters.
    texts = digits_texts() + [SYSTEM_MESSAGE] * 50 + ["<image>"]
    return train_tokenizer(texts, vocab_size, out_dir)
