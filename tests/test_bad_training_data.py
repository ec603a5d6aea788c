"""Training data that must not be trained on is skipped and counted, each record under its own reason.

Hostile and malformed inputs built here: LLaVA conversations out of order or with empty answers, image
paths escaping `image_root`, webdataset shards with a key used twice, images PIL refuses. The pipeline's
`stats()` must count every one of them under its reason and yield exactly the good records.
"""

import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image
from test_data_sources import _add, encode, photos

import aki_jax
from aki_jax.data import DataConfig, SourceConfig, digits_tokenizer, make_train_iterator, records
from aki_jax.data.records import Bad
from aki_jax.data.sources import LlavaSource, VqaJsonlSource, WebDatasetShards, WebDatasetSource
from aki_jax.processing import Processor


@pytest.fixture(scope="module")
def processor():
    tokenizer = digits_tokenizer()
    config = aki_jax.tiny(initial_tokenizer_len=tokenizer.initial_tokenizer_len)
    return config, Processor.from_config(config, tokenizer)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava") / "images"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(photos()[0]).save(root / "0.png")
    Image.fromarray(photos()[1]).save(root / "sub" / "1.png")
    (root.parent / "secret.png").write_bytes(encode(photos()[2], "PNG"))  # outside the root: must stay unread
    return root


def turns(*pairs):
    return [{"from": who, "value": text} for who, text in pairs]


GOOD_CHAT = turns(("human", "<image>\nWhat is it?"), ("gpt", "A photo."))

# record -> the reason it is bad (None: a good record)
LLAVA_CASES = {
    "gpt_first": ({"image": "0.png", "conversations": turns(("gpt", "An answer."), ("human", "<image>\nQ?"))},
                  "bad_turn_order", "turn 1 is gpt, expected human"),
    "two_humans": ({"conversations": turns(("human", "Q1?"), ("human", "Q2?"), ("gpt", "A."))},
                   "bad_turn_order", "turn 2 is human, expected gpt"),
    "two_gpts": ({"conversations": turns(("human", "Q?"), ("gpt", "A."), ("gpt", "B."))},
                 "bad_turn_order", "turn 3 is gpt, expected human"),
    "ends_with_question": ({"conversations": turns(("human", "Q?"), ("gpt", "A."), ("human", "And?"))},
                           "bad_turn_order", "ends with a human turn"),
    "system_in_the_middle": ({"conversations": turns(("human", "Q?"), ("system", "Be brief."), ("gpt", "A."))},
                             "bad_turn_order", "system turn after the start"),
    "empty_answer": ({"conversations": turns(("human", "Q?"), ("gpt", ""))}, "empty_answer", "[2] are empty"),
    "blank_second_answer": ({"conversations": turns(("human", "Q?"), ("gpt", "A."), ("human", "R?"), ("gpt", " \n"))},
                            "empty_answer", "[4] are empty"),
    "absolute_path": ({"image": "/etc/passwd", "conversations": GOOD_CHAT}, "unsafe_image_path", "is absolute"),
    "dotdot_path": ({"image": "../secret.png", "conversations": GOOD_CHAT}, "unsafe_image_path", "outside image_root"),
    "hidden_dotdot": ({"image": "sub/../../secret.png", "conversations": GOOD_CHAT},
                      "unsafe_image_path", "outside image_root"),
    "one_of_two_escapes": ({"image": ["0.png", "../secret.png"],
                            "conversations": turns(("human", "<image> <image> Same?"), ("gpt", "No."))},
                           "unsafe_image_path", "'../secret.png'"),
    "unknown_speaker": ({"conversations": turns(("human", "Q?"), ("robot", "A."))}, "bad_record", "unknown speaker"),
    "no_conversations": ({"image": "0.png"}, "bad_record", "KeyError"),
    # good records: a system turn first, a `..` that stays inside the root
    "system_first": ({"conversations": turns(("system", "Be brief."), ("human", "Q?"), ("gpt", "A."))}, None, ""),
    "dotdot_inside": ({"image": "sub/../0.png", "conversations": GOOD_CHAT}, None, ""),
    "nested": ({"image": "sub/1.png", "conversations": GOOD_CHAT}, None, ""),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(LLAVA_CASES))
def test_llava_record_is_refused_with_its_reason(tmp_path, image_root, case):
    record, reason, detail = LLAVA_CASES[case]
    (tmp_path / "one.jsonl").write_text(json.dumps({"id": case, **record}) + "\n")
    example = records.decode_images(LlavaSource(str(tmp_path / "one.jsonl"), str(image_root))[0])
    if reason is None:
        assert not isinstance(example, Bad), example
        roles = [t["role"] for t in example["conversation"]]
        assert roles[-2:] == ["user", "assistant"]
    else:
        assert isinstance(example, Bad) and example.reason == reason, example
        assert detail in example.detail and "one.jsonl" in example.where


def test_vqa_image_paths_outside_the_root_are_refused(tmp_path, image_root):
    lines = [
        {"image": "../secret.png", "question": "q", "answer": "a"},
        {"image": "0.png", "question": "q", "answer": "a"},
    ]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    source = VqaJsonlSource(str(tmp_path / "qa.jsonl"), str(image_root))
    assert source[0].reason == "unsafe_image_path" and "outside image_root" in source[0].detail
    assert not isinstance(source[1], Bad)


def test_without_an_image_root_paths_are_taken_as_written(tmp_path, image_root):
    record = {"image": str(image_root / "0.png"), "conversations": GOOD_CHAT}  # absolute, no root given
    (tmp_path / "abs.jsonl").write_text(json.dumps(record) + "\n")
    example = records.decode_images(LlavaSource(str(tmp_path / "abs.jsonl"))[0])
    np.testing.assert_array_equal(np.asarray(example["images"][0].convert("RGB")), photos()[0])


def test_the_pipeline_counts_every_bad_llava_record_under_its_reason(tmp_path, image_root, processor):
    config, proc = processor
    lines = [json.dumps({"id": case, **record}) for case, (record, _, _) in sorted(LLAVA_CASES.items())]
    (tmp_path / "all.jsonl").write_text("\n".join(lines) + "\n")
    expected = {}
    for _, reason, _ in LLAVA_CASES.values():
        if reason is not None:
            expected[f"lv/{reason}"] = expected.get(f"lv/{reason}", 0) + 1
    source = SourceConfig("llava", str(tmp_path / "all.jsonl"), image_root=str(image_root), name="lv")
    data = DataConfig(sources=(source,), seq_len=128, batch_size=1, epochs=1, max_bad_fraction=1.0, prefetch=0,
                      shuffle_buffer=4, read_threads=1, read_buffer=2)  # fmt: skip
    it = make_train_iterator(data, proc, config, process_index=0, process_count=1)
    good = len(list(it))
    assert good == sum(reason is None for _, reason, _ in LLAVA_CASES.values()) == 3
    assert it.stats()["bad"] == expected
    assert expected == {"lv/bad_turn_order": 5, "lv/empty_answer": 2, "lv/unsafe_image_path": 4, "lv/bad_record": 2}


# --- images -----------------------------------------------------------------------------------------------


def _png_header_only(width, height) -> bytes:
    """A PNG that declares width x height pixels (a decompression bomb's header) and holds none."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _truncated_png() -> bytes:
    data = encode(photos()[0], "PNG")
    return data[: len(data) // 2]


BAD_IMAGES = {
    "text_named_png": (b"this is not an image", "bad_image"),
    "empty_file": (b"", "bad_image"),
    "truncated_png": (_truncated_png(), "bad_image"),
    "decompression_bomb": (_png_header_only(30000, 30000), "bad_image"),
    "missing": (None, "missing_image"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_an_image_pil_refuses_is_a_counted_bad_record(tmp_path, case):
    data, reason = BAD_IMAGES[case]
    root = tmp_path / "images"
    root.mkdir()
    if data is not None:
        (root / "x.png").write_bytes(data)
    (tmp_path / "r.jsonl").write_text(json.dumps({"image": "x.png", "conversations": GOOD_CHAT}) + "\n")
    example = records.decode_images(LlavaSource(str(tmp_path / "r.jsonl"), str(root))[0])
    assert isinstance(example, Bad) and example.reason == reason, example
    assert "x.png" in example.detail


# --- webdataset: a key used twice --------------------------------------------------------------------------


def _shard(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            _add(tar, name, data)


def test_a_key_used_by_two_samples_keeps_both(tmp_path):
    a, b = photos()[:2]
    _shard(tmp_path / "s.tar", [("k.png", encode(a, "PNG")), ("k.txt", b"first"), ("o.png", encode(b, "PNG")),
                                ("o.txt", b"other"), ("k.png", encode(b, "PNG")), ("k.txt", b"second")])  # fmt: skip
    source = WebDatasetSource(str(tmp_path / "s.tar"))
    got = [records.decode_images(source[i]) for i in range(len(source))]
    assert [g["caption"] for g in got] == ["first", "other", "second"]
    np.testing.assert_array_equal(np.asarray(got[0]["images"][0].convert("RGB")), a)
    np.testing.assert_array_equal(np.asarray(got[2]["images"][0].convert("RGB")), b)
    assert sum(source.index_bad.values()) == 0


@pytest.mark.parametrize(
    "members, missing",
    [
        ([("k.png", "img"), ("k.webp", "img"), ("k.txt", b"one caption")], "caption"),
        ([("k.png", "img"), ("k.txt", b"one"), ("k.json", b'{"caption": "two"}')], "image"),
    ],
    ids=["two_images_one_caption", "one_image_two_captions"],
)
def test_a_second_member_of_a_key_without_its_pair_is_counted(tmp_path, members, missing):
    image = photos()[0]
    built = [(n, encode(image, n.rsplit(".", 1)[1].upper()) if d == "img" else d) for n, d in members]
    _shard(tmp_path / "s.tar", built)
    source = WebDatasetSource(str(tmp_path / "s.tar"))
    assert len(source) == 1 and dict(source.index_bad) == {"duplicate_key": 1}
    assert f"with no {missing}" in source.index_bad_examples[0] and "s.tar:k" in source.index_bad_examples[0]
    streamed = WebDatasetShards(str(tmp_path / "s.tar")).shard_samples(str(tmp_path / "s.tar"))
    assert [x.reason for x in streamed if isinstance(x, Bad)] == ["duplicate_key"]  # streaming counts it too


def test_the_streaming_pipeline_counts_duplicate_keys(tmp_path, processor):
    config, proc = processor
    image = encode(photos()[0], "PNG")
    _shard(tmp_path / "s.tar", [("k.png", image), ("k.jpg", encode(photos()[1], "JPEG")), ("k.txt", b"cap"),
                                ("j.png", image), ("j.txt", b"cap two")])  # fmt: skip
    source = SourceConfig("webdataset", str(tmp_path / "s.tar"), name="tar")
    data = DataConfig(sources=(source,), seq_len=128, batch_size=1, epochs=1, max_bad_fraction=1.0, prefetch=0,
                      shuffle_buffer=4, read_threads=1, read_buffer=2)  # fmt: skip
    it = make_train_iterator(data, proc, config, process_index=0, process_count=1)
    assert len(list(it)) == 2
    assert it.stats()["bad"] == {"tar/duplicate_key": 1}


def test_unsafe_tar_members_never_pair_with_a_good_key(tmp_path):
    buffer = io.BytesIO(encode(photos()[0], "PNG"))
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        _add(tar, "../k.png", buffer.getvalue())
        _add(tar, "k.txt", b"caption")
    source = WebDatasetSource(str(tmp_path / "s.tar"))
    assert len(source) == 0
    assert dict(source.index_bad) == {"unsafe_tar_member": 1, "incomplete_sample": 1}
