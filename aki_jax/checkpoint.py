"""The "pretrained folder": an aki-jax model on disk, and how to read it back.

Layout (written by `save_pretrained` or by `tools/convert_pytorch_to_orbax.py`):

    dir/aki_config.json      AKIConfig JSON
    dir/params/              Orbax checkpoint of the param tree (orbax-checkpoint v1 layout: a plain
                             `ocp.v1.load(dir / "params")` restores it; v0 `PyTreeCheckpointer().restore(
                             dir / "params" / "state")` does too)
    dir/tokenizer.json ...   tokenizer files, when there is a tokenizer
    dir/config.json          (converted checkpoints only) the original model's constructor arguments,
                             kept so that an export reproduces them

`load_pretrained(dir, dtype=None, sharding=None)` -> (AKI model, params, tokenizer or None). `dtype` casts
every parameter on restore (and sets `config.param_dtype`); `sharding` places them: one
`jax.sharding.Sharding` for all leaves, a pytree of shardings shaped like the params, or a callable
`(path: tuple[str, ...], jax.ShapeDtypeStruct) -> Sharding`. Each process reads only what its shards need.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aki_jax.config import AKIConfig

CONFIG_FILE = "aki_config.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.json",
    "chat_template.jinja",
)


def _ocp():
    import orbax.checkpoint.experimental.v1 as ocp

    return ocp


def _context(compress: bool):
    ctx = _ocp().Context()
    ctx.array.saving.use_compression = compress
    # Saves here block until written and nothing mutates the arrays meanwhile: skip orbax's defensive
    # copy of host arrays, which would double the memory of every batch.
    ctx.memory.deepcopy_host_arrays = False
    # A leaf larger than OCDBT's target data-file size (2 GB by default) is copied while it is split
    # across files (measured: a 3.2 GB leaf peaked at 6.5 GB); a large target keeps it zero-copy.
    ctx.array.saving.ocdbt_target_data_file_size = 64 << 30
    return ctx


def copy_tokenizer_files(src: str | Path | None, dst: str | Path) -> list[str]:
    """Copy the tokenizer files found in `src` into `dst`; returns their names."""
    if src is None:
        return []
    src, copied = Path(src), []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, Path(dst) / name)
            copied.append(name)
    return copied


def save_pretrained(
    directory: str | Path, config: AKIConfig, params, tokenizer_dir: str | Path | None = None, compress: bool = True
) -> Path:
    """Write config, params (Orbax) and tokenizer files to `directory` (created; must not hold params yet)."""
    directory = Path(directory).absolute()  # Orbax requires absolute paths
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / PARAMS_DIR).exists():
        raise FileExistsError(f"{directory / PARAMS_DIR} already exists")
    with _context(compress):
        _ocp().save_pytree(directory / PARAMS_DIR, params)  # collective: every process writes its shards
    if jax.process_index() == 0:
        config.to_json(directory / CONFIG_FILE)
        copy_tokenizer_files(tokenizer_dir, directory)
    return directory


def write_params_streaming(
    path: str | Path,
    leaves: Iterable[tuple[tuple[str, ...], np.ndarray]],
    compress: bool = False,
    batch_bytes: int = 256 << 20,
) -> int:
    """Write an Orbax param checkpoint from (path tuple, leaf) pairs without holding them all.

    Leaves are gathered until `batch_bytes` and written as one orbax partial save, then released, so
    peak memory is about `batch_bytes` plus the largest leaf. `ocp.v1.partial.finalize` then makes it an
    ordinary checkpoint (`ocp.v1.load` restores it). Returns the bytes of array data written.
    """
    with ParamsWriter(path, compress, batch_bytes) as writer:
        for path_tuple, leaf in leaves:
            writer.add(path_tuple, leaf)
            del leaf
    return writer.bytes_written


class ParamsWriter:
    """An Orbax param checkpoint written leaf by leaf, never holding all of them:

        with ParamsWriter(folder / "params", overlap=True, arena_bytes=n) as writer:
            for path, leaf in iter_params(state, config, dtype, allocate=writer.allocate):
                writer.add(path, leaf)
                del leaf  # so that the writer can reuse its memory once it is saved
        writer.bytes_written

    `add` gathers leaves into batches of `batch_bytes`, each saved as one orbax partial save; leaving the block
    finalizes them into an ordinary checkpoint (`ocp.v1.load` restores it).

    `allocate(shape, dtype)` gives the array to build the next leaf in, carved from one block of `arena_bytes`
    that is reused once the leaves in it are saved: fresh memory costs more than filling it (the kernel zeroes
    every page on first touch; measured ~2x the transposes that fill a leaf). It waits until the new leaf fits
    beside the leaves not yet saved, saving the gathered batch early if only that stands in the way. A leaf
    larger than the block is allocated on its own once everything before it is saved.

    `overlap=True` saves each batch on a background thread while the caller builds the next leaves in the
    arena, and skips tensorstore's fsync after every write (it would keep each batch's memory, and the caller,
    waiting until the bytes reach the disk); leaving the block fsyncs every file once instead, so the checkpoint
    is as durable. Without an arena nothing can be built beside a save, so nothing overlaps.

    Peak memory: `arena_bytes`, or `batch_bytes` plus the largest leaf where that is more. The saved values do
    not depend on `overlap` or `arena_bytes` (only how the leaves are grouped into partial saves does).
    """

    ALIGN = 64  # leaves start on cache-line boundaries in the arena

    def __init__(
        self,
        path: str | Path,
        compress: bool = False,
        batch_bytes: int = 256 << 20,
        overlap: bool = False,
        arena_bytes: int = 0,
    ):
        self.path = Path(path)
        self.compress = compress
        self.batch_bytes = batch_bytes
        self.overlap = overlap
        self.arena_bytes = arena_bytes
        self.bytes_written = 0
        self._arena: np.ndarray | None = None
        self._live: dict[int, int] = {}  # arena offset -> end of each leaf allocated there and not yet saved
        self._batch: dict[str, Any] = {}
        self._batch_offsets: list[int] = []
        self._pending = 0
        self._saving: collections.deque = collections.deque()  # (future, arena offsets) per batch being saved
        self._pool = None
        self._fsync_off = contextlib.ExitStack()

    def __enter__(self) -> ParamsWriter:
        if self.overlap:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="params-writer")
            self._fsync_off.enter_context(_tensorstore_without_fsync())
        return self

    def allocate(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised array for the next leaf: in the arena once it fits there, else on its own."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0 or nbytes > self.arena_bytes:
            self._drain()
            return np.empty(shape, dtype)
        if self._arena is None:
            self._arena = np.empty(self.arena_bytes, np.uint8)
        while (offset := self._fit(nbytes)) is None:
            if self._saving:
                self._wait_oldest()
            elif self._batch:
                self._submit()
            else:  # only leaves allocated but never added are left: a caller error
                raise RuntimeError(f"ParamsWriter.allocate: {nbytes} bytes do not fit beside leaves never added")
        self._live[offset] = offset + nbytes
        return self._arena[offset : offset + nbytes].view(dtype).reshape(shape)

    def add(self, path_tuple: tuple[str, ...], leaf: np.ndarray) -> None:
        node = self._batch
        for key in path_tuple[:-1]:
            node = node.setdefault(key, {})
        node[path_tuple[-1]] = leaf
        if self._arena is not None:
            offset = leaf.ctypes.data - self._arena.ctypes.data
            if offset in self._live:
                self._batch_offsets.append(offset)
        self._pending += leaf.nbytes
        self.bytes_written += leaf.nbytes
        del node, leaf
        while self._saving and self._saving[0][0].done():  # free finished batches, raise their errors now
            self._wait_oldest()
        if self._pending >= self.batch_bytes:
            self._submit()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._drain()
                with _context(self.compress):
                    _ocp().partial.finalize(self.path)
                if self.overlap:
                    _fsync_tree(self.path)
        finally:
            for future, _ in self._saving:  # after an error: let running saves end before the caller cleans up
                future.exception()
            self._saving.clear()
            if self._pool is not None:
                self._pool.shutdown()
            self._fsync_off.close()
            self._arena = None

    def _fit(self, nbytes: int) -> int | None:
        """The lowest aligned arena offset with `nbytes` free, or None."""
        start = 0
        for begin, end in sorted(self._live.items()):
            if begin - start >= nbytes:
                return start
            start = max(start, -(-end // self.ALIGN) * self.ALIGN)
        return start if self.arena_bytes - start >= nbytes else None

    def _submit(self) -> None:
        batch, offsets = self._batch, self._batch_offsets
        self._batch, self._batch_offsets, self._pending = {}, [], 0
        if self._pool is None:
            self._save(batch)
            self._free(offsets)
        else:
            self._saving.append((self._pool.submit(self._save, batch), offsets))

    def _save(self, batch: dict) -> None:
        with _context(self.compress):  # orbax contexts are per thread
            _ocp().partial.save(self.path, batch)

    def _wait_oldest(self) -> None:
        future, offsets = self._saving.popleft()
        future.result()
        self._free(offsets)

    def _drain(self) -> None:
        if self._batch:
            self._submit()
        while self._saving:
            self._wait_oldest()

    def _free(self, offsets: list[int]) -> None:
        for offset in offsets:
            del self._live[offset]


@contextlib.contextmanager
def _tensorstore_without_fsync():
    """Orbax opens its tensorstores with `file_io_sync` on (an fsync after every write) and has no option for
    it; its default tensorstore contexts are switched here. If a later orbax moves them, saves simply fsync
    as before (slower, same files)."""
    try:
        from orbax.checkpoint._src.serialization import tensorstore_utils

        contexts = [tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT, tensorstore_utils._BASE_TS_CONTEXT]
    except (ImportError, AttributeError):
        contexts = []
    before = [context.get("file_io_sync") for context in contexts]
    for context in contexts:
        context["file_io_sync"] = False
    try:
        yield
    finally:
        for context, value in zip(contexts, before, strict=True):
            if value is None:
                context.pop("file_io_sync", None)
            else:
                context["file_io_sync"] = value


def _fsync_tree(path: Path) -> None:
    """fsync every file below `path`, then every folder (so that their entries are durable too)."""
    for root, _, files in os.walk(path, topdown=False):
        for name in [*files, "."]:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def params_metadata(path: str | Path) -> dict:
    """{path tuple: (shape, dtype)} of every leaf saved in an Orbax param checkpoint; nothing is read."""
    meta = _ocp().pytree_metadata(path).metadata
    return {
        tuple(k.key for k in p): (tuple(m.shape), np.dtype(m.dtype))
        for p, m in jax.tree_util.tree_leaves_with_path(meta)
    }


def iter_leaves(
    path: str | Path, leaf_paths: list[tuple[str, ...]], batch_bytes: int = 256 << 20
) -> Iterable[tuple[tuple[str, ...], np.ndarray]]:
    """Leaves of an Orbax param checkpoint as host numpy arrays, in `leaf_paths` order.

    Consecutive leaves are restored together up to `batch_bytes` (the rest of the tree is skipped with
    orbax PLACEHOLDERs), so memory stays about `batch_bytes` plus the largest leaf.
    """
    ocp = _ocp()
    meta = ocp.pytree_metadata(path).metadata
    sizes = {
        tuple(k.key for k in p): int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize
        for p, m in jax.tree_util.tree_leaves_with_path(meta)
    }
    groups, group, pending = [], [], 0
    for leaf_path in leaf_paths:
        group.append(tuple(leaf_path))
        pending += sizes[tuple(leaf_path)]
        if pending >= batch_bytes:
            groups.append(group)
            group, pending = [], 0
    if group:
        groups.append(group)
    for group in groups:
        wanted = set(group)
        abstract = jax.tree_util.tree_map_with_path(
            lambda p, m, wanted=wanted: m if tuple(k.key for k in p) in wanted else ocp.PLACEHOLDER, meta
        )
        tree = ocp.load(path, abstract)
        for leaf_path in group:
            node = tree
            for key in leaf_path:
                node = node[key]
            yield leaf_path, np.asarray(node)
        del tree, node


def _resolve_sharding(sharding, abstract):
    """Per-leaf shardings for `abstract` (a ShapeDtypeStruct tree) from the user's `sharding` argument."""
    if sharding is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, abstract)
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda _: sharding, abstract)
    if callable(sharding):
        return jax.tree_util.tree_map_with_path(lambda p, s: sharding(tuple(k.key for k in p), s), abstract)
    return sharding  # a pytree of shardings shaped like the params


def load_params(path: str | Path, config: AKIConfig, dtype=None, sharding=None):
    """Restore the param tree at `path`, checked against `config`'s shapes, cast to `dtype`, placed by `sharding`."""
    from aki_jax.model import abstract_params

    try:
        saved = params_metadata(path)
    except Exception as e:  # Orbax / TensorStore raise many types for a missing or damaged checkpoint
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ValueError(
            f"{path}: cannot read the parameters, the checkpoint is damaged or incomplete "
            f"({type(e).__name__}: {lines[0][:200] if lines else ''})"
        ) from e
    expected, _ = abstract_params(config)
    problems = []
    for p, leaf in jax.tree_util.tree_leaves_with_path(expected):
        key = tuple(k.key for k in p)
        if key not in saved:
            problems.append(f"{'/'.join(key)} missing (expected {tuple(leaf.shape)})")
        elif saved[key][0] != tuple(leaf.shape):
            problems.append(f"{'/'.join(key)}: shape {saved[key][0]} in the checkpoint, config expects {leaf.shape}")
    extra = set(saved) - {tuple(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(expected)}
    problems += [f"{'/'.join(k)}: not a parameter of this config" for k in sorted(extra)]
    if problems:
        raise ValueError(f"{path}: params do not match the config: " + "; ".join(problems))
    abstract = jax.tree_util.tree_map_with_path(
        lambda p, leaf: jax.ShapeDtypeStruct(
            leaf.shape, jnp.dtype(dtype) if dtype is not None else saved[tuple(k.key for k in p)][1]
        ),
        expected,
    )
    shardings = _resolve_sharding(sharding, abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return _ocp().load(path, abstract)


def check_pretrained_folder(directory: str | Path, what: str = "") -> Path:
    """`directory` as an absolute Path if it looks like a pretrained folder; else FileNotFoundError saying why.

    `what` names where the path came from (e.g. "--init-from"), so that the message points at the flag.
    Only the layout is checked (nothing is read): a damaged checkpoint fails later, when it is loaded.
    """
    prefix = f"{what} {directory}" if what else str(directory)
    path = Path(directory).absolute()  # Orbax requires absolute paths
    if not path.exists():
        raise FileNotFoundError(f"{prefix}: no such folder (expected a pretrained folder with {CONFIG_FILE})")
    if not path.is_dir():
        raise FileNotFoundError(f"{prefix}: is a file, not a pretrained folder (with {CONFIG_FILE} and {PARAMS_DIR}/)")
    missing = [name for name in (CONFIG_FILE, PARAMS_DIR) if not (path / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"{prefix}: no {' and no '.join(missing)}; not an aki-jax pretrained folder "
            f"(write one with save_pretrained, aki-convert or a finished aki-train run's <dir>/model)"
        )
    return path


def load_pretrained(
    directory: str | Path, dtype=None, sharding: Any | Callable | None = None, compute_dtype=None
) -> tuple[Any, Any, Any]:
    """(AKI model, params, tokenizer or None) from a pretrained folder.

    dtype: parameter dtype after restore (e.g. "bfloat16"); also becomes `config.param_dtype`.
    compute_dtype: optional new `config.dtype` (activations).
    sharding: see the module docstring.
    """
    from aki_jax.model import AKI

    directory = check_pretrained_folder(directory)
    try:
        config = AKIConfig.from_json(directory / CONFIG_FILE)
    except (ValueError, TypeError, KeyError) as e:  # JSON syntax (already names the file), unknown fields, bad values
        where = str(directory / CONFIG_FILE)
        raise ValueError(str(e) if where in str(e) else f"{where}: not a valid aki-jax config ({e})") from e
    changes = {}
    if dtype is not None:
        changes["param_dtype"] = jnp.dtype(dtype).name
    if compute_dtype is not None:
        changes["dtype"] = jnp.dtype(compute_dtype).name
    if changes:
        config = config.replace(**changes)
    params = load_params(directory / PARAMS_DIR, config, dtype, sharding)
    tokenizer = None
    if (directory / "tokenizer.json").is_file() or (directory / "tokenizer.model").is_file():
        from aki_jax.processing.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(directory)
    return AKI(config), params, tokenizer
