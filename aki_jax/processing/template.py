"""The chat and caption templates, rendered as text segments that know what is supervised.

Chat (Phi-3.5 roles), exactly the original's string for one user turn:

    <s> <|system|>\\n{system}<|end|>\\n<|user|>\\n<image>\\n{question}<|end|>\\n<|assistant|>\\n{answer}<|end|>

More turns repeat `<|user|>\\n{content}<|end|>\\n<|assistant|>\\n{answer}<|end|>`, joined by `\\n`. An
inference prompt stops after `<|assistant|>\\n`. Supervised text (SFT): each assistant answer and the
`<|end|>` that closes it. Caption pretraining: `<image>{caption}<|endofchunk|><|endoftext|>`, with the
caption, `<|endofchunk|>` and eos supervised.

A message is {"role": "system" | "user" | "assistant", "content": str}; images appear in the content
as `<image>` placeholders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from aki_jax.processing.tokenizer import END_OF_CHUNK_TOKEN, IMAGE_TOKEN

SYSTEM_MESSAGE = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Segment:
    """A piece of the rendered text. `role` is the message it belongs to ("template" for scaffolding)."""

    text: str
    supervised: bool = False
    role: str = "template"


def _check_messages(messages: Sequence[dict]) -> None:
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
        if message["role"] not in ROLES:
            raise ValueError(f"message {i}: role must be one of {ROLES}, got {message['role']!r}")
        if message["role"] == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")
        if not isinstance(message["content"], str):
            raise ValueError(f"message {i}: content must be a string, got {type(message['content']).__name__}")


def render_chat(
    messages: Sequence[dict], *, add_generation_prompt: bool = False, system_message: str = SYSTEM_MESSAGE
) -> list[Segment]:
    """Render a conversation with the chat template.

    A leading system message replaces `system_message`. With `add_generation_prompt` the text ends
    with `<|assistant|>\\n` (the last message must then be a user message).
    """
    _check_messages(messages)
    if messages[0]["role"] == "system":
        system_message, messages = messages[0]["content"], messages[1:]
    segments = [
        Segment("<s> <|system|>\n"),
        Segment(system_message, role="system"),
        Segment("<|end|>\n"),
    ]
    for i, message in enumerate(messages):
        last = i == len(messages) - 1
        if message["role"] == "user":
            segments += [Segment("<|user|>\n"), Segment(message["content"], role="user"), Segment("<|end|>\n")]
        else:
            segments += [
                Segment("<|assistant|>\n"),
                Segment(message["content"] + "<|end|>", supervised=True, role="assistant"),
            ]
            if not last:
                segments.append(Segment("\n"))
    if add_generation_prompt:
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("add_generation_prompt needs the conversation to end with a user message")
        segments.append(Segment("<|assistant|>\n"))
    return segments


def render_caption(caption: str, num_images: int = 1, eos_token: str = "<|endoftext|>") -> list[Segment]:
    """`<image>{caption}<|endofchunk|>` + eos; caption, end-of-chunk and eos supervised."""
    return [Segment(IMAGE_TOKEN * num_images), Segment(caption + END_OF_CHUNK_TOKEN + eos_token, supervised=True)]
