"""Built-in data that needs no download: scikit-learn's handwritten digits as small RGB images.

The 1,797 real 8x8 scans (UCI optical recognition of handwritten digits, bundled with scikit-learn)
are drawn white on black, upscaled to `image_size` and repeated over three channels. Each image is
asked four questions whose answers depend on the question, so a model must read both:

  "What digit is this?"            -> "7"
  "Is it even?" / "Is it odd?"     -> "yes" | "no"      (even images ask one, odd the other)
  "Is it greater than 4?"          -> "yes" | "no"      (the number varies per image)
  "What is this digit plus 3?"     -> "10"              (the number varies per image)

Images are split once, by a fixed permutation that does not depend on the training seed, into
"train" (80%) and "heldout" (20%); the questions of one image never cross the split.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from aki_jax.data import records

SPLITS = ("train", "heldout")
QUESTIONS_PER_IMAGE = 4
_SPLIT_SEED = 20240917


@functools.lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def split_indices(split: str, holdout_fraction: float = 0.2) -> np.ndarray:
    """Indices of the scikit-learn digits in `split`, int64[N], sorted."""
    if split not in SPLITS:
        raise ValueError(f"digits split must be one of {SPLITS}, got {split!r}")
    n = len(_digits()[1])
    order = np.random.default_rng(_SPLIT_SEED).permutation(n)
    n_heldout = int(round(n * holdout_fraction))
    chosen = order[:n_heldout] if split == "heldout" else order[n_heldout:]
    return np.sort(chosen)


def render(scan, image_size: int) -> np.ndarray:
    """f32[8, 8] scan with values 0..16 -> uint8[image_size, image_size, 3], white on black."""
    gray = Image.fromarray(np.clip(np.round(np.asarray(scan) * (255.0 / 16.0)), 0, 255).astype(np.uint8))
    gray = gray.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.repeat(np.asarray(gray)[..., None], 3, axis=-1)


def question(digit: int, kind: int, number: int) -> tuple[str, str]:
    """The `kind`-th question about `digit` (0..3) with its answer; `number` parametrises kinds 2 and 3."""
    yes_no = ("no", "yes")
    if kind == 0:
        return "What digit is this?", str(digit)
    if kind == 1:
        if digit % 2 == 0:
            return "Is it even?", yes_no[True]
        return "Is it odd?", yes_no[True]
    if kind == 2:
        return f"Is it greater than {number}?", yes_no[digit > number]
    if kind == 3:
        return f"What is this digit plus {number}?", str(digit + number)
    raise ValueError(f"digits question kind must be 0..3, got {kind}")


def _numbers(image_index: int) -> tuple[int, int]:
    rng = np.random.default_rng((_SPLIT_SEED, image_index))
    return int(rng.integers(0, 9)), int(rng.integers(1, 10))


class DigitsSource:
    """Random-access source of digit questions: index i asks question i % 4 about image i // 4 of `split`."""

    def __init__(self, split: str = "train", image_size: int = 28, holdout_fraction: float = 0.2, name: str = ""):
        self.name = name or f"digits:{split}"
        self.split = split
        self.image_size = image_size
        self.images = split_indices(split, holdout_fraction)
        self.index_bad = {}
        self.index_bad_examples = []

    def __len__(self) -> int:
        return len(self.images) * QUESTIONS_PER_IMAGE

    def answer(self, index: int) -> tuple[int, str, str]:
        """(digit, question, answer) of example `index`, without rendering the image."""
        image_index = int(self.images[index // QUESTIONS_PER_IMAGE])
        digit = int(_digits()[1][image_index])
        greater_than, plus = _numbers(image_index)
        kind = index % QUESTIONS_PER_IMAGE
        return (digit, *question(digit, kind, greater_than if kind == 2 else plus))

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        image_index = int(self.images[index // QUESTIONS_PER_IMAGE])
        _, text, answer = self.answer(index)
        image = render(_digits()[0][image_index], self.image_size)
        return records.chat_example(self.name, f"{self.name}#{index}", [image], records.question_answer(text, answer))


def digits_texts() -> list[str]:
    """Every question and answer the digits source can produce (for training its tokenizer)."""
    texts = set()
    for digit in range(10):
        for kind in range(QUESTIONS_PER_IMAGE):
            for number in range(10):
                texts.update(question(digit, kind, number))
    return sorted(texts)


DIGITS_VOCAB_SIZE = 448


def digits_tokenizer(out_dir=None, vocab_size: int = DIGITS_VOCAB_SIZE):
    """A small Phi-3-like tokenizer trained on the digits texts and the chat template's system message.

    With the default size `initial_tokenizer_len` is 454 (fits `aki_jax.tiny()`'s 512 embedding rows)
    and a digits example is about 35 tokens plus its image tokens. Saved to `out_dir` when given.
    """
    from aki_jax.processing import SYSTEM_MESSAGE, train_tokenizer

    # The system message repeats so that BPE learns it as a few long pieces rather than letters.
    texts = digits_texts() + [SYSTEM_MESSAGE] * 50 + ["<image>"]
    return train_tokenizer(texts, vocab_size, out_dir)
