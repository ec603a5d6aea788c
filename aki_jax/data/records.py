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
corrupt image makes the example a `Bad` record, which the pipeline counts and drops.
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
from PIL import Image

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
    """ImageRef -> a fully decoded PIL image in its own mode (or the uint8 array itself).

    Mode conversion, EXIF orientation and resizing are left to `aki_jax.processing.preprocess_image`,
    which handles palette, alpha and 16-bit images faithfully. Raises OSError/ValueError for missing
    or undecodable images.
    """
    if isinstance(ref, np.ndarray):
        if ref.ndim not in (2, 3) or (ref.ndim == 3 and ref.shape[-1] not in (1, 3, 4)):
            raise ValueError(f"image array must be [H, W] or [H, W, 1|3|4], got shape {ref.shape}")
        return ref
    if isinstance(ref, (str, os.PathLike)):
        with open(ref, "rb") as f:
            ref = f.read()
    if not isinstance(ref, (bytes, bytearray, memoryview)):
        raise ValueError(f"unsupported image reference of type {type(ref).__name__}")
    image = Image.open(io.BytesIO(ref))
    image.load()  # Image.open is lazy: a truncated file only fails here
    return image


def decode_images(example: dict) -> dict | Bad:
    """Replace the example's ImageRefs by decoded images (`open_image`), or return Bad naming the image."""
    if isinstance(example, Bad):
        return example
    decoded = []
    for ref in example["images"]:
        try:
            decoded.append(open_image(ref))
        except FileNotFoundError:
            return Bad("missing_image", example["source"], example["id"], str(ref))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            name = ref if isinstance(ref, str) else f"{type(ref).__name__}"
            return Bad("bad_image", example["source"], example["id"], f"{name}: {e}")
    return {**example, "images": decoded}
