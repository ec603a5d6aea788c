"""One benchmark question, whatever file it came from.

Three tasks:

  multiple_choice  options A..H (some may be absent), one reference letter.
  yes_no           reference "yes" or "no" (POPE, MME, ...).
  vqa              short free-form answer, one or more reference answers (VQA accuracy).

An item's `answers` is empty when the file carries no reference (e.g. the MMBench test split): such
items are still predicted and written, but excluded from the scores and counted as `unscored`.
"""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

TASKS = ("multiple_choice", "yes_no", "vqa")
OPTION_LETTERS = "ABCDEFGH"


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """Where an item's image lives: base64 bytes from the file, or a path (absolute after reading)."""

    base64: str | None = None
    path: str | None = None

    def read_bytes(self) -> bytes:
        if self.base64 is not None:
            return base64.b64decode(self.base64, validate=False)
        return Path(self.path).read_bytes()

    def load(self):
        """The fully decoded image, in its own mode (`aki_jax.processing.open_image` with keep_mode:
        `preprocess_image` converts it faithfully). Raises `ImageError` naming this source."""
        from aki_jax.processing.image import ImageError, open_image

        if self.base64 is None:
            return open_image(self.path, name=self.describe(), keep_mode=True)
        try:
            data = self.read_bytes()
        except ValueError as e:  # binascii.Error: not base64
            raise ImageError(f"{self.describe()}: not base64 ({e})") from None
        return open_image(data, name=self.describe(), keep_mode=True)

    def describe(self) -> str:
        return f"base64 ({len(self.base64)} chars)" if self.base64 is not None else f"file {self.path}"


@dataclasses.dataclass(frozen=True)
class Item:
    """One question.

    index: the file's `index` (int when it looks like one; results are sorted by it).
    options: ((letter, text), ...) in letter order, absent options left out.
    answers: reference letter (multiple_choice), "yes"/"no" (yes_no) or references (vqa); () if none.
    group: items of one image (the MME pair rule); the image's origin index when nothing better is known.
    extra: the row's other columns, kept verbatim and copied into the predictions file.
    """

    index: int | str
    task: str
    question: str
    image: ImageSource | None
    answers: tuple[str, ...]
    options: tuple[tuple[str, str], ...] = ()
    hint: str = ""
    category: str = ""
    group: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"item {self.index}: task must be one of {TASKS}, got {self.task!r}")

    @property
    def letters(self) -> tuple[str, ...]:
        return tuple(letter for letter, _ in self.options)

    @property
    def scored(self) -> bool:
        return bool(self.answers)


def index_sort_key(index) -> tuple:
    """Integers first in numeric order, then strings: the deterministic order of every output."""
    return (0, index, "") if isinstance(index, int) else (1, 0, str(index))


def parse_index(value) -> int | str:
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        try:
            as_float = float(text)  # pandas writes integer columns with NaNs as "3.0"
        except ValueError:
            return text
        return int(as_float) if as_float.is_integer() else text


def jsonable(value):
    """Values of `extra` as JSON types (numpy scalars from callers that build items themselves)."""
    if isinstance(value, np.generic):
        return value.item()
    return value
