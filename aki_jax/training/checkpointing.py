"""Training checkpoints with an Orbax `CheckpointManager`.

Layout: `<dir>/checkpoints/<step>/{state, data}`:
  state  the train-state pytree {step, params, opt_state, rng} (each array saved from its own shards)
  data   the data iterator's state of every process (JSON, {"processes": [state of process 0, ...]}), so
         that resuming yields exactly the next examples on every host.

Saves are asynchronous (training continues while arrays are written) and atomic: Orbax writes into a
temporary directory and renames it when complete, so a save interrupted by a crash or SIGKILL leaves the
previous checkpoint intact and is ignored on restore.

A checkpoint damaged later (a truncated or deleted file, a disk error) is skipped by `resume`: it falls
back to the newest one that restores, says which were skipped and why, and moves them aside to
`<dir>/damaged_checkpoints/` (so the resumed run can save those steps again).
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)
DAMAGED_DIR = "damaged_checkpoints"


class DamagedCheckpointError(ValueError):
    """No checkpoint of a run can be restored."""


class Checkpointer:
    """Save every `every_steps`; keep the last `keep`, plus (`keep_best`) the one with the best eval accuracy.

    The most recent checkpoints always stay, so `--resume` continues from the last save even when an
    earlier step scored better. A checkpoint's accuracy is the `metrics` given to its own `maybe_save`.
    """

    def __init__(self, directory: str | Path, every_steps: int, keep: int, keep_best: bool, async_save: bool):
        self.directory = Path(directory).absolute() / "checkpoints"
        self.every_steps = every_steps
        self.keep_best = keep_best
        accuracy = lambda metrics: metrics["eval_accuracy"]  # noqa: E731
        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        if keep_best:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=accuracy, reverse=False, n=1, keep_checkpoints_without_metrics=False
                )
            )
        # The save interval is decided here (`maybe_save`), not by Orbax's policy (which also saves the first step).
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=accuracy if keep_best else None,  # records each save's metrics, for `best_step`
            best_mode="max",
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether `maybe_save(step, ...)` will save (without `force`)."""
        return self.every_steps > 0 and step % self.every_steps == 0 and step not in self.manager.all_steps()

    def best_step(self) -> int | None:
        return self.manager.best_step() if self.keep_best else None

    def maybe_save(self, step: int, state, data_state, metrics=None, force: bool = False) -> bool:
        """Save if `step` is on the interval (or `force`); returns whether a save started."""
        if not (force or self.due(step)) or step in self.manager.all_steps():
            return False
        # Orbax writes JSON from the primary process only: every process's iterator state goes through it.
        data_states = {"processes": gather_from_processes(encode(data_state))}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_states))
        saved = self.manager.save(step, args=args, metrics=metrics, force=True)
        if saved:
            log.info("checkpoint %d: saving to %s", step, self.directory)
        return saved

    def restore(self, abstract_state, step: int | None = None):
        """(state, data iterator state) of `step` (default: latest), arrays placed as `abstract_state` says."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {self.directory}")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return restored["state"], decode(own_process_state(restored["data"], self.directory / str(step) / "data"))

    def resume(self, abstract_state, resume: bool):
        """Where a run starts: (state, data iterator state, step) of the newest restorable checkpoint, or None.

        resume=False with checkpoints present is refused (a new run would mix with the old one's saves);
        resume=True with none says so and returns None (the run starts from step 0: the same command
        can be used for the first start and for every restart of a preemptible job).
        """
        latest = self.manager.latest_step()
        if latest is not None and not resume:
            raise FileExistsError(
                f"{self.directory} already holds checkpoints (latest step {latest}); pass --resume to continue "
                f"or choose another checkpoint.dir"
            )
        if not resume:
            return None
        if latest is None:
            log.warning("--resume: no checkpoint in %s, so this run starts from step 0", self.directory)
            return None
        return self.restore_newest(abstract_state)

    def restore_newest(self, abstract_state):
        """(state, data iterator state, step) of the newest checkpoint that restores on every process.

        Damaged ones are logged with the reason, moved aside to `<dir>/damaged_checkpoints/` and skipped;
        DamagedCheckpointError (naming the folder and each reason) when none restores.
        """
        skipped = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data_state = self.restore(abstract_state, step)
                error = ""
            except Exception as e:  # Orbax / TensorStore raise many types for missing or damaged files
                error = _first_line(e)
            errors = gather_from_processes(error)  # every process must restore the same step
            if not any(errors):
                break
            reason = next(e for e in errors if e)
            skipped.append((step, reason))
            log.warning("checkpoint %d in %s cannot be restored, skipping it: %s", step, self.directory, reason)
        else:
            if not skipped:
                raise FileNotFoundError(f"no checkpoint to resume from in {self.directory}")
            reasons = "; ".join(f"step {s}: {r}" for s, r in skipped)
            raise DamagedCheckpointError(
                f"{self.directory}: no checkpoint can be restored ({reasons}); start a new run in another "
                f"checkpoint.dir (or --init-from an exported model)"
            )
        if skipped:
            self._set_aside([s for s, _ in skipped])
            log.warning("resuming from checkpoint %d (skipped damaged: %s)", step, [s for s, _ in skipped])
        return state, data_state, step

    def _set_aside(self, steps: list[int]) -> None:
        """Move damaged step folders out of Orbax's sight (kept for inspection); then every process reloads."""
        if jax.process_index() == 0:
            aside = self.directory.parent / DAMAGED_DIR
            aside.mkdir(exist_ok=True)
            for step in steps:
                target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                shutil.move(str(self.directory / str(step)), target)
                log.warning("moved damaged checkpoint %d to %s", step, target)
        gather_from_processes(0)  # a barrier: no process reloads before the move
        self.manager.reload()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def abstract_with_shardings(abstract_state, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def gather_from_processes(payload) -> list:
    """[payload of process 0, payload of process 1, ...] on every process (a collective when several)."""
    if jax.process_count() == 1:
        return [payload]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(payload).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int64))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: raw.size] = raw
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(gathered[p, : lengths[p]].tobytes()) for p in range(len(lengths))]


def own_process_state(saved: dict, where: Path):
    """This process's entry of a saved {"processes": [...]} (a state saved before that format: as is)."""
    if "processes" not in saved:
        return saved
    states = saved["processes"]
    if len(states) != jax.process_count():
        raise ValueError(
            f"{where}: the data iterator state was saved by {len(states)} processes but this run has "
            f"{jax.process_count()}; each process's position in its own data shard cannot be carried over. "
            f"Resume with {len(states)} processes, or start a new run with --init-from an exported model"
        )
    return states[jax.process_index()]


def encode(data_state):
    """Iterator state -> JSON-able (grain's DataLoader iterators give bytes, dataset iterators dicts)."""
    if isinstance(data_state, bytes):
        return {"__bytes__": base64.b64encode(data_state).decode("ascii")}
    return {"state": data_state}


def decode(payload):
    if "__bytes__" in payload:
        return base64.b64decode(payload["__bytes__"])
    return payload["state"]
