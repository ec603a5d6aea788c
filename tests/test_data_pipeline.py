"""The grain pipelines: contract batches from every format, packing, exact resume, sharding, bad data."""

import json
import re

import grain
import jax
import numpy as np
import pytest
from test_data_sources import photos, write_llava, write_shards, write_tfds, write_vqa

import aki_jax
from aki_jax.data import (
    BadDataError,
    DataConfig,
    PackIterDataset,
    SourceConfig,
    digits_tokenizer,
    make_eval_iterator,
    make_train_iterator,
)
from aki_jax.data.shuffle import WindowShuffleIterDataset
from aki_jax.mask import IMAGE, PAD, QUERY, TEXT
from aki_jax.mask import attention_mask as _attention_mask
from aki_jax.processing import Processor, preprocess_image

attention_mask = jax.jit(_attention_mask, static_argnames="kind")
BATCH_KEYS = {"pixel_values", "input_ids", "modality_ids", "segment_ids", "positions", "targets", "weights"}


@pytest.fixture(scope="session")
def setup():
    tokenizer = digits_tokenizer()
    config = aki_jax.tiny(initial_tokenizer_len=tokenizer.initial_tokenizer_len)
    return tokenizer, config, Processor.from_config(config, tokenizer)


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_shards(root / "shards")
    write_shards(root / "bad_shards", bad=True)
    write_shards(root / "four_shards", n_shards=4)
    write_llava(root / "llava")
    write_vqa(root / "vqa", n=8)
    write_vqa(root / "text_qa", n=10, with_images=False)
    write_tfds(root / "tfds")
    return root


def every_format(root):
    return (
        SourceConfig("webdataset", str(root / "shards/shard-{0000..0001}.tar"), weight=1),
        SourceConfig("llava", str(root / "llava/llava.jsonl"), image_root=str(root / "llava/images"), weight=1),
        SourceConfig("vqa", str(root / "vqa/vqa.jsonl"), image_root=str(root / "vqa/images"), weight=1),
        SourceConfig("tfds", "aki_test_vqa", data_dir=str(root / "tfds"),
                     features={"image": "image", "question": "question", "answer": "answers"}),
        SourceConfig("digits", weight=2),
    )  # fmt: skip


def small(**fields):
    """A DataConfig with little read-ahead (tests read few batches), no background thread unless asked."""
    return DataConfig(**{"prefetch": 0, "read_buffer": 2, "read_threads": 1, "shuffle_buffer": 4, **fields})


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def segments(batch):
    """(row, segment id, slice) of every packed example, in order."""
    out = []
    for b, row in enumerate(batch["segment_ids"]):
        for s in np.unique(row[row > 0]):
            where = np.flatnonzero(row == s)
            assert (np.diff(where) == 1).all(), "a segment must be contiguous"
            out.append((b, int(s), slice(where[0], where[-1] + 1)))
    return out


def test_every_format_mixed_and_packed_gives_contract_batches(setup, files):
    tokenizer, config, processor = setup
    data = small(
        sources=every_format(files), seq_len=256, packing=True, batch_size=4, max_bad_fraction=1.0, shuffle_buffer=4
    )
    it = make_train_iterator(data, processor, config, process_index=0, process_count=1)
    texts = []
    t = config.image_token_count
    for batch in take(it, 6):
        assert set(batch) == BATCH_KEYS
        assert batch["pixel_values"].shape == (4, 256 // t, 28, 28, 3) and batch["pixel_values"].dtype == np.float32
        for key in BATCH_KEYS - {"pixel_values", "weights"}:
            assert batch[key].shape == (4, 256) and batch[key].dtype == np.int32, key
        assert batch["weights"].dtype == np.float32
        assert np.isin(batch["modality_ids"], [PAD, TEXT, IMAGE, QUERY]).all()
        np.testing.assert_array_equal(batch["modality_ids"] == PAD, batch["segment_ids"] == 0)
        for b in range(4):
            # each row's IMAGE positions come in whole images, one per filled slot, the rest zero
            n_images = int((batch["modality_ids"][b] == IMAGE).sum()) // t
            assert (batch["modality_ids"][b] == IMAGE).sum() == n_images * t
            assert np.abs(batch["pixel_values"][b, :n_images]).max(axis=(1, 2, 3)).min() > 0
            assert not batch["pixel_values"][b, n_images:].any()
            assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
        for b, _, where in segments(batch):
            ids = batch["input_ids"][b, where]
            np.testing.assert_array_equal(batch["targets"][b, where][:-1], ids[1:])  # shifted inside the example
            assert batch["weights"][b, where][-1] == 0  # nothing across the example boundary
            texts.append(tokenizer.decode(ids[batch["modality_ids"][b, where] != IMAGE]))
    joined = "\n".join(texts)
    for needle in ("photo", "astronaut", "question", "q", "digit"):  # every source contributed
        assert needle in joined, needle
    assert it.stats()["bad"] == {} or set(it.stats()["bad"]) <= {
        f"llava:{files}/llava/llava.jsonl/{r}" for r in ("bad_json", "missing_image", "image_count_mismatch")
    }
    it.close()


def test_padded_rows_hold_the_exact_preprocessed_image_of_their_question(setup, files):
    tokenizer, config, processor = setup
    source = SourceConfig("vqa", str(files / "vqa/vqa.jsonl"), image_root=str(files / "vqa/images"))
    data = small(sources=(source,), seq_len=128, batch_size=2, epochs=1, prefetch=0)
    seen = []
    for batch in make_train_iterator(data, processor, config, process_index=0, process_count=1):
        assert batch["pixel_values"].shape == (2, 1, 28, 28, 3)
        np.testing.assert_array_equal(batch["segment_ids"] > 0, batch["modality_ids"] != PAD)
        for b in range(2):
            k = int(re.search(r"question (\d+)", tokenizer.decode(batch["input_ids"][b])).group(1))
            expected = preprocess_image(photos()[k % 3], 28)
            np.testing.assert_array_equal(batch["pixel_values"][b, 0], expected)
            n = int((batch["segment_ids"][b] > 0).sum())
            np.testing.assert_array_equal(batch["positions"][b, :n], np.arange(n))
            seen.append(k)
    assert sorted(seen) == list(range(8))


def _random_examples(rng, count, image_tokens=3, size=4):
    """Processed-example stand-ins: text, then per image [IMAGE x T, QUERY...], then answer text."""
    examples = []
    for i in range(count):
        n_images = int(rng.integers(0, 3))
        modality = [TEXT] * int(rng.integers(1, 4))
        for _ in range(n_images):
            modality += [IMAGE] * image_tokens + [QUERY] * int(rng.integers(1, 4))
        modality += [TEXT] * int(rng.integers(1, 5))
        n = len(modality)
        examples.append({
            "input_ids": np.concatenate([[1000 + i], rng.integers(3, 100, n - 1)]).astype(np.int32),  # [0]: its id
            "modality_ids": np.asarray(modality, np.int32),
            "targets": rng.integers(3, 100, n).astype(np.int32),
            "weights": (rng.random(n) < 0.5).astype(np.float32),
            "pixel_values": np.full((n_images, size, size, 3), i / count, np.float32),
        })  # fmt: skip
    return examples


def test_packing_keeps_examples_apart_and_loses_no_token():
    rng = np.random.default_rng(0)
    examples = _random_examples(rng, 60)
    length, slots = 32, 4
    stream = grain.MapDataset.source(examples).to_iter_dataset()
    rows = list(PackIterDataset(stream, length, slots, (4, 4, 3), pad_id=0, window=16))
    tokens = sum(len(e["input_ids"]) for e in examples)
    assert len(rows) == -(-tokens // length)  # first-fit decreasing reaches the fewest possible rows here
    # every example alone, in a row of its own (one call, one shape): its reference mask
    alone_ids = np.zeros((len(examples), length), np.int32)
    for i, example in enumerate(examples):
        alone_ids[i, : len(example["modality_ids"])] = example["modality_ids"]
    alone = np.asarray(attention_mask(alone_ids, None, "mma"))
    packed = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
    masks = np.asarray(attention_mask(packed["modality_ids"], packed["segment_ids"], "mma"))
    unpacked = []
    for r, row in enumerate(rows):
        assert row["input_ids"].shape == (length,) and row["pixel_values"].shape == (slots, 4, 4, 3)
        expected = np.zeros((length, length), bool)
        image_slot = 0
        for _, segment, where in segments({k: v[None] for k, v in row.items()}):
            assert segment == sum(u["row"] == r for u in unpacked) + 1  # ids 1, 2, 3, ... in order
            piece = {k: row[k][where] for k in ("input_ids", "modality_ids", "targets", "weights")}
            n_images = int((piece["modality_ids"] == IMAGE).sum()) // 3
            piece["pixel_values"] = row["pixel_values"][image_slot : image_slot + n_images]
            image_slot += n_images
            n = where.stop - where.start
            np.testing.assert_array_equal(row["positions"][where], np.arange(n))
            expected[where, where] = alone[piece["input_ids"][0] - 1000, :n, :n]
            unpacked.append({**piece, "row": r})
        np.testing.assert_array_equal(masks[r], expected)  # block diagonal: no attention across examples
        assert not row["pixel_values"][image_slot:].any()
    assert sorted(u["input_ids"][0] for u in unpacked) == [1000 + i for i in range(len(examples))]
    for got in unpacked:
        want = examples[got["input_ids"][0] - 1000]
        for key in ("input_ids", "modality_ids", "targets", "weights", "pixel_values"):
            np.testing.assert_array_equal(got[key], want[key])


def test_packer_state_restores_mid_window():
    examples = _random_examples(np.random.default_rng(1), 50)
    stream = grain.MapDataset.source(examples).to_iter_dataset()
    packer = PackIterDataset(stream, 32, 4, (4, 4, 3), pad_id=0, window=16)
    rows = list(packer)
    for k in (0, 1, 3, 7):  # inside the first window, at and past its end
        it = iter(packer)
        take(it, k)
        state = it.get_state()
        again = iter(packer)
        again.set_state(state)
        rest = list(again)
        assert len(rest) == len(rows) - k
        for want, got in zip(rows[k:], rest, strict=True):
            np.testing.assert_array_equal(got["input_ids"], want["input_ids"])


def test_window_shuffle_permutes_each_window_and_resumes_exactly():
    stream = grain.MapDataset.range(23).to_iter_dataset()
    shuffled = WindowShuffleIterDataset(stream, window=5, seed=7)
    order = list(shuffled)
    assert order != list(range(23))
    for w in range(5):  # each window is a permutation of its own elements
        assert sorted(order[5 * w : 5 * w + 5]) == list(range(5 * w, min(5 * w + 5, 23)))
    for k in (0, 3, 5, 12, 23):
        it = iter(shuffled)
        take(it, k)
        again = iter(shuffled)
        again.set_state(json.loads(json.dumps(it.get_state())))
        assert list(again) == order[k:]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_saved_state_continues_with_exactly_the_next_batches(setup, files, workers):
    """A fresh iterator restored from a saved state continues exactly; with worker processes the state
    is restored into the running iterator (one set of workers to start keeps the test short)."""
    _, config, processor = setup
    sources = (
        SourceConfig("digits", weight=3),
        SourceConfig("webdataset", str(files / "shards/shard-{0000..0001}.tar")),
        SourceConfig("vqa", str(files / "vqa/vqa.jsonl"), image_root=str(files / "vqa/images")),
        SourceConfig("llava", str(files / "llava/llava.jsonl"), image_root=str(files / "llava/images")),
    )
    data = small(
        sources=sources, seq_len=192, packing=True, batch_size=2, workers=workers, max_bad_fraction=1.0, prefetch=2
    )  # fmt: skip  (background thread included)
    first = make_train_iterator(data, processor, config, process_index=0, process_count=1)
    take(first, 3)
    state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
    stats = first.stats()
    expected = take(first, 5)
    if workers:
        second = first
    else:
        first.close()
        second = make_train_iterator(data, processor, config, process_index=0, process_count=1)
    second.set_state(state)
    resumed = take(second, 5)
    second.close()
    for want, got in zip(expected, resumed, strict=True):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert stats["records_read"] > 0
    if workers == 0:
        assert stats["bad"]  # the llava file's bad records were counted


@pytest.mark.parametrize("kind", ["vqa", "webdataset"])
def test_two_processes_share_the_data_exactly_once(setup, files, kind):
    """Records (vqa) or whole shards (webdataset, 4 shards) are divided among processes."""
    tokenizer, config, processor = setup
    if kind == "vqa":
        source, pattern, count = SourceConfig("vqa", str(files / "text_qa/vqa.jsonl")), r"question (\d+)", 10
    else:
        source, pattern, count = (
            SourceConfig("webdataset", str(files / "four_shards/shard-{0000..0003}.tar")),
            r"photo (\d \d)",
            12,
        )
    data = small(
        sources=(source,), seq_len=64, packing=True, batch_size=2, epochs=1, seed=3, prefetch=0, shuffle_buffer=5
    )
    shares = []
    for p in range(2):
        found = []
        for batch in make_train_iterator(data, processor, config, process_index=p, process_count=2):
            assert batch["input_ids"].shape[0] == 1  # global batch 2 over 2 processes
            found += re.findall(pattern, tokenizer.decode(batch["input_ids"][0]))
        shares.append(found)
    assert len(set(shares[0]) & set(shares[1])) == 0
    assert len(shares[0] + shares[1]) == len(set(shares[0] + shares[1])) == count


def test_eval_iterator_covers_the_heldout_digits_once_with_equal_batch_counts(setup):
    tokenizer, config, processor = setup
    data = small(seq_len=64, batch_size=128)
    counts, rows = [], 0
    for p in range(2):
        ev = make_eval_iterator(data, processor, config, process_index=p, process_count=2)
        batches = list(ev)
        counts.append(len(batches))
        for batch in batches:
            assert batch["input_ids"].shape == (64, 64) and batch["pixel_values"].shape == (64, 1, 28, 28, 3)
            real = batch["segment_ids"].max(axis=1) > 0
            rows += int(real.sum())
            assert not batch["weights"][~real].any()
        assert ev.stats()["bad"] == {}
    assert counts[0] == counts[1] == len(ev) == 12  # ceil(ceil(1436 / 2) / 64)
    assert rows == 359 * 4


def test_each_kind_of_bad_input_is_skipped_and_counted(setup, files):
    _, config, processor = setup
    long_qa = files / "long"
    long_qa.mkdir()
    lines = [{"question": "why " * 200, "answer": "because"}, {"question": "ok?", "answer": "yes"}]
    (long_qa / "qa.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    cases = {
        SourceConfig("webdataset", str(files / "bad_shards/shard-{0000..0001}.tar"), name="tar"): (
            {"tar/bad_image": 1, "tar/unsafe_tar_member": 3, "tar/incomplete_sample": 1}, {}, 6),
        SourceConfig("llava", str(files / "llava/llava.jsonl"), image_root=str(files / "llava/images"), name="lv"): (
            {"lv/bad_json": 1, "lv/missing_image": 1, "lv/image_count_mismatch": 1}, {}, 3),
        SourceConfig("vqa", str(long_qa / "qa.jsonl"), name="qa"): ({"qa/too_long": 1}, {}, 1),
    }  # fmt: skip
    for source, (bad, index_bad, good) in cases.items():
        data = small(
            sources=(source,), seq_len=128, batch_size=1, epochs=1, max_bad_fraction=1.0, prefetch=0, shuffle_buffer=4
        )
        it = make_train_iterator(data, processor, config, process_index=0, process_count=1)
        assert len(list(it)) == good, source.name
        stats = it.stats()
        assert stats["bad"] == bad and stats["bad_while_indexing"] == index_bad, source.name
        assert stats["records_read"] == good + sum(bad.values())


def test_too_much_bad_data_fails_the_run(setup, files):
    _, config, processor = setup
    shards = SourceConfig("webdataset", str(files / "bad_shards/shard-{0000..0001}.tar"))
    data = small(sources=(shards,), eval_sources=(shards,), seq_len=128, batch_size=1, max_bad_fraction=0.2,
                      bad_check_after=8, prefetch=0, shuffle_buffer=4)  # fmt: skip
    with pytest.raises(BadDataError, match=r"4 of 11 records are bad.*unsafe_tar_member"):  # indexed at start
        make_eval_iterator(data, processor, config, process_index=0, process_count=1)
    it = make_train_iterator(data, processor, config, process_index=0, process_count=1)  # streamed
    with pytest.raises(
        BadDataError, match=r"of \d+ records read were bad.*shard-\{0000..0001\}.tar/.*max_bad_fraction=0.2"
    ):
        take(it, 20)
    llava = SourceConfig("llava", str(files / "llava/llava.jsonl"), image_root=str(files / "llava/images"))
    it = make_train_iterator(data.replace(sources=(llava,)), processor, config, process_index=0, process_count=1)
    with pytest.raises(BadDataError, match=r"of \d+ records read were bad.*missing_image.*max_bad_fraction=0.2"):
        take(it, 20)


def test_configuration_mistakes_fail_at_start_with_a_clear_message(setup, tmp_path):
    _, config, processor = setup
    with pytest.raises(ValueError, match="unknown data source kind 'parquet'"):
        SourceConfig("parquet", "x")
    with pytest.raises(ValueError, match="unknown data source kind 'parquet'"):
        DataConfig.from_dict({"sources": [{"kind": "parquet", "path": "x"}]})
    missing = SourceConfig("webdataset", str(tmp_path / "none-{000..009}.tar"))
    with pytest.raises(FileNotFoundError, match=r"none-000\.tar.*and 7 more"):
        make_train_iterator(small(sources=(missing,)), processor, config, process_index=0, process_count=1)
    no_root = SourceConfig("vqa", str(tmp_path / "qa.jsonl"), image_root=str(tmp_path / "nowhere"))
    (tmp_path / "qa.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="image_root .*nowhere.* is not a directory"):
        make_train_iterator(small(sources=(no_root,)), processor, config, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="not divisible"):
        make_train_iterator(DataConfig(batch_size=3), processor, config, process_index=0, process_count=2)
    round_trip = DataConfig.from_dict(json.loads(json.dumps(DataConfig().to_dict())))
    assert round_trip == DataConfig()
