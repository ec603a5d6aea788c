"""VQA accuracy with the answer normalisation of the official VQA evaluation.

Normalisation (applied to the prediction and to every reference):
  1. newlines/tabs to spaces, surrounding whitespace stripped;
  2. punctuation: each mark in PUNCTUATION is deleted when it touches a space (or the text holds a
     digit-comma-digit number), otherwise replaced by a space; a period is deleted unless it is a
     decimal point (between digits);
  3. lower case; number words zero..ten become digits ("none" -> "0"); articles a/an/the removed;
     apostrophe-less contractions restored ("dont" -> "don't").

Accuracy, `vqa_accuracy(prediction, references)`:
  "official" (default): the mean, over the N leave-one-out subsets of the N references, of
      min(1, #matches in the subset / 3). With the usual 10 human answers this is the official metric.
  "simple": min(1, #matches / 3) over all references (the common shortcut; equals "official" when
      all or none of 10 references match, and differs by at most 0.1 otherwise).
With a single reference both reduce to exact match after normalisation.
"""

from __future__ import annotations

import re

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = {"a", "an", "the"}
# Written without apostrophe -> standard form. Multi-apostrophe forms accept either missing apostrophe.
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's i'd i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd she'd've "
    "she'll she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's "
    "someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd "
    "there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd we'd've we'll "
    "we're we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've "
    "who'll who're who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll "
    "y'all'd've you'd you'd've you'll you're you've"
).split()


def _contraction_table() -> dict[str, str]:
    table = {}
    for word in _CONTRACTIONS:
        parts = word.split("'")
        table["".join(parts)] = word
        # "couldn't've" is also written "couldnt've" or "couldn'tve": accept each single omission.
        if len(parts) > 2:
            for skip in range(1, len(parts)):
                kept = "".join(p + ("" if j + 1 == skip else "'") for j, p in enumerate(parts[:-1])) + parts[-1]
                table[kept] = word
    return table


CONTRACTIONS = _contraction_table()
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    keep_numbers = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or keep_numbers:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def _words(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """The official VQA normalisation (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _words(_punctuation(text))


def vqa_accuracy(prediction: str, references, form: str = "official") -> float:
    """VQA accuracy in [0, 1] of one prediction against its references (see the module docstring)."""
    references = [normalize_answer(r) for r in references]
    if not references:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    guess = normalize_answer(prediction)
    matches = [r == guess for r in references]
    if form == "simple":
        return min(1.0, sum(matches) / 3.0)
    if form != "official":
        raise ValueError(f"VQA accuracy form must be 'official' or 'simple', got {form!r}")
    if len(references) == 1:
        return float(matches[0])
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(matches)
