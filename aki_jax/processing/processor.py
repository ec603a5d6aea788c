"""From a conversation (or caption) and its images to one processed example, and examples to a batch.

One example (numpy, unpadded), the contract every stage shares:
  input_ids    int32[n]   fused sequence; each `<image>` becomes `image_token_count` copies of its id
  modality_ids int32[n]   aki_jax.mask.{TEXT, IMAGE, QUERY}
  targets      int32[n]   targets[t] = input_ids[t + 1] (last: pad id)
  weights      f32[n]     1 where targets[t] is supervised
  pixel_values f32[I, S, S, 3] in [-1, 1], one per `<image>`, in order (I may be 0)

QUERY marks the text an image may read (see aki_jax.mask): for an `<image>` inside a user message
(or anywhere, for text without roles), the tokens after it up to and including the next
`<|assistant|>` token, image tokens excluded. On the chat template that is exactly the original's
rectangle (`\\n{question}<|end|>\\n<|assistant|>`); with several images in one turn each reads the rest
of that turn; in later turns each image reads its own turn. Captions (no `<|assistant|>`) get none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from aki_jax.mask import IMAGE, PAD, QUERY, TEXT
from aki_jax.processing.image import ImageLike, preprocess_images
from aki_jax.processing.template import SYSTEM_MESSAGE, Segment, render_caption, render_chat
from aki_jax.processing.tokenizer import IMAGE_TOKEN, Tokenizer

TRUNCATION = ("error", "right")
PADDING_SIDES = ("left", "right")


@dataclasses.dataclass(frozen=True)
class Processor:
    """Turns conversations, captions and prompts into examples (`Processor.from_config(config, tok)`)."""

    tokenizer: Tokenizer
    image_token_count: int
    image_size: int
    system_message: str = SYSTEM_MESSAGE

    @classmethod
    def from_config(cls, config, tokenizer: Tokenizer, **kwargs) -> Processor:
        """Checks that the tokenizer's `<image>` id is the model's (`config.image_token_id`)."""
        if tokenizer.initial_tokenizer_len != config.initial_tokenizer_len:
            raise ValueError(
                f"tokenizer has initial_tokenizer_len {tokenizer.initial_tokenizer_len} but the model config "
                f"says {config.initial_tokenizer_len}: they must come from the same checkpoint"
            )
        return cls(tokenizer, config.image_token_count, config.vision.image_size, **kwargs)

    # --- examples -------------------------------------------------------------------------------------
    def sft_example(self, messages: Sequence[dict], images: Sequence[ImageLike] = (), *, pixel_values=None) -> dict:
        """Supervised fine-tuning: loss on each assistant answer and its closing `<|end|>`."""
        if not any(m.get("role") == "assistant" for m in messages):
            raise ValueError("an SFT conversation needs at least one assistant message")
        segments = render_chat(messages, system_message=self.system_message)
        return self.encode(segments, images, pixel_values=pixel_values)

    def caption_example(self, caption: str, images: Sequence[ImageLike] = (), *, pixel_values=None) -> dict:
        """Caption pretraining: `<image>{caption}<|endofchunk|>` + eos, loss on caption, end-of-chunk and eos."""
        count = len(images) if pixel_values is None else len(pixel_values)
        segments = render_caption(caption, max(count, 1), self.tokenizer.eos_token)
        return self.encode(segments, images, pixel_values=pixel_values)

    def prompt_example(self, prompt, images: Sequence[ImageLike] = (), *, pixel_values=None) -> dict:
        """Inference prompt ending with `<|assistant|>\\n` (weights all 0).

        `prompt` is a question string or a list of messages ending with a user message. A question
        without `<image>` placeholders gets one `<image>\\n` per image in front, as the demo writes it.
        """
        if isinstance(prompt, str):
            count = len(images) if pixel_values is None else len(pixel_values)
            if IMAGE_TOKEN not in prompt:
                prompt = "<image>\n" * count + prompt
            prompt = [{"role": "user", "content": prompt}]
        segments = render_chat(prompt, add_generation_prompt=True, system_message=self.system_message)
        return self.encode(segments, images, pixel_values=pixel_values)

    def encode(self, segments: Sequence[Segment], images: Sequence[ImageLike] = (), *, pixel_values=None) -> dict:
        """Tokenise rendered segments as one string (as the original does), expand images, mark QUERY."""
        tok = self.tokenizer
        if pixel_values is None:
            pixel_values = preprocess_images(list(images), self.image_size)
        else:
            pixel_values = np.asarray(pixel_values, np.float32)
            expected = (self.image_size, self.image_size, 3)
            if pixel_values.ndim != 4 or pixel_values.shape[1:] != expected:
                raise ValueError(
                    f"pixel_values must be f32[I, {', '.join(map(str, expected))}], got {pixel_values.shape}"
                )
        text = "".join(s.text for s in segments)
        ids, offsets = tok.encode_with_offsets(text)
        ids = np.asarray(ids, np.int32)
        starts = np.asarray([start for start, _ in offsets], np.int64)

        # Character ranges -> per-token flags: a token belongs to the segment holding its first character.
        bounds = np.cumsum([0] + [len(s.text) for s in segments])
        owner = np.clip(np.searchsorted(bounds, starts, side="right") - 1, 0, len(segments) - 1)
        supervised = np.asarray([segments[k].supervised for k in owner], bool)
        roles = [segments[k].role for k in owner]

        image_id = tok.image_token_id
        is_image = ids == image_id
        n_placeholders = int(is_image.sum())
        if n_placeholders != len(pixel_values):
            content = " | ".join(s.text for s in segments if s.role != "template") or text
            raise ValueError(
                f"the text has {n_placeholders} <image> placeholder(s) but {len(pixel_values)} image(s) were given "
                f"(one <image> per image, in order): {content[:300]!r}"
            )
        has_roles = any(s.role != "template" for s in segments)
        modality = np.full(len(ids), TEXT, np.int32)
        assistant_id = tok.assistant_token_id if tok.has_token("<|assistant|>") else -1
        assistant_at = np.flatnonzero(ids == assistant_id)
        for i in np.flatnonzero(is_image):
            if has_roles and roles[i] != "user":
                continue
            later = assistant_at[assistant_at > i]
            if len(later):
                modality[i + 1 : later[0] + 1] = QUERY
        modality[is_image] = IMAGE
        supervised &= ~is_image

        repeat = np.where(is_image, self.image_token_count, 1)
        input_ids = np.repeat(ids, repeat)
        modality_ids = np.repeat(modality, repeat)
        supervised = np.repeat(supervised, repeat)
        pad = tok.pad_token_id
        targets = np.concatenate([input_ids[1:], [pad]]).astype(np.int32)
        weights = np.concatenate([supervised[1:], [False]]).astype(np.float32)
        return {
            "input_ids": input_ids.astype(np.int32),
            "modality_ids": modality_ids,
            "targets": targets,
            "weights": weights,
            "pixel_values": pixel_values.astype(np.float32),
        }

    def collate(self, examples: Sequence[dict], length: int | None = None, **kwargs) -> dict:
        """`collate` with this tokenizer's pad id and image size (see the module function)."""
        kwargs.setdefault("pad_id", self.tokenizer.pad_token_id)
        kwargs.setdefault("image_size", self.image_size)
        kwargs.setdefault("image_token_count", self.image_token_count)
        return collate(examples, length, **kwargs)


def truncate_example(example: dict, length: int, image_token_count: int) -> dict:
    """Cut an example to at most `length` tokens from the right, never through an image.

    If the cut would split an image's tokens, the whole image goes (its tokens and pixel values).
    The last kept position keeps its (now outside) target only if that token was kept: otherwise
    its weight becomes 0.
    """
    n = len(example["input_ids"])
    if n <= length:
        return example
    modality = example["modality_ids"]
    cut = length
    while cut > 0 and modality[cut - 1] == IMAGE and modality[cut] == IMAGE:
        cut -= 1
    kept_images = int((modality[:cut] == IMAGE).sum()) // image_token_count
    out = {k: np.asarray(v[:cut]).copy() for k, v in example.items() if k != "pixel_values"}
    out["weights"][cut - 1 :] = 0.0  # its target lies beyond the cut
    out["pixel_values"] = example["pixel_values"][:kept_images]
    return out


def collate(
    examples: Sequence[dict],
    length: int | None = None,
    *,
    max_images: int | None = None,
    padding_side: str = "right",
    truncation: str = "error",
    pad_id: int = 0,
    image_size: int | None = None,
    image_token_count: int | None = None,
) -> dict:
    """Pad examples to one fixed-shape batch (numpy).

    Args:
      examples: processed examples (see the module docstring).
      length: L; None means the longest example.
      max_images: I, the image slots per row (zero-padded); None means the most any example has.
      padding_side: "right" (training) or "left" (generation prompts).
      truncation: "error" (raise naming the example and lengths) or "right" (see `truncate_example`).
      pad_id: input id written at PAD positions (never attended to).
      image_size, image_token_count: needed only when no example has an image / to truncate.

    Returns {"pixel_values" f32[B, I, S, S, 3], "input_ids", "modality_ids", "segment_ids" (1 real, 0 pad),
    "positions" (0..n-1 from each row's first real token, 0 at PAD), "targets" int32[B, L], "weights" f32[B, L]}.
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
    if not examples:
        raise ValueError("collate needs at least one example")
    if length is None:
        length = max(len(e["input_ids"]) for e in examples)
    rows = []
    for index, example in enumerate(examples):
        n = len(example["input_ids"])
        if n > length:
            if truncation == "error":
                raise ValueError(
                    f"example {index} has {n} tokens, more than the batch length {length} "
                    "(raise the length or pass truncation='right')"
                )
            if image_token_count is None:
                raise ValueError("truncation='right' needs image_token_count")
            example = truncate_example(example, length, image_token_count)
        rows.append(example)
    counts = [len(e["pixel_values"]) for e in rows]
    if max_images is None:
        max_images = max(counts)
    for index, count in enumerate(counts):
        if count > max_images:
            raise ValueError(f"example {index} has {count} images, more than max_images={max_images}")
    shapes = {e["pixel_values"].shape[1:] for e in rows if len(e["pixel_values"])}
    if len(shapes) > 1:
        raise ValueError(f"examples have images of different shapes: {sorted(shapes)}")
    if shapes:
        image_shape = shapes.pop()
    elif image_size is not None:
        image_shape = (image_size, image_size, 3)
    else:
        raise ValueError("no example has an image: pass image_size to build empty pixel_values")

    batch = len(rows)
    out = {
        "pixel_values": np.zeros((batch, max_images) + tuple(image_shape), np.float32),
        "input_ids": np.full((batch, length), pad_id, np.int32),
        "modality_ids": np.full((batch, length), PAD, np.int32),
        "segment_ids": np.zeros((batch, length), np.int32),
        "positions": np.zeros((batch, length), np.int32),
        "targets": np.full((batch, length), pad_id, np.int32),
        "weights": np.zeros((batch, length), np.float32),
    }
    for b, example in enumerate(rows):
        n = len(example["input_ids"])
        where = slice(0, n) if padding_side == "right" else slice(length - n, length)
        for key in ("input_ids", "modality_ids", "targets", "weights"):
            out[key][b, where] = example[key]
        out["segment_ids"][b, where] = 1
        out["positions"][b, where] = np.arange(n, dtype=np.int32)
        out["pixel_values"][b, : len(example["pixel_values"])] = example["pixel_values"]
    return out
