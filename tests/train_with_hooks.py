"""`aki-train` with the test hooks, for the tests that run training as real processes.

  python tests/train_with_hooks.py [--record-example-ids] [--kill-at-step N] [--sigterm-at-step N]
                                   [--slow-host S] [--hook-process P] AKI-TRAIN ARGUMENTS...

--record-example-ids  each step's example ids (or, for data without ids, a short hash of each row) are
                      appended to <checkpoint.dir>/example_ids.jsonl (example_ids.processP-of-N.jsonl with
                      several processes), one line {"step", "ids"} per step.
--kill-at-step N      SIGKILL this process after step N (no cleanup at all).
--sigterm-at-step N   send this process SIGTERM after step N (as a preemption notice would).
--slow-host S         sleep S seconds before building the data and again before the first step (a slow
                      host: its data and its compilation take that much longer than the others').
--hook-process P      the faults only in process P of a multi-process run (default: every process).

The hooks are `aki_jax.training.loop.train` callbacks (--slow-host wraps `loop.build_data` and `loop.run`),
so the product config carries no test switches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import time

import jax
import numpy as np

from aki_jax.cli.train import main


def example_ids_file() -> str:
    if jax.process_count() == 1:
        return "example_ids.jsonl"
    return f"example_ids.process{jax.process_index()}-of-{jax.process_count()}.jsonl"


def row_fingerprints(batch: dict) -> np.ndarray:
    """A short hash per row (identifies the examples of data that carries no ids)."""
    out = []
    for i in range(batch["input_ids"].shape[0]):
        digest = hashlib.sha1(np.ascontiguousarray(batch["input_ids"][i]).tobytes())
        if "pixel_values" in batch:
            digest.update(np.ascontiguousarray(batch["pixel_values"][i]).tobytes())
        out.append(digest.hexdigest()[:16])
    return np.asarray(out)


def record_example_ids(event) -> None:
    ids = event.example_ids if event.example_ids is not None else row_fingerprints(event.batch)
    with open(event.out_dir / example_ids_file(), "a") as f:
        f.write(json.dumps({"step": event.step, "ids": ids.tolist()}) + "\n")


def fault(kill_at_step: int, sigterm_at_step: int, process: int):
    def hook(event) -> None:
        if process not in (-1, jax.process_index()):
            return
        if event.step == kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if event.step == sigterm_at_step:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def slow_host(seconds: float, process: int) -> None:
    from aki_jax.training import loop

    def delayed(fn):
        def wrapper(*args, **kwargs):
            if process in (-1, jax.process_index()):
                time.sleep(seconds)
            return fn(*args, **kwargs)

        return wrapper

    loop.build_data = delayed(loop.build_data)
    loop.run = delayed(loop.run)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--record-example-ids", action="store_true")
    parser.add_argument("--kill-at-step", type=int, default=0)
    parser.add_argument("--sigterm-at-step", type=int, default=0)
    parser.add_argument("--slow-host", type=float, default=0)
    parser.add_argument("--hook-process", type=int, default=-1)
    hooks, rest = parser.parse_known_args()
    if hooks.slow_host:
        slow_host(hooks.slow_host, hooks.hook_process)
    callbacks = [record_example_ids] if hooks.record_example_ids else []
    callbacks.append(fault(hooks.kill_at_step, hooks.sigterm_at_step, hooks.hook_process))
    raise SystemExit(main(rest, callbacks=callbacks))
