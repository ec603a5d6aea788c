"""The training program: build everything from a `TrainConfig`, run steps, evaluate, checkpoint, export.

`train(config)` is what `aki-train` / `python train.py` calls. It runs unchanged from one CPU to a multi-host
pod: the mesh comes from `config.mesh`, each process feeds its own rows (`make_global_batch`), and every
array is created directly in its sharded layout. `train(config, callbacks=[...])` calls each callback with a
`StepEnd` after every step (after its checkpoint, before the preemption check); the tests record example ids
and inject faults this way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from aki_jax import sharding
from aki_jax.training import flops as flops_lib
from aki_jax.training.checkpointing import Checkpointer, abstract_with_shardings
from aki_jax.training.config import PRETRAINED_SUBDIR, TrainConfig
from aki_jax.training.data import DataBundle, build_data
from aki_jax.training.host_memory import ENV as HOST_MEMORY_ENV
from aki_jax.training.host_memory import keep_freed_memory
from aki_jax.training.optimizer import learning_rate_schedule, make_optimizer
from aki_jax.training.question_types import accuracy_by_type
from aki_jax.training.reporting import Reporter, format_summary, plot_metrics
from aki_jax.training.state import count_params, init_state, split_trainable, state_shardings
from aki_jax.training.step import eval_step, make_train_step

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StepEnd:
    """What a `train` callback is given after each step.

    batch: this process's numpy rows of the step (input_ids int32[b, L], ...; b = rows per process).
    example_ids: the rows' example ids when the data carries them (synthetic data), else None.
    """

    step: int
    batch: dict
    example_ids: np.ndarray | None
    out_dir: Path


Callback = Callable[[StepEnd], None]


class _Preemption:
    """SIGTERM (a preemption notice) makes every process checkpoint after the same step and exit cleanly.

    One process: a Python handler sets a flag. Several: the notice may reach only some hosts, and a
    host saving alone would wait forever in the collective save. JAX's preemption service (started by
    `jax.distributed.initialize`) catches SIGTERM itself and `reached_preemption_sync_point` picks a step
    at which all processes stop; our handler must then stay out of its way. If that service is off, the
    flag is shared by an all-gather at every step.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._service = False

    def __enter__(self):
        self._service = jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)
        if not self._service:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if not self._service:
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)

    def should_stop(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        if self._service:
            return multihost_utils.reached_preemption_sync_point(step)
        flags = multihost_utils.process_allgather(np.asarray([self.requested]))
        return bool(np.asarray(flags).any())


def train(config: TrainConfig, data: DataBundle | None = None, callbacks: Sequence[Callback] = ()) -> dict:
    """Run the configured job; returns the summary dict (also printed and written to summary.json)."""
    job = build(config, data)
    outcome = run(job, callbacks)
    return finish(job, outcome)


@dataclasses.dataclass
class Job:
    """Everything `build` makes for `run` and `finish`: resolved config, mesh, state, step function, IO."""

    config: TrainConfig
    out_dir: Path
    data: DataBundle
    mesh: object
    rules: tuple
    abstract: dict  # the abstract train state (shapes only)
    state: dict
    start_step: int
    step_fn: Callable
    first_batch: dict  # taken from data.train to size the step; the first step uses it
    checkpointer: Checkpointer
    reporter: Reporter
    step_flops: float
    peak_flops: float | None
    n_trainable: int
    export: bool  # write the pretrained folder at the end (decided before any process could write it)


@dataclasses.dataclass
class Outcome:
    """What `run` leaves for `finish`."""

    state: dict
    step: int
    history: list  # the logged train metrics records
    eval_result: dict | None
    timer: dict
    baselines: dict | None = None  # held-out text-only / shuffled-image accuracies (digits question types)


def build(config: TrainConfig, data: DataBundle | None = None) -> Job:
    """Resolve the config, make the mesh, the data, the (restored or initial) state and the step function."""
    sharding.initialize_distributed()
    if jax.default_backend() == "cpu" and keep_freed_memory():
        log.info("host memory: freed buffers are kept for reuse (%s=0 turns this off)", HOST_MEMORY_ENV)
    # "{attention}" in checkpoint.dir keeps the MMA run and its causal ablation apart.
    config = dataclasses.replace(
        config,
        checkpoint=dataclasses.replace(config.checkpoint, dir=str(config.checkpoint.run_dir(config.model.attention))),
    )
    out_dir = Path(config.checkpoint.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = build_data(config) if data is None else data
    model_config = data.model_config
    config = dataclasses.replace(config, model=model_config)

    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config.mesh)
    divisor = sharding.batch_divisor(mesh, rules)
    if config.data.batch_size % (divisor * config.optim.grad_accum):
        raise ValueError(
            f"data.batch_size={config.data.batch_size} must be a multiple of the batch-sharded devices ({divisor}) "
            f"x optim.grad_accum ({config.optim.grad_accum})"
        )
    optimizer = make_optimizer(config.optim)
    schedule = learning_rate_schedule(config.optim)
    abstract, shardings = state_shardings(model_config, optimizer, mesh, rules, config.seed)

    # Orbax's CheckpointManager runs the first cross-process collective: meet first (building the data can
    # take one host much longer than another, and gloo's first collective waits only 30 s; see sync_processes).
    sharding.sync_processes("aki-train-setup")
    checkpointer = Checkpointer(
        out_dir, config.checkpoint.every_steps, config.checkpoint.keep, config.checkpoint.keep_best,
        config.checkpoint.async_save,
    )  # fmt: skip
    state, start_step = _initial_state(config, optimizer, abstract, shardings, checkpointer, data)
    if jax.process_index() == 0:
        config.to_json(out_dir / "config.json")

    total = config.optim.total_steps
    first = next(data.train)
    batch_shardings = {
        k: sharding.batch_sharding(mesh, rules, np.ndim(v)) for k, v in first.items() if k != "example_ids"
    }
    step_fn = make_train_step(model_config, optimizer, schedule, config.optim.grad_accum, shardings, batch_shardings)
    rows, length = config.data.batch_size, first["input_ids"].shape[1]
    images = first["pixel_values"].shape[1] if "pixel_values" in first else 0
    n_trainable = count_params(split_trainable(abstract["params"], model_config)[0])
    reporter = Reporter(out_dir, total, start_step, config.logging.progress_bar, config.logging.tensorboard)
    reporter.write(
        f"AKI {count_params(abstract['params']) / 1e6:.2f}M params ({n_trainable / 1e6:.2f}M trained), "
        f"mesh {dict(mesh.shape)}, batch {rows}x{length}, steps {start_step}->{total}, data: {data.description}"
    )
    return Job(
        config=config,
        out_dir=out_dir,
        data=data,
        mesh=mesh,
        rules=rules,
        abstract=abstract,
        state=state,
        start_step=start_step,
        step_fn=step_fn,
        first_batch=first,
        checkpointer=checkpointer,
        reporter=reporter,
        step_flops=flops_lib.train_step_flops(model_config, rows, length, images),
        peak_flops=_peak_flops(config),
        n_trainable=n_trainable,
        # Decided before any process could export, so that all processes agree (the export is collective).
        export=config.checkpoint.export_pretrained and not (out_dir / PRETRAINED_SUBDIR / "params").exists(),
    )


def run(job: Job, callbacks: Sequence[Callback] = ()) -> Outcome:
    """Train from `job.start_step` to the end (or a preemption): log, evaluate, checkpoint, call back."""
    config, data, mesh, rules = job.config, job.data, job.mesh, job.rules
    checkpointer, reporter = job.checkpointer, job.reporter
    total = config.optim.total_steps
    tokens_per_step = config.data.batch_size * job.first_batch["input_ids"].shape[1]
    data_pending = [job.first_batch]
    timer = {"start": time.perf_counter(), "steps": 0, "compile_s": None}
    history = []
    eval_result = baselines = None
    state, step = job.state, job.start_step
    with _Preemption() as preemption, sharding.activation_context(mesh, rules):
        while step < total:
            batch = data_pending.pop() if data_pending else next(data.train)
            example_ids = batch.pop("example_ids", None)
            global_batch = sharding.make_global_batch(batch, mesh, rules)
            t0 = time.perf_counter()
            step_fn = job.step_fn
            if timer["compile_s"] is None:  # every process compiles the first step, then they start it together
                step_fn = sharding.compile_together(step_fn, state, global_batch, name="aki-train-first-step")
            state, metrics = step_fn(state, global_batch)
            step += 1
            if timer["compile_s"] is None:
                jax.block_until_ready(metrics)
                timer.update(compile_s=time.perf_counter() - t0, start=time.perf_counter(), steps=0)
            else:
                timer["steps"] += 1
            if step % config.logging.every_steps == 0 or step == total:
                record = _metrics_record(metrics, timer, job.step_flops, tokens_per_step, job.peak_flops)
                history.append(record)
                reporter.log(step, record)
            reporter.advance()
            evaluated = None  # a checkpoint carries the accuracy of its own step, never an older one
            eval_due = config.eval.every_steps and step % config.eval.every_steps == 0
            if step < total and (eval_due or (config.checkpoint.keep_best and checkpointer.due(step))):
                evaluated = eval_result = evaluate(state["params"], data, config.model, mesh, rules)
                reporter.log(step, eval_result, split="eval")
            if step < total:  # the last step is saved after the final evaluation, with its accuracy
                checkpointer.maybe_save(step, state, data.train.get_state(), metrics=_ckpt_metrics(evaluated))
            for callback in callbacks:
                callback(StepEnd(step, batch, example_ids, job.out_dir))
            if step < total and preemption.should_stop(step):
                reporter.write(f"SIGTERM: saving checkpoint at step {step} before exiting")
                checkpointer.maybe_save(step, state, data.train.get_state(), force=True)
                break
        else:
            eval_result = evaluate(state["params"], data, config.model, mesh, rules)
            if data.question_types is not None:
                baselines = _baselines(state["params"], data, config.model, mesh, rules)
            reporter.log(step, eval_result, split="eval")
            checkpointer.maybe_save(step, state, data.train.get_state(), metrics=_ckpt_metrics(eval_result), force=True)
    return Outcome(state, step, history, eval_result, timer, baselines)


def finish(job: Job, outcome: Outcome) -> dict:
    """Wait for the checkpoints, close everything, export and plot a finished run, write the summary."""
    config, out_dir, checkpointer = job.config, job.out_dir, job.checkpointer
    checkpointer.wait()
    best_step = checkpointer.best_step()
    checkpointer.close()
    job.data.close()
    job.reporter.close()

    total, step = config.optim.total_steps, outcome.step
    summary = _summary(
        config, step, total, outcome.history, outcome.eval_result, outcome.timer, job.n_trainable, job.abstract
    )
    if best_step is not None:
        summary["best_checkpoint_step"] = best_step
    if outcome.baselines is not None:
        summary["baselines"] = outcome.baselines
    if step == total:
        if job.export:
            model_dir = out_dir.absolute() / PRETRAINED_SUBDIR
            summary["pretrained_dir"] = str(_export(model_dir, config.model, outcome.state["params"], job.data))
        if config.logging.plot and jax.process_index() == 0:
            summary["plot"] = str(plot_metrics(out_dir / "metrics.jsonl", out_dir / "training.png"))
    if jax.process_index() == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(format_summary(summary), flush=True)
    return summary


def _initial_state(config: TrainConfig, optimizer, abstract, shardings, checkpointer: Checkpointer, data):
    """(state, first step): restored from the latest checkpoint, or initialised (randomly / from --init-from)."""
    resumed = checkpointer.resume(abstract_with_shardings(abstract, shardings), config.resume)
    if resumed is not None:
        state, data_state, step = resumed
        data.train.set_state(data_state)
        log.info("resumed from step %d", step)
        return state, int(step)
    model_config = config.model
    if config.init_from:
        params = load_params(config.init_from, model_config, shardings["params"])
        init = jax.jit(lambda p: init_state(model_config, optimizer, config.seed, p), out_shardings=shardings)
        return init(params), 0
    init = jax.jit(lambda: init_state(model_config, optimizer, config.seed), out_shardings=shardings)
    return init(), 0


def load_params(directory: str, model_config, param_shardings):
    """Params of a pretrained folder (`aki_jax.load_pretrained`), checked against the model config."""
    from aki_jax.checkpoint import load_pretrained

    _, params, _ = load_pretrained(directory, sharding=param_shardings)
    expected = jax.tree.map(lambda s: s.shape, param_shardings_shapes(model_config))
    got = jax.tree.map(lambda x: x.shape, params)
    if expected != got:
        flat_expected = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
        flat_got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(got)}
        differ = [
            f"{k}: {flat_got.get(k, 'missing')} saved, {flat_expected.get(k, 'absent')} configured"
            for k in sorted(flat_expected.keys() | flat_got.keys())
            if flat_expected.get(k) != flat_got.get(k)
        ]
        raise ValueError(
            f"--init-from {directory}: its parameter shapes do not match the configured model "
            f"({len(differ)} differ, e.g. {'; '.join(differ[:3])}); use the folder's own model settings "
            f"(its aki_config.json)"
        )
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, param_shardings)


def param_shardings_shapes(model_config):
    from aki_jax.model import abstract_params

    return abstract_params(model_config)[0]


def evaluate(params, data: DataBundle, model_config, mesh, rules, make_eval=None) -> dict:
    """Held-out answer exact-match accuracy (teacher-forced argmax == greedy decoding) and token loss.

    Rows without supervised tokens (the padding rows of the last eval batch) are not counted. Each batch
    is reduced to replicated totals inside the jitted step, so every process gets the global figures.
    With `data.question_types`, "by_type" holds the accuracy per question type. `make_eval` replaces
    `data.make_eval` (e.g. the shuffled-image pass).
    """
    fn = _eval_fn(model_config, mesh)
    correct = loss_sum = count = n = 0
    rows_correct, rows_real = [], []
    for batch in (make_eval or data.make_eval)():
        inputs = {k: v for k, v in batch.items() if k != "example_ids"}
        totals = jax.device_get(fn(params, sharding.make_global_batch(inputs, mesh, rules)))
        correct += int(totals["correct"])
        loss_sum += float(totals["loss_sum"])
        count += float(totals["count"])
        n += int(totals["rows"])
        rows_correct.append(totals["row_correct"])
        rows_real.append(totals["row_real"])
    if n == 0:
        return {}
    result = {"accuracy": correct / n, "loss": loss_sum / max(count, 1.0), "examples": n}
    if data.question_types is not None:
        by_type = accuracy_by_type(rows_correct, rows_real, jax.process_count(), data.question_types.types_of_process)
        if by_type is not None:
            result["by_type"] = by_type
    return result


def _baselines(params, data: DataBundle, model_config, mesh, rules) -> dict:
    """The text-only and shuffled-image baselines ("all" and per question type) of `question_types`."""
    shuffled = evaluate(params, data, model_config, mesh, rules, make_eval=data.question_types.make_shuffled_eval)
    return {
        "text_only": data.question_types.text_only(),
        "shuffled_image": {"all": shuffled["accuracy"], **shuffled.get("by_type", {})} if shuffled else {},
    }


_EVAL_FNS = {}


def _eval_fn(model_config, mesh):
    key = (model_config, mesh)
    if key not in _EVAL_FNS:

        def totals(params, batch):
            ok, loss_sum, count = eval_step(params, batch, config=model_config)
            real = count > 0
            return {
                "correct": (ok & real).sum(), "loss_sum": loss_sum.sum(), "count": count.sum(), "rows": real.sum(),
                "row_correct": ok & real, "row_real": real,
            }  # fmt: skip

        _EVAL_FNS[key] = jax.jit(totals, out_shardings=NamedSharding(mesh, PartitionSpec()))
    return _EVAL_FNS[key]


def _metrics_record(metrics, timer, step_flops, tokens_per_step, peak) -> dict:
    record = {k: float(v) for k, v in jax.device_get(metrics).items()}
    elapsed = time.perf_counter() - timer["start"]
    if timer["steps"] > 0 and elapsed > 0:
        steps_per_s = timer["steps"] / elapsed
        record["steps_per_s"] = steps_per_s
        record["tokens_per_s"] = steps_per_s * tokens_per_step
        record["tflops_per_s"] = steps_per_s * step_flops / 1e12
        if peak:
            record["mfu"] = steps_per_s * step_flops / (peak * jax.device_count())
    return record


def _peak_flops(config: TrainConfig) -> float | None:
    if config.logging.peak_flops_per_device > 0:
        return config.logging.peak_flops_per_device
    peak = flops_lib.peak_flops_per_device(jax.devices()[0])
    if peak is None and jax.devices()[0].platform == "cpu":
        # The CPU "devices" share the machine: measured whole-machine rate split across them.
        peak = flops_lib.measure_matmul_peak(1024, "float32", 3) / jax.device_count()
    return peak


def _ckpt_metrics(eval_result):
    return {"eval_accuracy": eval_result["accuracy"]} if eval_result else None


def _summary(config, step, total, history, eval_result, timer, n_trainable, abstract) -> dict:
    last = history[-1] if history else {}
    summary = {
        "steps": step,
        "finished": step == total,
        "trainable_params": n_trainable,
        "total_params": count_params(abstract["params"]),
        "attention": config.model.attention,
        "final_train_loss": last.get("loss"),
        "final_train_token_accuracy": last.get("accuracy"),
        "tokens_per_s": last.get("tokens_per_s"),
        "mfu": last.get("mfu"),
        "compile_s": timer["compile_s"],
        "train_wall_s": time.perf_counter() - timer["start"],
        "checkpoint_dir": str(Path(config.checkpoint.dir) / "checkpoints"),
    }
    if eval_result:
        summary["heldout_accuracy"] = eval_result["accuracy"]
        summary["heldout_loss"] = eval_result["loss"]
        summary["heldout_examples"] = eval_result["examples"]
        if "by_type" in eval_result:
            summary["heldout_by_type"] = eval_result["by_type"]
    return summary


def _export(directory: Path, model_config, params, data: DataBundle) -> Path:
    from aki_jax.checkpoint import save_pretrained

    save_pretrained(directory, model_config, params, tokenizer_dir=data.tokenizer_dir)
    return directory
