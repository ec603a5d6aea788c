"""An evaluation job: several benchmarks, one model, one output folder.

`output_dir/results.json` holds every benchmark's scores (and its mode, file and skipped rows),
`output_dir/results.md` the same as markdown tables; per benchmark see `aki_jax.evaluation.runner`.
Rerunning the same command resumes: finished items are read back, not recomputed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from aki_jax.evaluation import metrics, runner
from aki_jax.evaluation.readers import Benchmark

log = logging.getLogger(__name__)


def evaluate(
    benchmarks: list[Benchmark],
    scorer,
    output_dir,
    dist: runner.Distribution | None = None,
    progress: bool = True,
    mode: str | None = None,
) -> dict:
    """Run (or resume) every benchmark, write results.json and results.md; returns {name: result}."""
    dist = dist or runner.Distribution()
    names = [b.name for b in benchmarks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"several benchmarks are named {duplicates}: rename the files (the name is the file stem)")
    mode = mode or scorer.settings().get("mode", "")
    results = {}
    for benchmark in benchmarks:
        scores = runner.evaluate_benchmark(benchmark, scorer, output_dir, dist, progress)
        results[benchmark.name] = {
            "file": benchmark.path,
            "mode": mode,
            "scores": scores,
            "read_errors": benchmark.errors,
        }
    if dist.process_index == 0:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        (out / "results.md").write_text(metrics.markdown_table(results))
    return results


def parse_mesh(text: str):
    """`"data=-1,fsdp=1,tensor=1"` -> `aki_jax.sharding.MeshConfig` (missing axes keep their defaults)."""
    from aki_jax.sharding import MESH_AXES, MeshConfig

    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in MESH_AXES or not value.lstrip("-").isdigit():
            raise ValueError(f"--mesh: expected comma-separated AXIS=SIZE with AXIS in {MESH_AXES}, got {part!r}")
        sizes[name] = int(value)
    return MeshConfig(**sizes)


def evaluate_checkpoint(
    checkpoint,
    benchmark_files: list,
    output_dir,
    *,
    mode: str = "likelihood",
    batch_size: int = 8,
    mesh: str = "data=-1",
    dtype: str | None = None,
    task: str | None = None,
    continuation: str = "letter",
    max_new_tokens: int = 16,
    length_multiple: int = 64,
    tokenizer_dir=None,
    progress: bool = True,
) -> dict:
    """Load a pretrained folder onto a mesh and evaluate benchmark files (what `tools/evaluate.py` runs).

    batch_size: rows per model call over all processes (one row per item: its question with all candidate
    answers in likelihood mode, its prompt in generation); a multiple of the devices the batch is split over.
    """
    from aki_jax import sharding
    from aki_jax.checkpoint import CONFIG_FILE, load_pretrained
    from aki_jax.config import AKIConfig
    from aki_jax.evaluation.readers import read_benchmark
    from aki_jax.evaluation.scoring import EvaluationScorer, ModelRunner
    from aki_jax.processing import Processor, load_tokenizer

    dist = runner.Distribution.from_jax()
    if batch_size % dist.process_count:
        raise ValueError(f"--batch-size {batch_size} must be a multiple of the process count {dist.process_count}")
    benchmarks = [read_benchmark(path, task=task) for path in benchmark_files]
    mesh_config = parse_mesh(mesh)
    device_mesh = sharding.make_mesh(mesh_config)
    rules = sharding.logical_rules(mesh_config)
    config = AKIConfig.from_json(f"{checkpoint}/{CONFIG_FILE}")
    if dtype is not None:
        config = config.replace(param_dtype=dtype)
    _, param_shardings = sharding.param_shardings(config, device_mesh, rules)
    model, params, tokenizer = load_pretrained(checkpoint, dtype=dtype, sharding=param_shardings, compute_dtype=dtype)
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer is None:
        raise ValueError(f"{checkpoint} holds no tokenizer files: pass --tokenizer DIR")
    processor = Processor.from_config(model.config, tokenizer)
    model_runner = ModelRunner(
        model,
        params,
        processor,
        rows_per_step=batch_size // dist.process_count,
        mesh=device_mesh,
        rules=rules,
        length_multiple=length_multiple,
        max_new_tokens=max_new_tokens,
        dist=dist,
    )
    # What changes predictions; the device count does not, so a resumed job may run on another topology.
    settings = {"checkpoint": str(Path(checkpoint).resolve()), "dtype": dtype, "task": task}
    scorer = EvaluationScorer(model_runner, mode=mode, continuation=continuation, settings=settings)
    return evaluate(benchmarks, scorer, output_dir, dist, progress=progress, mode=mode)
