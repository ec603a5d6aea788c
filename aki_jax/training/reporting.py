"""What a person watching a run sees: a progress bar, metrics JSONL, TensorBoard events, a plot, a summary.

Only process 0 writes. `metrics.jsonl` has one JSON object per logged step (train) or evaluation
(`"split": "eval"`); after a resume the steps redone since the last checkpoint appear again (the later
record is the one of the continued run).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax


class Reporter:
    def __init__(self, directory: str | Path, total_steps: int, start_step: int, progress_bar: bool, tensorboard: bool):
        self.directory = Path(directory)
        self.main = jax.process_index() == 0
        self.bar = None
        self.tb = None
        self.jsonl = None
        if not self.main:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self.jsonl = (self.directory / "metrics.jsonl").open("a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(self.directory / "tensorboard"))
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, smoothing=0.1)

    def log(self, step: int, metrics: dict, split: str = "train") -> None:
        if not self.main:
            return
        record = {"step": step, "split": split, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self.tb.add_scalar(f"{split}/{key}", value, step)
            self.tb.flush()
        if self.bar is not None and split == "train":
            shown = {"loss": f"{metrics['loss']:.4f}", "acc": f"{metrics['accuracy']:.3f}"}
            if "tokens_per_s" in metrics:
                shown["tok/s"] = f"{metrics['tokens_per_s']:.0f}"
            if metrics.get("mfu"):
                shown["mfu"] = f"{metrics['mfu']:.1%}"
            self.bar.set_postfix(shown, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def write(self, text: str) -> None:
        """Print without breaking the progress bar."""
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else str(value)
    return value


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl, keeping the last one per (split, step) (a resumed run supersedes)."""
    latest = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            latest[(record.get("split"), record["step"])] = record
    return sorted(latest.values(), key=lambda r: (r.get("split", ""), r["step"]))


def plot_metrics(metrics_path: str | Path, out_path: str | Path) -> Path:
    """PNG with training loss (left) and token / held-out accuracy (right) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="held-out loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_acc.plot([r["step"] for r in train], [r["accuracy"] for r in train], label="train token accuracy")
    if evals:
        ax_acc.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", label="held-out answer accuracy")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def format_summary(summary: dict) -> str:
    """The summary as aligned `key value` lines; the per-question-type figures as a small table after them."""
    lines = ["", "=== run summary ==="]
    for key, value in summary.items():
        if key in ("heldout_by_type", "baselines"):
            continue
        if isinstance(value, float):
            value = f"{value:.4g}"
        lines.append(f"  {key:<24} {value}")
    if "heldout_by_type" in summary:
        lines += ["", "held-out exact match by question type:", *format_by_type(summary)]
    return "\n".join(lines)


def format_by_type(summary: dict) -> list[str]:
    """Rows "model / text only / shuffled image" x columns "all" and each question type."""
    model = {"all": summary.get("heldout_accuracy"), **summary["heldout_by_type"]}
    rows = [(f"model ({summary.get('attention', '?')})", model)]
    for name, label in (("text_only", "text only"), ("shuffled_image", "shuffled image")):
        if name in summary.get("baselines", {}):
            rows.append((label, summary["baselines"][name]))
    columns = list(model)
    width = max(len(c) for c in columns) + 2
    out = ["  " + " " * 16 + "".join(f"{c:>{width}}" for c in columns)]
    for label, values in rows:
        cells = "".join(f"{values[c]:>{width}.3f}" if values.get(c) is not None else " " * width for c in columns)
        out.append(f"  {label:<16}{cells}")
    return out
