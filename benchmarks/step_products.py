"""The train step's matrix products timed one at a time outside the step, in XLA and in PyTorch, beside the step.

  python benchmarks/step_products.py                  # batch 4 x 512, float32, 3 rounds
  python benchmarks/step_products.py --skip-torch --per-product

`profile_step.py` attributes the step's time from a trace, and the tracer itself slows the step (1.2-1.8x on the
project's VMs), most of all the matrix products, which it splits into many small recorded regions. This script
measures without a tracer. It reads every dot of the compiled JAX step of `benchmarks/train_step.py` from its
optimised HLO (operand shapes, batch and contracting dimensions, in the operand order XLA settled on), and how
many times each runs per step (the trip counts of the loops around it: the scanned layers). Each distinct
product is then jitted alone on random operands of those shapes and timed, and PyTorch times products of the
same sizes as row-major `[batch, M, K] @ [batch, K, N]` (its BLAS's best case). The JAX step, the products
through XLA and the products through PyTorch each run in their own worker process, called in turn in every
round (medians reported).

Alone, a product's operands are hot in cache where they fit, and it has both cores to itself; inside the step
they mostly come from memory and XLA may run two thunks side by side. So the sum is a floor for the step's
products, not their cost inside it: "step - products" is what the step spends on everything else (attention's
softmax, norms, elementwise work, copies, the optimizer, dispatch) plus whatever the products lose inside it.
Prints a table (one row per model part and direction, or per product with --per-product) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import bench_config, call_rounds, close_workers, jax_step_parts, make_run  # noqa: E402

from aki_jax import sharding as S  # noqa: E402
from aki_jax.training.synthetic import SyntheticBatches  # noqa: E402

SIDES = ("jax step", "jax products", "torch products")
MIN_TIMED_S = 0.05  # each product is repeated until one timing spans at least this long
DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64"}  # HLO's names

_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")


@dataclass(frozen=True)
class Product:
    """One dot of the step: operand dtypes and shapes, its dimension numbers, and what the model calls it."""

    lhs_dtype: str
    lhs_shape: tuple
    rhs_dtype: str
    rhs_shape: tuple
    out_dtype: str
    lhs_contracting: tuple
    rhs_contracting: tuple
    lhs_batch: tuple
    rhs_batch: tuple
    label: str  # "<part> <einsum> <fwd|bwd>", from the op's metadata

    def sizes(self) -> tuple[int, int, int, int]:
        """(batch, M, K, N): the product as a batched matrix product."""
        batch = math.prod(self.lhs_shape[d] for d in self.lhs_batch)
        k = math.prod(self.lhs_shape[d] for d in self.lhs_contracting)
        m = math.prod(self.lhs_shape) // (batch * k)
        n = math.prod(self.rhs_shape) // (batch * k)
        return batch, m, k, n

    def flops(self) -> int:
        batch, m, k, n = self.sizes()
        return 2 * batch * m * k * n


def _dims(text: str, name: str) -> tuple:
    found = re.search(rf"\b{name}=\{{([\d,]*)\}}", text)
    return tuple(int(d) for d in found.group(1).split(",") if d) if found else ()


def _label(text: str) -> str:
    """'decoder BTD,DKF->BTKF bwd' from the op_name metadata of a dot."""
    found = re.search(r'op_name="([^"]*)"', text)
    op_name = found.group(1) if found else ""
    part = next((p for p in ("vision", "resampler", "decoder") if f"/{p}/" in op_name), "other")
    einsum = re.search(r"/([A-Za-z]+(?:,[A-Za-z]+)*->[A-Za-z]+)/", op_name)
    direction = "bwd" if "transpose(jvp(" in op_name else "fwd"
    return f"{part} {einsum.group(1) if einsum else 'dot'} {direction}"


def step_products(hlo: str) -> Counter:
    """{Product: times per step} of an optimised HLO module's text (`compiled.as_text()`)."""
    computations: dict[str, list[tuple[str, str]]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        if current is None:
            found = _COMPUTATION.match(line)
            if found and line.rstrip().endswith("{"):
                current = found.group(1)
                computations[current] = []
                entry = current if line.startswith("ENTRY") else entry
            continue
        if line.startswith("}"):
            current = None
            continue
        found = _INSTRUCTION.match(line)
        if found:
            computations[current].append((found.group(1), found.group(2)))

    callers: dict[str, list[tuple[str, int]]] = {name: [] for name in computations}  # callee: [(caller, times)]
    for name, instructions in computations.items():
        for _, text in instructions:
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', text)
            for key in ("calls", "body", "condition", "to_apply"):
                for callee in re.findall(rf"\b{key}=%([\w.\-]+)", text):
                    times = int(trips.group(1)) if key == "body" and trips else 1
                    if key == "body" and not trips:
                        raise ValueError(f"a while loop of the step has no known trip count ({text[:120]})")
                    callers[callee].append((name, times))

    memo: dict[str, int] = {}

    def runs(name: str) -> int:  # how many times a computation runs per step
        if name == entry:
            return 1
        if name not in memo:
            memo[name] = sum(runs(caller) * times for caller, times in callers[name])
        return memo[name]

    products: Counter = Counter()
    for name, instructions in computations.items():
        shapes = {}
        for instr, text in instructions:
            shape = _SHAPE.match(text)
            if shape:
                shapes[instr] = (shape.group(1), tuple(int(d) for d in shape.group(2).split(",") if d))
            dot = re.search(r"\bdot\(%([\w.\-]+), %([\w.\-]+)\)", text)
            if not dot or runs(name) == 0:
                continue
            lhs, rhs = shapes[dot.group(1)], shapes[dot.group(2)]
            product = Product(
                lhs[0], lhs[1], rhs[0], rhs[1], shapes[instr][0],
                _dims(text, "lhs_contracting_dims"), _dims(text, "rhs_contracting_dims"),
                _dims(text, "lhs_batch_dims"), _dims(text, "rhs_batch_dims"), _label(text),
            )  # fmt: skip
            products[product] += runs(name)
    return products


def compiled_step_hlo(args) -> str:
    """The optimised HLO text of the JAX step of benchmarks/train_step.py (compiled, not run)."""
    config = bench_config(args.dtype)
    batch = next(SyntheticBatches(config, args.batch, args.seq, images_per_row=1, seed=0))
    batch.pop("example_ids")
    parts = jax_step_parts(config, batch)
    with S.activation_context(parts["mesh"], parts["rules"]):
        return parts["step"].lower(parts["abstract"], parts["batch"]).compile().as_text()


def _repeats(run) -> int:
    start = time.perf_counter()
    run()
    return max(1, math.ceil(MIN_TIMED_S / max(time.perf_counter() - start, 1e-6)))


def products_run(side: str, products: list[Product]):
    """A closure timing each product once (repeated to MIN_TIMED_S): seconds per call, in `products` order."""
    calls = []
    for i, p in enumerate(products):
        if side == "jax products":
            key_a, key_b = jax.random.split(jax.random.key(i))
            a = jax.random.normal(key_a, p.lhs_shape, DTYPES[p.lhs_dtype])
            b = jax.random.normal(key_b, p.rhs_shape, DTYPES[p.rhs_dtype])
            dims = ((p.lhs_contracting, p.rhs_contracting), (p.lhs_batch, p.rhs_batch))
            out = DTYPES[p.out_dtype]
            fn = jax.jit(lambda x, y, dims=dims, out=out: jax.lax.dot_general(x, y, dims, preferred_element_type=out))

            def call(fn=fn, a=a, b=b):
                fn(a, b).block_until_ready()

        else:
            import torch

            batch, m, k, n = p.sizes()
            dtype = getattr(torch, DTYPES[p.lhs_dtype])
            a, b = torch.randn(batch, m, k, dtype=dtype), torch.randn(batch, k, n, dtype=dtype)

            def call(a=a, b=b):
                torch.bmm(a, b)

        call()  # compile / warm up
        calls.append((call, _repeats(call)))

    def run() -> list[float]:
        seconds = []
        for call, repeats in calls:
            start = time.perf_counter()
            for _ in range(repeats):
                call()
            seconds.append((time.perf_counter() - start) / repeats)
        return seconds

    return run


def worker(side: str, args):
    """A side in its own process: one line per call on stdin, each answered with a JSON list of seconds."""
    from aki_jax.training.host_memory import keep_freed_memory

    keep_freed_memory()  # as benchmarks/train_step.py's default allocator (and aki-train on CPU)
    if side == "jax step":
        step = make_run("jax mma", args)

        def run():
            start = time.perf_counter()
            step()
            return [time.perf_counter() - start]

    else:
        products = [Product(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
                    for d in json.loads(sys.stdin.readline())]  # fmt: skip
        run = products_run(side, products)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(json.dumps(run()), flush=True)


def time_sides(sides: list, products: list[Product], args) -> dict:
    """{side: [per-round answers]}: one worker process per side, called in turn in every round."""
    base = [sys.executable, os.path.abspath(__file__), "--batch", str(args.batch), "--seq", str(args.seq),
            "--dtype", args.dtype]  # fmt: skip
    workers = {}
    try:
        for side in sides:  # started one at a time: warm-ups side by side would slow each other
            proc = subprocess.Popen(base + ["--worker", side], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True)  # fmt: skip
            if side != "jax step":
                proc.stdin.write(json.dumps([asdict(p) for p in products]) + "\n")
                proc.stdin.flush()
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit(f"benchmark worker {side!r} failed to start (exit {proc.wait()})")
            workers[side] = proc
        return {side: [json.loads(a) for a in answers] for side, answers in call_rounds(workers, args.rounds).items()}
    finally:
        close_workers(workers)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3, help="medians over rounds are reported")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--per-product", action="store_true", help="a row per distinct product, not per group")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args)

    counts = step_products(compiled_step_hlo(args))
    products = sorted(counts, key=lambda p: (p.label, p.lhs_shape, p.rhs_shape))
    sides = [s for s in SIDES if not (args.skip_torch and s.startswith("torch"))]
    answers = time_sides(sides, products, args)
    step_s = float(np.median([a[0] for a in answers["jax step"]]))
    per_product = {side: np.median(np.array(answers[side]), axis=0) for side in sides if side != "jax step"}

    groups: dict[str, list[int]] = {}
    for i, p in enumerate(products):
        name = p.label if args.per_product else " ".join(p.label.split()[::2])  # "<part> <direction>"
        if args.per_product:
            name += " [{}x{}x{}x{}]".format(*p.sizes())
        groups.setdefault(name, []).append(i)

    print(f"\ntrain step products, batch {args.batch} x {args.seq}, {args.dtype}, {jax.devices()[0].platform}, "
          f"median of {args.rounds} rounds, seconds per step (count x one product alone)")  # fmt: skip
    columns = [s.split()[0] for s in per_product]
    header = f"{'products':<44} {'count':>6} {'GFLOP':>8}" + "".join(
        f" {c + ' s':>9} {c + ' GF/s':>10}" for c in columns
    )
    print(header)
    result = {"batch": args.batch, "seq": args.seq, "dtype": args.dtype, "rounds": args.rounds, "groups": {}}
    totals = {c: 0.0 for c in columns}
    total_flops = 0
    for name, members in groups.items():
        count = sum(counts[products[i]] for i in members)
        group_flops = sum(counts[products[i]] * products[i].flops() for i in members)
        total_flops += group_flops
        row = f"{name:<44} {count:>6} {group_flops / 1e9:>8.1f}"
        entry = {"count": count, "gflop": round(group_flops / 1e9, 2)}
        for side, column in zip(per_product, columns, strict=True):
            seconds = sum(counts[products[i]] * per_product[side][i] for i in members)
            totals[column] += seconds
            row += f" {seconds:>9.3f} {group_flops / seconds / 1e9:>10.1f}"
            entry[f"{column}_s"] = round(float(seconds), 4)
        result["groups"][name] = entry
        print(row)
    row = f"{'all products':<44} {sum(counts.values()):>6} {total_flops / 1e9:>8.1f}"
    for column in columns:
        row += f" {totals[column]:>9.3f} {total_flops / totals[column] / 1e9:>10.1f}"
    print(row)
    print(f"JAX step: {step_s:.3f} s; its products alone through XLA: {totals['jax']:.3f} s "
          f"({100 * totals['jax'] / step_s:.0f}% of the step); the rest: {step_s - totals['jax']:.3f} s")  # fmt: skip
    if "torch" in totals:
        print(f"the same products through PyTorch: {totals['torch']:.3f} s (XLA / PyTorch time "
              f"{totals['jax'] / totals['torch']:.2f})")  # fmt: skip
    result.update(
        step_s=round(step_s, 4),
        step_rounds_s=[round(a[0], 4) for a in answers["jax step"]],
        products_gflop=round(total_flops / 1e9, 2),
        **{f"{c}_products_s": round(float(t), 4) for c, t in totals.items()},
        rest_s=round(step_s - totals["jax"], 4),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
