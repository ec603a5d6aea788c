"""Generation: MMA prefill into a preallocated KV cache, then a jit-compiled causal decode loop.

Array level (no tokenizer needed):

    new_ids = generate(model, params, pixel_values, input_ids, modality_ids, max_new_tokens=32,
                       sampling=Sampling(eos_ids=(eos,)))          # int32[B, 32], greedy

Text level:

    answers = generate_text(model, params, tokenizer, "What is in the picture?", [image])
    answers = generate_text(..., sampling=Sampling(temperature=0.7, top_p=0.9, seed=1))

`Sampling` holds every setting of how tokens are chosen and when rows stop; all three entry points take it.

How it works (B rows, prompt length P, N new tokens, cache length P + N):
  1. Prefill: one forward over the prompt with the modality (MMA) mask, writing keys/values into
     cache slots [0, P). The first new token comes from the logits at each row's last real token.
  2. Decode: token t is written at slot P + t of every row and attends to that row's real prompt
     slots and to the generated slots up to itself (causal), exactly as the original continues
     after its prefill. Rows stop independently at any of `eos_ids` (the end token is kept, then
     `pad_id` follows); the loop ends when every row has stopped or N tokens exist.
     The prefill runs the decoder's layers as a scan over their stacked weights; the decode steps,
     which read every weight once per token, run them one by one over per-layer copies taken once
     after the prefill (`scan_layers=True` keeps the scan: no copy, slower; see `aki_jax.decoder.Decoder`).

Padding: prompts may be padded on either side (PAD modality); left padding (what `generate_text`
uses) keeps the arrays simple. Positions count from each row's first real token, so a padded
row gets exactly the positions, logits and greedy tokens of the same prompt alone.

LongRoPE: the model picks short or long rotary factors from the highest position of each call.
Here, as in the original's cached `generate`, the prefill picks them from the longest prompt of the
batch and every decode step from the highest position of that step. Past
`original_max_position_embeddings` (4096 for Phi-3.5) new tokens use the long factors while the
cached prompt keys keep the short ones, so a cached continuation differs from a full forward over
the whole text there (the original behaves the same way); below that length both agree exactly.

Sharding: the cache is constrained with `aki_jax.decoder.CACHE_AXES` (layers, batch, length, heads,
head_dim); under `aki_jax.sharding.activation_context(mesh, rules)` it is split like the model's
activations (batch over data/fsdp, heads over tensor). Without a mesh the constraint is a no-op.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aki_jax.decoder import CACHE_AXES, Decoder, init_cache, unrolled_params, unstack_layers
from aki_jax.layers import constrain
from aki_jax.mask import PAD


# --- sampling -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sampling:
    """How new tokens are chosen (see `sample_logits`) and when a row stops.

    temperature: 0 is greedy (argmax); top_k / top_p: None is off; seed: the same seed gives the same
    tokens for the same inputs. eos_ids: ids that end a row (kept in the output, `pad_id` after); empty:
    never stop early; None: none for `generate` / `stream_generate`, the tokenizer's stop tokens for
    `generate_text` (which also uses the tokenizer's pad id).
    All of these are traced: changing them reuses the compiled program.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    eos_ids: tuple[int, ...] | None = None
    pad_id: int = 0


GREEDY = Sampling()


def sample_logits(logits, key, temperature=0.0, top_k=0, top_p=1.0):
    """Next token ids int32[B] from logits f32[B, V]: argmax when temperature is 0, else sampled.

    temperature divides the logits; top_k (0: off) keeps the k highest; top_p (1: off) then keeps the
    smallest set of highest-probability tokens of what is left whose mass reaches p (always at least
    the top token), as transformers orders them. All three may be traced values, so changing them
    does not recompile; the sampling branch runs only when temperature > 0.
    """
    logits = logits.astype(jnp.float32)

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled(_):
        scaled = logits / jnp.maximum(temperature, 1e-6)
        vocab = scaled.shape[-1]
        ordered = jnp.sort(scaled, axis=-1)[..., ::-1]
        k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)
        in_top_k = jnp.arange(vocab) < k
        kth = jnp.take_along_axis(ordered, jnp.broadcast_to(k - 1, ordered.shape[:-1])[..., None], axis=-1)
        probs = jax.nn.softmax(jnp.where(in_top_k, ordered, -jnp.inf), axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # the top token always has mass_before 0
        nucleus = jnp.min(jnp.where(in_top_k & (mass_before < top_p), ordered, jnp.inf), axis=-1, keepdims=True)
        threshold = jnp.maximum(kth, nucleus)
        return jax.random.categorical(key, jnp.where(scaled < threshold, -jnp.inf, scaled), axis=-1).astype(jnp.int32)

    return jax.lax.cond(jnp.asarray(temperature) > 0, sampled, greedy, None)


def _sampling_args(sampling: Sampling) -> dict:
    """Traced sampling settings; eos ids padded with -1 to a multiple of 8 so their count rarely recompiles."""
    eos = [int(i) for i in sampling.eos_ids or ()]
    width = max(8, -(-len(eos) // 8) * 8)
    return {
        "temperature": jnp.float32(sampling.temperature),
        "top_k": jnp.int32(0 if sampling.top_k is None else sampling.top_k),
        "top_p": jnp.float32(1.0 if sampling.top_p is None else sampling.top_p),
        "eos_ids": jnp.asarray(eos + [-1] * (width - len(eos)), jnp.int32),
        "pad_id": jnp.int32(sampling.pad_id),
    }


# --- the two model calls --------------------------------------------------------------------------------------
def _constrain_cache(cache):
    """Shard a stacked cache {"key", "value"} or a per-layer list of them (see `_for_decoding`) like activations."""
    if isinstance(cache, list):
        return [{name: constrain(value, CACHE_AXES[1:]) for name, value in layer.items()} for layer in cache]
    return {name: constrain(value, CACHE_AXES) for name, value in cache.items()}


def _prefill(model, params, pixel_values, input_ids, modality_ids, cache_length: int, cache_dtype):
    """-> (cache, logits at each row's last real token f32[B, V], real int32[B, P] mask, lengths int32[B])."""
    batch, prompt = input_ids.shape
    real = modality_ids != PAD
    positions = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0).astype(jnp.int32)
    cache = _constrain_cache(init_cache(model.config, batch, cache_length, cache_dtype))
    logits, cache = model.apply(
        {"params": params}, pixel_values, input_ids, modality_ids, positions=positions, cache=cache, cache_index=0
    )
    last = prompt - 1 - jnp.argmax(real[:, ::-1], axis=1)  # index of each row's last real token
    last_logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
    return _constrain_cache(cache), last_logits, real, real.sum(axis=1).astype(jnp.int32)


def _for_decoding(params, cache, scan_layers: bool):
    """The decode steps' weights and cache: with scan_layers False, the decoder's layer weights and the
    cache as separate per-layer arrays (copied once here, so no step copies a slice of a stack).
    Only the decoder's params are kept: a decode step runs no vision tower."""
    decoder = params["decoder"]
    if scan_layers:
        return decoder, cache
    return unrolled_params(decoder), _constrain_cache(unstack_layers(cache))


def _decode_step(model, decoder_params, cache, token, step, real, lengths, scan_layers: bool):
    """Feed token int32[B] as new token `step` (slot P + step) -> (logits f32[B, V], cache).

    `decoder_params` and `cache` as `_for_decoding` returns them; the step is the model's decoder alone
    (a text token, the positions and the mask given), run through `Decoder(config, scan_layers)`.
    """
    batch, prompt = real.shape
    length = (cache[0] if isinstance(cache, list) else cache)["key"].shape[-3]
    slots = jnp.arange(length)
    visible = jnp.where(slots < prompt, jnp.pad(real, ((0, 0), (0, length - prompt))), slots <= prompt + step)

    def run(decoder):
        embeds = decoder.embed(token[:, None])
        return decoder(embeds, (lengths + step)[:, None], visible[:, None, :], cache, prompt + step)

    decoder = Decoder(model.config, scan_layers=scan_layers)
    logits, cache = nn.apply(run, decoder)({"params": decoder_params})
    return logits[:, 0], _constrain_cache(cache)


# --- array-level generation -------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "cache_dtype", "scan_layers"))
def _generate(
    params, pixel_values, input_ids, modality_ids, key, sampling, *, model, max_new_tokens, cache_dtype, scan_layers
):
    batch, prompt = input_ids.shape
    sample = functools.partial(
        sample_logits, temperature=sampling["temperature"], top_k=sampling["top_k"], top_p=sampling["top_p"]
    )
    stops, pad_id = sampling["eos_ids"], sampling["pad_id"]
    cache, logits, real, lengths = _prefill(
        model, params, pixel_values, input_ids, modality_ids, prompt + max_new_tokens, cache_dtype
    )
    decoder_params, cache = _for_decoding(params, cache, scan_layers)
    token = sample(logits, jax.random.fold_in(key, 0))
    done = jnp.isin(token, stops)
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)

    def cond(carry):
        step, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, token, done, out = carry
        logits, cache = _decode_step(model, decoder_params, cache, token, step - 1, real, lengths, scan_layers)
        new = sample(logits, jax.random.fold_in(key, step))
        new = jnp.where(done, pad_id, new)
        out = jax.lax.dynamic_update_slice_in_dim(out, new[:, None], step, axis=1)
        return step + 1, cache, new, done | jnp.isin(new, stops), out

    carry = (jnp.int32(1), cache, token, done, out)
    return jax.lax.while_loop(cond, body, carry)[-1]


def _check_inputs(model, pixel_values, input_ids, modality_ids, max_new_tokens):
    input_ids = jnp.asarray(input_ids, jnp.int32)
    modality_ids = jnp.asarray(modality_ids, jnp.int32)
    if input_ids.ndim != 2 or input_ids.shape != modality_ids.shape:
        raise ValueError(f"input_ids {input_ids.shape} and modality_ids {modality_ids.shape} must both be int[B, P]")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not bool(jnp.all(jnp.any(modality_ids != PAD, axis=1))):
        raise ValueError("every prompt row needs at least one non-PAD token")
    if pixel_values is not None:
        pixel_values = jnp.asarray(pixel_values)
        if pixel_values.shape[1] == 0:
            pixel_values = None
    return pixel_values, input_ids, modality_ids


def generate(
    model,
    params,
    pixel_values,
    input_ids,
    modality_ids,
    max_new_tokens: int = 256,
    *,
    sampling: Sampling = GREEDY,
    cache_dtype=None,
    scan_layers: bool = False,
):
    """New token ids int32[B, max_new_tokens] after the prompts (greedy unless sampling.temperature > 0).

    Args:
      model: `aki_jax.AKI(config)`; params: its parameters.
      pixel_values: f32[B, I, S, S, 3] or None; input_ids, modality_ids: int[B, P] (a processed,
        padded prompt batch, e.g. `Processor.collate(..., padding_side="left")`).
      sampling: `Sampling` (traced; shapes, max_new_tokens, the model and cache_dtype are compiled in).
      cache_dtype: KV cache dtype (default: the model's compute dtype).
      scan_layers: False (default): decode over per-layer copies of the decoder's layer weights, taken
        once per call (memory: one more copy of those weights while generating); True: decode through
        the layers' scan over the stacked weights, which copies each layer's slice at every token
        (slower; see `aki_jax.decoder.Decoder`). Both give the same tokens.
    """
    pixel_values, input_ids, modality_ids = _check_inputs(model, pixel_values, input_ids, modality_ids, max_new_tokens)
    return _generate(
        params,
        pixel_values,
        input_ids,
        modality_ids,
        jax.random.key(sampling.seed),
        _sampling_args(sampling),
        model=model,
        max_new_tokens=int(max_new_tokens),
        cache_dtype=None if cache_dtype is None else jnp.dtype(cache_dtype).name,
        scan_layers=bool(scan_layers),
    )


# Streaming: the same prefill and step, driven from Python so each token can be shown as it comes.
@functools.partial(jax.jit, static_argnames=("model", "cache_length", "cache_dtype"))
def _stream_prefill(params, pixel_values, input_ids, modality_ids, key, sampling, *, model, cache_length, cache_dtype):
    cache, logits, real, lengths = _prefill(
        model, params, pixel_values, input_ids, modality_ids, cache_length, cache_dtype
    )
    token = sample_logits(
        logits, jax.random.fold_in(key, 0), sampling["temperature"], sampling["top_k"], sampling["top_p"]
    )
    return cache, token, real, lengths


_stream_for_decoding = jax.jit(_for_decoding, static_argnames=("scan_layers",))


@functools.partial(jax.jit, static_argnames=("model", "scan_layers"), donate_argnums=(1,))
def _stream_step(decoder_params, cache, token, step, real, lengths, key, sampling, *, model, scan_layers):
    logits, cache = _decode_step(model, decoder_params, cache, token, step - 1, real, lengths, scan_layers)
    key = jax.random.fold_in(key, step)
    return cache, sample_logits(logits, key, sampling["temperature"], sampling["top_k"], sampling["top_p"])


def stream_generate(
    model,
    params,
    pixel_values,
    input_ids,
    modality_ids,
    max_new_tokens: int = 256,
    *,
    sampling: Sampling = GREEDY,
    cache_dtype=None,
    scan_layers: bool = False,
):
    """Like `generate`, but yields each step's tokens (numpy int32[B]) as they are produced.

    Yields the same tokens as `generate` with the same arguments (finished rows yield `sampling.pad_id`).
    The layer weights are copied per layer once per call, as in `generate` (unless scan_layers).
    """
    pixel_values, input_ids, modality_ids = _check_inputs(model, pixel_values, input_ids, modality_ids, max_new_tokens)
    settings = sampling
    sampling = _sampling_args(settings)
    key = jax.random.key(settings.seed)
    cache_dtype = None if cache_dtype is None else jnp.dtype(cache_dtype).name
    cache, token, real, lengths = _stream_prefill(
        params,
        pixel_values,
        input_ids,
        modality_ids,
        key,
        sampling,
        model=model,
        cache_length=input_ids.shape[1] + max_new_tokens,
        cache_dtype=cache_dtype,
    )
    decoder_params, cache = _stream_for_decoding(params, cache, scan_layers=bool(scan_layers))
    stops = np.asarray(settings.eos_ids or (), np.int32)
    done = np.zeros(input_ids.shape[0], bool)
    for step in range(max_new_tokens):
        if step > 0:
            cache, token = _stream_step(
                decoder_params,
                cache,
                token,
                jnp.int32(step),
                real,
                lengths,
                key,
                sampling,
                model=model,
                scan_layers=bool(scan_layers),
            )
        host = np.where(done, settings.pad_id, np.asarray(token)).astype(np.int32)
        token = jnp.asarray(host)
        done |= np.isin(host, stops)
        yield host
        if done.all():
            return


# --- text-level generation -------------------------------------------------------------------------------------
def generate_text(
    model,
    params,
    tokenizer,
    prompts: str | Sequence,
    images: Sequence | None = None,
    *,
    max_new_tokens: int = 256,
    on_text: Callable[[str], None] | None = None,
    pad_to_multiple: int = 16,
    sampling: Sampling = GREEDY,
) -> str | list[str]:
    """Answer questions about images with the chat template.

    Args:
      prompts: one question (str) or a list of questions; a question may also be a list of chat
        messages ending with a user message. Without `<image>` placeholders, one `<image>\\n` per
        image is put in front of the question.
      images: for one question, a list of images (PIL images, paths or arrays); for a list of
        questions, a list of such lists. None: no images.
      on_text: called with each new piece of text of the first row as it is generated (streaming).
      pad_to_multiple: prompts are left-padded to a multiple of this to reuse compiled code.
      sampling: `Sampling`; eos_ids None means `tokenizer.stop_token_ids`; the pad id is the tokenizer's.

    Returns the answer text(s), cut at the first stop token.
    """
    from aki_jax.processing import Processor  # processing imports PIL/tokenizers; keep generation light

    single = isinstance(prompts, str) or (
        isinstance(prompts, Sequence) and len(prompts) > 0 and isinstance(prompts[0], dict)
    )
    if single:
        prompts, images = [prompts], [images or []]
    elif images is None:
        images = [[] for _ in prompts]
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    config = model.config
    processor = Processor(tokenizer, config.image_token_count, config.vision.image_size)
    examples = [processor.prompt_example(p, list(i)) for p, i in zip(prompts, images, strict=True)]
    longest = max(len(e["input_ids"]) for e in examples)
    length = -(-longest // pad_to_multiple) * pad_to_multiple
    batch = processor.collate(examples, length, padding_side="left")
    eos_ids = tuple(tokenizer.stop_token_ids if sampling.eos_ids is None else sampling.eos_ids)
    sampling = dataclasses.replace(sampling, eos_ids=eos_ids, pad_id=tokenizer.pad_token_id)
    args = (model, params, batch["pixel_values"], batch["input_ids"], batch["modality_ids"], max_new_tokens)
    kwargs = {"sampling": sampling}
    if on_text is None:
        tokens = np.asarray(generate(*args, **kwargs))
    else:
        steps, shown = [], ""
        for step in stream_generate(*args, **kwargs):
            steps.append(step)
            if _is_byte_piece(tokenizer, int(step[0])):
                continue  # a UTF-8 character may continue in the next byte piece: decode the group whole
            text = _cut_and_decode(tokenizer, np.stack(steps, axis=1)[0], eos_ids)
            if len(text) > len(shown) and text.startswith(shown):
                on_text(text[len(shown) :])
                shown = text
        tokens = np.stack(steps, axis=1)
    answers = [_cut_and_decode(tokenizer, row, eos_ids) for row in tokens]
    if on_text is not None and len(answers[0]) > len(shown) and answers[0].startswith(shown):
        on_text(answers[0][len(shown) :])
    return answers[0] if single else answers


def _is_byte_piece(tokenizer, token: int) -> bool:
    """True for SentencePiece byte-fallback pieces `<0x..>`, which decode together with their neighbours."""
    piece = tokenizer.backend.id_to_token(token) or ""
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def _cut_and_decode(tokenizer, row, eos_ids) -> str:
    row = [int(t) for t in row]
    for i, t in enumerate(row):
        if t in eos_ids:
            row = row[:i]
            break
    return tokenizer.decode(row, skip_special_tokens=True)
