"""The paper's ablation over seeds: the same job with MMA and with plain causal attention, then compared.

Each (attention, seed) run is `train()` on the config with `attention=<kind> seed=<s> data.seed=<s>
checkpoint.dir=<out>/<kind>_seed<s>` appended to the overrides, so the two kinds of one seed share
their initial parameters and their data order and differ only in the mask. Runs are subprocesses: a
crash cannot take the others down, and each starts with fresh XLA caches. A run whose summary.json
says finished is skipped; an unfinished one continues from its last checkpoint. Seeds are run in
turn, both kinds of a seed together, so a partial ablation already has paired seeds.

`analyse` turns the runs' summaries into per-kind mean and sample standard deviation (overall and per
question type) and the paired difference MMA - causal over the seeds both finished, with a two-sided
95% Student-t interval; `write_report` writes ablation.md, ablation.json and ablation.png.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

KINDS = ("mma", "causal")
CONFIDENCE = 0.95
SUMMARY = "summary.json"
RUN_LOG = "run.log"
_CHILD = "import sys; from aki_jax.training.ablation import child_main; raise SystemExit(child_main(sys.argv[1:]))"


@dataclasses.dataclass
class Run:
    """One (attention, seed) run. status: "done" (ran now), "skipped" (finished before), "failed"."""

    attention: str
    seed: int
    directory: str
    status: str = "pending"
    wall_s: float | None = None
    error: str | None = None
    summary: dict | None = None

    def record(self) -> dict:
        """The JSON form (the summary's headline figures, not all of it)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "summary"}
        if self.summary:
            for key in ("heldout_accuracy", "heldout_by_type", "baselines", "train_wall_s", "compile_s", "steps"):
                if key in self.summary:
                    out[key] = self.summary[key]
        return out


def run_directory(out: str | Path, attention: str, seed: int) -> Path:
    return Path(out) / f"{attention}_seed{seed}"


def run_overrides(overrides: Sequence[str], attention: str, seed: int, directory: str | Path) -> list[str]:
    """The user's overrides, then those that make this run: later overrides win, so these cannot be undone."""
    return [
        *overrides,
        f"model.attention={attention}",
        f"seed={seed}",
        f"data.seed={seed}",
        f"checkpoint.dir={directory}",
    ]


def finished_summary(directory: str | Path) -> dict | None:
    """The run's summary when it finished all its steps, else None (absent, unreadable or interrupted)."""
    path = Path(directory) / SUMMARY
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("finished") else None


def subprocess_runner(config_path: str, overrides: list[str], directory: Path, timeout_s: float | None) -> str | None:
    """Run one training job in a fresh Python process; None on success, else a one-line reason.

    Its output goes to `<directory>.run.log` beside it (named in the error). The parent directory is
    created here, the run's own by `train()`. Runs of one ablation compile the same programs, so they
    share XLA's persistent cache in `<out>/xla_cache` (unless JAX_COMPILATION_CACHE_DIR says otherwise).
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    log_path = directory.parent / f"{directory.name}.{RUN_LOG}"
    env = {"JAX_COMPILATION_CACHE_DIR": str(directory.parent.absolute() / "xla_cache"), **os.environ}
    with log_path.open("w") as log:
        try:
            code = subprocess.run(
                [sys.executable, "-c", _CHILD, config_path, *overrides],
                stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=False, env=env,
            ).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout_s:g} s (log: {log_path})"
    if code != 0:
        return f"exit code {code}: {_last_error_line(log_path)} (log: {log_path})"
    return None


def _last_error_line(log_path: Path) -> str:
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or line.startswith("error"):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def child_main(argv: list[str]) -> int:
    """In the run's process: load the config file argv[0], apply the overrides argv[1:], train (resuming)."""
    import logging

    from aki_jax.training.config import apply_overrides, load_config_file
    from aki_jax.training.loop import train

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = apply_overrides(load_config_file(argv[0]), argv[1:])
    train(dataclasses.replace(config, resume=True))
    return 0


def run_all(
    config_path: str | Path,
    overrides: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    kinds: Sequence[str] = KINDS,
    *,
    timeout_s: float | None = None,
    runner: Callable[[str, list[str], Path, float | None], str | None] = subprocess_runner,
    log: Callable[[str], None] = print,
) -> list[Run]:
    """Every (kind, seed) run, seed by seed; finished runs are skipped and a failed one does not stop the rest."""
    runs = []
    for seed in seeds:
        for kind in kinds:
            directory = run_directory(out, kind, seed)
            run = Run(kind, seed, str(directory))
            summary = finished_summary(directory)
            if summary is not None:
                run.status, run.summary = "skipped", summary
                log(f"{kind} seed {seed}: already finished ({directory / SUMMARY}), skipped")
                runs.append(run)
                continue
            log(f"{kind} seed {seed}: training into {directory} ...")
            start = time.perf_counter()
            error = runner(str(config_path), run_overrides(overrides, kind, seed, directory), directory, timeout_s)
            run.wall_s = time.perf_counter() - start
            summary = finished_summary(directory)
            if error is None and summary is None:
                error = f"the run ended without a finished {directory / SUMMARY}"
            if error is None:
                run.status, run.summary = "done", summary
                log(f"{kind} seed {seed}: held-out accuracy {summary.get('heldout_accuracy')} ({run.wall_s:.0f} s)")
            else:
                run.status, run.error = "failed", error
                log(f"{kind} seed {seed}: FAILED: {error}")
            runs.append(run)
    return runs


def collect(out: str | Path, seeds: Sequence[int], kinds: Sequence[str] = KINDS) -> list[Run]:
    """The runs as they stand, running nothing: finished ones "skipped", the others "missing"."""
    runs = []
    for seed in seeds:
        for kind in kinds:
            directory = run_directory(out, kind, seed)
            summary = finished_summary(directory)
            runs.append(Run(kind, seed, str(directory), "skipped" if summary else "missing", summary=summary))
    return runs


# --- analysis ---------------------------------------------------------------------------------------


def t_quantile(probability: float, dof: int) -> float:
    """Student-t quantile (scipy is installed with scikit-learn, a dependency)."""
    from scipy import stats

    return float(stats.t.ppf(probability, dof))


def mean_std(values: Sequence[float]) -> dict:
    """{"mean", "std" (sample, ddof=1; None for one value), "n"}."""
    x = np.asarray(values, np.float64)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else None, "n": len(x)}


def paired_interval(differences: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """Mean of paired differences with its two-sided Student-t interval (None below two pairs)."""
    d = np.asarray(differences, np.float64)
    out = {"mean": float(d.mean()), "n": len(d), "low": None, "high": None, "per_seed": [float(v) for v in d]}
    if len(d) > 1:
        half = t_quantile(0.5 + confidence / 2, len(d) - 1) * float(d.std(ddof=1)) / math.sqrt(len(d))
        out["low"], out["high"] = out["mean"] - half, out["mean"] + half
    return out


def _figures(summary: dict) -> dict[str, float]:
    """{"all": held-out accuracy, <question type>: accuracy, ...} of one run's summary."""
    return {"all": summary["heldout_accuracy"], **summary.get("heldout_by_type", {})}


def analyse(runs: Sequence[Run], kinds: Sequence[str] = KINDS) -> dict:
    """Per-kind mean ± std and the paired difference kinds[0] - kinds[1], overall ("all") and per question type."""
    ok = [r for r in runs if r.summary is not None and "heldout_accuracy" in r.summary]
    columns: list[str] = []
    for run in ok:
        columns += [c for c in _figures(run.summary) if c not in columns]
    by_kind = {}
    for kind in kinds:
        figures = [_figures(r.summary) for r in ok if r.attention == kind]
        if figures:
            by_kind[kind] = {c: mean_std([f[c] for f in figures if c in f]) for c in columns}
            by_kind[kind]["seeds"] = sorted(r.seed for r in ok if r.attention == kind)
    paired = {}
    if len(kinds) == 2:
        first = {r.seed: _figures(r.summary) for r in ok if r.attention == kinds[0]}
        second = {r.seed: _figures(r.summary) for r in ok if r.attention == kinds[1]}
        seeds = sorted(set(first) & set(second))
        if seeds:
            paired = {c: paired_interval([first[s][c] - second[s][c] for s in seeds]) for c in columns}
            paired["seeds"] = seeds
    baselines = {}
    for run in ok:  # data-only, identical in every run; the shuffled-image one depends on the model
        if "text_only" in run.summary.get("baselines", {}):
            baselines["text only"] = run.summary["baselines"]["text_only"]
    for kind in kinds:
        shuffled = [r.summary["baselines"]["shuffled_image"] for r in ok if r.attention == kind
                    and r.summary.get("baselines", {}).get("shuffled_image")]  # fmt: skip
        if shuffled:
            baselines[f"shuffled image ({kind})"] = {
                c: float(np.mean([s[c] for s in shuffled if c in s])) for c in columns
            }
    return {"columns": columns, "by_kind": by_kind, "paired": paired, "baselines": baselines, "kinds": list(kinds)}


def machine() -> dict:
    """Where the ablation ran (for the report): CPU count, processor, platform, load averages."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_1_5_15": load,
    }


def _cell(stat: dict | None) -> str:
    if not stat:
        return ""
    if stat["std"] is None:
        return f"{100 * stat['mean']:.1f}"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def _interval_cell(stat: dict | None) -> str:
    if not stat:
        return ""
    if stat["low"] is None:
        return f"{100 * stat['mean']:+.1f} (one pair: no interval)"
    return f"{100 * stat['mean']:+.1f} [{100 * stat['low']:+.1f}, {100 * stat['high']:+.1f}]"


def format_markdown(analysis: dict, runs: Sequence[Run], meta: dict) -> str:
    """The ablation table (held-out exact match in %, mean ± std over seeds), baselines and run list."""
    columns, kinds = analysis["columns"], analysis["kinds"]
    lines = [
        "# Attention ablation: held-out exact match (%)",
        "",
        f"Config `{meta['config']}`, overrides `{' '.join(meta['overrides']) or '(none)'}`, seeds {meta['seeds']}.",
        f"Command: `{meta['command']}`",
        "",
    ]
    if columns:
        lines += ["| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for kind in kinds:
            if kind in analysis["by_kind"]:
                stats = analysis["by_kind"][kind]
                label = f"{kind} (n={len(stats['seeds'])})"
                lines.append(f"| {label} | " + " | ".join(_cell(stats.get(c)) for c in columns) + " |")
        if analysis["paired"]:
            paired = analysis["paired"]
            label = f"{kinds[0]} - {kinds[1]}, paired, {int(CONFIDENCE * 100)}% t-interval (n={len(paired['seeds'])})"
            lines.append(f"| {label} | " + " | ".join(_interval_cell(paired.get(c)) for c in columns) + " |")
        for name, values in analysis["baselines"].items():
            lines.append(f"| baseline: {name} | " + " | ".join(
                f"{100 * values[c]:.1f}" if c in values else "" for c in columns) + " |")  # fmt: skip
        lines.append("")
    else:
        lines += ["No run finished.", ""]
    lines += ["## Runs", "", "| attention | seed | status | held-out | wall s | note |", "|---|---|---|---|---|---|"]
    for run in runs:
        acc = run.summary.get("heldout_accuracy") if run.summary else None
        wall = f"{run.wall_s:.0f}" if run.wall_s is not None else ""
        note = run.error or ("finished earlier" if run.status == "skipped" else "")
        acc_text = f"{100 * acc:.1f}" if acc is not None else ""
        lines.append(f"| {run.attention} | {run.seed} | {run.status} | {acc_text} | {wall} | {note} |")
    m = meta["machine"]
    lines += [
        "",
        f"Machine: {m['cpus']} CPUs ({m['processor']}, {m['platform']}), load average at start "
        f"{meta.get('load_at_start')}, at end {m['load_average_1_5_15']}; wall time of this call "
        f"{meta['wall_s']:.0f} s (runs skipped as finished cost nothing).",
        "",
    ]
    return "\n".join(lines)


def plot(analysis: dict, runs: Sequence[Run], path: str | Path) -> Path:
    """Bars: mean held-out exact match per kind and question type, error bars one std, dots the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns, kinds = analysis["columns"], [k for k in analysis["kinds"] if k in analysis["by_kind"]]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(columns) + 2), 4))
    width = 0.8 / max(len(kinds), 1)
    x = np.arange(len(columns))
    for i, kind in enumerate(kinds):
        stats = analysis["by_kind"][kind]
        means = [100 * stats[c]["mean"] if c in stats else np.nan for c in columns]
        errs = [100 * (stats[c]["std"] or 0.0) if c in stats else 0.0 for c in columns]
        ax.bar(x + i * width, means, width, yerr=errs, capsize=3, label=kind, alpha=0.8)
        for run in runs:
            if run.attention == kind and run.summary and "heldout_accuracy" in run.summary:
                figures = _figures(run.summary)
                ax.plot(x + i * width, [100 * figures.get(c, np.nan) for c in columns], "k.", markersize=4)
    text_only = analysis["baselines"].get("text only")
    if text_only:
        ax.plot(x + width * (len(kinds) - 1) / 2, [100 * text_only.get(c, np.nan) for c in columns], "r_",
                markersize=20, label="text only")  # fmt: skip
    ax.set_xticks(x + width * (len(kinds) - 1) / 2, columns)
    ax.set_ylabel("held-out exact match (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(out: str | Path, runs: Sequence[Run], meta: dict, kinds: Sequence[str] = KINDS) -> dict:
    """Write out/ablation.{md,json,png}; returns the analysis."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    analysis = analyse(runs, kinds)
    meta = {**meta, "machine": machine()}
    (out / "ablation.md").write_text(format_markdown(analysis, runs, meta))
    record = {**meta, "analysis": analysis, "runs": [r.record() for r in runs]}
    (out / "ablation.json").write_text(json.dumps(record, indent=2) + "\n")
    if analysis["columns"]:
        plot(analysis, runs, out / "ablation.png")
    return analysis
