"""The user turn for each task, in the style of the original AKI / LLaVA evaluation prompts.

The text below becomes the user message of the chat template (the processor adds the system prompt,
roles and `<|assistant|>`); `<image>` marks where the image goes, first, as in the original.

  multiple_choice:  <image>\\n{hint}\\n{question}\\nOptions:\\nA. {A}\\nB. {B}\\n...
                    Answer with the option's letter from the given choices directly.
                    (the hint line only when the item has one)
  yes_no:           <image>\\n{question}\\nPlease answer yes or no.
                    (not repeated when the question already asks it, as MME's questions do)
  vqa:              <image>\\n{question}\\nAnswer the question using a single word or phrase.

Items without an image get the same text without the `<image>` line.
"""

from __future__ import annotations

from aki_jax.data import templates
from aki_jax.evaluation.items import Item
from aki_jax.processing.tokenizer import IMAGE_TOKEN

# The same words as the training data's templates (why: see aki_jax.data.templates).
MC_INSTRUCTION = templates.MULTIPLE_CHOICE
VQA_INSTRUCTION = templates.SHORT_ANSWER
YES_NO_INSTRUCTION = "Please answer yes or no."


def user_prompt(item: Item) -> str:
    """The user message for `item` (see the module docstring)."""
    lines = [IMAGE_TOKEN] if item.image is not None else []
    if item.task == "multiple_choice":
        if item.hint:
            lines.append(item.hint)
        lines.append(item.question)
        lines.append("Options:")
        lines.extend(f"{letter}. {text}" for letter, text in item.options)
        lines.append(MC_INSTRUCTION)
    elif item.task == "yes_no":
        lines.append(item.question)
        if YES_NO_INSTRUCTION.lower() not in item.question.lower():
            lines.append(YES_NO_INSTRUCTION)
    else:
        lines.append(item.question)
        lines.append(VQA_INSTRUCTION)
    return "\n".join(lines)


def candidate_answers(item: Item, continuation: str = "letter") -> list[tuple[str, str]]:
    """(label, assistant answer text) pairs scored by likelihood.

    multiple_choice: continuation "letter" scores "A", "B", ... (what the instruction asks for);
      "option" scores "A. {option text}", which lets the option's words count too.
    yes_no: "Yes" and "No" (the capitalised form a chat model writes).
    """
    if item.task == "multiple_choice":
        if continuation == "letter":
            return [(letter, letter) for letter in item.letters]
        if continuation == "option":
            return [(letter, f"{letter}. {text}") for letter, text in item.options]
        raise ValueError(f"continuation must be 'letter' or 'option', got {continuation!r}")
    if item.task == "yes_no":
        return [("yes", "Yes"), ("no", "No")]
    raise ValueError(f"item {item.index}: task {item.task!r} has no candidate answers to score by likelihood")
