"""The common raw example every source produces, and the marker for a record that had to be skipped.

A raw example is a plain dict (picklable, so it can cross into worker processes):

    {
      "source": str,                 # the source's name, for statistics
      "id": str,                     # where it came from (file:line, shard:member, index)
      "task": "chat" | "caption",
      "images": [ImageRef, ...],     # bytes (encoded file), str (path) or uint8[H, W, 3]
      "conversation": [{"role": "system" | "user" | "assistant", "content": str}, ...],  # task "chat"
      "caption": str,                # task "caption"
    }

In a chat, each image appears as one literal `<image>` in the text where it belongs (the LLaVA
convention); sources that only have a question put `<image>\\n` in front of it.

`decode_images` opens and decodes the ImageRefs (PIL images, or the arrays as given); a missing or
corrupt image (an `ImageError`) makes the example a `Bad` record, which the pipeline counts and drops.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from aki_jax.processing.image import ImageError
from aki_jax.processing.image import open_image as processing_open_image
from aki_jax.processing.tokenizer import IMAGE_TOKEN


@dataclasses.dataclass(frozen=True)
class Bad:
    """A record that cannot be used. `reason` is a short key ("bad_image", "bad_json", ...)."""

    reason: str
    source: str
    where: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.source} {self.where}: {self.reason} {self.detail}".strip()


def chat_example(source, where, images, conversation) -> dict:
    return {"source": source, "id": where, "task": "chat", "images": list(images), "conversation": conversation}


def caption_example(source, where, images, caption) -> dict:
    return {"source": source, "id": where, "task": "caption", "images": list(images), "caption": caption}


def question_answer(question: str, answer: str, n_images: int = 1) -> list[dict]:
    """A one-turn chat: the images' placeholders, a newline, the question; then the answer."""
    prefix = (IMAGE_TOKEN + "\n") * n_images if IMAGE_TOKEN not in question else ""
    return [{"role": "user", "content": prefix + question}, {"role": "assistant", "content": answer}]


def open_image(ref):
    """ImageRef -> a fully decoded PIL image in its own mode (`aki_jax.processing.open_image`).

    Mode conversion and resizing are left to `aki_jax.processing.preprocess_image`, which handles
    palette, alpha and 16-bit images faithfully. Raises `ImageError` naming the image.
    """
    if not isinstance(ref, (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray)):
        raise ImageError(f"unsupported image reference of type {type(ref).__name__}")
    name = None if isinstance(ref, (str, os.PathLike)) else f"{type(ref).__name__} image"
    return processing_open_image(ref, name=name, keep_mode=True)


def decode_images(example: dict) -> dict | Bad:
    """Replace the example's ImageRefs by decoded images (`open_image`), or return Bad naming the image."""
    if isinstance(example, Bad):
        return example
    decoded = []
    for ref in example["images"]:
        if isinstance(ref, (str, os.PathLike)) and not os.path.exists(ref):
            return Bad("missing_image", example["source"], example["id"], str(ref))
        try:
            decoded.append(open_image(ref))
        except ImageError as e:
            return Bad("bad_image", example["source"], example["id"], str(e))
    return {**example, "images": decoded}
