"""Bad benchmark files and bad images, built here, through the evaluation job and its entry point.

One rule: an item that cannot be read or decoded is skipped and listed in `read_errors`, never
predicted or scored; a file that cannot be a benchmark (empty, header only, a required column missing,
no readable row) is an error naming the file and the column, before any model is loaded.
"""

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from aki_jax.data import records
from aki_jax.evaluation import job, runner
from aki_jax.evaluation.readers import read_benchmark, write_benchmark
from aki_jax.processing import ImageError, open_image


def _png(seed=0, size=16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _truncated_png() -> bytes:
    """Header and the start of the pixel data: `Image.open` succeeds, decoding fails."""
    data = _png(1, 32)
    return data[: len(data) * 6 // 10]


def _bomb_png(side=20_000) -> bytes:
    """A PNG declaring side x side pixels (> 2 x PIL's MAX_IMAGE_PIXELS) with the start of its data: 100 bytes."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    data = zlib.compress(bytes(3 * side + 1))  # the first row of pixels, all black
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- the one image opener --------------------------------------------------------------------------------


def test_image_opener_decodes_fully_refuses_bombs_and_names_the_source(tmp_path):
    image = open_image(_png(2))
    assert image.mode == "RGB" and image.size == (16, 16)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(_png(2)))))
    palette = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("P")
    assert open_image(palette).mode == "RGB" and open_image(palette, keep_mode=True).mode == "P"
    cases = {
        "truncated.png": (_truncated_png(), "truncated"),
        "bomb.png": (_bomb_png(), "decompression bomb"),
        "text.png": (b"not an image", "not a readable image"),
        "empty.png": (b"", "not a readable image"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        for source in (tmp_path / name, str(tmp_path / name)):
            with pytest.raises(ImageError, match=reason) as error:
                open_image(source)
            assert str(tmp_path / name) in str(error.value)
        with pytest.raises(ImageError, match=f"^sample 7: .*{reason}"):
            open_image(data, name="sample 7")
    with pytest.raises(ImageError, match="missing.png: no such image file"):
        open_image(tmp_path / "missing.png")


def test_training_records_skip_bad_images_as_bad_samples(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_bomb_png())
    for ref, reason in (
        (_truncated_png(), "bad_image"),
        (str(tmp_path / "bomb.png"), "bad_image"),
        (str(tmp_path / "missing.png"), "missing_image"),
        (np.zeros((4, 4, 2), np.uint8), "bad_image"),  # two channels: no such image
    ):
        example = records.chat_example("src", "file:3", [ref], records.question_answer("q", "a"))
        bad = records.decode_images(example)
        assert isinstance(bad, records.Bad) and bad.reason == reason and bad.where == "file:3"
    good = records.decode_images(records.chat_example("src", "x", [_png(3)], records.question_answer("q", "a")))
    assert np.asarray(good["images"][0]).shape == (16, 16, 3)


# --- bad files: errors naming the file and the column -----------------------------------------------------


def _file_cases(tmp_path):
    good_row = {"index": 1, "question": "Is there a cat?", "answer": "Yes"}
    cases = {}

    def tsv(name, text, needle):
        (tmp_path / name).write_text(text, encoding="utf-8")
        cases[name] = needle

    tsv("empty.tsv", "", "empty file")
    tsv("header_only.tsv", "index\tquestion\tanswer\n", "a header but no rows")
    tsv("no_question.tsv", "index\tanswer\n1\tYes\n", "no `question` column")
    tsv("no_index.tsv", "question\tanswer\nIs it?\tYes\n", "no `index` column")
    tsv("twice.tsv", "index\tQuestion\tquestion\n1\ta\tb\n", "appear more than once")
    tsv("all_bad.tsv", "index\tquestion\tanswer\n1\t\tYes\n2\tq\n", "none of its 2 rows could be read")
    tsv("empty.jsonl", "\n\n", "empty file")
    tsv("no_question.jsonl", json.dumps({"index": 1, "answer": "Yes"}) + "\n", "no row has a `question` key")
    tsv("all_bad.jsonl", "not json\n" + json.dumps(good_row | {"index": ""}) + "\n", "none of its 2 rows")
    return cases


def test_unusable_benchmark_files_are_errors_naming_file_and_column(tmp_path):
    for name, needle in _file_cases(tmp_path).items():
        with pytest.raises(ValueError, match=needle) as error:
            read_benchmark(tmp_path / name)
        assert str(tmp_path / name) in str(error.value), name
        # Through the job entry point: the file is refused before any checkpoint is opened.
        with pytest.raises(ValueError, match=needle):
            job.evaluate_checkpoint(tmp_path / "no-checkpoint", [tmp_path / name], tmp_path / "out", progress=False)


# --- bad images in a benchmark: skipped and listed, never scored ------------------------------------------


class RecordingScorer:
    """Answers "yes"; records which items reached `prepare` (a model would have seen them)."""

    rows_per_step = 4

    def __init__(self, load_images=False):
        self.prepared, self.load_images = [], load_images

    def settings(self):
        return {"mode": "fake"}

    def prepare(self, item):
        self.prepared.append(item.index)
        if self.load_images and item.image is not None:
            try:
                item.image.load()
            except ImageError as e:
                raise runner.ItemUnreadable(str(e)) from None
        return item

    def run(self, prepared):
        return [None] * len(prepared)

    def finish(self, item, output):
        return {"prediction": "yes"}


def test_undecodable_images_are_skipped_and_listed_in_results(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "good.png").write_bytes(_png(4))
    (tmp_path / "imgs" / "cut.png").write_bytes(_truncated_png())
    (tmp_path / "imgs" / "bomb.png").write_bytes(_bomb_png())
    question = {"question": "Is there a cat?", "answer": "Yes", "category": "random"}
    rows = [
        {"index": 0, "image": _b64(_png(5))} | question,
        {"index": 1, "image": _b64(_truncated_png())} | question,
        {"index": 2, "image": _b64(_bomb_png())} | question,
        {"index": 3, "image": "2"} | question,  # MME-style reference to row 2's (bomb) image
        {"index": 4, "image_path": "imgs/good.png"} | question,
        {"index": 5, "image_path": "imgs/cut.png"} | question,
        {"index": 6, "image_path": "imgs/bomb.png"} | question,
        {"index": 7, "image_path": "imgs/missing.png"} | question,
    ]
    write_benchmark(rows, tmp_path / "pope.tsv")
    bench = read_benchmark(tmp_path / "pope.tsv")
    assert [it.index for it in bench.items] == [0, 4]
    scorer = RecordingScorer()
    results = job.evaluate([bench], scorer, tmp_path / "out", progress=False)
    assert scorer.prepared == [0, 4]  # the model never sees a skipped item
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["pope"]
    assert saved == json.loads(json.dumps(results["pope"]))
    errors = saved["read_errors"]
    reasons = ["truncated", "decompression bomb", "decompression bomb", "truncated", "decompression bomb", "not found"]
    assert len(errors) == len(reasons) == saved["scores"]["read_errors"]
    prefix = f"{tmp_path / 'pope.tsv'}:"
    for error, reason in zip(errors, reasons, strict=True):
        assert error.startswith(prefix) and reason in error, error
    assert [int(e[len(prefix) :].split(":")[0]) for e in errors] == [3, 4, 5, 7, 8, 9]  # row k is on line k + 2
    scores = saved["scores"]
    assert (scores["items"], scores["scored"], scores["accuracy"]) == (2, 2, 1.0)
    predictions = (tmp_path / "out" / "pope" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(x)["index"] for x in predictions] == [0, 4]


def test_an_image_that_stops_decoding_after_reading_is_skipped_not_scored(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(6))
    (tmp_path / "b.png").write_bytes(_png(7))
    rows = [{"index": i, "image_path": f"{k}.png", "question": "Cat?", "answer": "No"} for i, k in enumerate("ab")]
    write_benchmark(rows, tmp_path / "yn.jsonl")
    bench = read_benchmark(tmp_path / "yn.jsonl")
    (tmp_path / "b.png").write_bytes(_truncated_png())  # damaged between reading and running
    scores = job.evaluate([bench], RecordingScorer(load_images=True), tmp_path / "out", progress=False)["yn"]["scores"]
    assert (scores["unreadable"], scores["unreadable_indices"]) == (1, [1])
    assert (scores["items"], scores["scored"], scores["failed"], scores["accuracy"]) == (1, 1, 0, 0.0)


def test_evaluate_command_reports_unusable_files_in_one_line_with_exit_1(tmp_path, capsys):
    from aki_jax.cli.evaluate import main

    for name, needle in _file_cases(tmp_path).items():
        argv = ["--checkpoint", str(tmp_path / "no-checkpoint"), "--benchmark", str(tmp_path / name)]
        assert main(argv + ["--output", str(tmp_path / "out"), "--no-progress"]) == 1, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / name}: ") and needle in err[0], err
