"""Training checkpoints with an Orbax `CheckpointManager`.

Layout: `<dir>/checkpoints/<step>/{state, data}`:
  state  the train-state pytree {step, params, opt_state, rng} (each array saved from its own shards)
  data   the data iterator's state (JSON) so that resuming yields exactly the next examples.

Saves are asynchronous (training continues while arrays are written) and atomic: Orbax writes into a
temporary directory and renames it when complete, so a save interrupted by a crash or SIGKILL leaves the
previous checkpoint intact and is ignored on restore.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


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
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(encode(data_state)))
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
        return restored["state"], decode(restored["data"])

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def encode(data_state):
    """Iterator state -> JSON-able (grain's DataLoader iterators give bytes, dataset iterators dicts)."""
    if isinstance(data_state, bytes):
        return {"__bytes__": base64.b64encode(data_state).decode("ascii")}
    return {"state": data_state}


def decode(payload):
    if "__bytes__" in payload:
        return base64.b64decode(payload["__bytes__"])
    return payload["state"]
