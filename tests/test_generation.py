"""Generation: cached greedy decoding equals the full forward, batching and padding change nothing,
sampling is reproducible and respects top-k / top-p, rows stop at their end tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aki_jax import AKI, init_cache
from aki_jax.generation import Sampling, generate, generate_text, sample_logits, stream_generate
from aki_jax.mask import IMAGE, PAD, QUERY, TEXT

# Compiles prefill and decode for many shapes (about 5 min on a loaded 2-core machine).
pytestmark = pytest.mark.slow

NEW = 6
PROMPT = 16


@pytest.fixture(scope="module")
def setup(tiny_params):
    config, shared = tiny_params
    params = jax.tree.map(lambda x: x, shared)  # a copy: the head is scaled below
    model = AKI(config)
    # Larger logits spread so greedy ties are impossible and sampling is not near-uniform.
    params["decoder"]["lm_head_kernel"] = params["decoder"]["lm_head_kernel"] * 20.0
    return config, model, params


def unpadded_prompts(config):
    """Two prompts of different lengths: text, an image, a QUERY span, trailing text."""
    rng = np.random.default_rng(1)
    t = config.image_token_count
    prompts = []
    for length, before, query in ((PROMPT, 3, 4), (PROMPT - 5, 2, 2)):
        ids = rng.integers(0, config.initial_tokenizer_len, length).astype(np.int32)
        modality = np.full(length, TEXT, np.int32)
        modality[before : before + t] = IMAGE
        modality[before + t : before + t + query] = QUERY
        ids[before : before + t] = config.image_token_id
        prompts.append((ids, modality))
    pixels = rng.uniform(-1, 1, (2, 1, config.vision.image_size, config.vision.image_size, 3)).astype(np.float32)
    return prompts, pixels


def left_padded(prompts, length):
    ids = np.zeros((len(prompts), length), np.int32)
    modality = np.full((len(prompts), length), PAD, np.int32)
    for b, (i, m) in enumerate(prompts):
        ids[b, length - len(i) :], modality[b, length - len(m) :] = i, m
    return ids, modality


@pytest.fixture(scope="module")
def reference(setup):
    """Independent reference: re-run the full forward over prompt + tokens so far, take the argmax."""
    config, model, params = setup
    prompts, pixels = unpadded_prompts(config)
    forward = jax.jit(lambda p, x, i, m: model.apply({"params": p}, x, i, m))
    length = PROMPT + NEW
    expected, step_logits = [], []
    for b, (ids, modality) in enumerate(prompts):
        tokens, logits_seen = [], []
        for _ in range(NEW):
            seq = np.concatenate([ids, np.asarray(tokens, np.int32)])
            mods = np.concatenate([modality, np.full(len(tokens), TEXT, np.int32)])
            # Right padding with PAD is invisible to earlier tokens, so one compiled shape serves all steps.
            pad = length - len(seq)
            logits = forward(
                params,
                pixels[b : b + 1],
                np.pad(seq, (0, pad))[None],
                np.pad(mods, (0, pad), constant_values=PAD)[None],
            )
            last = np.asarray(logits[0, len(seq) - 1])
            logits_seen.append(last)
            tokens.append(int(last.argmax()))
        expected.append(tokens)
        step_logits.append(logits_seen)
    return prompts, pixels, np.asarray(expected), step_logits, forward


def test_greedy_with_cache_equals_full_forward_argmax(setup, reference):
    _, model, params = setup
    prompts, pixels, expected, _, _ = reference
    ids, modality = left_padded(prompts, PROMPT)
    out = generate(model, params, pixels, ids, modality, NEW)
    assert out.shape == (2, NEW) and out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_batched_equals_one_by_one(setup, reference):
    _, model, params = setup
    prompts, pixels, _, _, _ = reference
    ids, modality = left_padded(prompts, PROMPT)
    batched = np.asarray(generate(model, params, pixels, ids, modality, NEW))
    for b in range(2):
        alone = generate(model, params, pixels[b : b + 1], ids[b : b + 1], modality[b : b + 1], NEW)
        np.testing.assert_array_equal(np.asarray(alone)[0], batched[b])
    # Right padding works too: each row continues from its own last real token.
    right_ids, right_modality = np.zeros_like(ids), np.full_like(modality, PAD)
    for b, (i, m) in enumerate(prompts):
        right_ids[b, : len(i)], right_modality[b, : len(m)] = i, m
    right = generate(model, params, pixels, right_ids, right_modality, NEW)
    np.testing.assert_array_equal(np.asarray(right), batched)


def test_prefill_logits_equal_the_forward(setup, reference):
    config, model, params = setup
    prompts, pixels, _, _, _ = reference
    ids, modality = left_padded(prompts, PROMPT)
    positions = np.maximum(np.cumsum(modality != PAD, axis=1) - 1, 0)

    @jax.jit
    def both(params):
        full = model.apply({"params": params}, pixels, ids, modality, positions=positions)
        cache = init_cache(config, 2, PROMPT + NEW)
        cached, cache = model.apply(
            {"params": params}, pixels, ids, modality, positions=positions, cache=cache, cache_index=0
        )
        return full, cached, cache

    full, cached, cache = both(params)
    real = modality != PAD
    np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], atol=1e-5, rtol=1e-5)
    assert cache["key"].shape == (config.decoder.num_layers, 2, PROMPT + NEW, config.decoder.num_heads, 16)


def test_rows_stop_at_end_tokens_and_pad_after(setup, reference):
    _, model, params = setup
    prompts, pixels, expected, _, _ = reference
    ids, modality = left_padded(prompts, PROMPT)
    stop = int(expected[0, 2])
    stopping = Sampling(eos_ids=(stop,), pad_id=-1)
    out = np.asarray(generate(model, params, pixels, ids, modality, NEW, sampling=stopping))
    first = int(np.flatnonzero(expected[0] == stop)[0])
    np.testing.assert_array_equal(out[0, : first + 1], expected[0, : first + 1])
    assert (out[0, first + 1 :] == -1).all()
    hits = np.flatnonzero(expected[1] == stop)
    cut = hits[0] + 1 if len(hits) else NEW
    np.testing.assert_array_equal(out[1, :cut], expected[1, :cut])
    # Streaming yields the same tokens, step by step.
    streamed = list(stream_generate(model, params, pixels, ids, modality, NEW, sampling=stopping))
    np.testing.assert_array_equal(np.stack(streamed, 1), out[:, : len(streamed)])


def test_sampling_is_reproducible_and_stays_in_the_top_k(setup, reference):
    _, model, params = setup
    prompts, pixels, _, _, forward = reference
    ids, modality = left_padded(prompts, PROMPT)
    seven, eight = Sampling(temperature=1.5, top_k=3, seed=7), Sampling(temperature=1.5, top_k=3, seed=8)
    a = np.asarray(generate(model, params, pixels, ids, modality, NEW, sampling=seven))
    b = np.asarray(generate(model, params, pixels, ids, modality, NEW, sampling=seven))
    c = np.asarray(generate(model, params, pixels, ids, modality, NEW, sampling=eight))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Teacher-force each row's sampled tokens through the full forward: every token was in the top 3.
    for row in range(2):
        prompt_ids, prompt_mod = prompts[row]
        pad = PROMPT - len(prompt_ids)
        seq = np.pad(np.concatenate([prompt_ids, a[row]]), (0, pad))
        mods = np.pad(np.concatenate([prompt_mod, np.full(NEW, TEXT, np.int32)]), (0, pad), constant_values=PAD)
        logits = np.asarray(forward(params, pixels[row : row + 1], seq[None], mods[None]))[0]
        for step in range(NEW):
            top3 = np.argsort(logits[len(prompt_ids) - 1 + step])[-3:]
            assert a[row, step] in top3


def test_sample_logits_top_k_and_top_p_keep_only_their_tokens():
    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.06, 0.04]]))
    keys = jax.random.split(jax.random.key(0), 4000)

    sample = jax.jit(jax.vmap(lambda k, top_k, top_p: sample_logits(logits, k, 1.0, top_k, top_p)[0], (0, None, None)))

    def draws(top_k=0, top_p=1.0):  # traced settings: one compilation for every call
        return np.asarray(sample(keys, top_k, top_p))

    top_k = draws(top_k=2)
    assert set(top_k.tolist()) == {0, 1}
    np.testing.assert_allclose((top_k == 0).mean(), 0.5 / 0.75, atol=0.03)
    top_p = draws(top_p=0.8)
    assert set(top_p.tolist()) == {0, 1, 2}  # 0.5 + 0.25 < 0.8: the third token completes the nucleus
    np.testing.assert_allclose(
        np.bincount(top_p, minlength=5)[:3] / len(top_p), np.array([0.5, 0.25, 0.15]) / 0.9, atol=0.03
    )
    both = draws(top_k=3, top_p=0.6)  # top-p over the renormalised top 3: 0.5/0.9 < 0.6 <= 0.75/0.9
    assert set(both.tolist()) == {0, 1}
    assert set(draws().tolist()) == {0, 1, 2, 3, 4}
    assert int(sample_logits(logits, keys[0])[0]) == 0  # temperature 0: greedy


def test_generate_text_streams_the_same_answer(setup):
    from aki_jax.processing import SYSTEM_MESSAGE, train_tokenizer

    config, _, params = setup
    tok = train_tokenizer([SYSTEM_MESSAGE, "What is in the picture? A cat."] * 20, 400)
    config = config.replace(initial_tokenizer_len=tok.initial_tokenizer_len, pad_token_id=tok.pad_token_id)
    model = AKI(config)
    image = np.random.default_rng(0).uniform(0, 1, (30, 40, 3))
    question = "What is in the picture?"
    batch = generate_text(model, params, tok, [question, "Hi"], [[image], []], max_new_tokens=NEW)
    pieces = []
    streamed = generate_text(model, params, tok, question, [image], max_new_tokens=NEW, on_text=pieces.append)
    assert isinstance(streamed, str) and streamed == batch[0] and "".join(pieces) == streamed
