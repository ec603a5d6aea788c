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
