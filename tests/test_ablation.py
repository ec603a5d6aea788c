"""The attention ablation: statistics, the report, skipping finished runs, and failures that stop nothing.

The end-to-end test runs the real command on the default config cut to a few steps: real training
subprocesses write real summaries, a second call skips them, a run that cannot start is reported.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from aki_jax.cli.ablation import main
from aki_jax.data.digits import QUESTION_TYPES
from aki_jax.training import ablation
from aki_jax.training.config import load_config_file
from aki_jax.training.question_types import accuracy_by_type

ROOT = Path(__file__).resolve().parents[1]


def test_paired_interval_is_the_student_t_interval():
    # t(0.975, 2 degrees of freedom) = 4.303 (any t table); differences 1, 2, 3 points: sd 1 point.
    out = ablation.paired_interval([0.01, 0.02, 0.03])
    half = 4.303 * 0.01 / math.sqrt(3)
    assert out["mean"] == pytest.approx(0.02)
    assert out["low"] == pytest.approx(0.02 - half, rel=1e-3) and out["high"] == pytest.approx(0.02 + half, rel=1e-3)
    one = ablation.paired_interval([0.05])
    assert one["mean"] == pytest.approx(0.05) and one["low"] is None and one["high"] is None


def _summary(accuracy, left, right):
    return {"finished": True, "heldout_accuracy": accuracy, "heldout_by_type": {"left": left, "right": right}}


def test_analysis_gives_mean_std_per_kind_and_type_and_paired_differences_over_common_seeds():
    values = {("mma", 0): (0.9, 0.95, 0.85), ("mma", 1): (0.8, 0.9, 0.7), ("mma", 2): (0.7, 0.6, 0.8),
              ("causal", 0): (0.6, 0.5, 0.7), ("causal", 1): (0.7, 0.8, 0.6)}  # fmt: skip
    runs = [ablation.Run(k, s, f"/x/{k}{s}", "done", summary=_summary(*v)) for (k, s), v in values.items()]
    runs.append(ablation.Run("causal", 2, "/x/causal2", "failed", error="boom"))
    result = ablation.analyse(runs)
    assert result["columns"] == ["all", "left", "right"]
    for kind, seeds in (("mma", (0, 1, 2)), ("causal", (0, 1))):
        for c, column in enumerate(result["columns"]):
            x = np.array([values[(kind, s)][c] for s in seeds])
            assert result["by_kind"][kind][column]["mean"] == pytest.approx(x.mean())
            assert result["by_kind"][kind][column]["std"] == pytest.approx(x.std(ddof=1))
    assert result["paired"]["seeds"] == [0, 1]  # seed 2 has no causal run
    diffs = [values[("mma", s)][1] - values[("causal", s)][1] for s in (0, 1)]
    assert result["paired"]["left"]["per_seed"] == pytest.approx(diffs)
    text = ablation.format_markdown(result, runs, _meta())
    assert "| mma (n=3) | 80.0 ± 10.0 |" in text
    assert "| causal 2 " not in text and "| causal | 2 | failed |" in text and "boom" in text


def _meta():
    return {"config": "c.py", "overrides": [], "seeds": [0, 1, 2], "command": "aki-ablation", "wall_s": 1.0,
            "load_at_start": None, "machine": ablation.machine()}  # fmt: skip


def test_run_all_skips_finished_runs_and_continues_after_a_failure(tmp_path):
    calls = []

    def runner(config, overrides, directory, timeout_s):
        calls.append(directory.name)
        if directory.name == "causal_seed0":
            return "exit code 1: it broke"
        directory.mkdir(parents=True)
        (directory / ablation.SUMMARY).write_text(json.dumps(_summary(0.5, 0.4, 0.6)))
        assert overrides[-4:] == ["model.attention=" + directory.name.split("_")[0], "seed=" + directory.name[-1],
                                  "data.seed=" + directory.name[-1], f"checkpoint.dir={directory}"]  # fmt: skip
        return None

    runs = ablation.run_all("c.py", ["steps=3"], [0, 1], tmp_path, runner=runner, log=lambda _: None)
    assert calls == ["mma_seed0", "causal_seed0", "mma_seed1", "causal_seed1"]
    assert [r.status for r in runs] == ["done", "failed", "done", "done"]
    calls.clear()
    again = ablation.run_all("c.py", ["steps=3"], [0, 1], tmp_path, runner=runner, log=lambda _: None)
    assert calls == ["causal_seed0"] and [r.status for r in again] == ["skipped", "failed", "skipped", "skipped"]


def test_accuracy_by_type_follows_each_processes_reading_order():
    # 2 processes, 2 local rows each, 5 records: process 0 reads 0, 2, 4; process 1 reads 1, 3.
    types = ["a", "b", "a", "b", "a"]

    def types_of_process(p, count):
        return [types[i] for i in range(p, len(types), count)]

    # global batch = [p0 row, p0 row, p1 row, p1 row]; batch 1 holds p0's record 4 and three padding rows.
    correct = [np.array([True, False, True, True]), np.array([True, False, False, False])]
    real = [np.array([True, True, True, True]), np.array([True, False, False, False])]
    # records: 0 ok (a), 2 wrong (a), 4 ok (a); 1 ok (b), 3 ok (b)
    assert accuracy_by_type(correct, real, 2, types_of_process) == {"a": pytest.approx(2 / 3), "b": 1.0}
    # a process with fewer real rows than records (a bad record skipped): rows cannot be matched
    assert accuracy_by_type(correct, [real[0], np.zeros(4, bool)], 2, types_of_process) is None


@pytest.mark.slow
def test_ablation_command_trains_reports_skips_finished_runs_and_survives_a_failed_one(tmp_path):
    out = tmp_path / "ablation"
    out.mkdir()
    (out / "causal_seed0").write_text("a file where the run's folder should be: this run must fail")
    few_steps = ["steps=3", "batch_size=8", "eval.batch_size=128", "optim.warmup_steps=1", "logging.plot=false",
                 "logging.tensorboard=false", "logging.progress_bar=false", "checkpoint.export_pretrained=false",
                 "eval.every_steps=0", "checkpoint.every_steps=0", "logging.peak_flops_per_device=1e12"]  # fmt: skip
    args = ["--seeds", "1", "--out", str(out), "--config", str(ROOT / "configs" / "tiny_digits.py"), *few_steps]
    assert main(args) == 1  # one run failed; the other ran and is reported
    record = json.loads((out / "ablation.json").read_text())
    assert [(r["attention"], r["status"]) for r in record["runs"]] == [("mma", "done"), ("causal", "failed")]
    mma = json.loads((out / "mma_seed0" / "summary.json").read_text())
    assert record["runs"][0]["heldout_accuracy"] == mma["heldout_accuracy"]
    task = load_config_file(ROOT / "configs" / "tiny_digits.py").data.digits_task
    assert set(mma["heldout_by_type"]) == set(QUESTION_TYPES[task]) and len(QUESTION_TYPES[task]) == 4
    assert set(mma["baselines"]) == {"text_only", "shuffled_image"}
    table = (out / "ablation.md").read_text()
    assert f"| mma (n=1) | {100 * mma['heldout_accuracy']:.1f} |" in table and "| causal | 0 | failed |" in table
    assert (out / "ablation.png").stat().st_size > 0

    (out / "causal_seed0").unlink()
    stamp = (out / "mma_seed0" / "summary.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "mma_seed0" / "summary.json").stat().st_mtime_ns == stamp  # skipped, not retrained
    record = json.loads((out / "ablation.json").read_text())
    assert [(r["attention"], r["status"]) for r in record["runs"]] == [("mma", "skipped"), ("causal", "done")]
    paired = record["analysis"]["paired"]["all"]
    causal = json.loads((out / "causal_seed0" / "summary.json").read_text())
    assert paired["mean"] == pytest.approx(mma["heldout_accuracy"] - causal["heldout_accuracy"])
    assert "mma - causal, paired" in (out / "ablation.md").read_text()
