"""Processing: tokenizer layout and loading, image preprocessing, the processor's layout vs the original's."""

import json

import numpy as np
import pytest
from PIL import Image

from aki_jax import tiny
from aki_jax.mask import IMAGE, PAD, QUERY, TEXT, attention_mask
from aki_jax.processing import (
    SYSTEM_MESSAGE,
    Processor,
    Segment,
    collate,
    load_tokenizer,
    preprocess_image,
    train_tokenizer,
)

TEXTS = [SYSTEM_MESSAGE, "What is in the picture?\nA cat sitting on a mat.", "Describe the image in detail."] * 30
IMAGE_TOKENS = 6  # tiny config's resampler latents


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, 400, out)
    return out


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def proc(tok):
    config = tiny(initial_tokenizer_len=tok.initial_tokenizer_len)
    return Processor.from_config(config, tok)


def random_image(seed=0, size=(40, 30)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8))


# --- tokenizer -----------------------------------------------------------------------------------------


def test_trained_tokenizer_has_aki_token_layout(tok):
    n = tok.initial_tokenizer_len
    assert tok.image_token_id == n and tok.end_of_chunk_token_id == n + 1 and len(tok) == n + 2
    assert tok.pad_token_id == n - 1  # <pad> is the last token before the AKI tokens, as in Phi-3.5 (32011)
    assert tok.bos_token_id == 1
    assert tok.encode("<s> <|user|>\n<image>")[0] == 1
    assert tok.encode("<image><|endofchunk|>") == [n, n + 1]


def test_load_adds_pad_image_and_endofchunk_like_the_original_factory(tokenizer_dir, tok, tmp_path):
    # A Phi-3.5-like folder: no <pad>/<image>/<|endofchunk|>, pad == eos.
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    data["added_tokens"] = [
        t for t in data["added_tokens"] if t["content"] not in ("<pad>", "<image>", "<|endofchunk|>")
    ]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    )
    base = load_tokenizer(tmp_path)
    assert (base.pad_token_id, base.initial_tokenizer_len, base.image_token_id, base.end_of_chunk_token_id) == (
        tok.pad_token_id,
        tok.initial_tokenizer_len,
        tok.image_token_id,
        tok.end_of_chunk_token_id,
    )
    # Independent: transformers' fast tokenizer with the original factory's additions.
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token="<|endoftext|>")
    hf.add_special_tokens({"pad_token": "<pad>"})
    assert len(hf) == base.initial_tokenizer_len
    hf.add_special_tokens({"additional_special_tokens": ["<image>", "<|endofchunk|>"]})
    text = "<s> <|system|>\nHi<|end|>\n<|user|>\n<image>\nWhat is in the picture?<|end|>\n<|assistant|>\n"
    assert hf(text, add_special_tokens=False)["input_ids"] == base.encode(text)
    # Saving and reloading keeps every id.
    base.save(tmp_path / "again")
    again = load_tokenizer(tmp_path / "again")
    assert again.encode(text) == base.encode(text) and again.initial_tokenizer_len == base.initial_tokenizer_len


def test_load_reports_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_decode_round_trips_text_with_byte_fallback(tok):
    text = "A cat — naïve 猫 on a mat."
    assert tok.decode(tok.encode(text)) == text


# --- images --------------------------------------------------------------------------------------------


def test_rgb_preprocessing_is_pil_bicubic_then_scaled_to_minus_one_one():
    image = random_image()
    expected = np.asarray(image.resize((28, 28), Image.Resampling.BICUBIC), np.float32) / 255.0 * 2.0 - 1.0
    out = preprocess_image(image, 28)
    assert out.shape == (28, 28, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.min() >= -1.0 and out.max() <= 1.0


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "P", "CMYK", "1", "I;16", "I", "F", "YCbCr"])
def test_every_pil_mode_gives_rgb_in_range(mode):
    image = random_image(1)
    if mode in ("I;16", "I", "F"):
        image = image.convert("L")
    converted = image.convert(mode) if mode != "P" else image.convert("P", palette=Image.Palette.ADAPTIVE)
    out = preprocess_image(converted, 16)
    assert out.shape == (16, 16, 3) and np.isfinite(out).all()
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_sixteen_bit_images_are_scaled_by_their_range_not_clipped():
    mid_gray = Image.fromarray(np.full((8, 8), 32768, np.uint16))  # half of the 16-bit range
    np.testing.assert_allclose(preprocess_image(mid_gray, 4), 0.0, atol=0.01)  # PIL's own convert would say 1.0


def test_palette_images_are_converted_before_the_bicubic_resize():
    image = random_image(2).convert("P", palette=Image.Palette.ADAPTIVE)
    np.testing.assert_allclose(preprocess_image(image, 12), preprocess_image(image.convert("RGB"), 12), atol=1e-6)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    out = preprocess_image(path, 20)
    # Displayed upright the image is 20 wide, 40 tall with the red half on top.
    assert out[2, 10, 0] > 0.8 and out[17, 10, 0] < -0.8


def test_encoded_bytes_and_arrays_are_accepted(tmp_path):
    image = random_image(3)
    path = tmp_path / "x.png"
    image.save(path)
    expected = preprocess_image(image, 12)
    np.testing.assert_array_equal(preprocess_image(path.read_bytes(), 12), expected)
    np.testing.assert_array_equal(preprocess_image(np.asarray(image), 12), expected)


def test_unreadable_image_path_names_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        preprocess_image(bad, 8)


# --- the processor vs the original -------------------------------------------------------------------------


def original_prompt(question):
    """The original demo's template string, verbatim structure."""
    system = "<|system|>" + "\n" + SYSTEM_MESSAGE + "<|end|>\n"
    return f"<s> {system}" + f"<|user|>\n<image>\n{question}<|end|>\n<|assistant|>\n"


def original_layout(tok, question, answer, image_tokens):
    """The original's fused ids, labels and mask, computed from token ids as it does (one image)."""
    ids = tok.encode(original_prompt(question) + answer + "<|end|>")
    start = ids.index(tok.assistant_token_id) + 2  # the answer follows "<|assistant|>\n"
    assert tok.decode(ids[start:], skip_special_tokens=False) == answer + "<|end|>"
    labels = [-100] * start + ids[start:]
    p = ids.index(tok.image_token_id)
    fused = ids[:p] + [tok.image_token_id] * image_tokens + ids[p + 1 :]
    fused_labels = labels[:p] + [-100] * image_tokens + labels[p + 1 :]
    n = len(fused)
    mask = np.tril(np.ones((n, n), bool))
    end = ids.index(tok.assistant_token_id) + image_tokens  # index in unexpanded text + 144 (here 6)
    mask[p : p + image_tokens, p + image_tokens : end] = True
    return np.asarray(fused), np.asarray(fused_labels), mask, p


def test_chat_layout_equals_the_original(tok, proc):
    question, answer = "What is in the picture?", "A cat sitting on a mat."
    ex = proc.sft_example(
        [{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": answer}],
        [random_image()],
    )
    fused, labels, mask, p = original_layout(tok, question, answer, IMAGE_TOKENS)
    np.testing.assert_array_equal(ex["input_ids"], fused)
    # targets/weights are the original's labels shifted by one.
    supervised = labels[1:] != -100
    np.testing.assert_array_equal(ex["weights"][:-1], supervised.astype(np.float32))
    np.testing.assert_array_equal(ex["targets"][:-1][supervised], labels[1:][supervised])
    assert ex["weights"][-1] == 0
    ours = np.asarray(attention_mask(ex["modality_ids"][None]))[0]
    np.testing.assert_array_equal(ours, mask)
    # The QUERY span is "\n{question}<|end|>\n<|assistant|>" exactly.
    query = ex["input_ids"][ex["modality_ids"] == QUERY]
    assert tok.decode(query, skip_special_tokens=False) == f"\n{question}<|end|>\n<|assistant|>"
    assert (ex["modality_ids"][p : p + IMAGE_TOKENS] == IMAGE).all()


def test_prompt_example_is_the_original_prompt(tok, proc):
    question = "Describe the image in detail."
    ex = proc.prompt_example(question, [random_image()])
    fused, _, mask, _ = original_layout(tok, question, "", IMAGE_TOKENS)
    fused, mask = fused[:-1], mask[:-1, :-1]  # the original prompt stops after "<|assistant|>\n"
    np.testing.assert_array_equal(ex["input_ids"], fused)
    np.testing.assert_array_equal(np.asarray(attention_mask(ex["modality_ids"][None]))[0], mask)
    assert ex["weights"].sum() == 0


def test_caption_example_supervises_caption_endofchunk_and_eos(tok, proc):
    ex = proc.caption_example("A cat sitting on a mat.", [random_image()])
    ids = tok.encode("<image>A cat sitting on a mat.<|endofchunk|><|endoftext|>")
    fused = [tok.image_token_id] * IMAGE_TOKENS + ids[1:]
    np.testing.assert_array_equal(ex["input_ids"], fused)
    assert set(ex["modality_ids"].tolist()) == {IMAGE, TEXT}  # no <|assistant|>: no rectangle, plain causal
    np.testing.assert_array_equal(ex["weights"], [0.0] * (IMAGE_TOKENS - 1) + [1.0] * (len(ids) - 1) + [0.0])
    assert ex["targets"][-2] == tok.eos_token_id


def test_two_images_in_one_turn_read_the_rest_of_that_turn(tok, proc):
    messages = [
        {"role": "user", "content": "Compare <image> with <image>\nWhat is in the picture?"},
        {"role": "assistant", "content": "A cat."},
    ]
    ex = proc.sft_example(messages, [random_image(0), random_image(1)])
    m = ex["modality_ids"]
    image_rows = np.flatnonzero(m == IMAGE)
    assert len(image_rows) == 2 * IMAGE_TOKENS
    first, second = image_rows[0], image_rows[IMAGE_TOKENS]
    assistant = np.flatnonzero(ex["input_ids"] == tok.assistant_token_id)[0]
    # "Compare " stays TEXT; after the first image everything up to <|assistant|> is QUERY or IMAGE.
    assert (m[:first] != QUERY).all()
    assert np.isin(m[first : assistant + 1], [IMAGE, QUERY]).all() and m[assistant + 1] == TEXT
    full = np.asarray(attention_mask(m[None]))[0]
    assert full[first, second - 1] and full[first, assistant]  # first image reads the text between and the question
    assert not full[first, second]  # ... but not the second image
    assert not full[first, assistant + 1 :].any()  # and never the answer


def test_images_in_later_turns_read_their_own_turn(tok, proc):
    messages = [
        {"role": "user", "content": "<image>\nWhat is in the picture?"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "<image>\nDescribe the image in detail."},
        {"role": "assistant", "content": "A cat sitting on a mat."},
    ]
    ex = proc.sft_example(messages, [random_image(0), random_image(1)])
    m, ids = ex["modality_ids"], ex["input_ids"]
    assistants = np.flatnonzero(ids == tok.assistant_token_id)
    images = np.flatnonzero(m == IMAGE)
    second = images[IMAGE_TOKENS]
    assert (m[assistants] == QUERY).all()
    assert (m[assistants[0] + 1 : second] != QUERY).all()  # turn-1 answer and turn-2 "<|user|>\n" are TEXT
    assert (m[second + IMAGE_TOKENS : assistants[1] + 1] == QUERY).all()
    # Both answers (and their <|end|>) are supervised, nothing else.
    supervised = ids[1:][ex["weights"][:-1] == 1]
    assert tok.decode(supervised, skip_special_tokens=False) == "A cat.<|end|>A cat sitting on a mat.<|end|>"


def test_placeholder_and_image_count_mismatch_is_reported(proc):
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) but 2 image\(s\)"):
        proc.sft_example(
            [{"role": "user", "content": "<image>\nHi"}, {"role": "assistant", "content": "Hi"}],
            [random_image(0), random_image(1)],
        )
    with pytest.raises(ValueError, match=r"0 <image> placeholder\(s\) but 1 image"):
        proc.encode([Segment("just text")], [random_image()])


# --- collate -----------------------------------------------------------------------------------------------


def test_collate_pads_left_or_right_and_counts_positions_from_the_first_token(proc):
    short = proc.prompt_example("Hi", [random_image()])
    long = proc.prompt_example("Describe the image in detail.", [random_image(1)])
    n_short, n_long = len(short["input_ids"]), len(long["input_ids"])
    for side in ("left", "right"):
        batch = proc.collate([short, long], n_long + 3, padding_side=side, max_images=2)
        assert batch["input_ids"].shape == (2, n_long + 3) and batch["pixel_values"].shape == (2, 2, 28, 28, 3)
        real = batch["modality_ids"][0] != PAD
        assert real.sum() == n_short and (batch["segment_ids"][0] == real).all()
        np.testing.assert_array_equal(batch["positions"][0][real], np.arange(n_short))
        np.testing.assert_array_equal(batch["input_ids"][0][real], short["input_ids"])
        assert (real[-1] if side == "left" else real[0]) and not (real[0] if side == "left" else real[-1])
        np.testing.assert_array_equal(batch["pixel_values"][0, 0], short["pixel_values"][0])
        assert (batch["pixel_values"][:, 1] == 0).all()


def test_collate_truncation_errors_or_cuts_without_splitting_an_image(proc):
    ex = proc.sft_example(
        [{"role": "user", "content": "Hi <image>\nWhat?"}, {"role": "assistant", "content": "A cat."}], [random_image()]
    )
    n = len(ex["input_ids"])
    with pytest.raises(ValueError, match=f"example 0 has {n} tokens, more than the batch length 10"):
        proc.collate([ex], 10)
    first_image = int(np.flatnonzero(ex["modality_ids"] == IMAGE)[0])
    cut = proc.collate([ex], first_image + 2, truncation="right")  # would split the image: drops it
    assert (cut["modality_ids"][0] != IMAGE).all() and (cut["modality_ids"][0][first_image:] == PAD).all()
    kept = proc.collate([ex], n - 2, truncation="right")
    np.testing.assert_array_equal(kept["input_ids"][0], ex["input_ids"][: n - 2])
    assert kept["weights"][0, -1] == 0 and (kept["pixel_values"][0, 0] == ex["pixel_values"][0]).all()


def test_collate_rejects_too_many_images(proc):
    ex = proc.caption_example("A cat.", [random_image(0), random_image(1)])
    with pytest.raises(ValueError, match="example 0 has 2 images, more than max_images=1"):
        collate([ex], max_images=1)
