"""Question templates per task kind, as in the instruction data AKI was tuned on (LLaVA-1.5 patterns).

plain            the question as given
short_answer     question + "Answer the question using a single word or phrase."  (VQAv2, GQA, ...)
multiple_choice  question, options "A. ...", "B. ...", + "Answer with the option's letter from the given
                 choices directly."; the answer becomes the option's letter  (ScienceQA, MMBench, ...)
caption          the caption alone follows the image (pretraining; no chat)
"""

from __future__ import annotations

TEMPLATES = ("plain", "short_answer", "multiple_choice", "caption")
# The instruction suffixes of LLaVA-1.5's SFT mix (llava_v1_5_mix665k: VQAv2/GQA use SHORT_ANSWER,
# ScienceQA/A-OKVQA MULTIPLE_CHOICE), the kind of instruction data AKI was tuned on. Evaluation
# (aki_jax.evaluation.prompts) asks with the same words on purpose: LLaVA-1.5's own MMBench script
# (llava/eval/model_vqa_mmbench.py, --single-pred-prompt) and lmms-eval's MMBench post_prompt both use
# "...from the given choices directly.", so a model is scored on the phrasing it was trained to answer.
SHORT_ANSWER = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def format_question(template: str, question: str, answer: str, choices=None) -> tuple[str, str]:
    """(question, answer) -> the (user text, assistant text) of one turn under `template`.

    For multiple choice, `answer` may be an option's text, its letter, or its index as a string.
    Raises ValueError when the answer is not one of the choices.
    """
    if template == "plain":
        return question, answer
    if template == "short_answer":
        return f"{question}\n{SHORT_ANSWER}", answer
    if template == "multiple_choice":
        if not choices:
            raise ValueError("multiple_choice needs a non-empty 'choices' list")
        choices = [str(c) for c in choices]
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
        if answer in choices:
            letter = LETTERS[choices.index(answer)]
        elif len(answer) == 1 and answer.upper() in LETTERS[: len(choices)]:
            letter = answer.upper()
        elif answer.isdigit() and int(answer) < len(choices):
            letter = LETTERS[int(answer)]
        else:
            raise ValueError(f"answer {answer!r} is not one of the choices {choices}")
        return f"{question}\n{options}\n{MULTIPLE_CHOICE}", letter
    raise ValueError(f"unknown question template {template!r}; known: {TEMPLATES}")
