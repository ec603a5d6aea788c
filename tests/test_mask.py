"""The modality mask: hand-worked layouts, properties, and the original AKI's image rectangle."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aki_jax.mask import IMAGE, PAD, QUERY, TEXT, attention_mask, default_positions

CODES = {"P": PAD, "T": TEXT, "I": IMAGE, "Q": QUERY}


def layout(text):
    return np.array([[CODES[c] for c in text.split()]], np.int32)


def grid(rows):
    return np.array([[c == "1" for c in row.split()] for row in rows], bool)


def test_mma_worked_example_image_reads_following_query_only():
    got = np.asarray(attention_mask(layout("T I I Q Q T"), kind="mma"))[0]
    expected = grid(
        [
            "1 . . . . .",
            "1 1 . 1 1 .",
            "1 1 1 1 1 .",
            "1 1 1 1 . .",
            "1 1 1 1 1 .",
            "1 1 1 1 1 1",
        ]
    )
    np.testing.assert_array_equal(got, expected)


def test_causal_worked_example_is_lower_triangular():
    got = np.asarray(attention_mask(layout("T I I Q Q T"), kind="causal"))[0]
    np.testing.assert_array_equal(got, np.tril(np.ones((6, 6), bool)))


def test_packed_segments_are_independent_blocks():
    segments = np.array([[0, 0, 0, 1, 1]])
    got = np.asarray(attention_mask(layout("I Q T I Q"), segments))[0]
    expected = grid(["1 1 . . .", "1 1 . . .", "1 1 1 . .", ". . . 1 1", ". . . 1 1"])
    np.testing.assert_array_equal(got, expected)


def test_pad_is_seen_by_nobody_and_sees_nothing():
    got = np.asarray(attention_mask(layout("T T P"), kind="mma"))[0]
    np.testing.assert_array_equal(got, grid(["1 . .", "1 1 .", ". . ."]))


def test_query_after_text_gap_is_not_visible_to_earlier_image():
    # the run of IMAGE/QUERY is broken by TEXT, so the image may not read the second QUERY block
    got = np.asarray(attention_mask(layout("I Q T Q"), kind="mma"))[0]
    np.testing.assert_array_equal(got[0], [True, True, False, False])


def test_two_images_each_read_the_queries_ahead_in_their_run():
    got = np.asarray(attention_mask(layout("I Q T I Q"), kind="mma"))[0]
    np.testing.assert_array_equal(got[0], [True, True, False, False, False])
    np.testing.assert_array_equal(got[3], [True, True, True, True, True])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="kind"):
        attention_mask(layout("T T"), kind="bidirectional")
    with pytest.raises(ValueError, match="segment_ids shape"):
        attention_mask(layout("T T"), np.zeros((1, 3), np.int32))
    with pytest.raises(ValueError, match=r"int\[B, L\]"):
        attention_mask(np.zeros((3,), np.int32))


def rule_by_loops(modality, segment, kind):
    """The mask rule written out position by position (independent of the vectorised version)."""
    n = len(modality)
    out = np.zeros((n, n), bool)
    for t in range(n):
        for s in range(n):
            if modality[t] == PAD or modality[s] == PAD or segment[t] != segment[s]:
                continue
            if s <= t:
                out[t, s] = True
            elif kind == "mma" and modality[t] == IMAGE and modality[s] == QUERY:
                between = range(t, s + 1)
                out[t, s] = all(modality[u] in (IMAGE, QUERY) and segment[u] == segment[t] for u in between)
    return out


rows = st.integers(1, 12).flatmap(
    lambda n: st.tuples(
        st.lists(st.sampled_from([PAD, TEXT, IMAGE, QUERY]), min_size=n, max_size=n),
        st.lists(st.integers(0, 2), min_size=n, max_size=n).map(sorted),
    )
)


@settings(max_examples=150, deadline=None)
@given(rows, st.sampled_from(["mma", "causal"]))
def test_mask_equals_the_rule_written_with_loops(row, kind):
    modality, segment = (np.array([x], np.int32) for x in row)
    got = np.asarray(attention_mask(modality, segment, kind=kind))[0]
    np.testing.assert_array_equal(got, rule_by_loops(modality[0], segment[0], kind))


@settings(max_examples=150, deadline=None)
@given(rows)
def test_mask_properties(row):
    modality, segment = (np.array(x, np.int32) for x in row)
    mma = np.asarray(attention_mask(modality[None], segment[None]))[0]
    causal = np.asarray(attention_mask(modality[None], segment[None], kind="causal"))[0]
    n = len(modality)
    upper = np.triu(np.ones((n, n), bool), 1)
    pad = modality == PAD
    # PAD invisible, no attention across segments
    assert not mma[:, pad].any() and not mma[pad].any()
    assert not (mma & (segment[:, None] != segment[None, :])).any()
    # causal kind: exactly lower triangular within segments over non-PAD tokens
    expected_causal = ~upper & (segment[:, None] == segment[None, :]) & ~pad[:, None] & ~pad[None, :]
    np.testing.assert_array_equal(causal, expected_causal)
    # outside the IMAGE->QUERY rectangles, MMA is causal
    extra = mma & ~causal
    assert not (extra & ~((modality[:, None] == IMAGE) & (modality[None, :] == QUERY))).any()
    # images never see text (the answer) ahead of them
    assert not (mma & upper & (modality[:, None] == IMAGE) & (modality[None, :] == TEXT)).any()


def original_rectangle_mask(text_ids, image_token, assistant_token, image_token_count, pad_id):
    """The original AKI mask for one unexpanded text with one `<image>`, as the reference describes it.

    Causal over the fused sequence, padding columns closed, plus rows of the image tokens opened on the
    columns [image_end, index_of_assistant_in_text + image_token_count) (one past `<|assistant|>`).
    """
    text_ids = list(text_ids)
    i = text_ids.index(image_token)
    fused = text_ids[:i] + [image_token] * image_token_count + text_ids[i + 1 :]
    n = len(fused)
    mask = np.tril(np.ones((n, n), bool))
    if assistant_token in text_ids:
        end = text_ids.index(assistant_token) + image_token_count
        mask[i : i + image_token_count, i + image_token_count : end] = True
    mask[:, np.array(fused) == pad_id] = False
    return mask, fused


def modality_ids_for_chat(fused, image_token, assistant_token, pad_id):
    """QUERY = from just after the image run up to and including the first `<|assistant|>`."""
    fused = np.array(fused)
    modality = np.full(len(fused), TEXT, np.int32)
    modality[fused == image_token] = IMAGE
    modality[fused == pad_id] = PAD
    image_end = np.nonzero(fused == image_token)[0].max() + 1
    hits = np.nonzero(fused == assistant_token)[0]
    if len(hits):
        modality[image_end : hits[0] + 1] = QUERY
    return modality


@pytest.mark.parametrize("prefix,question,answer,pad", [(4, 3, 5, 0), (1, 7, 2, 3), (9, 1, 1, 6)])
def test_mma_reproduces_the_original_rectangle_on_chat_layouts(prefix, question, answer, pad):
    image, assistant, end, pad_id, count = 90, 91, 92, 99, 5
    rng = np.random.default_rng(prefix * 100 + question)
    words = lambda k: list(rng.integers(10, 80, size=k))  # noqa: E731
    text = words(prefix) + [image] + words(question) + [end, 11, assistant] + words(answer) + [end]
    text += [pad_id] * pad
    expected, fused = original_rectangle_mask(text, image, assistant, count, pad_id)
    modality = modality_ids_for_chat(fused, image, assistant, pad_id)
    got = np.asarray(attention_mask(modality[None]))[0]
    # the original leaves padded rows causal; ours closes them. Compare the rows of real tokens.
    real = np.array(fused) != pad_id
    np.testing.assert_array_equal(got[real], expected[real])


def test_caption_layout_without_assistant_is_plain_causal():
    image, pad_id = 90, 99
    text = [5, image, 6, 7, 8]
    expected, fused = original_rectangle_mask(text, image, 91, 4, pad_id)
    modality = modality_ids_for_chat(fused, image, 91, pad_id)
    np.testing.assert_array_equal(np.asarray(attention_mask(modality[None]))[0], expected)


def test_mask_is_jittable_and_batched():
    modality = np.concatenate([layout("T I Q Q T P"), layout("I Q T T T T")])
    got = jax.jit(attention_mask, static_argnames="kind")(modality, None, kind="mma")
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(attention_mask(modality[1:]))[0])
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(attention_mask(modality[:1]))[0])


def test_default_positions_restart_in_each_segment():
    segments = np.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    got = np.asarray(default_positions(np.ones_like(segments), segments))
    np.testing.assert_array_equal(got, [[0, 1, 2, 0, 1, 0, 0, 1]])
    np.testing.assert_array_equal(np.asarray(default_positions(np.ones((2, 3), np.int32))), [[0, 1, 2]] * 2)
