"""Conversion benchmark: a synthetic AKI checkpoint with the real aki-4b shapes, converted to Orbax.

    python benchmarks/convert.py                    # full size: ~8.6 GB of random bf16 in /tmp
    python benchmarks/convert.py --scale 0.1        # layer counts x0.1 (at least 1): a quick run
    python benchmarks/convert.py --dir /big/disk --export --keep

Steps (all in this run): write `released/` (config.json, SigLIP/Phi-3 sub-configs, model.safetensors with
every original key incl. the SigLIP pooling head); time a plain copy of model.safetensors (read + write +
fsync) as the baseline; run `aki-convert` (`python -m aki_jax.cli.convert`) in a child process and read its peak
resident memory from the OS (getrusage of the child); optionally export back and check a few tensors
bit for bit. Prints a table and one JSON line. Goals: peak RSS <= checkpoint/2, time <= 2x the copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from aki_jax.config import aki_4b
from aki_jax.convert.hf_config import phi3_config_dict, siglip_config_dict
from aki_jax.convert.mapping import TABLE, as_dtype, expected_torch_shapes, leaf_shape, num_layers
from aki_jax.convert.safetensors_io import SafetensorsFile, write_safetensors


def scaled_config(scale: float):
    c = aki_4b()
    if scale >= 1:
        return c
    n = lambda layers: max(1, round(layers * scale))
    return c.replace(
        vision=dataclasses.replace(c.vision, num_layers=n(c.vision.num_layers)),
        resampler=dataclasses.replace(c.resampler, depth=n(c.resampler.depth)),
        decoder=dataclasses.replace(c.decoder, num_layers=n(c.decoder.num_layers)),
    )


def siglip_head_shapes(d: int, f: int, prefix: str = "vision_encoder.") -> dict[str, tuple[int, ...]]:
    """The unused SigLIP attention-pooling head, present in released checkpoints (and in SigLIP's own)."""
    p = f"{prefix}head."
    return {
        f"{p}probe": (1, 1, d),
        f"{p}attention.in_proj_weight": (3 * d, d),
        f"{p}attention.in_proj_bias": (3 * d,),
        f"{p}attention.out_proj.weight": (d, d),
        f"{p}attention.out_proj.bias": (d,),
        f"{p}layernorm.weight": (d,),
        f"{p}layernorm.bias": (d,),
        f"{p}mlp.fc1.weight": (f, d),
        f"{p}mlp.fc1.bias": (f,),
        f"{p}mlp.fc2.weight": (d, f),
        f"{p}mlp.fc2.bias": (d,),
    }


def write_released(folder: Path, config, dtype) -> int:
    """Random tensors (slices of one random pool, so generation is not the bottleneck)."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {
        **expected_torch_shapes(config),
        **siglip_head_shapes(config.vision.hidden_size, config.vision.intermediate_size),
    }
    specs = [(k, s, dtype) for k, s in shapes.items()]
    rng = np.random.default_rng(0)
    pool = rng.standard_normal(64 << 20, np.float32).astype(dtype)  # 64 Mi values

    def tensors():
        for key, shape, _ in specs:
            size = int(np.prod(shape))
            start = int(rng.integers(0, pool.size))
            yield key, np.resize(pool[start:], size).reshape(shape)  # np.resize repeats cyclically

    nbytes = write_safetensors(folder / "model.safetensors", specs, tensors())
    args = {
        "vision_encoder_path": "vision_encoder",
        "lang_model_path": "lang_model",
        "pad_token_id": config.pad_token_id,
        "initial_tokenizer_len": config.initial_tokenizer_len,
        "num_vision_tokens": config.resampler.num_latents,
    }
    (folder / "config.json").write_text(json.dumps(args, indent=2))
    for sub, data in (("vision_encoder", siglip_config_dict(config)), ("lang_model", phi3_config_dict(config))):
        (folder / sub).mkdir(exist_ok=True)
        (folder / sub / "config.json").write_text(json.dumps(data, indent=2))
    return nbytes


def largest_leaf_bytes(config, dtype) -> int:
    """The biggest aki-jax leaf (per-layer tensors stacked): the floor for the converter's memory."""
    sizes = [
        int(np.prod(leaf_shape(config, e))) * (num_layers(config, e.layers) or 1) * np.dtype(dtype).itemsize
        for e in TABLE
    ]
    return max(sizes)


def plain_copy(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 16 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    return time.perf_counter() - start


def run_child(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes of the child) for one tool run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib <= before:  # ru_maxrss of children is a max over all waited-for children
        print(f"warning: child peak RSS not above an earlier child's ({before} KiB)", file=sys.stderr)
    return seconds, peak_kib * 1024


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/aki_convert_bench", help="work folder (needs ~3x checkpoint size)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the layer counts (default 1 = aki-4b)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--export", action="store_true", help="also export back and spot-check bit-exactness")
    parser.add_argument("--keep", action="store_true", help="keep the files (default: delete them at the end)")
    args = parser.parse_args()

    work = Path(args.dir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    config = scaled_config(args.scale)
    try:
        t = time.perf_counter()
        ckpt_bytes = write_released(work / "released", config, as_dtype(args.dtype))
        print(f"wrote synthetic checkpoint: {ckpt_bytes / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s", flush=True)

        copy_s = plain_copy(work / "released" / "model.safetensors", work / "copy.safetensors")
        (work / "copy.safetensors").unlink()
        convert_s, convert_rss = run_child(
            ["-m", "aki_jax.cli.convert", "--src", str(work / "released"), "--dst", str(work / "jax")]
        )
        written = dir_bytes(work / "jax")
        result = {
            "benchmark": "convert",
            "scale": args.scale,
            "dtype": args.dtype,
            "checkpoint_bytes": ckpt_bytes,
            "plain_copy_s": round(copy_s, 2),
            "convert_s": round(convert_s, 2),
            "time_ratio_to_copy": round(convert_s / copy_s, 2),
            "convert_peak_rss_bytes": convert_rss,
            "rss_ratio_to_checkpoint": round(convert_rss / ckpt_bytes, 3),
            "bytes_written": written,
            "largest_leaf_bytes": largest_leaf_bytes(config, as_dtype(args.dtype)),
        }
        if args.export:
            export_s, export_rss = run_child(
                ["-m", "aki_jax.cli.export", "--src", str(work / "jax"), "--dst", str(work / "back")]
            )
            a, b = (
                SafetensorsFile(work / "released" / "model.safetensors"),
                SafetensorsFile(work / "back" / "model.safetensors"),
            )
            for key in (
                "lang_model.model.layers.0.mlp.gate_up_proj.weight",
                "vision_tokenizer.layers.0.0.to_kv.weight",
            ):
                assert np.array_equal(a[key].view(np.uint8), b[key].view(np.uint8)), key
            result.update({"export_s": round(export_s, 2), "export_peak_rss_bytes": export_rss})
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    gb = lambda x: f"{x / 1e9:.2f} GB"
    print(f"{'checkpoint':<28}{gb(result['checkpoint_bytes'])} ({args.dtype}, scale {args.scale})")
    print(f"{'plain copy (read+write+fsync)':<30}{result['plain_copy_s']:.1f} s")
    print(f"{'convert (child process)':<28}{result['convert_s']:.1f} s  = {result['time_ratio_to_copy']:.2f}x copy")
    rss, ratio = gb(result["convert_peak_rss_bytes"]), result["rss_ratio_to_checkpoint"]
    print(f"{'convert peak RSS':<28}{rss}  = {ratio:.2f}x checkpoint")
    print(f"{'bytes written (Orbax dir)':<28}{gb(result['bytes_written'])}")
    print(f"{'largest leaf':<28}{gb(result['largest_leaf_bytes'])}")
    if "export_s" in result:
        print(
            f"{'export (child process)':<28}{result['export_s']:.1f} s, peak RSS {gb(result['export_peak_rss_bytes'])}"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
