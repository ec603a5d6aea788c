"""Device mesh, logical-axis rules and shardings for params and batches.

The model names every parameter and activation axis logically (see `aki_jax.layers`); this module maps
those names onto a mesh with three axes:

  data    pure data parallelism: params replicated, the batch split.
  fsdp    data parallelism with params (and optimizer state) split along "embed" (ZeRO-3 style).
  tensor  tensor (Megatron) parallelism: heads, MLP width and vocabulary split, batch not split.

Parallelism is chosen by mesh sizes alone, e.g. on 8 devices:
  {"data": -1}                        pure DP (8, 1, 1)
  {"data": 1, "fsdp": -1}             FSDP over 8
  {"data": 2, "fsdp": 2, "tensor": 2} all three
A size of -1 takes the devices left over. Rules can be overridden per config (`MeshConfig.rules`).

A dimension whose size is not divisible by the mesh axes its rule names stays replicated on that axis
(e.g. the 2-column added head under tensor=8), so every config shards without hand edits.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Every logical name used by the model -> mesh axes (None: replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("layers", None),  # the scan axis is never split: each step of the scan needs its whole layer
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
)

LOGICAL_NAMES = tuple(name for name, _ in DEFAULT_RULES)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (-1: the devices left over; at most one -1) and logical rules.

    `rules` overrides entries of `DEFAULT_RULES` by logical name, e.g. {"embed": None} turns FSDP off
    for params even on an fsdp axis; values are a mesh axis name, a list of names, or None.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: dict = dataclasses.field(default_factory=dict)


def resolve_mesh_shape(config: MeshConfig, device_count: int) -> tuple[int, int, int]:
    """Mesh sizes for (data, fsdp, tensor) with -1 resolved; errors name the field at fault."""
    sizes = [config.data, config.fsdp, config.tensor]
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}")
    for name, s in zip(MESH_AXES, sizes, strict=True):
        if s == 0 or s < -1:
            raise ValueError(f"mesh.{name} must be a positive size or -1, got {s}")
    known = math.prod(s for s in sizes if s != -1)
    if unknown:
        if device_count % known:
            raise ValueError(
                f"mesh: {device_count} devices are not divisible by the fixed axis sizes (product {known})"
            )
        sizes[unknown[0]] = device_count // known
    if math.prod(sizes) != device_count:
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
            f"but {device_count} are available"
        )
    return tuple(sizes)


def make_mesh(config: MeshConfig, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

    `jax.make_mesh` orders devices so that the innermost axis (tensor) uses the fastest links.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(config, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    except (ValueError, NotImplementedError):  # unusual device sets (e.g. a subset): plain reshape
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def logical_rules(config: MeshConfig | None = None) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """`DEFAULT_RULES` with `config.rules` overrides applied (unknown names are an error)."""
    overrides = dict(config.rules) if config is not None else {}
    unknown = set(overrides) - set(LOGICAL_NAMES)
    if unknown:
        raise ValueError(f"mesh.rules: unknown logical axis names {sorted(unknown)}; known: {list(LOGICAL_NAMES)}")
    rules = []
    for name, axes in DEFAULT_RULES:
        axes = overrides.get(name, axes)
        if isinstance(axes, list):
            axes = tuple(axes)
        for axis in axes if isinstance(axes, tuple) else (axes,):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"mesh.rules[{name!r}]: unknown mesh axis {axis!r}; known: {list(MESH_AXES)}")
        rules.append((name, axes))
    return tuple(rules)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(logical: PartitionSpec, shape: Sequence[int], mesh: Mesh, rules) -> PartitionSpec:
    """Mesh PartitionSpec for one array from its logical names; dims the mesh axes don't divide stay whole."""
    table = dict(rules)
    out, used = [], set()
    for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical)), strict=True):
        axes = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        flat = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        # A mesh axis may appear once per array, and only where it divides the dimension.
        flat = tuple(a for a in flat if a not in used and mesh.shape[a] > 1)
        if flat and dim % _axis_size(mesh, flat):
            log.info("dimension %d (%s) not divisible by mesh axes %s: kept replicated", dim, name, flat)
            flat = ()
        used.update(flat)
        out.append(None if not flat else flat[0] if len(flat) == 1 else flat)
    return PartitionSpec(*out)


def boxed_shardings(boxed, mesh: Mesh, rules):
    """(ShapeDtypeStruct tree, NamedSharding tree) of an abstract tree whose leaves may be logically boxed.

    Boxed leaves (`nn.LogicallyPartitioned`, e.g. params and optimizer moments derived from them) map
    through `logical_to_spec`; unboxed ones (step counters) are replicated.
    """
    shapes, logical = nn.unbox(boxed), nn.get_partition_spec(boxed)
    # The spec tree has PartitionSpec leaves where the shape tree has arrays.
    shardings = jax.tree.map(
        lambda spec, s: NamedSharding(mesh, logical_to_spec(spec, s.shape, mesh, rules)),
        logical,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    return shapes, shardings


def param_shardings(config, mesh: Mesh, rules):
    """(ShapeDtypeStruct tree, NamedSharding tree) of the AKI params for `config` (nothing allocated)."""
    from aki_jax.model import boxed_abstract_params  # the model does not import sharding; avoid a cycle anyway

    return boxed_shardings(boxed_abstract_params(config), mesh, rules)


def batch_spec(ndim: int, rules) -> PartitionSpec:
    """Batch arrays are split on their leading (batch) axis like activations ("act_batch")."""
    axes = dict(rules)["act_batch"]
    return PartitionSpec(axes, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(ndim, rules))


def batch_divisor(mesh: Mesh, rules) -> int:
    """The global batch must be a multiple of this (the product of the mesh axes the batch is split over)."""
    return _axis_size(mesh, dict(rules)["act_batch"])


def make_global_batch(local_batch: dict, mesh: Mesh, rules) -> dict:
    """Per-process numpy batch -> global jax arrays sharded over the batch axes.

    Each process passes the rows for its own devices (global batch / process count rows, in process
    order, as a per-process data shard yields them); on one process this is simply a device_put.
    """
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        sharding = batch_sharding(mesh, rules, value.ndim)
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


# How long a process waits for the others (seconds): at start-up and the first collectives; at the end.
BARRIER_TIMEOUT_ENV = "AKI_BARRIER_TIMEOUT_S"
DEFAULT_BARRIER_TIMEOUT_S = 600
FINISH_TIMEOUT_ENV = "AKI_FINISH_TIMEOUT_S"
DEFAULT_FINISH_TIMEOUT_S = 3600


def initialize_distributed(enabled: bool | None = None, **kwargs) -> None:
    """`jax.distributed.initialize()` for multi-host runs (auto-detected on TPU pods, SLURM, Open MPI).

    enabled=None initialises only when a cluster environment is detected, so single-host runs skip it.
    Without a cluster manager, set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES
    and JAX_PROCESS_ID on every process. Must run before any other JAX call. Each process waits for
    the others to connect for AKI_BARRIER_TIMEOUT_S (as at `sync_processes`; at least 5 minutes).
    """
    import os

    if enabled is None:
        markers = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")
        enabled = any(os.environ.get(m) for m in markers) and os.environ.get("TPU_WORKER_HOSTNAMES", "x") != "localhost"
    if enabled:
        # A manual launch (no cluster manager) names the process by environment, like the coordinator.
        for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
            if key not in kwargs and os.environ.get(env):
                kwargs[key] = _env_int(env)
        # A host may start late too; never below JAX's own 5 minutes (a short barrier timeout is for failing fast).
        wait = max(300, math.ceil(_timeout_s(BARRIER_TIMEOUT_ENV, DEFAULT_BARRIER_TIMEOUT_S)))
        kwargs.setdefault("initialization_timeout", wait)
        jax.distributed.initialize(**kwargs)
        log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def _coordination_client():
    """JAX's coordination-service client (None on one process, or before `jax.distributed.initialize`)."""
    from jax._src import distributed  # jax has no public barrier with a timeout

    return getattr(distributed.global_state, "client", None)


def _timeout_s(env: str, default: float) -> float:
    import os

    value = os.environ.get(env) or str(default)
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"environment variable {env}={value!r} must be a positive number of seconds")
    return seconds


def sync_processes(name: str, timeout_s: float | None = None) -> None:
    """Wait until every process reaches the barrier `name` (of JAX's coordination service).

    Why: the CPU collectives (gloo) open a communicator for each new set of devices at its first
    collective, and give the other processes a fixed 30 s to get there ("Gloo context initialization
    failed: DEADLINE_EXCEEDED: GetKeyValue() timed out"; jax has no setting for it). A host slower to
    build its data or to compile (a loaded machine; a persistent compilation cache, whose entries on CPU
    only process 0 writes and finds) arrives later than that. Meeting here first, with a long timeout, makes the
    collective start together; once open, a communicator waits for a late process for many minutes.

    `timeout_s` defaults to AKI_BARRIER_TIMEOUT_S, else 10 minutes. A process still missing then fails
    every process with a TimeoutError naming the barrier and the timeout (a late one fails on arrival); a
    process that died is noticed sooner by JAX's heartbeats (100 s): a ConnectionError naming the barrier,
    and JAX aborts the process. A no-op on one process (and when `jax.distributed` was not initialised).
    """
    client = _coordination_client()
    if client is None:
        return
    if timeout_s is None:
        timeout_s = _timeout_s(BARRIER_TIMEOUT_ENV, DEFAULT_BARRIER_TIMEOUT_S)
    try:
        client.wait_at_barrier(name, int(timeout_s * 1000))
    except jax.errors.JaxRuntimeError as e:
        if "DEADLINE_EXCEEDED" in str(e):
            raise TimeoutError(
                f"process {jax.process_index()}: not all {jax.process_count()} processes reached the barrier "
                f"{name!r} within {timeout_s:g} s; one is stuck or died (see its log), or raise the timeout "
                f"(AKI_BARRIER_TIMEOUT_S; AKI_FINISH_TIMEOUT_S for the final barrier)"
            ) from None
        # E.g. "Task 1 heartbeat timeout": JAX also ends this process then, from another thread.
        reason = str(e).split("\n", 1)[0].split(" [type.googleapis.com", 1)[0]
        raise ConnectionError(f"process {jax.process_index()}: the barrier {name!r} failed: {reason}") from None


def compile_together(jitted, *args, name: str):
    """`jitted` compiled for `args` on every process, returned once all have compiled it (`sync_processes`).

    For the first call of a program whose collectives are the first over some devices: compilation time
    differs between hosts (up to the whole compile when only one hits the compilation cache), and gloo
    would give the late one only 30 s (see `sync_processes`). Call the result with `args`; later calls
    of `jitted` with the same kind of arguments reuse this executable. On one process: `jitted` itself.
    """
    if _coordination_client() is None:
        return jitted
    compiled = jitted.lower(*args).compile()
    sync_processes(name)
    return compiled


def finish_distributed(name: str = "aki-finish", timeout_s: float | None = None) -> None:
    """End a multi-host run cleanly: wait until every process gets here, then shut `jax.distributed` down.

    Without this, JAX shuts down at interpreter exit, where a process that is done waits for the others
    in a shutdown barrier of fixed length (5 minutes) and aborts the whole job (SIGABRT, "Shutdown
    barrier has failed ... DEADLINE_EXCEEDED") when another host is slower: a loaded machine, a
    process writing plots or reports. Here a finished process waits at `sync_processes(name)`, for
    `timeout_s` (default AKI_FINISH_TIMEOUT_S, else an hour). Only then is the runtime shut down, with
    everyone present. A no-op on one process (and when `jax.distributed` was not initialised).
    """
    if _coordination_client() is None:
        return
    if timeout_s is None:
        timeout_s = _timeout_s(FINISH_TIMEOUT_ENV, DEFAULT_FINISH_TIMEOUT_S)
    log.info("process %d: finished; waiting for the other processes", jax.process_index())
    sync_processes(name, timeout_s)
    jax.distributed.shutdown()


def _env_int(name: str) -> int:
    import os

    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def activation_context(mesh: Mesh, rules):
    """Context under which the model's `constrain` calls take effect: the mesh plus the logical rules.

    Use around tracing (the first call of a jitted step): `with activation_context(mesh, rules): step(...)`.
    """
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(jax.sharding.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    return stack
