"""Where the train step of `benchmarks/train_step.py` spends its time, JAX and PyTorch side by side, by op class.

  python benchmarks/profile_step.py                  # batch 4 x 512, float32, 2 profiled steps each
  python benchmarks/profile_step.py --steps 1 --skip-torch

JAX: a `jax.profiler` trace (perfetto JSON) of the jitted step; on CPU every XLA thunk is one trace event named
after its HLO instruction, which is classified from the compiled HLO text (opcode, the fused computation's ops,
the source file in the op metadata). PyTorch: `torch.profiler` self CPU time per aten op, classified by op name.
Classes: matmul (dot / mm, outside attention), attention (everything from aki_jax/attention or the eager attention's
bmm/softmax), norm+elementwise, optimizer (AdamW update, gradient clipping), transpose+copy, other; "host/idle" is
the step's wall time during which no op ran (dispatch, Python, waiting). Op time is summed over threads, so with
concurrent thunks the column can exceed the wall time. Prints a table and one JSON line.
The tracer slows the JAX step (1.2-1.8x) and its matrix products most; `step_products.py` times the step's
products alone, without one.

Measured 2026-12-02 on the project's 2-core AMD EPYC VM, nothing else running, one process, JAX first, freed
memory kept (the default `--allocator keep`, as aki-train does on CPU), 2 profiled steps each, seconds per step:

  class               jax    torch
  matmul              4.03    3.53   (summed over threads; jax: the ynn_fusion dot thunks, two often side by side)
  attention           0.99    0.60   (jax: ops from aki_jax/attention; torch: eager bmm + softmax)
  norm+elementwise    0.77    0.43
  optimizer           0.09    0.11   (jax: optax, fused by XLA; torch: clipping + AdamW)
  transpose+copy      0.27    0.30   (jax: the scan's stacked gradients and residuals, the logits' slice and pad)
  host/idle           0.10    0.06   (jax: wall time with no thunk running)
  wall                4.86    5.03

The same, measured 2026-12-02 on a 2-core Intel Sapphire Rapids VM (one run, seconds per step; PyTorch's BLAS
is faster than XLA's YNNPACK dots on this host, see the README):

  class               jax    torch
  matmul              5.00    3.02
  attention           1.46    0.56
  norm+elementwise    1.25    0.55
  optimizer           0.16    0.19
  transpose+copy      0.76    0.27
  host/idle           0.41    0.06
  wall                6.99    4.66

With glibc as it comes (`--allocator system`) the JAX step spent another 1-4 s per step in the kernel, faulting
in its ~1.6 GB of temporaries anew (see aki_jax/training/host_memory.py). Attributed by wall time (each instant
split among the thunks running then), the JAX step is ~3.1 s matmul, 0.8 s attention, 0.7 s elementwise,
0.5 s copies: the attention's small batched products run at 60-120 GFLOP/s against ~180 for the projections.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax
import numpy as np
from train_step import bench_config, jax_step_parts  # benchmarks/ is the script's directory

from aki_jax import sharding as S
from aki_jax.training.host_memory import keep_freed_memory
from aki_jax.training.synthetic import SyntheticBatches

CLASSES = ("matmul", "attention", "norm+elementwise", "optimizer", "transpose+copy", "other", "host/idle")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^=]*? (\w[\w\-]*)\(")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")


def stack_files(text: str) -> dict:
    """{stack_frame_id: "file file ..."}: every source file on the frame's call chain, from the HLO's frame tables."""
    table, files, locations, frames = None, {}, {}, {}
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            table = line
            continue
        m = re.match(r"^(\d+) (.*)$", line)
        if not m or table is None:
            table = None if not line.strip() else table
            continue
        key, rest = int(m.group(1)), m.group(2)
        if table == "FileNames":
            files[key] = rest.strip('"')
        elif table == "FileLocations":
            locations[key] = int(re.search(r"file_name_id=(\d+)", rest).group(1))
        elif table == "StackFrames":
            frames[key] = tuple(
                int(x) for x in re.search(r"file_location_id=(\d+) parent_frame_id=(\d+)", rest).groups()
            )
    chains = {}
    for frame in frames:
        names, seen, current = [], set(), frame
        while current in frames and current not in seen:
            seen.add(current)
            location, parent = frames[current]
            names.append(files.get(locations.get(location), ""))
            current = parent
        chains[frame] = " ".join(names)
    return chains


def hlo_index(text: str) -> tuple[dict, dict]:
    """{instruction: (opcode, line)} over all computations, and {computation: [opcodes]} for fused bodies."""
    instrs, comps, current = {}, collections.defaultdict(list), None
    chains = stack_files(text)
    for line in text.splitlines():
        frame = re.search(r"stack_frame_id=(\d+)", line)
        if frame:
            line = line + f' source_file="{chains.get(int(frame.group(1)), "")}"'
        m = _COMP.match(line)
        if m:
            current = m.group(1)
            continue
        m = _INSTR.match(line)
        if m:
            instrs[m.group(1)] = (m.group(2), line)
            comps[current].append(m.group(2))
    return instrs, comps


def classify_hlo(name: str, instrs: dict, comps: dict) -> str:
    base = name.split(":")[0].strip()
    if base not in instrs:
        base = re.sub(r"^(end: |start: )", "", base)
    if base not in instrs:
        return "other"
    opcode, line = instrs[base]
    ops = [opcode]
    called = re.search(r"calls=%?([\w.\-]+)", line)
    if called:
        ops += comps.get(called.group(1), [])
    source = re.search(r'source_file="([^"]+)"', line)
    op_name = re.search(r'op_name="([^"]+)"', line)
    where = (source.group(1) if source else "") + " " + (op_name.group(1) if op_name else "")
    if "attention/" in where:
        return "attention"
    if "optax" in where or "optimizer.py" in where or "clip" in where:
        return "optimizer"
    if "dot" in ops or "convolution" in ops or opcode == "custom-call":
        return "matmul"
    moves = {"transpose", "copy", "bitcast", "parameter", "dynamic-update-slice", "dynamic-slice", "slice",
                    "concatenate", "broadcast", "constant", "pad", "reshape", "gather", "scatter", "tuple",
                    "get-tuple-element", "copy-start", "copy-done"}  # fmt: skip
    if set(ops) - {"fusion"} <= moves:
        return "transpose+copy"
    return "norm+elementwise"


def union_us(intervals: list) -> float:
    total, end = 0.0, -np.inf
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def jax_profile(config, batch, steps: int) -> tuple[dict, float]:
    """Seconds per step per class, and the step's wall seconds."""
    parts = jax_step_parts(config, batch)
    step, state, device_batch = parts["step"], parts["init"](), parts["batch"]
    with S.activation_context(parts["mesh"], parts["rules"]):
        text = step.lower(state, device_batch).compile().as_text()
        instrs, comps = hlo_index(text)
        state, metrics = step(state, device_batch)  # compile + warm
        jax.block_until_ready(metrics)
        out = tempfile.mkdtemp(prefix="aki_profile_")
        with jax.profiler.trace(out, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(steps):
                state, metrics = step(state, device_batch)
                jax.block_until_ready(metrics)
            wall = (time.perf_counter() - start) / steps
    trace = json.load(gzip.open(glob.glob(f"{out}/**/*.trace.json.gz", recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_class, busy, ops = collections.Counter(), [], collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e["name"].startswith("$") or e["name"].split(":")[0].strip() not in instrs:
            continue
        cls = classify_hlo(e["name"], instrs, comps)
        per_class[cls] += e["dur"] * 1e-6 / steps
        ops[e["name"]] += e["dur"] * 1e-6 / steps
        busy.append((e["ts"], e["ts"] + e["dur"]))
    per_class["host/idle"] = max(wall - union_us(busy) * 1e-6 / steps, 0.0)
    top = [(n, round(s, 4), classify_hlo(n, instrs, comps)) for n, s in ops.most_common(12)]
    return dict(per_class), wall, top


def torch_class(name: str) -> str:
    if name.startswith("aten::_foreach") or "clip_grad" in name or "Optimizer" in name or "adamw" in name.lower():
        return "optimizer"
    if name in ("aten::bmm", "aten::_softmax", "aten::_softmax_backward_data", "aten::baddbmm"):
        return "attention"  # the eager attention's two batched matmuls and softmax (projections are mm/addmm)
    if name in ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "aten::_convolution", "aten::convolution",
                "aten::mkldnn_convolution", "aten::convolution_backward"):  # fmt: skip
        return "matmul"
    if name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::index", "aten::gather",
                "aten::transpose", "aten::t", "aten::permute", "aten::zero_", "aten::fill_", "aten::zeros",
                "aten::empty", "aten::index_select", "aten::embedding_dense_backward", "aten::scatter_add_",
                "aten::new_zeros", "aten::where", "aten::masked_fill"):  # fmt: skip
        return "transpose+copy"
    if name.startswith("aten::"):
        return "norm+elementwise"
    return None  # python / autograd wrapper frames: their time is in the aten ops below them


def torch_profile(config, batch, steps: int) -> tuple[dict, float]:
    from torch.profiler import ProfilerActivity, profile
    from train_step import torch_step_fn

    run_one = torch_step_fn(config, batch)
    run_one()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            run_one()
        wall = (time.perf_counter() - start) / steps
    per_class, ops = collections.Counter(), collections.Counter()
    for e in prof.events():
        cls = torch_class(e.name)
        if cls is None:
            continue
        parent = e.cpu_parent
        while parent is not None:  # everything under the optimizer's (or clipping's) own profiler range
            if parent.name.startswith(("Optimizer.step", "optimizer")):
                cls = "optimizer"
                break
            parent = parent.cpu_parent
        per_class[cls] += e.self_cpu_time_total * 1e-6 / steps
        ops[e.name] += e.self_cpu_time_total * 1e-6 / steps
    per_class["host/idle"] = max(wall - sum(per_class.values()), 0.0)
    top = [(n, round(s, 4), torch_class(n)) for n, s in ops.most_common(12)]
    return dict(per_class), wall, top


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--top", action="store_true", help="also print the 12 most expensive ops of each side")
    parser.add_argument("--allocator", choices=("keep", "system"), default="keep",
                        help="keep: glibc keeps freed memory, as aki-train does on CPU (both sides)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.allocator == "keep":
        keep_freed_memory()
    config = bench_config("float32")
    batch = next(SyntheticBatches(config, args.batch, args.seq, images_per_row=1, seed=0))
    batch.pop("example_ids")
    sides = {"jax": jax_profile(config, batch, args.steps)}
    if not args.skip_torch:
        sides["torch"] = torch_profile(config, batch, args.steps)
    print(f"\ntrain step profile, batch {args.batch} x {args.seq}, float32, seconds per step")
    print(f"{'class':<18}" + "".join(f"{name:>10}" for name in sides))
    for cls in CLASSES:
        print(f"{cls:<18}" + "".join(f"{side[0].get(cls, 0.0):>10.3f}" for side in sides.values()))
    print(f"{'wall':<18}" + "".join(f"{side[1]:>10.3f}" for side in sides.values()))
    if args.top:
        for name, side in sides.items():
            print(f"\n{name}: top ops (s/step, class)")
            for op, seconds, cls in side[2]:
                print(f"  {seconds:8.4f}  {cls:<18} {op}")
    result = {name: {"wall_s": round(side[1], 4), **{k: round(v, 4) for k, v in side[0].items()}}
              for name, side in sides.items()}  # fmt: skip
    print(json.dumps({"benchmark": "profile_step", "batch": args.batch, "seq": args.seq, **result}))
    return result


if __name__ == "__main__":
    main()
