"""One loaded model answering one request at a time, streamed, with every user mistake a `RequestError`.

    answerer = Answerer.from_pretrained(directory)   # load + compile once (answerer.timings says how long)
    example = answerer.prompt(question, images)      # checks the request; its modality_ids feed model_view
    for text in answerer.answer(question, images, AskSettings(temperature=0.7, seed=1)):
        ...                                          # the answer so far (each yield is longer)

The answer is `aki_jax.generation.generate_text` on the same inputs and settings, token by token: the
generation runs in a worker thread that hands each new piece of text to the caller's iterator. One
lock keeps generations one at a time on the model (a web server may call from many threads); a caller
that stops iterating cancels its generation at the next token.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from aki_jax.processing import ImageError, Processor, open_image

WARM_UP_QUESTION = "What is in the picture?"
# Prompts are left-padded to a multiple of this many tokens. Compiled programs are per padded length,
# so a coarse bucket lets the one compiled at start serve most short questions about one image.
PROMPT_BUCKET = 64


class RequestError(ValueError):
    """A request the model cannot answer as asked (empty question, unreadable image, too long, bad setting)."""


@dataclasses.dataclass(frozen=True)
class AskSettings:
    """How to generate one answer. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        problems = []
        if int(self.max_new_tokens) != self.max_new_tokens or self.max_new_tokens < 1:
            problems.append(f"max new tokens must be a whole number >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            problems.append(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            problems.append(f"top-k must be a whole number >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top-p must be in (0, 1] (1: off), got {self.top_p}")
        if int(self.seed) != self.seed:
            problems.append(f"seed must be a whole number, got {self.seed}")
        if problems:
            raise RequestError("; ".join(problems))

    def generation_kwargs(self, eos_ids: tuple[int, ...] | None = None) -> dict:
        """The keyword arguments of `generate_text` these settings stand for (eos_ids None: the tokenizer's)."""
        from aki_jax.generation import Sampling

        sampling = Sampling(
            temperature=float(self.temperature),
            top_k=int(self.top_k) or None,
            top_p=float(self.top_p),
            seed=int(self.seed),
            eos_ids=eos_ids,
        )
        return {"max_new_tokens": int(self.max_new_tokens), "sampling": sampling}


class _Cancelled(Exception):
    """Raised inside the generation thread when its reader has gone away."""


_DONE = object()


class Answerer:
    """A model, its parameters and tokenizer, ready to answer (see the module docstring)."""

    def __init__(self, model, params, tokenizer):
        if tokenizer is None:
            raise ValueError("the checkpoint has no tokenizer files (tokenizer.json or tokenizer.model)")
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.processor = Processor.from_config(model.config, tokenizer)
        self.max_positions = model.config.decoder.max_position_embeddings
        self.timings: dict[str, float] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype=None, warm_up: bool = True) -> Answerer:
        """Load a pretrained folder (`aki_jax.checkpoint.load_pretrained`) and compile the common case."""
        from aki_jax.checkpoint import load_pretrained

        start = time.perf_counter()
        model, params, tokenizer = load_pretrained(directory, dtype=dtype, compute_dtype=dtype)
        if tokenizer is None:
            raise FileNotFoundError(f"{directory}: no tokenizer files (tokenizer.json or tokenizer.model)")
        answerer = cls(model, params, tokenizer)
        answerer.timings["load_s"] = time.perf_counter() - start
        if warm_up:
            answerer.warm_up()
        return answerer

    def warm_up(self, settings: AskSettings = AskSettings()) -> float:
        """Compile generation for one image, a short question and `settings`; returns the seconds it took.

        The page's mask pictures are computed once too. Both compiled generation programs are exercised,
        the prefill and the decode step: stop tokens are switched off
        and the run is cut after its second piece of text. Other shapes (more images, a prompt past
        `PROMPT_BUCKET` tokens, another max new tokens) compile once on first use.
        """
        from aki_jax.generation import generate_text
        from aki_jax.serving.views import model_view

        start = time.perf_counter()
        size = self.model.config.vision.image_size
        blank = np.zeros((size, size, 3), np.uint8)
        model_view(self.prompt(WARM_UP_QUESTION, [blank], settings)["modality_ids"], PROMPT_BUCKET)
        pieces = []

        def stop_after_two(piece: str) -> None:
            pieces.append(piece)
            if len(pieces) >= 2:
                raise _Cancelled

        try:
            with self._lock:
                generate_text(
                    self.model,
                    self.params,
                    self.tokenizer,
                    WARM_UP_QUESTION,
                    [blank],
                    on_text=stop_after_two,
                    pad_to_multiple=PROMPT_BUCKET,
                    # no stop ids (traced, padded to 8 ids): the program is the one real requests use
                    **settings.generation_kwargs(eos_ids=()),
                )
        except _Cancelled:
            pass
        self.timings["compile_s"] = time.perf_counter() - start
        return self.timings["compile_s"]

    # --- one request -------------------------------------------------------------------------------------------
    def load_images(self, images: Sequence) -> list:
        """PIL images (decoded mode kept, as preprocessing expects) from paths / arrays / PIL images.

        An unreadable one is a `RequestError` naming it by its file name (an upload's temporary folder
        says nothing to the person who sent it).
        """
        images = list(images or [])
        loaded = []
        for number, image in enumerate(images, start=1):
            is_path = isinstance(image, (str, os.PathLike))
            name = os.path.basename(image) if is_path else None
            try:
                loaded.append(open_image(image, name=name, keep_mode=True))
            except (ImageError, TypeError) as e:
                message = str(e).replace(os.fspath(image), name) if is_path else str(e)
                raise RequestError(f"image {number} of {len(images)}: {message}") from e
        return loaded

    def prompt(self, question: str, images: Sequence, settings: AskSettings = AskSettings()) -> dict:
        """The processed prompt example (`Processor.prompt_example`) after checking the request."""
        settings.check()
        if not question or not question.strip():
            raise RequestError("the question is empty: type a question about the image(s)")
        try:
            example = self.processor.prompt_example(question, self.load_images(images))
        except RequestError:
            raise
        except ValueError as e:  # e.g. <image> placeholders that do not match the images
            raise RequestError(str(e)) from e
        length = len(example["input_ids"])
        if length + settings.max_new_tokens > self.max_positions:
            image_tokens = int(len(example["pixel_values"]) * self.processor.image_token_count)
            raise RequestError(
                f"the prompt is {length} tokens ({image_tokens} of them for {len(example['pixel_values'])} image(s)) "
                f"and {settings.max_new_tokens} new tokens were asked for: more than the model's "
                f"{self.max_positions} positions; shorten the question, use fewer images or lower max new tokens"
            )
        return example

    def answer(self, question: str, images: Sequence, settings: AskSettings = AskSettings()) -> Iterator[str]:
        """Yield the answer so far after each new piece of text (the last yield is the whole answer).

        Raises `RequestError` (before generating) for a request that cannot be answered.
        """
        from aki_jax.generation import generate_text

        self.prompt(question, images, settings)  # every check before any work
        pil_images = self.load_images(images)
        pieces: queue.Queue = queue.Queue()
        stop = threading.Event()

        def on_text(piece: str) -> None:
            if stop.is_set():
                raise _Cancelled
            pieces.put(piece)

        def run() -> None:
            try:
                with self._lock:
                    result = generate_text(
                        self.model,
                        self.params,
                        self.tokenizer,
                        question,
                        pil_images,
                        on_text=on_text,
                        pad_to_multiple=PROMPT_BUCKET,
                        **settings.generation_kwargs(),
                    )
                pieces.put(("result", result))
            except _Cancelled:
                pass
            except BaseException as e:  # handed to the reader, which raises it in the caller's thread
                pieces.put(e)
            finally:
                pieces.put(_DONE)

        worker = threading.Thread(target=run, name="aki-generate", daemon=True)
        worker.start()
        text, yielded = "", False
        try:
            while (item := pieces.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, tuple):  # generate_text's own answer: what the pieces add up to
                    if item[1] != text or not yielded:  # an empty answer is still one yield
                        text, yielded = item[1], True
                        yield text
                    continue
                text, yielded = text + item, True
                yield text
        finally:
            stop.set()
