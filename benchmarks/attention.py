"""MMA attention with the range kernels: tiles visited, mask memory, and (on an accelerator) speed.

  PYTHONPATH=$PWD python benchmarks/attention.py                    # tile fractions and mask memory
  PYTHONPATH=$PWD python benchmarks/attention.py --time             # + fwd+bwd timings (TPU or GPU)
  PYTHONPATH=$PWD python benchmarks/attention.py --time --out DIR   # also writes DIR/attention.json
  PYTHONPATH=$PWD python benchmarks/attention.py --parity           # kernel vs dense errors (no pytest needed)

Layouts are realistic SFT rows (seeded): each example is a prompt prefix, one or several 144-token
images, a question (QUERY, read by its images), an answer; "single" rows hold one example and are
padded, "packed" rows hold as many examples as fit. Tiles are counted with the kernels' own
classification (`aki_jax.attention.tile_classes`) at the GPU (64 x 64) and TPU (256 x 256) blocks:
"mma" = our kernel's visited tiles, "causal+seg" = our kernel with kind="causal" (segments and padding
skipped too: what MMA costs over plain causal), "causal" = a causal flash kernel (lower triangle, no segment
skipping, as cuDNN's is_causal), "dense" = every tile.

Timed on an accelerator, side by side in one process, Phi-3.5 attention shapes (32 heads x 96, bf16):
our kernel over MMA ranges, causal flash (cuDNN `jax.nn.dot_product_attention(is_causal=True)` on GPU,
splash attention's causal kernel on TPU) and dense XLA with the bool mask. TFLOP/s count the useful
FLOPs of each method's own mask (14 per visible cell per head-dim unit: 4 forward + 10 backward).
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from aki_jax.attention import EMPTY, attention_ranges, dot_product_attention, tile_classes
from aki_jax.mask import IMAGE, PAD, QUERY, TEXT, attention_mask

IMAGE_TOKENS = 144
BLOCKS = {"gpu": (64, 64), "tpu": (256, 256)}


def sft_example(rng, images: int):
    """modality ids of one example: prefix, `images` images, question, answer."""
    ids = [TEXT] * int(rng.integers(8, 32))
    for _ in range(images):
        ids += [IMAGE] * IMAGE_TOKENS
    ids += [QUERY] * int(rng.integers(16, 96))
    ids += [TEXT] * int(rng.integers(32, 400))
    return ids


def layout(length: int, rows: int, packed: bool, images: int, seed: int = 0):
    """(modality_ids, segment_ids) int32[rows, length]."""
    rng = np.random.default_rng(seed)
    modality = np.full((rows, length), PAD, np.int32)
    segment = np.zeros((rows, length), np.int32)
    for r in range(rows):
        at, seg = 0, 0
        while True:
            ex = sft_example(rng, images)
            if at + len(ex) > length:
                if at == 0:  # the first example always fits (cut): single rows are never empty
                    ex = ex[:length]
                else:
                    break
            modality[r, at : at + len(ex)] = ex
            segment[r, at : at + len(ex)] = seg
            at, seg = at + len(ex), seg + 1
            if not packed:
                break
        segment[r, at:] = seg  # trailing padding: a segment of its own
    return modality, segment


def visited_fraction(modality, segment, kind, blocks):
    classes = np.asarray(tile_classes(attention_ranges(modality, segment, kind), *blocks))
    return float(np.mean(classes != EMPTY))


def causal_flash_fraction(length, blocks):
    bq, bk = blocks
    n_q, n_k = -(-length // bq), -(-length // bk)
    i, j = np.meshgrid(np.arange(n_q), np.arange(n_k), indexing="ij")
    return float(np.mean(j * bk < (i + 1) * bq))


def tile_table(lengths, rows: int):
    records = []
    for length in lengths:
        for name, packed, images in [("single 1 img", False, 1), ("packed 1 img", True, 1), ("packed 3 img", True, 3)]:
            modality, segment = layout(length, rows, packed, images)
            rec = {"L": length, "layout": name, "real_tokens": float(np.mean(modality != PAD))}
            for platform, blocks in BLOCKS.items():
                rec[f"mma_{platform}"] = visited_fraction(modality, segment, "mma", blocks)
                rec[f"causal_ranges_{platform}"] = visited_fraction(modality, segment, "causal", blocks)
                rec[f"causal_flash_{platform}"] = causal_flash_fraction(length, blocks)
            rec["dense"] = 1.0
            # bool[B, L, L] at 1 byte per cell vs four int32[B, L] ranges
            rec["mask_bytes_dense_per_row"] = length * length
            rec["mask_bytes_ranges_per_row"] = 4 * 4 * length
            records.append(rec)
    return records


def _time(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _fwd_bwd(attend):
    def loss(q, k, v, d_out):
        return jnp.sum(attend(q, k, v).astype(jnp.float32) * d_out.astype(jnp.float32))

    return jax.jit(jax.grad(loss, (0, 1, 2)))


def _splash_causal(length, heads):
    """splash attention's causal MHA kernel (TPU), or None when its API is not the one expected."""
    try:
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

        mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(heads)])
        kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1)
    except Exception as e:  # noqa: BLE001 - reported, the row is skipped
        print(f"splash attention unavailable: {e!r}")
        return None

    def attend(q, k, v):  # [B, T, N, H] -> splash's [N, T, H] per batch row, scaled beforehand
        q = jnp.swapaxes(q, 1, 2) * q.shape[-1] ** -0.5
        out = jax.vmap(kernel)(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))
        return jnp.swapaxes(out, 1, 2)

    return attend


def timing_table(lengths, batch: int, heads: int = 32, head_dim: int = 96):
    platform = jax.default_backend()
    kernel = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform)
    if kernel is None:
        print(f"no accelerator ({platform}): timings skipped")
        return []
    records = []
    for length in lengths:
        modality, segment = layout(length, batch, packed=True, images=1)
        ranges = attention_ranges(modality, segment)
        mask = attention_mask(modality, segment)
        causal_cells = batch * length * (length + 1) / 2
        mma_cells = float(jnp.sum(mask))
        keys = jax.random.split(jax.random.key(0), 4)
        q, k, v, d_out = (jax.random.normal(x, (batch, length, heads, head_dim), jnp.bfloat16) for x in keys)
        methods = {
            "mma_kernel": (
                lambda q, k, v, r=ranges: dot_product_attention(q, k, v, r, implementation=kernel),
                mma_cells,
            ),
            "dense_xla_mask": (
                lambda q, k, v, m=mask: jax.nn.dot_product_attention(q, k, v, mask=m[:, None], implementation="xla"),
                mma_cells,
            ),
        }
        if kernel == "pallas_gpu":
            methods["causal_cudnn"] = (
                lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
                causal_cells,
            )
        else:
            splash = _splash_causal(length, heads)
            if splash is not None:
                methods["causal_splash"] = (splash, causal_cells)
        rec = {"L": length, "batch": batch, "heads": heads, "head_dim": head_dim}
        for name, (attend, cells) in methods.items():
            try:
                seconds = _time(_fwd_bwd(attend), q, k, v, d_out)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory for the dense mask at 8192
                print(f"L={length} {name}: failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            rec[f"{name}_ms"] = seconds * 1e3
            rec[f"{name}_tflops"] = 14 * cells * heads * head_dim / seconds / 1e12
        causal = rec.get("causal_cudnn_ms", rec.get("causal_splash_ms"))
        if "mma_kernel_ms" in rec and causal:
            rec["mma_over_causal"] = rec["mma_kernel_ms"] / causal
        if "mma_kernel_ms" in rec and "dense_xla_mask_ms" in rec:
            rec["dense_over_mma"] = rec["dense_xla_mask_ms"] / rec["mma_kernel_ms"]
        records.append(rec)
    return records


@functools.partial(jax.jit, static_argnums=0)
def _grads(implementation, q, k, v, d_out, mask):
    """(out, dq, dk, dv) of sum(attention * d_out)."""

    def loss(q, k, v):
        out = dot_product_attention(q, k, v, mask, implementation=implementation)
        return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32)), out

    (_, out), g = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return (out, *g)


def parity_table(kernel: str | None = None):
    """Max relative errors (out, dq, dk, dv) of a kernel against dense recomputing attention, fp32 and bf16.

    Native on an accelerator (its own kernel), interpreted elsewhere. Layouts: the SFT rows above at
    L = 333 (not a multiple of any block) and 1000, packed and single, both kinds; Phi-3.5 heads (96).
    """
    from aki_jax.attention import resolve_implementation

    kernel = kernel or resolve_implementation("auto") or "pallas_gpu_interpret"
    precision = "highest"  # the reference's float32 matmuls at full precision (no TF32)
    records = []
    for length, packed, kind, dtype in [
        (333, True, "mma", "float32"),
        (333, False, "causal", "float32"),
        (1000, True, "mma", "float32"),
        (1000, True, "mma", "bfloat16"),
    ]:
        modality, segment = layout(length, 2, packed, images=1, seed=length)
        modality[1, :17] = PAD  # left padding on the second row
        ranges, mask = attention_ranges(modality, segment, kind), attention_mask(modality, segment, kind)
        keys = jax.random.split(jax.random.key(length), 4)
        args = [jax.random.normal(x, (2, length, 4, 96), jnp.float32).astype(dtype) for x in keys]

        with jax.default_matmul_precision(precision):
            got = _grads(kernel, *args, ranges)
            exact = _grads(None, *(x.astype(jnp.float32) for x in args), mask)
            same_dtype = _grads(None, *args, mask)
        rec = {"kernel": kernel, "L": length, "packed": packed, "kind": kind, "dtype": dtype}
        for name, a, ref, dense in zip(["out", "dq", "dk", "dv"], got, exact, same_dtype, strict=True):
            scale = max(float(jnp.max(jnp.abs(ref))), 1.0)
            rec[name] = float(jnp.max(jnp.abs(a.astype(jnp.float32) - ref))) / scale
            rec[f"{name}_dense_same_dtype"] = float(jnp.max(jnp.abs(dense.astype(jnp.float32) - ref))) / scale
        rec["ok"] = all(
            rec[n] <= (1e-5 if dtype == "float32" else 2 * rec[f"{n}_dense_same_dtype"] + 2**-8)
            for n in ["out", "dq", "dk", "dv"]
        )
        records.append(rec)
        print(
            f"parity {kernel} L={length} {'packed' if packed else 'single'} {kind} {dtype}: "
            + " ".join(f"{n}={rec[n]:.2e}" for n in ["out", "dq", "dk", "dv"])
            + f" ok={rec['ok']}"
        )
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--rows", type=int, default=8, help="rows per layout for the tile counts")
    parser.add_argument("--time", action="store_true", help="time fwd+bwd on this machine's accelerator")
    parser.add_argument("--parity", action="store_true", help="kernel vs dense errors (native on an accelerator)")
    parser.add_argument("--parity-kernel", default=None, help="e.g. pallas_tpu_interpret (default: this backend's)")
    parser.add_argument("--batch", type=int, default=2, help="batch of the timed calls")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="directory for attention.json")
    args = parser.parse_args()

    tiles = tile_table(args.lengths, args.rows)
    print("tiles visited (fraction of all tiles; GPU blocks 64x64, TPU blocks 256x256) and mask memory per row")
    print(f"{'L':>5} {'layout':<13} {'real':>5} {'mma gpu':>8} {'mma tpu':>8} {'causal+seg gpu':>14}"
          f" {'causal gpu':>10} {'causal tpu':>10} {'dense':>5} {'bool mask':>10} {'ranges':>8}")  # fmt: skip
    for r in tiles:
        print(
            f"{r['L']:>5} {r['layout']:<13} {r['real_tokens']:>5.2f} {r['mma_gpu']:>8.3f} {r['mma_tpu']:>8.3f} "
            f"{r['causal_ranges_gpu']:>14.3f} "
            f"{r['causal_flash_gpu']:>10.3f} {r['causal_flash_tpu']:>10.3f} {r['dense']:>5.1f} "
            f"{r['mask_bytes_dense_per_row'] / 2**20:>8.1f}MB {r['mask_bytes_ranges_per_row'] / 2**10:>6.0f}KB"
        )
    parity = parity_table(args.parity_kernel) if args.parity else []
    timings = timing_table(args.lengths, args.batch) if args.time else []
    for r in timings:
        cells = " ".join(f"{k}={v:.3g}" for k, v in r.items() if k.endswith(("_ms", "_tflops", "_over_causal", "_mma")))
        print(f"L={r['L']} B={r['batch']} {r['heads']}x{r['head_dim']} bf16: {cells}")
    at_4096 = [r for r in timings if r["L"] == 4096]
    goals = {}
    if at_4096:
        r = at_4096[0]
        goals = {
            "mma_le_1.10x_causal_at_4096": r.get("mma_over_causal", float("inf")) <= 1.10,
            "mma_ge_3x_faster_than_dense_at_4096": r.get("dense_over_mma", 0.0) >= 3.0,
        }
        print("goals:", goals)
    result = {"backend": jax.default_backend(), "device": str(jax.devices()[0]), "tiles": tiles}
    result.update(parity=parity, timings=timings, goals=goals)
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "attention.json").write_text(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
