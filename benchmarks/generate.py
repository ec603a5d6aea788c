"""Greedy generation speed on CPU: aki-jax (`aki_jax.generate`) vs transformers' `Phi3ForCausalLM.generate`.

    python benchmarks/generate.py                      # width 512, 8 layers, prompt 128, 64 new tokens
    python benchmarks/generate.py --width 256 --layers 4 --prompt 64 --new 32 --repeats 3

Both sides run the same decoder weights (aki-jax params mapped with `aki_jax.convert.mapping.params_to_torch`),
a text-only prompt, batch 1, float32, greedy, the same number of new tokens (no early stop). Measured:
  prefill latency   one call with max_new_tokens=1 (prompt forward + first token)
  decode tokens/s   (N - 1) / (time for N new tokens - time for 1)
Each figure is the median of --repeats runs after a warm-up (which compiles the jitted side); the runs of
both sides alternate, so a change of machine load hits both alike. Prints a table, then one JSON line.
Both sides must generate the same tokens (checked and reported).

Memory-bandwidth bound of decoding at batch 1: every new token reads all decoder weights that take part (each
layer's projections, the final norm and the LM head; of the embedding table only one row) and the filled part of the
KV cache. bound tokens/s = measured copy bandwidth / those bytes, the bandwidth from a numpy copy of a 256 MiB
array (read + write bytes / seconds, best of 5). Reported: the bound and each side's decode rate as a share of it.

Where aki-jax's decode step loses against the bound (a jax.profiler trace of the defaults, 2026-12-01, loaded
machine): the layers run under `nn.scan` over weights stacked on a leading layer axis, and on CPU XLA copies each
layer's weight slice (dynamic-slice fusions) before every matrix-vector product, so each token reads and writes the
layer weights once more than the products need: the slices took about as long as the dots (0.81 s vs 0.79 s over
63 tokens), plus 0.25 s of weight-layout copies. A stand-alone MLP stack (8 x 512x2x1344 + 1344x512, batch 1) ran
in 9.1-10.7 ms scanned over stacked weights and 5.2 ms over separate per-layer arrays (unrolling the scan instead
was slower, 58-62 ms). A decode path over unstacked layer weights is the indicated next step; not done yet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from aki_jax import AKI, DecoderConfig, init_params, tiny
from aki_jax.generation import generate


def build(width: int, layers: int, vocab: int):
    heads = width // 64
    config = tiny(vocab_size=vocab, initial_tokenizer_len=vocab)  # all rows are "original" tokens
    decoder = DecoderConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=int(width * 8 / 3) // 64 * 64,
        num_layers=layers,
        num_heads=heads,
        max_position_embeddings=4096,
        rope_scaling=None,
    )
    config = config.replace(decoder=decoder, pad_token_id=vocab - 1)
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    params = jax.tree.map(np.asarray, params)
    # Phi-3 has neither a head bias nor AKI's two extra columns: zero the bias, never pick the extras.
    params["decoder"]["lm_head_bias"] = np.zeros_like(params["decoder"]["lm_head_bias"])
    params["decoder"]["additional_head_bias"] = np.full_like(params["decoder"]["additional_head_bias"], -1e9)
    return config, params


def torch_model(config, params):
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from aki_jax.convert.mapping import params_to_torch

    dec = config.decoder
    hf_config = Phi3Config(
        vocab_size=dec.vocab_size,
        hidden_size=dec.hidden_size,
        intermediate_size=dec.intermediate_size,
        num_hidden_layers=dec.num_layers,
        num_attention_heads=dec.num_heads,
        num_key_value_heads=dec.num_heads,
        max_position_embeddings=dec.max_position_embeddings,
        original_max_position_embeddings=dec.max_position_embeddings,
        rms_norm_eps=dec.rms_norm_eps,
        rope_theta=dec.rope_theta,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    model = Phi3ForCausalLM(hf_config).eval()
    prefix = "lang_model."
    state = {
        k[len(prefix) :]: torch.from_numpy(np.array(v))
        for k, v in params_to_torch(params, config).items()
        if k.startswith(prefix) and "additional" not in k and k != "lang_model.lm_head.bias"
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"torch mapping: missing {missing}, unexpected {unexpected}")
    return model


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes/s of a plain numpy copy (bytes read + bytes written), best of `repeats`: the streaming ceiling."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def decode_bytes_per_token(params, config, cache_slots: float) -> float:
    """Bytes one batch-1 decode step must read: the decoder's weights (one embedding row) + `cache_slots` K/V slots."""
    dec = params["decoder"]
    weights = sum(np.asarray(x).nbytes for x in jax.tree.leaves(dec))
    embed = np.asarray(dec["embed_tokens"])
    weights -= embed.nbytes - embed[0].nbytes
    d = config.decoder
    cache = 2 * d.num_layers * cache_slots * d.hidden_size * embed.itemsize
    return weights + cache


def timed(runs: dict, repeats: int) -> tuple[dict, dict]:
    """Median seconds and last output per named run; runs alternate so load changes hit all alike."""
    outputs = {name: fn() for name, fn in runs.items()}  # warm-up / compile
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32064)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import torch

    config, params = build(args.width, args.layers, args.vocab)
    model = AKI(config)
    prompt = np.random.default_rng(0).integers(0, args.vocab - 1, (1, args.prompt)).astype(np.int32)
    modality = np.ones_like(prompt)  # TEXT

    def jax_run(n):
        return lambda: np.asarray(generate(model, params, None, prompt, modality, n))

    hf = torch_model(config, params)
    ids = torch.from_numpy(prompt.astype(np.int64))

    def torch_run(n):
        def run():
            with torch.inference_mode():
                out = hf.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False
                )
            return out[:, ids.shape[1] :].numpy()

        return run

    runs = {"jax_1": jax_run(1), "jax_n": jax_run(args.new), "torch_1": torch_run(1), "torch_n": torch_run(args.new)}
    seconds, outputs = timed(runs, args.repeats)
    jax_first, jax_all, torch_first, torch_all = (seconds[k] for k in ("jax_1", "jax_n", "torch_1", "torch_n"))
    jax_tokens, torch_tokens = outputs["jax_n"], outputs["torch_n"]

    def rate(first, total):
        # A run of N tokens no slower than a run of 1 means the timing drowned in noise: no rate.
        return (args.new - 1) / (total - first) if total > first else float("nan")

    result = {
        "benchmark": "generate",
        "device": jax.devices()[0].device_kind,
        "threads": torch.get_num_threads(),
        "width": args.width,
        "layers": args.layers,
        "vocab": args.vocab,
        "prompt": args.prompt,
        "new_tokens": args.new,
        "jax_prefill_ms": 1e3 * jax_first,
        "torch_prefill_ms": 1e3 * torch_first,
        "jax_decode_tok_s": rate(jax_first, jax_all),
        "torch_decode_tok_s": rate(torch_first, torch_all),
        "same_tokens": float((np.asarray(jax_tokens) == torch_tokens).mean()),
    }
    bandwidth = copy_bandwidth()
    per_token = decode_bytes_per_token(params, config, args.prompt + args.new / 2)  # mean filled cache length
    bound = bandwidth / per_token
    result.update(
        copy_bandwidth_gb_s=bandwidth / 1e9,
        decode_mb_per_token=per_token / 1e6,
        decode_bound_tok_s=bound,
        jax_decode_vs_bound=result["jax_decode_tok_s"] / bound,
        torch_decode_vs_bound=result["torch_decode_tok_s"] / bound,
    )
    result["prefill_speedup"] = result["torch_prefill_ms"] / result["jax_prefill_ms"]
    result["decode_speedup"] = result["jax_decode_tok_s"] / result["torch_decode_tok_s"]

    print(f"{'':24}{'aki-jax':>12}{'torch (HF)':>12}{'ratio':>8}")
    print(
        f"{'prefill latency (ms)':24}{result['jax_prefill_ms']:12.1f}{result['torch_prefill_ms']:12.1f}"
        f"{result['prefill_speedup']:8.2f}"
    )
    print(
        f"{'decode (tokens/s)':24}{result['jax_decode_tok_s']:12.1f}{result['torch_decode_tok_s']:12.1f}"
        f"{result['decode_speedup']:8.2f}"
    )
    print(
        f"{'decode / bandwidth bound':24}{result['jax_decode_vs_bound']:12.0%}{result['torch_decode_vs_bound']:12.0%}"
    )
    print(f"bound: {bandwidth / 1e9:.1f} GB/s copy / {per_token / 1e6:.1f} MB per token = {bound:.1f} tokens/s")
    print(f"greedy tokens identical: {result['same_tokens']:.0%}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
