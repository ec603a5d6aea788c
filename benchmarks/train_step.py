"""Train-step throughput and MFU of a ~60M-parameter AKI at sequence 512, against this machine's matmul peak,
a PyTorch implementation of the same step, and the same step with plain causal attention.

  python benchmarks/train_step.py                          # CPU, float32, 5 rounds (the defaults)
  python benchmarks/train_step.py --allocator system       # every side with glibc's malloc as it comes
  python benchmarks/train_step.py --baseline ../before     # + the JAX step of another checkout, side by side
  python benchmarks/train_step.py --steps 5 --batch 4 --dtype bfloat16

Each side runs in its own worker process, started one after another (compile and warm-up), then called in
turn in each of --steps rounds (A B C A B C ...; medians reported, with min and max): four 2048^3 jitted matmuls
(XLA's ceiling for the dominant op), the JAX step (MMA), the JAX step (causal), the same four products in
PyTorch (its BLAS's ceiling), the PyTorch step (transformers' Phi-3 and SigLIP + a torch Perceiver resampler,
`aki_jax/testing/torch_reference.py`, AdamW, frozen vision tower). "% of peak" is against the faster of the two
libraries' products (the machine's measured matmul peak); "% of own lib" against the step's own library's.
Separate processes because in one process the two runtimes' thread pools and their page-fault storms slowed
each other unevenly (the JAX step ran ~1.3x slower beside a live PyTorch). Every worker gets the same allocator
(`--allocator`, default keep: glibc keeping freed memory, what `aki-train` sets up on CPU, see
`aki_jax/training/host_memory.py`). FLOPs are the model FLOPs of `aki_jax.training.flops` (same count for all).
Prints a table and one JSON line (per-round times included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

from aki_jax import sharding as S
from aki_jax.config import AKIConfig, DecoderConfig, ResamplerConfig, VisionConfig
from aki_jax.training import flops
from aki_jax.training.config import OptimizerConfig
from aki_jax.training.optimizer import learning_rate_schedule, make_optimizer
from aki_jax.training.state import count_params, init_state, state_shardings
from aki_jax.training.step import make_train_step
from aki_jax.training.synthetic import SyntheticBatches

PEAK_SIZE = 2048
PEAK_REPEATS = 4
BASELINE = "jax before"  # the JAX step of the checkout given by --baseline


def bench_config(dtype: str) -> AKIConfig:
    """~62M parameters: SigLIP-like 112px/14 (64 patches) x4 layers, resampler 64 latents x2, Phi-3-like 8x640."""
    return AKIConfig(
        vision=VisionConfig(image_size=112, patch_size=14, hidden_size=384, intermediate_size=1536, num_layers=4,
                            num_heads=6),
        resampler=ResamplerConfig(num_latents=64, depth=2),
        decoder=DecoderConfig(vocab_size=8192, hidden_size=640, intermediate_size=1792, num_layers=8, num_heads=10,
                              max_position_embeddings=4096, rope_scaling=None),
        initial_tokenizer_len=8190,
        pad_token_id=8189,
        dtype=dtype,
    )  # fmt: skip


def jax_step_parts(config: AKIConfig, batch: dict) -> dict:
    """The JAX train step on one device and what it runs on, not yet compiled or run.

    {"step": the jitted step, "abstract": the state's shapes, "init": () -> a fresh sharded state,
     "batch": the batch on the device, "mesh", "rules"}; call the step under `S.activation_context(mesh, rules)`.
    """
    mesh_config = S.MeshConfig(data=1)
    mesh = S.make_mesh(mesh_config, jax.devices()[:1])
    rules = S.logical_rules(mesh_config)
    optim = OptimizerConfig(lr=1e-4, warmup_steps=0, total_steps=100)
    optimizer = make_optimizer(optim)
    abstract, shardings = state_shardings(config, optimizer, mesh, rules)
    batch_shardings = {k: S.batch_sharding(mesh, rules, v.ndim) for k, v in batch.items()}
    return {
        "step": make_train_step(config, optimizer, learning_rate_schedule(optim), 1, shardings, batch_shardings),
        "abstract": abstract,
        "init": jax.jit(lambda: init_state(config, optimizer, 0), out_shardings=shardings),
        "batch": S.make_global_batch(batch, mesh, rules),
        "mesh": mesh,
        "rules": rules,
    }


def jax_step_fn(config: AKIConfig, batch: dict):
    """One JAX train step (state kept inside) as a closure that blocks until the step is done."""
    parts = jax_step_parts(config, batch)
    state = {"s": parts["init"]()}

    def run_one():
        with S.activation_context(parts["mesh"], parts["rules"]):
            state["s"], metrics = parts["step"](state["s"], parts["batch"])
        jax.block_until_ready(metrics)

    return run_one


def torch_step_fn(config: AKIConfig, batch: dict):
    """One PyTorch train step of the same model as a closure (shared with benchmarks/profile_step.py)."""
    import torch
    import torch.nn.functional as F

    from aki_jax.testing.torch_reference import AKIReference, modality_mask

    ref = AKIReference(config)
    for p in ref.vision_encoder.parameters():
        p.requires_grad_(False)
    trainable = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
    b = batch["input_ids"].shape[0]
    pixels = torch.as_tensor(batch["pixel_values"]).permute(0, 1, 4, 2, 3).flatten(0, 1).contiguous()
    is_image = torch.as_tensor(batch["modality_ids"] == 2)
    ids = torch.where(is_image, 0, torch.as_tensor(batch["input_ids"], dtype=torch.long))
    order = (torch.cumsum(is_image.long(), 1) - 1).clamp(min=0)
    mask = torch.as_tensor(np.asarray(modality_mask(batch["modality_ids"])))
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)[:, None]
    positions = torch.as_tensor(batch["positions"], dtype=torch.long)
    targets = torch.as_tensor(batch["targets"], dtype=torch.long)
    weights = torch.as_tensor(batch["weights"])

    def run_one():
        with torch.no_grad():
            features = ref.vision_encoder(pixel_values=pixels).last_hidden_state
        tokens = ref.vision_tokenizer(features).reshape(b, -1, config.decoder.hidden_size)
        embeds = ref.lang_model.model.embed_tokens(ids)
        gathered = torch.gather(
            tokens, 1, order[..., None].expand(-1, -1, tokens.shape[-1]).clamp(max=tokens.shape[1] - 1)
        )
        embeds = torch.where(is_image[..., None], gathered, embeds)
        logits = ref.lang_model(
            inputs_embeds=embeds, attention_mask=additive, position_ids=positions, use_cache=False
        ).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        loss = (loss * weights.flatten()).sum() / weights.sum()
        loss.backward()
        with torch.profiler.record_function("optimizer: clip + AdamW"):
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
        opt.zero_grad(set_to_none=True)

    ref.train()
    return run_one


TCMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)


def allocator_env(allocator: str) -> dict:
    """The environment of every worker: the system allocator, or tcmalloc preloaded (same for all sides)."""
    env = dict(os.environ)
    if allocator in ("system", "keep"):  # keep: glibc told to keep freed memory (in the worker, see worker())
        return env
    found = [path for path in TCMALLOC_PATHS if os.path.exists(path)]
    if not found:
        raise SystemExit(
            f"--allocator tcmalloc: none of {', '.join(TCMALLOC_PATHS)} exists "
            "(Debian: apt install libtcmalloc-minimal4)"
        )
    env["LD_PRELOAD"] = ":".join(filter(None, [found[0], env.get("LD_PRELOAD", "")]))
    return env


def make_run(name: str, args):
    """The closure that runs one `name` call (built, compiled and warmed up before it is returned)."""
    config = bench_config(args.dtype)
    batch = next(SyntheticBatches(config, args.batch, args.seq, images_per_row=1, seed=0))
    batch.pop("example_ids")
    if name == "peak":  # 2048^3 matmuls, the machine's ceiling for the dominant op
        a = jax.random.normal(jax.random.key(0), (PEAK_SIZE, PEAK_SIZE), args.dtype)
        matmul = jax.jit(lambda x, y: x @ y)

        def run():
            for _ in range(PEAK_REPEATS):  # one 86 ms product alone is at the mercy of a single hiccup
                matmul(a, a).block_until_ready()

    elif name == "torch peak":  # the same products through PyTorch's BLAS
        import torch

        a = torch.randn(PEAK_SIZE, PEAK_SIZE, dtype=getattr(torch, args.dtype))

        def run():
            for _ in range(PEAK_REPEATS):
                torch.mm(a, a)

    elif name in ("jax mma", BASELINE):
        import aki_jax

        print(f"{name}: aki_jax from {os.path.dirname(aki_jax.__file__)}", file=sys.stderr)
        run = jax_step_fn(config, batch)
    elif name == "jax causal":
        run = jax_step_fn(config.replace(attention="causal"), batch)
    elif name == "torch mma":
        import torch

        torch.manual_seed(0)
        run = torch_step_fn(config, batch)
    else:
        raise ValueError(f"unknown worker {name!r}")
    run()  # compile / warm up
    return run


def _this_checkouts_host_memory():
    """aki_jax/training/host_memory.py of this script's checkout (a --baseline worker imports an older aki_jax)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "aki_jax", "training", "host_memory.py")
    spec = importlib.util.spec_from_file_location("aki_bench_host_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(name: str, args):
    """A side in its own process: reads one line per call from stdin, answers with the call's seconds."""
    if args.allocator == "keep" and not _this_checkouts_host_memory().keep_freed_memory():
        raise SystemExit("--allocator keep: this C library is not glibc (use system or tcmalloc)")
    run = make_run(name, args)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        start = time.perf_counter()
        run()
        print(f"{time.perf_counter() - start:.6f}", flush=True)


def time_interleaved(names: list, args) -> dict:
    """{name: [seconds per round]}: each side in its own worker process, the calls alternating in each round.

    One process per side keeps the runtimes' thread pools and allocators out of each other's way (in one
    process PyTorch's threads and JAX's slowed each other unevenly); alternating A B C A B C ... makes a change
    of machine load during the run hit all sides alike, so the ratios between them stay meaningful.
    """
    base = [sys.executable, os.path.abspath(__file__), "--batch", str(args.batch), "--seq", str(args.seq),
            "--dtype", args.dtype]  # fmt: skip
    workers = {}
    try:
        for name in names:  # started one at a time: compiling side by side would slow every warm-up
            allocator = args.baseline_allocator or args.allocator if name == BASELINE else args.allocator
            env = allocator_env(allocator)
            if name == BASELINE:  # the same step, imported from another checkout of aki_jax
                path = os.pathsep.join(filter(None, [os.path.abspath(args.baseline), env.get("PYTHONPATH")]))
                env["PYTHONPATH"] = path
            proc = subprocess.Popen(base + ["--allocator", allocator, "--worker", name], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, env=env, text=True)  # fmt: skip
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit(f"benchmark worker {name!r} failed to start (exit {proc.wait()})")
            workers[name] = proc
        return {
            name: [float(answer) for answer in answers] for name, answers in call_rounds(workers, args.steps).items()
        }
    finally:
        close_workers(workers)


def call_rounds(workers: dict, rounds: int) -> dict:
    """{name: [answer line per round]}: each worker process (started, "ready") called once per round, in turn."""
    answers = {name: [] for name in workers}
    for _ in range(rounds):
        for name, proc in workers.items():
            proc.stdin.write("run\n")
            proc.stdin.flush()
            answer = proc.stdout.readline().strip()
            if not answer:
                raise SystemExit(f"benchmark worker {name!r} died during a round (exit {proc.wait()})")
            answers[name].append(answer)
    return answers


def close_workers(workers: dict):
    """End the worker processes still running (a closed stdin ends their loop)."""
    for proc in workers.values():
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="rounds; medians are reported")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-causal", action="store_true", help="leave out the plain-causal JAX step")
    parser.add_argument("--allocator", choices=("keep", "system", "tcmalloc"), default="keep",
                        help="malloc of every worker: keep (glibc keeping freed memory, as aki-train does on CPU: "
                        "aki_jax.training.host_memory), system (glibc as it comes), tcmalloc (preloaded)")  # fmt: skip
    parser.add_argument("--baseline", help="a checkout of aki-jax (say, a git worktree of an older commit) whose "
                        "JAX step runs beside this one as 'jax before' (before/after side by side)")  # fmt: skip
    parser.add_argument("--baseline-allocator", choices=("keep", "system", "tcmalloc"),
                        help="the --baseline worker's allocator (default: --allocator)")  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args)

    config = bench_config(args.dtype)
    from aki_jax.model import abstract_params

    n_params = count_params(abstract_params(config)[0])
    step_flops = flops.train_step_flops(config, args.batch, args.seq, 1)
    tokens = args.batch * args.seq
    names = ["peak", "jax mma"] + [BASELINE] * bool(args.baseline) + ["jax causal"] * (not args.skip_causal)
    names += ["torch peak", "torch mma"] * (not args.skip_torch)
    times = time_interleaved(names, args)
    rows = {name: float(np.median(t)) for name, t in times.items()}
    peaks = {lib: PEAK_REPEATS * 2 * PEAK_SIZE**3 / rows.pop(name) for lib, name in
             (("jax", "peak"), ("torch", "torch peak")) if name in rows}  # fmt: skip
    peak = max(peaks.values())  # the machine's ceiling: the faster of the two libraries' products

    device = jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    print(f"\nAKI train step, {n_params / 1e6:.1f}M params, batch {args.batch} x {args.seq}, {args.dtype}, ", end="")
    print(f"{device.platform} ({kind}), model FLOPs/step {step_flops / 1e12:.3f} T, allocator {args.allocator}")
    per_lib = ", ".join(f"{lib} {rate / 1e9:.1f}" for lib, rate in peaks.items())
    print(f"measured matmul peak: {peak / 1e9:.1f} GFLOP/s ({per_lib}; median of {args.steps} rounds)")
    print(f"{'step':<12} {'s/step':>8} {'min':>7} {'max':>7} {'tokens/s':>10} {'GFLOP/s':>9} {'% of peak':>10} "
          f"{'% of own lib':>13}")  # fmt: skip
    result = {"params_m": round(n_params / 1e6, 2), "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
              "allocator": args.allocator, "rounds": args.steps, "peak_gflops": round(peak / 1e9, 2),
              **{f"{lib}_peak_gflops": round(rate / 1e9, 2) for lib, rate in peaks.items()},
              "step_tflop": round(step_flops / 1e12, 4)}  # fmt: skip
    for name, seconds in rows.items():
        rate = step_flops / seconds
        low, high = min(times[name]), max(times[name])
        own = peaks["torch" if name.startswith("torch") else "jax"]  # the step's own library's products
        print(f"{name:<12} {seconds:>8.3f} {low:>7.3f} {high:>7.3f} {tokens / seconds:>10.0f} {rate / 1e9:>9.1f} "
              f"{100 * rate / peak:>9.1f}% {100 * rate / own:>12.1f}%")  # fmt: skip
        key = name.replace(" ", "_")
        result[f"{key}_s"] = round(seconds, 4)
        result[f"{key}_rounds_s"] = [round(t, 4) for t in times[name]]
        result[f"{key}_tokens_per_s"] = round(tokens / seconds, 1)
        result[f"{key}_mfu_vs_matmul_peak"] = round(rate / peak, 4)
        result[f"{key}_mfu_vs_own_library_peak"] = round(rate / own, 4)
    if "torch mma" in rows:
        # per-round ratios too: both sides of a round ran under the same machine load
        ratios = [t / j for t, j in zip(times["torch mma"], times["jax mma"], strict=True)]
        result["speedup_vs_torch"] = round(rows["torch mma"] / rows["jax mma"], 3)
        result["speedup_vs_torch_per_round_median"] = round(float(np.median(ratios)), 3)
        print(f"JAX / PyTorch speed-up: {result['speedup_vs_torch']:.2f}x (median of per-round ratios "
              f"{result['speedup_vs_torch_per_round_median']:.2f}x)")  # fmt: skip
    if BASELINE in rows:
        result["speedup_vs_before"] = round(rows[BASELINE] / rows["jax mma"], 3)
        result["baseline_allocator"] = args.baseline_allocator or args.allocator
        print(f"JAX now / JAX before ({args.baseline}, allocator {result['baseline_allocator']}) speed-up: "
              f"{result['speedup_vs_before']:.3f}x")  # fmt: skip
    if "jax causal" in rows:
        result["mma_cost_vs_causal"] = round(rows["jax mma"] / rows["jax causal"], 3)
        print(f"MMA / causal step time: {result['mma_cost_vs_causal']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
