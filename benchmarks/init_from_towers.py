"""Initialisation benchmark: synthetic SigLIP + Phi-3.5 folders with the real shapes -> an aki-jax folder.

    PYTHONPATH=. python benchmarks/init_from_towers.py              # full size: ~8.4 GB of random bf16 in /tmp
    PYTHONPATH=. python benchmarks/init_from_towers.py --scale 0.1  # layer counts x0.1 (at least 1): quick
    PYTHONPATH=. python benchmarks/init_from_towers.py --cache warm # towers' pages resident before each step

Steps (all in this run): write `siglip/` (a SiglipVisionModel folder: config.json, every `vision_model.*`
tensor incl. the pooling head, one model.safetensors) and `phi3/` (a Phi3ForCausalLM folder: config.json,
`model.*` + `lm_head.weight` in two shards with model.safetensors.index.json as released, and a 32011-entry
tokenizer whose pad is its eos, as Phi-3.5's). Then `--repeat` (default 3) rounds of, alternately:
  1. settle, then time a plain copy of all the towers' safetensors files (16 MB reads and writes, an fsync per
     file): the floor for any tool that reads those bytes and writes as many;
  2. settle, then time `aki-init-from-towers --dtype bfloat16` in a child process, from its start (Python and
     JAX imports included, as a user waits for them) to its exit (its output fsynced and renamed into place),
     and read that child's own peak resident memory from the OS (os.wait4's rusage).
"Settle" puts both on the same footing: `os.sync()` (no write-back of an earlier step left to compete), then
the towers' pages are dropped from the page cache (`--cache cold`, the default: posix_fadvise DONTNEED on
every file, so both read everything from the disk) or read once in full (`--cache warm`). Outputs are deleted
outside the timings, before the settle. The table and the JSON line give the median copy time, the median init
time and their ratio (all runs are in the JSON), and the highest peak RSS of the runs against the towers' size.
Goals: peak RSS <= towers/2, time <= 2x the copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tokenizers
from convert import dir_bytes, siglip_head_shapes  # benchmarks/convert.py (this folder is on sys.path)
from tokenizers import AddedToken, models

from aki_jax.config import aki_4b
from aki_jax.convert.hf_config import phi3_config_dict, siglip_config_dict
from aki_jax.convert.mapping import as_dtype, expected_torch_shapes
from aki_jax.convert.safetensors_io import write_safetensors


def scaled_config(scale: float):
    c = aki_4b()
    if scale >= 1:
        return c
    n = lambda layers: max(1, round(layers * scale))
    return c.replace(
        vision=dataclasses.replace(c.vision, num_layers=n(c.vision.num_layers)),
        decoder=dataclasses.replace(c.decoder, num_layers=n(c.decoder.num_layers)),
    )


class RandomTensors:
    """Slices of one random pool, so that generating the synthetic weights is not the bottleneck."""

    def __init__(self, dtype):
        self.rng = np.random.default_rng(0)
        self.pool = self.rng.standard_normal(64 << 20, np.float32).astype(dtype)  # 64 Mi values

    def __call__(self, specs):
        for key, shape, _ in specs:
            start = int(self.rng.integers(0, self.pool.size))
            yield key, np.resize(self.pool[start:], int(np.prod(shape))).reshape(shape)  # repeats cyclically


def write_towers(work: Path, config, dtype) -> tuple[int, list[Path]]:
    """The two Hugging Face folders; returns (bytes of their safetensors files, those files)."""
    shapes = expected_torch_shapes(config)
    random = RandomTensors(dtype)
    siglip, phi3 = work / "siglip", work / "phi3"
    siglip.mkdir(parents=True)
    phi3.mkdir(parents=True)
    vision = {
        "vision_model." + k[len("vision_encoder.") :]: s for k, s in shapes.items() if k.startswith("vision_encoder.")
    }
    vision.update(
        siglip_head_shapes(config.vision.hidden_size, config.vision.intermediate_size, prefix="vision_model.")
    )
    specs = [(k, s, dtype) for k, s in vision.items()]
    total = write_safetensors(siglip / "model.safetensors", specs, random(specs))
    (siglip / "config.json").write_text(json.dumps(siglip_config_dict(config), indent=2))

    new = ("lang_model.lm_head.bias", "lang_model.lm_head.additional_fc.", "lang_model.model.embed_tokens.additional_")
    lm = [
        (k[len("lang_model.") :], s, dtype)
        for k, s in shapes.items()
        if k.startswith("lang_model.") and not k.startswith(new)
    ]
    half = len(lm) // 2
    files, weight_map = [], {}
    for i, part in enumerate((lm[:half], lm[half:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        total += write_safetensors(phi3 / name, part, random(part))
        weight_map.update({k: name for k, _, _ in part})
        files.append(phi3 / name)
    (phi3 / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (phi3 / "config.json").write_text(json.dumps({**phi3_config_dict(config), "initializer_range": 0.02}, indent=2))
    write_phi35_like_tokenizer(phi3)
    return total, [siglip / "model.safetensors", *files]


def write_phi35_like_tokenizer(folder: Path) -> None:
    """32000 pieces + 11 specials, pad = eos = <|endoftext|> (so `<pad>` becomes 32011, as for Phi-3.5)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"p{i}": i for i in range(3, 32000)}}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    specials = ["<|endoftext|>", "<|assistant|>"] + [f"<|placeholder{i}|>" for i in range(1, 5)]
    specials += ["<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def settle(files: list[Path], cache: str) -> None:
    """Put the page cache in the same state before every timed step: nothing left to write back, and the
    towers' pages dropped ("cold": posix_fadvise DONTNEED, no root needed) or all resident ("warm")."""
    os.sync()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            if cache == "cold":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 16 << 20):
                    pass
        finally:
            os.close(fd)


def plain_copy(files: list[Path], dst: Path) -> float:
    """Seconds to copy the towers' safetensors files (read + write + fsync), the floor for any tool that
    reads them and writes as many bytes."""
    dst.mkdir()
    start = time.perf_counter()
    for src in files:
        with open(src, "rb") as fin, open(dst / src.name, "wb") as fout:
            shutil.copyfileobj(fin, fout, 16 << 20)
            fout.flush()
            os.fsync(fout.fileno())
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)
    return seconds


def run_child(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one tool run in a child process (os.wait4: this child's own rusage)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, *argv], env={**os.environ, "JAX_PLATFORMS": "cpu"})
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise subprocess.CalledProcessError(child.returncode, argv)
    return seconds, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/aki_towers_bench", help="work folder (needs ~2x the towers' size)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the layer counts (default 1 = aki-4b)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeat", type=int, default=3, help="copy/init pairs timed, medians reported (default 3)")
    parser.add_argument(
        "--cache", default="cold", choices=["cold", "warm"],
        help="towers' pages before each timed step: dropped (default) or all resident",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the files (default: delete them at the end)")
    args = parser.parse_args()

    work = Path(args.dir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    config = scaled_config(args.scale)
    argv = ["-m", "aki_jax.cli.init_from_towers", "--vision", str(work / "siglip"), "--lm", str(work / "phi3")]
    argv += ["--dst", str(work / "aki"), "--dtype", args.dtype]
    copies, inits, peaks = [], [], []
    try:
        t = time.perf_counter()
        tower_bytes, files = write_towers(work, config, as_dtype(args.dtype))
        print(f"wrote synthetic towers: {tower_bytes / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s", flush=True)
        for i in range(args.repeat):  # alternated, so that a change of load hits both alike
            settle(files, args.cache)
            copies.append(plain_copy(files, work / "copy"))
            shutil.rmtree(work / "aki", ignore_errors=True)  # the last run's folder is kept for the report
            settle(files, args.cache)
            seconds, peak = run_child(argv)
            inits.append(seconds)
            peaks.append(peak)
            print(f"repetition {i + 1}: copy {copies[-1]:.1f} s, init {inits[-1]:.1f} s", flush=True)
        report = json.loads((work / "aki" / "init_report.json").read_text())
        copy_s, init_s = statistics.median(copies), statistics.median(inits)
        result = {
            "benchmark": "init_from_towers",
            "scale": args.scale,
            "dtype": args.dtype,
            "cache": args.cache,
            "towers_bytes": tower_bytes,
            "plain_copy_s": round(copy_s, 2),
            "init_s": round(init_s, 2),
            "time_ratio_to_copy": round(init_s / copy_s, 2),
            "plain_copy_runs_s": [round(x, 2) for x in copies],
            "init_runs_s": [round(x, 2) for x in inits],
            "init_peak_rss_bytes": max(peaks),
            "rss_ratio_to_towers": round(max(peaks) / tower_bytes, 3),
            "bytes_written": dir_bytes(work / "aki"),
            "special_tokens": report["special_tokens"],
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    gb = lambda x: f"{x / 1e9:.2f} GB"
    n = f"median of {args.repeat}, {args.cache} cache"
    print(f"{'towers (SigLIP + Phi-3.5)':<30}{gb(result['towers_bytes'])} ({args.dtype}, scale {args.scale})")
    print(f"{'plain copy (read+write+fsync)':<30}{result['plain_copy_s']:.1f} s ({n})")
    print(f"{'init (child process)':<30}{result['init_s']:.1f} s  = {result['time_ratio_to_copy']:.2f}x copy ({n})")
    rss, ratio = gb(result["init_peak_rss_bytes"]), result["rss_ratio_to_towers"]
    print(f"{'init peak RSS (max of runs)':<30}{rss}  = {ratio:.2f}x the towers")
    print(f"{'bytes written (folder)':<30}{gb(result['bytes_written'])}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
