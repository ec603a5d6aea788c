"""Exact resume: runs preempted (SIGTERM) and killed (SIGKILL) between checkpoints, then resumed, end with
params bit-identical to an uninterrupted run, and every step saw the same examples (none twice, none skipped).

Each run is a real `aki-train` subprocess (through tests/train_with_hooks.py, which adds the example-id
recorder and the faults as training callbacks) on the digits data (grain pipeline with a prefetch
thread) on a 2x2x2 mesh of fake CPU devices. The runs share a persistent compilation cache so that
only the first one compiles.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

# End to end: several real training processes (about 11 min on a loaded 2-core machine).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
COMMON = [
    f"steps={STEPS}",
    "optim.warmup_steps=2",
    "data.batch_size=8",
    "data.seq_len=64",
    "mesh.data=2",
    "mesh.fsdp=2",
    "mesh.tensor=2",
    "checkpoint.every_steps=4",
    "checkpoint.keep=5",
    "checkpoint.export_pretrained=false",
    "logging.every_steps=1",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "logging.plot=false",
    "logging.peak_flops_per_device=1e12",
    "eval.max_batches=1",
]


def train(run_dir: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    hooked = [sys.executable, str(ROOT / "tests" / "train_with_hooks.py"), "--record-example-ids"]
    cmd = [*hooked, *COMMON, f"checkpoint.dir={run_dir}", *extra]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def final_params(run_dir: Path, step: int = STEPS) -> dict:
    restored = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(step) / "state")
    return restored["params"]


def ids_per_step(run_dir: Path) -> dict[int, list]:
    """Example ids of each step; a step redone after a crash keeps the ids of its last execution."""
    out = {}
    for line in (run_dir / "example_ids.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["ids"]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    cache = base / "jax_cache"
    straight = train(base / "straight", cache, "checkpoint.export_pretrained=true")
    assert straight.returncode == 0, straight.stderr[-3000:]

    interrupted = base / "interrupted"
    preempted = train(interrupted, cache, "--sigterm-at-step=6")
    assert preempted.returncode == 0, preempted.stderr[-3000:]
    after_sigterm = sorted(int(p.name) for p in (interrupted / "checkpoints").iterdir() if p.name.isdigit())
    killed = train(interrupted, cache, "--resume", "--kill-at-step=10")
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = train(interrupted, cache, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return base / "straight", interrupted, after_sigterm, resumed.stdout


def test_sigterm_saves_a_checkpoint_before_exiting(runs):
    _, _, after_sigterm, _ = runs
    assert after_sigterm == [4, 6]  # the regular save at 4, and 6 saved on SIGTERM (not a multiple of 4)


def test_killed_and_resumed_run_ends_bit_identical(runs):
    straight, interrupted, _, stdout = runs
    a, b = final_params(straight), final_params(interrupted)
    leaves_a, leaves_b = _leaves(a), _leaves(b)
    assert leaves_a.keys() == leaves_b.keys() and leaves_a
    for key in leaves_a:
        np.testing.assert_array_equal(leaves_a[key], leaves_b[key], err_msg=key)
    assert "heldout_accuracy" in stdout


def test_no_example_seen_twice_or_skipped(runs):
    straight, interrupted, _, _ = runs
    expected, got = ids_per_step(straight), ids_per_step(interrupted)
    assert sorted(expected) == sorted(got) == list(range(1, STEPS + 1))
    assert got == expected
    seen = [i for step in sorted(got) for i in got[step]]
    assert len(seen) == len(set(seen)) == STEPS * 8


def _leaves(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = np.asarray(value)
    return out


def test_init_from_starts_from_the_pretrained_params_and_keep_best_keeps_latest_and_best(runs, tmp_path):
    """A run started with --init-from the straight run's exported model, at learning rate 0, ends with
    exactly that model's params; with keep=1 and keep_best only the latest and the best save remain."""
    straight, _, _, _ = runs
    cache = straight.parent / "jax_cache"
    run = tmp_path / "init"
    result = train(
        run, cache, "--init-from", str(straight / "model"), "steps=3", "optim.lr=0", "optim.min_lr=0",
        "optim.warmup_steps=0", "checkpoint.every_steps=1", "checkpoint.keep=1", "checkpoint.keep_best=true",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = _leaves(final_params(straight)), _leaves(final_params(run, 3))
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    summary = json.loads((run / "summary.json").read_text())
    best = summary["best_checkpoint_step"]
    kept = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == sorted({best, 3})
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    accuracy = {r["step"]: r["accuracy"] for r in evals if r.get("split") == "eval"}
    assert sorted(accuracy) == [1, 2, 3]  # evaluated at every save, so each save has its own accuracy
    assert accuracy[best] == max(accuracy.values())
