"""VQA accuracy with the answer normalisation of the official VQA evaluation code.

The rules, the tables below and their order follow `PythonEvaluationTools/vqaEvaluation/vqaEval.py`
of github.com/GT-Vision-Lab/VQA (`processPunctuation`, then `processDigitArticle`); VLMEvalKit's
`vlmeval/dataset/utils/vqa_eval.py` applies the same two steps. Applied to the prediction and to
every reference:

  1. newlines and tabs become spaces; surrounding whitespace is stripped;
  2. punctuation: each mark of PUNCTUATION is deleted if it touches a space in the text, or if the text
     holds a digit-comma-digit anywhere ("1,000"); otherwise it is replaced by a space. Then every period
     NOT FOLLOWED BY A DIGIT is deleted ("2." -> "2", "3.5" and ".5" keep theirs). (The official pattern
     `(?!<=\\d)(\\.)(?!\\d)` reads like a look-behind but is a look-ahead that always passes, and its
     `re.UNICODE` lands in the `count` argument of `sub`: at most 32 periods go. Both kept as they are.)
  3. lower case, split on whitespace; each word that is a NUMBER_WORDS key becomes its digit; articles
     are dropped; then each word that is a key of CONTRACTIONS is replaced by its value; words are
     joined by single spaces. The table is the official one verbatim, quirks included: its "Im", "Ive",
     "Id've" and "I'dve" keys can never match (words are lower-cased first), and it maps "somebody'd"
     to "somebodyd". Apostrophes, colons and periods between digits are never removed ("3:30", "3.5").

Where the official script differs (deliberately not followed): it normalises references only when they
disagree, and then only step 2, because the official annotations ship normalised; benchmark files here
(like VLMEvalKit's) do not, so every reference gets all three steps.

Accuracy, `vqa_accuracy(prediction, references)`:
  "official" (default): the mean, over the N leave-one-out subsets of the N references, of
      min(1, #matches in the subset / 3). With the usual 10 human answers this is the official metric.
  "simple": min(1, #matches / 3) over all references (the common shortcut; equals "official" when
      all or none of 10 references match, and differs by at most 0.1 otherwise).
With a single reference both reduce to exact match after normalisation (the leave-one-out form would
leave no reference and score 0: VLMEvalKit's `vqa_score` does, here it is exact match on purpose).
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
ARTICLES = ("a", "an", "the")
# The official contractions table, entry for entry (pairs "written -> standard", space separated).
_CONTRACTION_PAIRS = """
aint ain't  arent aren't  cant can't  couldve could've  couldnt couldn't  couldn'tve couldn't've
couldnt've couldn't've  didnt didn't  doesnt doesn't  dont don't  hadnt hadn't  hadnt've hadn't've
hadn'tve hadn't've  hasnt hasn't  havent haven't  hed he'd  hed've he'd've  he'dve he'd've  hes he's
howd how'd  howll how'll  hows how's  Id've I'd've  I'dve I'd've  Im I'm  Ive I've  isnt isn't  itd it'd
itd've it'd've  it'dve it'd've  itll it'll  let's let's  maam ma'am  mightnt mightn't
mightnt've mightn't've  mightn'tve mightn't've  mightve might've  mustnt mustn't  mustve must've
neednt needn't  notve not've  oclock o'clock  oughtnt oughtn't  ow's'at 'ow's'at  'ows'at 'ow's'at
'ow'sat 'ow's'at  shant shan't  shed've she'd've  she'dve she'd've  she's she's  shouldve should've
shouldnt shouldn't  shouldnt've shouldn't've  shouldn'tve shouldn't've  somebody'd somebodyd
somebodyd've somebody'd've  somebody'dve somebody'd've  somebodyll somebody'll  somebodys somebody's
someoned someone'd  someoned've someone'd've  someone'dve someone'd've  someonell someone'll
someones someone's  somethingd something'd  somethingd've something'd've  something'dve something'd've
somethingll something'll  thats that's  thered there'd  thered've there'd've  there'dve there'd've
therere there're  theres there's  theyd they'd  theyd've they'd've  they'dve they'd've  theyll they'll
theyre they're  theyve they've  twas 'twas  wasnt wasn't  wed've we'd've  we'dve we'd've  weve we've
werent weren't  whatll what'll  whatre what're  whats what's  whatve what've  whens when's
whered where'd  wheres where's  whereve where've  whod who'd  whod've who'd've  who'dve who'd've
wholl who'll  whos who's  whove who've  whyll why'll  whyre why're  whys why's  wont won't
wouldve would've  wouldnt wouldn't  wouldnt've wouldn't've  wouldn'tve wouldn't've  yall y'all
yall'll y'all'll  y'allll y'all'll  yall'd've y'all'd've  y'alld've y'all'd've  y'all'dve y'all'd've
youd you'd  youd've you'd've  you'dve you'd've  youll you'll  youre you're  youve you've
""".split()
CONTRACTIONS = dict(zip(_CONTRACTION_PAIRS[::2], _CONTRACTION_PAIRS[1::2], strict=True))
_PERIOD = re.compile(r"\.(?!\d)")
_PERIODS_REMOVED_AT_MOST = 32  # the official `sub(..., re.UNICODE)`: re.UNICODE == 32 taken as `count`
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")


def strip_punctuation(text: str) -> str:
    """Step 2 of the module docstring (the official `processPunctuation`)."""
    out = text
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        # Tested on the original text, not on what earlier marks left: as the official code does.
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIODS_REMOVED_AT_MOST)


def _words(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(text: str) -> str:
    """The official VQA normalisation (steps 1-3 of the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _words(strip_punctuation(text))


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
