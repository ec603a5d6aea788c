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

`decode_images` turns ImageRefs into uint8[H, W, 3] arrays; a missing or corrupt image makes the
example a `Bad` record, which the pipeline counts and drops.
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
from PIL import Image

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")


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
    prefix = (IMAGE_PLACEHOLDER + "\n") * n_images if IMAGE_PLACEHOLDER not in question else ""
    return [{"role": "user", "content": prefix + question}, {"role": "assistant", "content": answer}]


def decode_image(ref) -> np.ndarray:
    """ImageRef -> uint8[H, W, 3]. Raises OSError/ValueError for missing or undecodable images."""
    if isinstance(ref, np.ndarray):
        array = ref
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"image array must be [H, W, 3], got shape {array.shape}")
        return array.astype(np.uint8, copy=False)
    if isinstance(ref, (str, os.PathLike)):
        with open(ref, "rb") as f:
            ref = f.read()
    if not isinstance(ref, (bytes, bytearray, memoryview)):
        raise ValueError(f"unsupported image reference of type {type(ref).__name__}")
    with Image.open(io.BytesIO(ref)) as image:
        image.load()  # Image.open is lazy: a truncated file only fails here
        return np.asarray(image.convert("RGB"))


def decode_images(example: dict) -> dict | Bad:
    """Replace the example's ImageRefs by uint8[H, W, 3] arrays, or return Bad naming the image."""
    if isinstance(example, Bad):
        return example
    decoded = []
    for ref in example["images"]:
        try:
            decoded.append(decode_image(ref))
        except FileNotFoundError:
            return Bad("missing_image", example["source"], example["id"], str(ref))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            name = ref if isinstance(ref, str) else f"{type(ref).__name__}"
            return Bad("bad_image", example["source"], example["id"], f"{name}: {e}")
    return {**example, "images": decoded}
