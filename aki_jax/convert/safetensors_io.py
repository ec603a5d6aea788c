"""Streaming safetensors: read one tensor at a time, write one tensor at a time, validate everything.

The format: 8-byte little-endian header length n, n bytes of JSON {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}, then the raw little-endian data. Each tensor read
is a read-only array over its own memory map of just its bytes, unmapped when the array is freed: the page
cache's pages are mapped rather than copied (a read costs no memcpy; a writable map would copy every page on
populate), and pages of tensors already converted do not stay in this process's resident set. bfloat16 is read
and written through `ml_dtypes.bfloat16` (numpy has no native bfloat16).

Why not the `safetensors` package (it is only in the `convert` / `test` extras): its writer takes all
tensors at once (no streaming, so an 8.6 GB export would need a second full copy in memory), and its
reader `safe_open` memory-maps the file, so every tensor already converted keeps its pages mapped in this
process until the file is closed; on a 24 GB machine converting a 17 GB float32 checkpoint that is the
difference that matters. The checks it makes on open (header size, entry sizes, truncation) are made here.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from aki_jax.convert.mapping import ConversionError

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


class SafetensorsFile(Mapping):
    """A lazy {name: np.ndarray} view of one .safetensors file; the header is validated on open.

    Raises ConversionError for a truncated or corrupt file (naming the file and what is wrong).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise ConversionError(
                    f"{self.path}: corrupt or truncated safetensors header (claims {n} header bytes, file has {size})"
                )
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{self.path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise ConversionError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        data_size = size - self._data_start
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise ConversionError(f"{self.path}: corrupt header entry for tensor {name!r}: {info!r}") from e
            if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
                raise ConversionError(
                    f"{self.path}: tensor {name!r} has {end - begin} data bytes for shape {shape} of "
                    f"{info['dtype']} (corrupt header)"
                )
            if end > data_size:
                raise ConversionError(
                    f"{self.path}: truncated file: tensor {name!r} ends at byte {self._data_start + end}, "
                    f"the file has {size} bytes"
                )
            self._entries[name] = (dtype, shape, begin, end)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def path_of(self, name: str) -> Path:
        return self.path

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[name]
        if end == begin:
            return np.empty(shape, dtype)
        start = self._data_start + begin
        aligned = start - start % mmap.ALLOCATIONGRANULARITY  # a map's offset must be page aligned
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size < self._data_start + end:  # mapped pages past the end would raise SIGBUS
                raise ConversionError(f"{self.path}: truncated while reading tensor {name!r}")
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # populate: fault every page in at once
            mapped = mmap.mmap(fd, self._data_start + end - aligned, flags, mmap.PROT_READ, offset=aligned)
        finally:
            os.close(fd)
        return np.frombuffer(mapped, dtype, math.prod(shape), start - aligned).reshape(shape)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)

    def __contains__(self, name):
        return name in self._entries


class ShardedSafetensors(Mapping):
    """Several .safetensors shards behind a `model.safetensors.index.json` ({"weight_map": {name: file}})."""

    def __init__(self, index_path: str | Path):
        index_path = Path(index_path)
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{index_path}: not a valid safetensors index ({e})") from e
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        for name, file in weight_map.items():
            if file not in self._files:
                shard = index_path.parent / file
                if not shard.exists():
                    raise ConversionError(f"{index_path}: shard {file} (holding {name!r}) does not exist")
                self._files[file] = SafetensorsFile(shard)
            if name not in self._files[file]:
                raise ConversionError(f"{index_path}: tensor {name!r} is not in its shard {file}")
            self._where[name] = self._files[file]

    def __getitem__(self, name):
        return self._where[name][name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].dtype(name)

    def path_of(self, name: str) -> Path:
        """The shard holding `name`."""
        return self._where[name].path

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)

    def __contains__(self, name):
        return name in self._where


def write_safetensors(
    path: str | Path,
    specs: list[tuple[str, tuple[int, ...], np.dtype]],
    tensors: Iterable[tuple[str, np.ndarray]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write tensors as they come; `specs` (name, shape, dtype) fixes the header up front.

    `tensors` must yield exactly the names of `specs`, in the same order, with matching shapes and
    dtypes. Returns the number of bytes written.
    """
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in specs:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as the reference writer does
    expected = iter(specs)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, array in tensors:
            want_name, want_shape, want_dtype = next(expected, (None, None, None))
            if name != want_name or tuple(array.shape) != tuple(want_shape) or array.dtype != np.dtype(want_dtype):
                raise ConversionError(
                    f"{path}: tensor {name!r} {tuple(array.shape)} {array.dtype} does not match the header's "
                    f"next entry {want_name!r} {want_shape} {want_dtype}"
                )
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        leftover = next(expected, None)
        if leftover is not None:
            raise ConversionError(f"{path}: tensor {leftover[0]!r} was announced in the header but never written")
    return 8 + len(raw) + offset
