"""Scoring conventions pinned to the community's reference scorers (no model involved).

- VQA answer normalisation against the official VQA evaluation code's rules (GT-Vision-Lab/VQA,
  vqaEval.py), re-implemented here independently (character loops, no regular expressions) with the
  official contractions table written out again, on every contraction and a few hundred crafted strings;
- yes/no extraction against VLMEvalKit's `YOrN_Extraction` rule (ambiguous answers are unparsed);
- POPE in VLMEvalKit's merged layout (one row in several splits), per-split figures counted by hand;
- MMBench circular accuracy per category and per l2-category, counted by hand;
- readers: a byte-order mark and column names in another case.
"""

import json
import random

import pytest

from aki_jax.evaluation import answers, job, runner
from aki_jax.evaluation.readers import read_benchmark, write_benchmark
from aki_jax.evaluation.vqa import CONTRACTIONS, normalize_answer, vqa_accuracy

# --- the official VQA processing, written independently ---------------------------------------------------

# The official table (vqaEval.py, `self.contractions`), as written there: key -> value.
OFFICIAL_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
OFFICIAL_PUNCT = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
OFFICIAL_NUMBERS = dict(
    zip(
        "none zero one two three four five six seven eight nine ten".split(),
        "0 0 1 2 3 4 5 6 7 8 9 10".split(),
        strict=True,
    )
)


def _is_digit(c: str) -> bool:
    return c.isdecimal()  # what `\d` matches in a str pattern


def official(text: str) -> str:
    """The official order: whitespace, processPunctuation, processDigitArticle (see vqa.py's docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    digit_comma_digit = any(
        text[i] == "," and _is_digit(text[i - 1]) and _is_digit(text[i + 1]) for i in range(1, len(text) - 1)
    )
    out = text
    for p in OFFICIAL_PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or digit_comma_digit) else " ")
    # periodStrip: a period not followed by a digit goes; `sub(.., re.UNICODE)` makes that the first 32.
    kept, removed = [], 0
    for i, c in enumerate(out):
        if c == "." and not (i + 1 < len(out) and _is_digit(out[i + 1])) and removed < 32:
            removed += 1
            continue
        kept.append(c)
    words = []
    for word in "".join(kept).lower().split():
        word = OFFICIAL_NUMBERS.get(word, word)
        if word not in ("a", "an", "the"):
            words.append(word)
    return " ".join(OFFICIAL_CONTRACTIONS.get(w, w) for w in words)


def test_contractions_table_is_the_official_one_and_every_entry_applies():
    assert CONTRACTIONS == OFFICIAL_CONTRACTIONS
    for written, standard in OFFICIAL_CONTRACTIONS.items():
        # Keys with capitals never match: the official code lower-cases before the lookup.
        expected = standard if written == written.lower() else written.lower()
        assert normalize_answer(written) == official(written) == expected, written
        assert normalize_answer(f"The {written}.") == expected, written
    # Real words the old word-list table rewrote stay as they are.
    for word in ("well", "were", "shed", "shell", "wed", "ill", "id", "its", "hell", "lets", "whore", "cant've"):
        assert normalize_answer(word) == word


HAND_DERIVED = {
    "2.": "2",
    "4.": "4",
    "3.5": "3.5",
    ".5": ".5",
    "1,000": "1000",
    "1,000 (approx)": "1000 approx",  # a digit-comma-digit deletes every mark, ( and ) too
    "3:30": "3:30",
    "12:00.": "12:00",
    "U.S.A.": "usa",
    "left-side": "left side",
    "black/white": "black white",
    "a+b": "b",  # "+" becomes a space, then the article "a" goes
    "yes, it is": "yes it is",
    "The Two dogs.": "2 dogs",
    "dont know!": "don't know",
    "Im here": "im here",
    "none": "0",
    "ten. ": "10",
    "." * 40: "." * 8,  # at most 32 periods removed
    "\tTwo\ncats\t": "2 cats",
}


def test_hand_derived_cases():
    for text, expected in HAND_DERIVED.items():
        assert normalize_answer(text) == official(text) == expected, repr(text)
    assert vqa_accuracy("4", ["4."]) == 1.0 and vqa_accuracy("2.", ["2"]) == 1.0


TOKENS = (
    "the a an The A AN two Ten none NONE zero dont Dont well were shed shell its cant yall Im hes cat dogs 3 "
    "2. 4. 3.5 .5 0.25 1,000 10,000.5 1,2,3 3:30 12:00. p.m. U.S.A. e.g. Yes. no! left-side black/white (red) "
    "[1] {x} x=y a+b C++ @home back\\slash snake_case <b> `code` \"quoted\" it's o'clock Dr. ... ?! -5 5- 50% "
    "twenty one,two 7,5 ,5 5, 1.5.2 mr.smith isnt y'allll somebody'd"
).split()
SEPARATORS = (" ", "  ", "\t", "\n", ", ", "; ", " - ", "/", "-", ".", ". ", " (", ") ", ",")


def _crafted(count=400, seed=0):
    rng = random.Random(seed)
    strings = []
    for _ in range(count):
        parts = [rng.choice(TOKENS) for _ in range(rng.randint(1, 5))]
        text = parts[0]
        for part in parts[1:]:
            text += rng.choice(SEPARATORS) + part
        if rng.random() < 0.3:
            text = rng.choice((" ", "\n", "\t", "")) + text + rng.choice((".", "?", "!", " ", "\n", ""))
        strings.append(text)
    return strings


def test_crafted_strings_follow_the_official_rules():
    strings = _crafted() + TOKENS + ["", " ", ".", ",", "a", "the the", "1,000 and 2.", "3 . 5", "3. 5"]
    assert len(strings) > 400
    mismatches = [(s, normalize_answer(s), official(s)) for s in strings if normalize_answer(s) != official(s)]
    assert mismatches == []


# --- yes / no ---------------------------------------------------------------------------------------------


def vlmevalkit_yes_no(text: str):
    """VLMEvalKit's YOrN_Extraction: lower case, the VQA punctuation step, yes xor no among the words."""
    words = official_punctuation(text.lower()).split()
    if ("yes" in words) != ("no" in words):
        return "yes" if "yes" in words else "no"
    return None


def official_punctuation(text: str) -> str:
    # processPunctuation alone: the part of `official` before lower-casing (no whitespace step, no words).
    digit_comma_digit = any(
        text[i] == "," and _is_digit(text[i - 1]) and _is_digit(text[i + 1]) for i in range(1, len(text) - 1)
    )
    out = text
    for p in OFFICIAL_PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or digit_comma_digit) else " ")
    kept, removed = [], 0
    for i, c in enumerate(out):
        if c == "." and not (i + 1 < len(out) and _is_digit(out[i + 1])) and removed < 32:
            removed += 1
            continue
        kept.append(c)
    return "".join(kept)


YES_NO_ANSWERS = {
    "No doubt, yes.": None,
    "Yes and no": None,
    "Yes/No": None,
    "yes there is no dog": None,
    "perhaps": None,
    "": None,
    "Yes": "yes",
    "yes.": "yes",
    "Yes, there is a cat.": "yes",
    "No.": "no",
    "There is no dog.": "no",
    "no-one": "no",  # "-" becomes a space
    "Nope": None,
    "Yesterday": None,
    "(yes)": "yes",
    "YES!!": "yes",
    "No, it is not": "no",
    "The answer is yes": "yes",
}


def test_yes_no_extraction_is_vlmevalkits_rule_and_ambiguity_is_unparsed():
    for text, expected in YES_NO_ANSWERS.items():
        assert answers.extract_yes_no(text) == vlmevalkit_yes_no(text) == expected, text
    for text in _crafted(200, seed=1):
        text = text.replace("cat", "yes").replace("dogs", "no")
        assert answers.extract_yes_no(text) == vlmevalkit_yes_no(text), text


# --- a stand-in scorer with fixed predictions, through the runner and the job ----------------------------


class FixedScorer:
    """Predicts what `predictions[index]` says (None: an unparsed answer)."""

    rows_per_step = 4

    def __init__(self, predictions):
        self.predictions = predictions

    def settings(self):
        return {"mode": "fixed"}

    def prepare(self, item):
        return item

    def run(self, prepared):
        return [None] * len(prepared)

    def finish(self, item, output):
        return {"prediction": self.predictions[item.index]}


def test_unparsed_yes_no_answers_score_zero_and_are_listed(tmp_path):
    rows = [{"index": i, "question": "Is there a cat?", "answer": "Yes"} for i in range(3)]
    write_benchmark(rows, tmp_path / "yn.tsv")
    bench = read_benchmark(tmp_path / "yn.tsv")
    texts = {0: "Yes.", 1: "Yes and no", 2: "No doubt, yes."}
    scorer = FixedScorer({i: answers.extract_yes_no(t) for i, t in texts.items()})
    scores = runner.evaluate_benchmark(bench, scorer, tmp_path / "out", progress=False)
    assert scores["unparsed"] == 2 and scores["unparsed_indices"] == [1, 2]
    assert scores["accuracy"] == pytest.approx(1 / 3)


# POPE in VLMEvalKit's merged layout: (truth, prediction, category); None is an unparsed answer.
POPE_ROWS = [
    ("Yes", "yes", "adversarial,random"),
    ("No", "yes", "adversarial,random"),
    ("Yes", "no", "adversarial"),
    ("No", "no", "random,popular"),
    ("Yes", "yes", "popular"),
    ("No", "yes", "popular"),
    ("Yes", None, "random"),
]


def test_pope_rows_shared_between_splits_count_in_each_split_and_overall(tmp_path):
    rows = [
        {"index": i, "question": "Is there a cat?", "answer": t, "category": c} for i, (t, _, c) in enumerate(POPE_ROWS)
    ]
    write_benchmark(rows, tmp_path / "POPE.tsv")
    bench = read_benchmark(tmp_path / "POPE.tsv")
    scorer = FixedScorer({i: p for i, (_, p, _) in enumerate(POPE_ROWS)})
    results = job.evaluate([bench], scorer, tmp_path / "out", progress=False)
    pope = results["POPE"]["scores"]["pope"]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["POPE"]["scores"]["pope"] == pope
    assert pope["rows"] == 7 and pope["shared_rows"] == 3
    # By hand. adversarial = rows 0, 1, 2: tp 1 (0), fp 1 (1), fn 1 (2), tn 0.
    # random = rows 0, 1, 3, 6: tp 1, fp 1, tn 1 (3), fn 1 (6: unparsed, truth yes).
    # popular = rows 3, 4, 5: tn 1 (3), tp 1 (4), fp 1 (5).
    # overall = the 10 rows after expansion: tp 3, fp 3, fn 2, tn 2.
    expected = {
        "adversarial": dict(accuracy=1 / 3, precision=1 / 2, recall=1 / 2, f1=1 / 2, yes_ratio=2 / 3, count=3),
        "random": dict(accuracy=2 / 4, precision=1 / 2, recall=1 / 2, f1=1 / 2, yes_ratio=2 / 4, count=4),
        "popular": dict(accuracy=2 / 3, precision=1 / 2, recall=1, f1=2 / 3, yes_ratio=2 / 3, count=3),
    }
    assert sorted(pope["per_category"]) == sorted(expected)
    for split, figures in expected.items():
        assert pope["per_category"][split] == pytest.approx(figures), split
    p, r = 3 / 6, 3 / 5
    overall = dict(accuracy=5 / 10, precision=p, recall=r, f1=2 * p * r / (p + r), yes_ratio=6 / 10, count=10)
    assert pope["overall"] == pytest.approx(overall)
    per_category = results["POPE"]["scores"]["per_category"]
    assert {c: v["count"] for c, v in per_category.items()} == {"adversarial": 3, "popular": 3, "random": 4}


def test_mmbench_circular_accuracy_per_category_and_l2_category(tmp_path):
    # (index, category, l2-category, right?): rotations of one question share index % 1,000,000.
    layout = [
        (1, "ocr", "perception", True),
        (1_000_001, "ocr", "perception", True),
        (2, "ocr", "perception", True),
        (1_000_002, "ocr", "perception", False),
        (3, "logic", "reasoning", True),
        (1_000_003, "logic", "reasoning", True),
        (2_000_003, "logic", "reasoning", True),
        (4, "logic", "perception", False),
    ]
    rows = [
        {"index": i, "question": f"q{i}", "A": "x", "B": "y", "answer": "A", "category": c, "l2-category": l2}
        for i, c, l2, _ in layout
    ]
    write_benchmark(rows, tmp_path / "mmbench.tsv")
    bench = read_benchmark(tmp_path / "mmbench.tsv")
    scorer = FixedScorer({i: "A" if right else "B" for i, _, _, right in layout})
    scores = job.evaluate([bench], scorer, tmp_path / "out", progress=False)["mmbench"]["scores"]
    # ocr: questions 1 (all right), 2 (one wrong) -> 1/2; items 3 of 4 right.
    # logic: questions 3 (all right), 4 (wrong) -> 1/2; items 3 of 4 right.
    # perception: questions 1, 2, 4 -> 1/3; items 3 of 5.  reasoning: question 3 -> 1; items 3 of 3.
    assert scores["circular_accuracy"] == pytest.approx(2 / 4)
    expected = {
        "per_category": {"logic": (3 / 4, 4, 1 / 2, 2), "ocr": (3 / 4, 4, 1 / 2, 2)},
        "per_l2_category": {"perception": (3 / 5, 5, 1 / 3, 3), "reasoning": (1.0, 3, 1.0, 1)},
    }
    for key, groups in expected.items():
        assert sorted(scores[key]) == sorted(groups), key
        for group, want in groups.items():
            v = scores[key][group]
            assert (v["accuracy"], v["count"], v["circular_accuracy"], v["questions"]) == pytest.approx(want), group
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| perception | 5 | 60.00 | 33.33 |" in table and "| ocr | 4 | 75.00 | 50.00 |" in table


# --- readers ------------------------------------------------------------------------------------------------


def test_byte_order_mark_and_column_case_are_accepted(tmp_path):
    rows = [
        {"index": 1, "question": "Is there a cat?", "answer": "Yes", "category": "random"},
        {"index": 2, "question": "Which?", "A": "x", "B": "y", "answer": "B", "category": "ocr"},
    ]
    write_benchmark(rows, tmp_path / "plain.tsv")
    reference = read_benchmark(tmp_path / "plain.tsv")
    text = (tmp_path / "plain.tsv").read_text(encoding="utf-8")
    header, body = text.split("\n", 1)
    shouted = "\t".join(h.capitalize() if len(h) > 1 else h.lower() for h in header.split("\t"))
    assert shouted.startswith("Index\tQuestion\tAnswer") and "\ta\tb" in shouted
    (tmp_path / "bom.tsv").write_bytes(b"\xef\xbb\xbf" + (shouted + "\n" + body).encode("utf-8"))
    bench = read_benchmark(tmp_path / "bom.tsv")
    assert bench.errors == [] and bench.items == reference.items

    lines = ["\ufeff" + json.dumps({"Index": 1, "Question": "Is there a cat?", "ANSWER": "Yes", "Category": "random"})]
    lines.append(
        json.dumps(
            {"index": 2, "question": "Which?", "Options": {"A": "x", "B": "y"}, "answer": "B"} | {"category": "ocr"}
        )
    )
    (tmp_path / "bom.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    bench = read_benchmark(tmp_path / "bom.jsonl")
    assert bench.errors == [] and bench.items == reference.items
