"""Evaluation without a model: readers (TSV/JSONL, real images), VQA normalisation, answer extraction,
metrics (accuracy, POPE, MME), and the runner's resume / merge logic with a counting stand-in scorer."""

import json

import numpy as np
import pytest
from skimage import data as skdata
from skimage.transform import resize

from aki_jax.evaluation import answers, metrics, runner
from aki_jax.evaluation.readers import encode_image, read_benchmark, write_benchmark
from aki_jax.evaluation.vqa import normalize_answer, vqa_accuracy


def _small(image, size=32):
    image = resize(image, (size, size) + image.shape[2:], anti_aliasing=True, preserve_range=True)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images():
    return {
        "astronaut": _small(skdata.astronaut()),
        "camera": _small(skdata.camera()),
        "coffee": _small(skdata.coffee()),
        "chelsea": _small(skdata.chelsea()),
    }


def _mmbench_rows(images):
    return [
        {
            "index": 10,
            "question": "What is in the image?",
            "hint": "",
            "A": "a cat",
            "B": "a person",
            "C": "a cup",
            "D": "",
            "answer": "C",
            "category": "object",
            "image": encode_image(images["coffee"]),
            "l2-category": "perception",
        },
        {
            "index": 2,
            "question": "Who is this?",
            "hint": "A photo from NASA.",
            "A": "an astronaut",
            "B": "a cat",
            "C": "",
            "D": "",
            "answer": "A",
            "category": "identity",
            "image": encode_image(images["astronaut"]),
            "l2-category": "perception",
        },
    ]


def test_tsv_multiple_choice_reads_options_hint_answer_and_keeps_other_columns(tmp_path, images):
    path = tmp_path / "mmbench.tsv"
    write_benchmark(_mmbench_rows(images), path)
    bench = read_benchmark(path)
    assert bench.errors == []
    assert [it.index for it in bench.items] == [2, 10]  # sorted by index
    first, second = bench.items
    assert first.task == "multiple_choice" and first.options == (("A", "an astronaut"), ("B", "a cat"))
    assert first.hint == "A photo from NASA." and first.answers == ("A",)
    assert second.options[-1] == ("C", "a cup") and second.hint == ""
    assert second.extra == {"l2-category": "perception"}
    pixels = np.asarray(second.image.load())
    np.testing.assert_array_equal(pixels, images["coffee"])  # base64 PNG round trip is lossless


def test_jsonl_equivalent_gives_the_same_items(tmp_path, images):
    rows = _mmbench_rows(images)
    write_benchmark(rows, tmp_path / "b.tsv")
    json_rows = []
    for row in rows:
        options = {k: row[k] for k in "ABCD" if row[k]}
        json_rows.append({k: v for k, v in row.items() if k not in "ABCD"} | {"options": options})
    write_benchmark(json_rows, tmp_path / "b.jsonl")
    tsv, jsonl = read_benchmark(tmp_path / "b.tsv"), read_benchmark(tmp_path / "b.jsonl")
    assert tsv.items == jsonl.items and jsonl.errors == []


def test_mme_image_references_and_pairs(tmp_path, images):
    """VLMEvalKit's MME TSV stores the image once; the second question names the first row's index."""
    rows = [
        {"index": 0, "image": encode_image(images["chelsea"]), "question": "Is there a cat?", "answer": "Yes"},
        {"index": 1, "image": "0", "question": "Is there a dog?", "answer": "No"},
        {"index": 2, "image": encode_image(images["camera"]), "question": "Is there a man?", "answer": "Yes"},
        {"index": 3, "image": "2", "question": "Is there a woman?", "answer": "No"},
    ]
    for row in rows:
        row["category"] = "existence"
    write_benchmark(rows, tmp_path / "MME.tsv")
    bench = read_benchmark(tmp_path / "MME.tsv")
    assert bench.errors == []
    assert [it.task for it in bench.items] == ["yes_no"] * 4
    assert [it.answers for it in bench.items] == [("yes",), ("no",), ("yes",), ("no",)]
    assert [it.group for it in bench.items] == ["0", "0", "2", "2"]
    assert bench.items[1].image == bench.items[0].image


def test_image_path_column_relative_to_the_file(tmp_path, images):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for k, digit in enumerate(_digits()[:2]):
        Image.fromarray(digit).save(tmp_path / "imgs" / f"{k}.png")
    rows = [
        {"index": k, "image_path": f"imgs/{k}.png", "question": "Which digit?", "answer": json.dumps([str(k)] * 3)}
        for k in range(2)
    ]
    write_benchmark(rows, tmp_path / "digits.tsv")
    bench = read_benchmark(tmp_path / "digits.tsv")
    assert bench.errors == []
    assert bench.items[1].task == "vqa" and bench.items[1].answers == ("1", "1", "1")
    np.testing.assert_array_equal(np.asarray(bench.items[1].image.load()), _digits()[1])


def _digits():
    from sklearn.datasets import load_digits

    return (load_digits().images[:10] * 255 / 16).astype(np.uint8)


def test_malformed_rows_are_reported_with_line_and_reason_not_fatal(tmp_path, images):
    good = _mmbench_rows(images)[0]
    header = list(good)
    lines = ["\t".join(header), "\t".join(str(good[k]) for k in header)]
    bad = dict(good)
    lines.append("\t".join(str(bad[k]) for k in header[:-2]))  # too few cells
    bad = dict(good, index=11, answer="E")
    lines.append("\t".join(str(bad[k]) for k in header))  # answer not an option
    bad = dict(good, index=12, image="bm90IGFuIGltYWdl" * 10)
    lines.append("\t".join(str(bad[k]) for k in header))  # base64 of text, not an image
    bad = dict(good, index=10)
    lines.append("\t".join(str(bad[k]) for k in header))  # duplicate index
    bad = dict(good, index=13, question="")
    lines.append("\t".join(str(bad[k]) for k in header))  # no question
    bad = dict(good, index=14, image="999")
    lines.append("\t".join(str(bad[k]) for k in header))  # reference to a missing row
    path = tmp_path / "bad.tsv"
    path.write_text("\n".join(lines) + "\n")
    bench = read_benchmark(path)
    assert [it.index for it in bench.items] == [10]
    assert len(bench.errors) == 6
    expected = [
        "9 cells, the header has 11",
        "answer ['E']",
        "not a readable image",
        "duplicate index",
        "empty `question`",
        "'999'",
    ]
    for error, needle, line in zip(bench.errors, expected, range(3, 9), strict=True):
        assert error.startswith(f"{path}:{line}:") and needle in error, error

    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"index": 1, "question": "q", "answer": "yes"}\nnot json\n[1, 2]\n')
    bench = read_benchmark(jsonl)
    assert len(bench.items) == 1 and bench.items[0].image is None
    assert "2: invalid JSON" in bench.errors[0] and "3: expected a JSON object" in bench.errors[1]


def test_vqa_normalisation_and_accuracy():
    assert normalize_answer("The Two dogs.") == "2 dogs"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("dont know!") == "don't know"
    assert normalize_answer("left-side") == "left side"
    assert normalize_answer("yes, it is") == "yes it is"
    refs = ["2"] * 3 + ["two dogs"] * 7
    # official: leave-one-out over 10 subsets. 3 matches: 3 subsets see 2 (2/3), 7 subsets see 3 (1).
    assert vqa_accuracy("Two", refs) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("Two", refs, form="simple") == 1.0
    assert vqa_accuracy("two", ["2"]) == 1.0 and vqa_accuracy("three", ["2"]) == 0.0
    assert vqa_accuracy("2", ["2"] * 10) == 1.0
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(0.9 * 1 / 3)


def test_answer_extraction():
    options = (("A", "cat"), ("B", "dog"), ("C", "red"), ("D", "dark red"))
    cases = {
        "B": "B",
        "(C) red": "C",
        "D. dark red": "D",
        "The answer is D.": "D",
        "Answer: (B)": "B",
        "I think it is a dog": "B",
        "a dark red car": "D",
        "maybe a cat or a dog": None,
        "": None,
        "Z": None,
    }
    for text, expected in cases.items():
        assert answers.extract_choice(text, options) == expected, text
    assert answers.extract_yes_no("Yes, there is.") == "yes"
    assert answers.extract_yes_no("There is no dog") == "no"
    assert answers.extract_yes_no("perhaps") is None
    assert answers.extract_short_answer("\n two \nmore") == "two"


def _yes_no_records(pairs, category="random"):
    return [
        {"index": i, "task": "yes_no", "category": category, "group": str(i // 2), "answers": [t], "prediction": p}
        | {"score": metrics.item_score("yes_no", [t], p)}
        for i, (t, p) in enumerate(pairs)
    ]


def test_pope_scores_against_hand_counts():
    pairs = [("yes", "yes")] * 3 + [("yes", "no")] + [("no", "yes")] * 2 + [("no", "no")] * 3 + [("yes", None)]
    s = metrics.pope_scores(_yes_no_records(pairs))
    tp, fp, fn, tn = 3, 2, 2, 3
    assert s["accuracy"] == pytest.approx((tp + tn) / 10)
    assert s["precision"] == pytest.approx(tp / (tp + fp))
    assert s["recall"] == pytest.approx(tp / (tp + fn))
    p, r = tp / (tp + fp), tp / (tp + fn)
    assert s["f1"] == pytest.approx(2 * p * r / (p + r))
    assert s["yes_ratio"] == pytest.approx(5 / 10)


def test_mme_pair_rule_and_perception_cognition_split():
    # existence: image 0 both right, image 1 one right -> acc 3/4, acc+ 1/2 -> 125.
    existence = _yes_no_records([("yes", "yes"), ("no", "no"), ("yes", "yes"), ("no", "yes")], "existence")
    # code_reasoning: image 0 both right -> 200.
    code = _yes_no_records([("yes", "yes"), ("no", "no")], "code_reasoning")
    for k, r in enumerate(code):
        r["index"] = 100 + k
    scores = metrics.benchmark_scores(existence + code)
    mme = scores["mme"]
    assert mme["categories"]["existence"]["score"] == pytest.approx(125.0)
    assert mme["categories"]["code_reasoning"]["score"] == pytest.approx(200.0)
    assert mme["perception"] == pytest.approx(125.0) and mme["cognition"] == pytest.approx(200.0)
    assert "count" in mme["missing_categories"]
    assert scores["accuracy"] == pytest.approx(5 / 6)
    assert scores["per_category"]["existence"]["accuracy"] == pytest.approx(0.75)


class CountingScorer:
    """Stand-in model: answers every multiple-choice item with the letter of its index mod options.

    Each item is one row; `calls` counts model calls; `fail_after` raises mid-run like a crash.
    """

    def __init__(self, rows_per_step=2, fail_after=None):
        self.rows_per_step, self.fail_after, self.calls = rows_per_step, fail_after, 0

    def settings(self):
        return {"mode": "fake"}

    def prepare(self, item):
        if item.question == "broken":
            raise runner.ItemFailed("cannot prepare")
        return item

    def run(self, prepared):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        return [item.index for item in prepared]

    def finish(self, item, output):
        assert output == item.index  # the output of this item's own row
        return {"prediction": item.letters[item.index % 3 % len(item.letters)]}


def _fake_benchmark(tmp_path, n=11):
    rows = [
        {"index": i, "question": "broken" if i == 4 else f"q{i}", "A": "x", "B": "y", "answer": "AB"[i % 2]}
        for i in range(n)
    ]
    write_benchmark(rows, tmp_path / "fake.jsonl")
    return read_benchmark(tmp_path / "fake.jsonl")


def test_killed_run_resumes_without_recomputing_finished_items(tmp_path):
    bench = _fake_benchmark(tmp_path)
    full = CountingScorer()
    reference = runner.evaluate_benchmark(bench, full, tmp_path / "full", progress=False)
    assert full.calls == -(-len(bench.items) // 2)

    crashed = CountingScorer(fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate_benchmark(bench, crashed, tmp_path / "resumed", progress=False)
    shard = tmp_path / "resumed" / "fake" / "shards" / "process-00000.jsonl"
    finished = [json.loads(line)["index"] for line in shard.read_text().splitlines()]
    assert sorted(finished) == [0, 1, 2, 3, 4, 5]  # 3 calls x 2 rows: items 0-3 and 5 done, 4 failed
    with open(shard, "a") as f:
        f.write('{"index": 6, "predic')  # a write cut by the kill

    resumed = CountingScorer()
    scores = runner.evaluate_benchmark(bench, resumed, tmp_path / "resumed", progress=False)
    assert resumed.calls == -(-(len(bench.items) - 6) // 2)  # only items 6.. are run again
    assert scores == reference
    merged = (tmp_path / "resumed" / "fake" / "predictions.jsonl").read_text()
    assert merged == (tmp_path / "full" / "fake" / "predictions.jsonl").read_text()
    again = CountingScorer()
    runner.evaluate_benchmark(bench, again, tmp_path / "resumed", progress=False)
    assert again.calls == 0


def test_processes_split_the_work_and_the_merge_is_deterministic(tmp_path):
    bench = _fake_benchmark(tmp_path)
    single = runner.evaluate_benchmark(bench, CountingScorer(), tmp_path / "one", progress=False)
    # Two "processes" that start together: each sees no finished item; their shards meet in one folder.
    calls = []
    for p in (1, 0):
        scorer = CountingScorer(rows_per_step=3)
        runner.run_predictions(bench, scorer, tmp_path / f"p{p}", runner.Distribution(p, 2), progress=False)
        calls.append(scorer.calls)
        shard = tmp_path / f"p{p}" / "fake" / "shards" / f"process-{p:05d}.jsonl"
        (tmp_path / "two" / "fake" / "shards").mkdir(parents=True, exist_ok=True)
        shard.rename(tmp_path / "two" / "fake" / "shards" / shard.name)
    assert calls == [2, 2]  # 5 and 6 rows in steps of 3
    shards = sorted((tmp_path / "two" / "fake" / "shards").glob("*.jsonl"))
    assert [s.name for s in shards] == ["process-00000.jsonl", "process-00001.jsonl"]
    indices = [[json.loads(x)["index"] for x in s.read_text().splitlines()] for s in shards]
    assert indices == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9]]
    merged = runner.merge_predictions(bench, tmp_path / "two")
    assert [r["index"] for r in merged] == list(range(11))
    assert runner.write_results(bench, tmp_path / "two", merged) == single
    assert (tmp_path / "two" / "fake" / "predictions.jsonl").read_bytes() == (
        tmp_path / "one" / "fake" / "predictions.jsonl"
    ).read_bytes()
    failed = [r for r in merged if r.get("error")]
    assert [r["index"] for r in failed] == [4] and failed[0]["score"] == 0.0


def test_rerun_with_other_settings_is_refused(tmp_path):
    bench = _fake_benchmark(tmp_path, n=3)
    runner.evaluate_benchmark(bench, CountingScorer(), tmp_path, progress=False)
    other = CountingScorer()
    other.settings = lambda: {"mode": "other"}
    with pytest.raises(ValueError, match="other settings \\(mode"):
        runner.evaluate_benchmark(bench, other, tmp_path, progress=False)


def test_mmbench_circular_accuracy_needs_every_rotation_right():
    def record(index, score):
        return {"index": index, "task": "multiple_choice", "category": "", "group": "", "answers": ["A"]} | {
            "prediction": "A" if score else "B",
            "score": float(score),
        }

    # question 1: both rotations right; question 2: one of two right; question 3: no rotation.
    records = [record(1, 1), record(1_000_001, 1), record(2, 1), record(1_000_002, 0), record(3, 1)]
    scores = metrics.benchmark_scores(records)
    assert scores["circular_accuracy"] == pytest.approx(2 / 3)
    assert scores["accuracy"] == pytest.approx(4 / 5)
    assert "circular_accuracy" not in metrics.benchmark_scores(records[:1] + records[2:3])


KILLED_WORKER = """
import os, signal, sys
from aki_jax.evaluation import runner
from aki_jax.evaluation.readers import read_benchmark

class Scorer:
    rows_per_step = 2
    calls = 0
    def settings(self): return {"mode": "fake"}
    def prepare(self, item): return item
    def run(self, prepared):
        if self.calls == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a real preemption
        self.calls += 1
        return [None] * len(prepared)
    def finish(self, item, output): return {"prediction": "A"}

runner.evaluate_benchmark(read_benchmark(sys.argv[1]), Scorer(), sys.argv[2], progress=False)
"""


def test_sigkilled_process_keeps_every_item_it_finished(tmp_path):
    import subprocess
    import sys

    bench = _fake_benchmark(tmp_path, n=9)
    command = [sys.executable, "-c", KILLED_WORKER, bench.path, str(tmp_path / "out"), "3"]
    assert subprocess.run(command).returncode == -9
    shard = tmp_path / "out" / "fake" / "shards" / "process-00000.jsonl"
    assert [json.loads(x)["index"] for x in shard.read_text().splitlines()] == [0, 1, 2, 3, 4, 5]  # 3 steps x 2 rows
    scorer = CountingScorer()
    runner.evaluate_benchmark(bench, scorer, tmp_path / "out", progress=False)
    assert scorer.calls == 2  # items 6-8: 3 rows in steps of 2
    merged = runner.merge_predictions(bench, tmp_path / "out")
    assert [r["index"] for r in merged] == list(range(9))
