"""Turning generated text into an answer: option letter, yes/no, short answer.

Extraction is deliberately rule-based and conservative (no judge model): when the text does not
name exactly one option, the prediction is None and counts as wrong (reported as `unparsed`).
"""

from __future__ import annotations

import re

from aki_jax.evaluation.vqa import strip_punctuation

_LEADING_LETTER = re.compile(r"^\(?([A-H])(?:[\s.):,]|$)")
_ANSWER_IS = re.compile(r"\b(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*\(?([A-H])\b")
_LONE_LETTER = re.compile(r"(?<![A-Za-z'])\(?([A-H])\)?(?![A-Za-z'])")


def extract_choice(text: str, options) -> str | None:
    """The option letter a generated answer names, or None.

    options: ((letter, option text), ...). Tried in order:
      1. the answer starts with a letter: "B", "B.", "(B) cat", "B: cat";
      2. "the answer is B" / "Answer: (B)";
      3. exactly one option letter standing alone in the text ("I think B");
      4. exactly one option's text occurs in the answer (case-insensitive), e.g. "a cat" for "cat";
         the longest match wins when one option text contains another ("red" vs "dark red").
    """
    letters = {letter for letter, _ in options}
    stripped = text.strip().strip("*").strip()
    match = _LEADING_LETTER.match(stripped)
    if match and match.group(1) in letters:
        return match.group(1)
    for match in _ANSWER_IS.finditer(stripped):
        letter = match.group(1)
        if letter in letters:
            return letter
    alone = {m.group(1) for m in _LONE_LETTER.finditer(stripped)} & letters
    # A lone capital "A" is usually the article; trust it only when it is the only letter named.
    if len(alone) == 1 and not (alone == {"A"} and len(stripped.split()) > 1):
        return alone.pop()
    lowered = stripped.lower()
    found = [(len(option), letter) for letter, option in options if option and option.lower() in lowered]
    if not found:
        return None
    found.sort(reverse=True)
    longest = [letter for length, letter in found if length == found[0][0]]
    if len(longest) != 1:
        return None
    containing = [letter for _, letter in found]
    # Every other found option must be part of the longest (e.g. "red" inside "dark red"); else ambiguous.
    best_text = dict(options)[longest[0]].lower()
    if all(dict(options)[letter].lower() in best_text for letter in containing):
        return longest[0]
    return None


def extract_yes_no(text: str) -> str | None:
    """ "yes"/"no" when exactly one of the two occurs as a word, else None (unparsed).

    VLMEvalKit's rule (`YOrN_Extraction` in vlmeval/dataset/utils/yorn.py, without its judge-model
    fallback): lower case, the VQA punctuation step (`vqa.strip_punctuation`: "Yes/No" -> "yes no"),
    split on whitespace. So "No doubt, yes.", "Yes and no" and "yes there is no dog" are None, as is
    an answer with neither word.
    """
    words = strip_punctuation(text.lower()).split()
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes != has_no:
        return "yes" if has_yes else "no"
    return None


def extract_short_answer(text: str) -> str:
    """The first non-empty line: the model was asked for a word or phrase (VQA normalisation does the rest)."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""
