"""Data sources read real files of each format back exactly; bad records are skipped and counted.

Also holds the writers of small real datasets (webdataset tar shards, LLaVA JSON/JSONL, VQA JSONL,
a TFDS array_record dataset) that tests/test_data_pipeline.py reuses.
"""

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import skimage.data
from PIL import Image

from aki_jax.data import records
from aki_jax.data.digits import (
    QUESTION_TYPES,
    QUESTIONS_PER_IMAGE,
    DigitsSource,
    digits_texts,
    render,
    split_indices,
    text_only_accuracy,
)
from aki_jax.data.paths import expand_braces, resolve_files
from aki_jax.data.records import Bad
from aki_jax.data.sources import LlavaSource, TfdsSource, VqaJsonlSource, WebDatasetSource
from aki_jax.data.templates import MULTIPLE_CHOICE, SHORT_ANSWER, format_question


def read(source, index):
    """source[index] with its images decoded to uint8[H, W, 3] RGB arrays (or Bad)."""
    example = records.decode_images(source[index])
    if isinstance(example, Bad):
        return example
    rgb = [im if isinstance(im, np.ndarray) else np.asarray(im.convert("RGB")) for im in example["images"]]
    return {**example, "images": rgb}


# --- small real files ------------------------------------------------------------------------------


def photos(size=32):
    """Three real photos (scikit-image samples), shrunk to uint8[size, size, 3]."""
    out = []
    for name in ("astronaut", "coffee", "chelsea"):
        image = Image.fromarray(getattr(skimage.data, name)()).resize((size, size), Image.Resampling.BILINEAR)
        out.append(np.asarray(image.convert("RGB")))
    return out


def encode(array, fmt):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


def _add(tar, name, data, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.type = kind
    info.linkname = link
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def write_shards(directory, n_shards=2, per_shard=3, bad=False):
    """Shards `shard-000{0..n-1}.tar` of lossless images with captions; returns {caption: image}.

    With `bad`, shard 0 also holds: two members with unsafe paths and a symlink (skipped while
    indexing), an image without caption (incomplete sample) and a corrupt image with a caption.
    """
    directory.mkdir(parents=True, exist_ok=True)
    images = photos()
    expected = {}
    for s in range(n_shards):
        with tarfile.open(directory / f"shard-{s:04d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"sample{s}_{i}"
                image = images[(s + i) % 3]
                fmt = ("png", "webp", "png")[i % 3]
                caption = f"photo {s} {i}"
                _add(tar, f"{key}.{fmt}", encode(image, fmt.upper()))
                if i % 2:
                    _add(tar, f"{key}.json", json.dumps({"caption": caption, "width": 32}).encode())
                else:
                    _add(tar, f"{key}.txt", caption.encode())
                expected[caption] = image
            if bad and s == 0:
                _add(tar, "../escape.txt", b"x")
                _add(tar, "/abs/evil.png", encode(images[0], "PNG"))
                _add(tar, "linked.png", b"", tarfile.SYMTYPE, "/etc/passwd")
                _add(tar, "lonely.png", encode(images[0], "PNG"))
                _add(tar, "corrupt.jpg", b"\xff\xd8\xff not really a jpeg")
                _add(tar, "corrupt.txt", b"a corrupt image")
    return expected


def write_llava(directory, jsonl=True):
    """LLaVA records (+ images in directory/images); returns the file path.

    Records: 0 a two-turn chat, 1 the image without `<image>` in the text, 2 text-only,
    3 a missing image file, then an unreadable line (JSONL) and a record with 2 placeholders for 1 image.
    """
    root = directory / "images"
    root.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(photos()):
        Image.fromarray(image).save(root / f"{i}.png")
    good = [
        {"id": "a", "image": "0.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "An astronaut."},
            {"from": "human", "value": "Colour of the suit?"}, {"from": "gpt", "value": "White."}]},
        {"id": "b", "image": "1.png", "conversations": [
            {"from": "human", "value": "What drink is this?"}, {"from": "gpt", "value": "Coffee."}]},
        {"id": "c", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},
        {"id": "d", "image": "missing.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Nothing."}]},
    ]  # fmt: skip
    mismatch = {"id": "e", "image": "2.png", "conversations": [
        {"from": "human", "value": "<image><image>\nTwo?"}, {"from": "gpt", "value": "One."}]}  # fmt: skip
    if jsonl:
        path = directory / "llava.jsonl"
        lines = [json.dumps(r) for r in good] + ['{"id": "broken", "conversations": [', "", json.dumps(mismatch)]
        path.write_text("\n".join(lines) + "\n")
    else:
        path = directory / "llava.json"
        path.write_text(json.dumps(good + [mismatch]))
    return path


def write_vqa(directory, n=6, name="vqa.jsonl", with_images=True):
    """VQA JSONL: record i asks "question i" with answer "answer i" about photo i % 3."""
    root = directory / "images"
    root.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(photos()):
        Image.fromarray(image).save(root / f"{i}.png")
    lines = []
    for i in range(n):
        record = {"question": f"question {i}", "answer": f"answer {i}"}
        if with_images:
            record["image"] = f"{i % 3}.png"
        lines.append(json.dumps(record))
    (directory / name).write_text("\n".join(lines) + "\n")
    return directory / name


_TFDS_BUILDER = None


def write_tfds(data_dir, n=5):
    """A prepared TFDS dataset `aki_test_vqa` (array_record) built with tfds's own writer, no TensorFlow.

    Images are given as PNG bytes so that tfds stores them without re-encoding (encoding needs TF).
    Example i: photo i % 3, question "q{i}", answers ["a{i}", "other"]. Returns {question: (image, answer)}.
    """
    global _TFDS_BUILDER
    import tensorflow_datasets as tfds

    images = photos()
    if _TFDS_BUILDER is None:

        class AkiTestVqa(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(
                    builder=self,
                    features=tfds.features.FeaturesDict(
                        {
                            "image": tfds.features.Image(shape=(None, None, 3)),
                            "question": tfds.features.Text(),
                            "answers": tfds.features.Sequence(tfds.features.Text()),
                        }
                    ),
                )

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                for i in range(self.n):
                    yield i, {"image": io.BytesIO(encode(images[i % 3], "PNG")), "question": f"q{i}",
                              "answers": [f"a{i}", "other"]}  # fmt: skip

        _TFDS_BUILDER = AkiTestVqa
    builder = _TFDS_BUILDER(data_dir=str(data_dir), file_format="array_record")
    builder.n = n
    builder.download_and_prepare()
    return {f"q{i}": (images[i % 3], f"a{i}") for i in range(n)}


# --- patterns --------------------------------------------------------------------------------------


def test_brace_patterns_expand_ranges_lists_and_products():
    assert expand_braces("s-{00000..00002}.tar") == ["s-00000.tar", "s-00001.tar", "s-00002.tar"]
    assert expand_braces("{a,b}/{8..10}.jsonl") == ["a/8.jsonl", "a/9.jsonl", "a/10.jsonl", "b/8.jsonl", "b/9.jsonl",
                                                    "b/10.jsonl"]  # fmt: skip
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_missing_files_fail_naming_the_pattern(tmp_path):
    (tmp_path / "s-0.tar").write_bytes(b"")
    assert resolve_files(str(tmp_path / "s-{0..0}.tar"), "x") == [str(tmp_path / "s-0.tar")]
    with pytest.raises(FileNotFoundError, match=r"s-1\.tar.*pattern"):
        resolve_files(str(tmp_path / "s-{0..1}.tar"), "shards")
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.jsonl"):
        resolve_files(str(tmp_path / "nothing-*.jsonl"), "qa")


# --- webdataset ------------------------------------------------------------------------------------


def test_webdataset_reads_images_and_captions_and_skips_unsafe_members(tmp_path):
    expected = write_shards(tmp_path, bad=True)
    source = WebDatasetSource(str(tmp_path / "shard-{0000..0001}.tar"))
    assert dict(source.index_bad) == {"unsafe_tar_member": 3, "incomplete_sample": 1}
    assert len(source) == len(expected) + 1  # the corrupt image is only found when decoded
    seen = {}
    bad = []
    for i in range(len(source)):
        example = read(source, i)
        if isinstance(example, Bad):
            bad.append(example.reason)
            continue
        assert example["task"] == "caption"
        seen[example["caption"]] = example["images"][0]
    assert bad == ["bad_image"]
    assert seen.keys() == expected.keys()
    for caption, image in expected.items():
        np.testing.assert_array_equal(seen[caption], image)  # png and lossless webp: exact
    copy = pickle.loads(pickle.dumps(source))  # as grain hands it to a worker process
    assert copy[len(source) - 1] == source[len(source) - 1]


# --- LLaVA -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("jsonl", [True, False])
def test_llava_records_become_chats_and_bad_records_are_marked(tmp_path, jsonl):
    path = write_llava(tmp_path, jsonl)
    source = LlavaSource(str(path), str(tmp_path / "images"))
    items = [read(source, i) for i in range(len(source))]
    a, b, c, d = items[:4]
    assert a["conversation"] == [
        {"role": "user", "content": "<image>\nWhat is shown?"},
        {"role": "assistant", "content": "An astronaut."},
        {"role": "user", "content": "Colour of the suit?"},
        {"role": "assistant", "content": "White."},
    ]
    np.testing.assert_array_equal(a["images"][0], photos()[0])
    assert b["conversation"][0]["content"] == "<image>\nWhat drink is this?"  # placeholder added
    assert c["images"] == [] and c["conversation"][1]["content"] == "Hi."
    assert isinstance(d, Bad) and d.reason == "missing_image" and "missing.png" in d.detail
    reasons = [x.reason for x in items[4:]]
    assert reasons == (["bad_json", "image_count_mismatch"] if jsonl else ["image_count_mismatch"])


# --- VQA JSONL and templates -----------------------------------------------------------------------


def test_vqa_jsonl_with_templates(tmp_path):
    write_vqa(tmp_path, n=3)
    source = VqaJsonlSource(str(tmp_path / "vqa.jsonl"), str(tmp_path / "images"), template="short_answer")
    example = read(source, 2)
    assert example["conversation"] == [
        {"role": "user", "content": f"<image>\nquestion 2\n{SHORT_ANSWER}"},
        {"role": "assistant", "content": "answer 2"},
    ]
    np.testing.assert_array_equal(example["images"][0], photos()[2])
    question, answer = format_question("multiple_choice", "Which?", "cat", ["dog", "cat"])
    assert (question, answer) == (f"Which?\nA. dog\nB. cat\n{MULTIPLE_CHOICE}", "B")
    assert format_question("multiple_choice", "Which?", "1", ["dog", "cat"])[1] == "B"
    with pytest.raises(ValueError, match="not one of the choices"):
        format_question("multiple_choice", "Which?", "cow", ["dog", "cat"])
    with pytest.raises(ValueError, match="unknown question template 'fancy'"):
        VqaJsonlSource(str(tmp_path / "vqa.jsonl"), template="fancy")


# --- TFDS ------------------------------------------------------------------------------------------


def test_tfds_array_record_dataset_is_read_with_mapped_features(tmp_path):
    expected = write_tfds(tmp_path / "tfds")
    source = TfdsSource(
        "aki_test_vqa", "train", str(tmp_path / "tfds"), {"image": "image", "question": "question", "answer": "answers"}
    )
    assert len(source) == len(expected)
    source = pickle.loads(pickle.dumps(source))  # workers reopen the dataset themselves
    for i in range(len(source)):
        example = read(source, i)
        question = example["conversation"][0]["content"].removeprefix("<image>\n")
        image, answer = expected[question]
        assert example["conversation"][1]["content"] == answer  # first of several reference answers
        np.testing.assert_array_equal(example["images"][0], image)
    with pytest.raises(ValueError, match="no feature"):
        TfdsSource("aki_test_vqa", "train", str(tmp_path / "tfds"), {"image": "img", "caption": "question"})
    with pytest.raises(ValueError, match="cannot open prepared TFDS dataset 'no_such_set'"):
        TfdsSource("no_such_set", "train", str(tmp_path / "tfds"))


# --- digits ----------------------------------------------------------------------------------------


def _expected_answer(question: str, digits: tuple[int, ...]) -> str:
    """The answer to a digits question, worked out from its words and the digits shown."""
    words = question.rstrip("?").split()
    yes_no = {True: "yes", False: "no"}
    table = {
        "What digit is this?": lambda: str(digits[0]),
        "Is it even?": lambda: yes_no[digits[0] % 2 == 0],
        "Is it odd?": lambda: yes_no[digits[0] % 2 == 1],
        "What is the left digit?": lambda: str(digits[0]),
        "What is the right digit?": lambda: str(digits[-1]),
        "Is the left digit greater than the right digit?": lambda: yes_no[digits[0] > digits[-1]],
        "What is the sum of the two digits?": lambda: str(sum(digits)),
    }
    if question in table:
        return table[question]()
    if question.startswith("Is it greater than"):
        return yes_no[digits[0] > int(words[-1])]
    assert question.startswith("What is this digit plus"), question
    return str(digits[0] + int(words[-1]))


def test_digits_split_is_disjoint_and_complete():
    from sklearn.datasets import load_digits

    train, heldout = split_indices("train"), split_indices("heldout")
    assert len(np.intersect1d(train, heldout)) == 0
    assert len(train) + len(heldout) == len(load_digits().target) and len(heldout) == 359
    np.testing.assert_array_equal(split_indices("heldout_shuffled"), heldout)


@pytest.mark.parametrize("task", ["pairs", "single"])
def test_digits_images_show_the_scans_and_answers_follow_the_question(task):
    from sklearn.datasets import load_digits

    digits = load_digits()
    heldout = set(split_indices("heldout").tolist())
    source = DigitsSource("heldout", image_size=28, task=task)
    assert len(source) == source.num_images * QUESTIONS_PER_IMAGE
    for index in range(0, len(source), 7):
        example = source[index]
        scans = source._scans_of(index // QUESTIONS_PER_IMAGE)
        assert len(scans) == (2 if task == "pairs" else 1) and heldout >= set(scans)  # no pair crosses the split
        question = example["conversation"][0]["content"].removeprefix("<image>\n")
        answer = example["conversation"][1]["content"]
        assert answer == _expected_answer(question, tuple(int(digits.target[s]) for s in scans))
        assert source.question_type(index) == QUESTION_TYPES[task][index % QUESTIONS_PER_IMAGE]
        side_by_side = np.concatenate([digits.images[s] for s in scans], axis=1)
        np.testing.assert_array_equal(example["images"][0], render(side_by_side, 28))
    assert set(digits_texts()) >= {"What digit is this?", "yes", "no", "What is the left digit?", "18"}


@pytest.mark.parametrize("task", ["pairs", "single"])
def test_no_digits_question_can_be_answered_from_its_text(task):
    """Every question asked often enough gets at least two different answers (no "always yes" question)."""
    source = DigitsSource("train", task=task)
    answers = {}
    for index in range(len(source)):
        _, question, answer = source.answer(index)
        answers.setdefault(question, set()).add(answer)
    assert all(len(a) >= 2 for a in answers.values()), {q: a for q, a in answers.items() if len(a) < 2}
    parity = [source.answer(i)[2] for i in range(1, len(source), QUESTIONS_PER_IMAGE)] if task == "single" else []
    if parity:  # "Is it even?" / "Is it odd?" is not asked according to the digit: its answer is a coin flip
        assert 0.4 < parity.count("yes") / len(parity) < 0.6


def test_text_only_baseline_is_the_most_frequent_training_answer_of_each_question():
    """Worked out here by brute force: every constant guess per question, best on the training split."""
    for task in ("pairs", "single"):
        train, heldout = DigitsSource("train", task=task), DigitsSource("heldout", task=task)
        counts = {}
        for index in range(len(train)):
            _, question, answer = train.answer(index)
            counts.setdefault(question, {}).setdefault(answer, 0)
            counts[question][answer] += 1
        hits = {}
        for index in range(len(heldout)):
            _, question, answer = heldout.answer(index)
            best = max(sorted(counts[question]), key=lambda a: counts[question][a])
            hits.setdefault(heldout.question_type(index), []).append(best == answer)
        got = text_only_accuracy(task)
        for kind in QUESTION_TYPES[task]:
            assert got[kind] == pytest.approx(np.mean(hits[kind]))
        assert got["all"] == pytest.approx(np.mean([h for v in hits.values() for h in v]))
    assert text_only_accuracy("pairs")["all"] < 0.3


def test_shuffled_image_split_keeps_questions_and_answers_but_shows_another_image():
    heldout = DigitsSource("heldout", image_size=28)
    shuffled = DigitsSource("heldout_shuffled", image_size=28)
    assert len(shuffled) == len(heldout)
    different = 0
    for index in range(0, len(heldout), 13):
        a, b = heldout[index], shuffled[index]
        assert a["conversation"] == b["conversation"]
        different += not np.array_equal(a["images"][0], b["images"][0])
        assert shuffled.shown_image(index) != index // QUESTIONS_PER_IMAGE
    assert different >= 0.9 * len(range(0, len(heldout), 13))


def test_digit_rendering_is_an_upscaled_white_on_black_scan():
    from sklearn.datasets import load_digits

    scan = load_digits().images[0]
    image = render(scan, 8)  # no upscaling: the scan itself
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], np.round(scan * 255 / 16).astype(np.uint8))
    assert (image[..., 0] == image[..., 2]).all()
    assert render(scan, 28).shape == (28, 28, 3)
