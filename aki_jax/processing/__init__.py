"""Processing: images, tokenizer, chat template and the processor that builds examples and batches.

API (everything numpy; see each module for details):

    from aki_jax.processing import Processor, collate, load_tokenizer, train_tokenizer, preprocess_image

    tok = load_tokenizer(checkpoint_dir)          # tokenizer.json (+ tokenizer_config.json); adds <pad>,
                                                  # <image>, <|endofchunk|> like the original when missing
    tok = train_tokenizer(texts, 400, out_dir)    # tiny Phi-3-like tokenizer for tests; tok.initial_tokenizer_len
                                                  # -> aki_jax.tiny(initial_tokenizer_len=..., vocab_size>=...)
    tok.encode(text) / tok.decode(ids) / tok.image_token_id / tok.pad_token_id / tok.stop_token_ids

    pixels = preprocess_image(image, size)        # PIL / path / bytes / array -> f32[size, size, 3] in [-1, 1]

    proc = Processor.from_config(config, tok)     # or Processor(tok, image_token_count, image_size)
    ex = proc.sft_example(messages, images)       # messages: [{"role": "system"|"user"|"assistant",
                                                  #             "content": "...<image>..."}, ...]
    ex = proc.caption_example(caption, [image])   # <image>{caption}<|endofchunk|><|endoftext|>
    ex = proc.prompt_example(question, [image])   # inference prompt ending with <|assistant|>\\n
    # ex: {"input_ids" int32[n], "modality_ids" int32[n], "targets" int32[n], "weights" f32[n],
    #      "pixel_values" f32[I, S, S, 3]}; pass pixel_values=... instead of images if already preprocessed.

    batch = proc.collate([ex, ...], length=512, max_images=1, padding_side="right", truncation="error")
    # -> {"pixel_values" f32[B, I, S, S, 3], "input_ids", "modality_ids", "segment_ids", "positions",
    #     "targets" int32[B, L], "weights" f32[B, L]}

Generation on top of this: `aki_jax.generation.generate_text(model, params, tok, question, [image])` and
the array-level `aki_jax.generation.generate(model, params, pixel_values, input_ids, modality_ids, N)`.

Errors are ValueErrors naming the cause: placeholder/image count mismatch, an example longer than the
batch (truncation="right" instead cuts the tail, dropping any image it would split), too many images.
"""

from aki_jax.processing.image import ImageError, load_image, open_image, preprocess_image, preprocess_images
from aki_jax.processing.processor import Processor, collate, truncate_example
from aki_jax.processing.template import SYSTEM_MESSAGE, Segment, render_caption, render_chat
from aki_jax.processing.tokenizer import (
    END_OF_CHUNK_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

__all__ = [
    "END_OF_CHUNK_TOKEN",
    "ImageError",
    "IMAGE_TOKEN",
    "PAD_TOKEN",
    "Processor",
    "SYSTEM_MESSAGE",
    "Segment",
    "Tokenizer",
    "collate",
    "load_image",
    "load_tokenizer",
    "open_image",
    "preprocess_image",
    "preprocess_images",
    "render_caption",
    "render_chat",
    "train_tokenizer",
    "truncate_example",
]
