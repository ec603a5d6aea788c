"""The streaming halves of conversion: `ParamsWriter` (leaves into an Orbax checkpoint, in a reused arena,
optionally saved in the background) and `SafetensorsFile` (tensors read as maps of their own bytes)."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest

from aki_jax.checkpoint import ParamsWriter, iter_leaves, params_metadata
from aki_jax.convert.mapping import ConversionError
from aki_jax.convert.safetensors_io import SafetensorsFile, write_safetensors

# (path, shape, dtype): leaves of mixed sizes (the 4 KB arena of the tests holds the small ones together,
# `big` not at all) and dtypes, some in the same subtree.
LEAVES = [
    (("a", "x"), (16, 16), np.float32),  # 1 KB
    (("a", "y"), (700,), ml_dtypes.bfloat16),
    (("big",), (40, 40), np.float32),  # 6.4 KB: larger than the arena
    (("b",), (3, 5, 7), np.float32),
    (("c", "z"), (30, 30), np.float16),
    (("c", "w"), (900,), np.float32),  # 3.6 KB: waits for everything else to be saved
    (("d",), (2, 3), ml_dtypes.bfloat16),
    (("e",), (500,), np.float32),
]


def expected_leaves() -> dict[tuple[str, ...], np.ndarray]:
    rng = np.random.default_rng(0)
    return {path: rng.standard_normal(shape).astype(dtype) for path, shape, dtype in LEAVES}


def restored(path) -> dict[tuple[str, ...], np.ndarray]:
    paths = sorted(params_metadata(path))
    return dict(iter_leaves(path, paths))


class WatchedWriter(ParamsWriter):
    """Records the memory of every batch while it is being saved, and checks that `allocate` never hands
    out any of it: a leaf built in memory that a save is still reading would corrupt the checkpoint."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.saving: dict[int, list[tuple[int, int]]] = {}
        self.arena_allocations = 0

    def _save(self, batch):
        spans = [(leaf.ctypes.data, leaf.ctypes.data + leaf.nbytes) for leaf in _leaves(batch)]
        self.saving[id(batch)] = spans
        try:
            super()._save(batch)
        finally:
            del self.saving[id(batch)]

    def allocate(self, shape, dtype):
        out = super().allocate(shape, dtype)
        begin, end = out.ctypes.data, out.ctypes.data + out.nbytes
        for spans in list(self.saving.values()):
            assert all(end <= b or e <= begin for b, e in spans), "allocated memory that is being saved"
        self.arena_allocations += out.base is not None
        return out


def _leaves(tree):
    for value in tree.values():
        yield from _leaves(value) if isinstance(value, dict) else [value]


@pytest.mark.parametrize(
    "overlap, arena_bytes", [(False, 0), (False, 4096), (True, 4096), (True, 0)], ids=["plain", "arena", "both", "bg"]
)
def test_written_leaves_restore_bit_for_bit(tmp_path, overlap, arena_bytes):
    want = expected_leaves()
    with WatchedWriter(tmp_path / "params", batch_bytes=1500, overlap=overlap, arena_bytes=arena_bytes) as writer:
        for path, value in want.items():
            leaf = writer.allocate(value.shape, value.dtype)
            leaf[...] = value
            writer.add(path, leaf)
            del leaf
    got = restored(tmp_path / "params")
    assert writer.bytes_written == sum(v.nbytes for v in want.values())
    assert got.keys() == want.keys()
    for path, value in want.items():
        assert got[path].dtype == value.dtype and got[path].tobytes() == value.tobytes(), path
    if arena_bytes:  # the arena was reused: it handed out more than it holds
        sizes = [v.nbytes for v in want.values() if v.nbytes <= arena_bytes]
        assert writer.arena_allocations == len(sizes) and sum(sizes) > arena_bytes


def test_a_failed_background_save_is_raised_and_nothing_is_finalized(tmp_path, monkeypatch):
    calls, real_save = [], ParamsWriter._save

    def failing_save(self, batch):
        calls.append(batch)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(self, batch)

    monkeypatch.setattr(ParamsWriter, "_save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        with ParamsWriter(tmp_path / "params", batch_bytes=1500, overlap=True, arena_bytes=4096) as writer:
            for path, value in expected_leaves().items():
                leaf = writer.allocate(value.shape, value.dtype)
                leaf[...] = value
                writer.add(path, leaf)
                del leaf
    assert len(calls) >= 2  # raised from the first allocate, add or block end that finds the failed save
    assert not (tmp_path / "params" / "commit_success.txt").exists()


def test_safetensors_tensors_are_read_only_maps_of_the_file(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {"w": rng.standard_normal((33, 17)).astype(ml_dtypes.bfloat16), "e": np.zeros((0, 4), np.float32)}
    tensors["v"] = rng.standard_normal(5000).astype(np.float32)
    path = tmp_path / "t.safetensors"
    write_safetensors(path, [(k, v.shape, v.dtype) for k, v in tensors.items()], tensors.items())
    f = SafetensorsFile(path)
    for name, value in tensors.items():
        got = f[name]
        assert got.shape == value.shape and got.dtype == value.dtype and got.tobytes() == value.tobytes()
    assert not f["w"].flags.writeable
    os.truncate(path, os.path.getsize(path) - 8)  # cut after the header was checked: the last tensor is short
    with pytest.raises(ConversionError, match=r"t\.safetensors: truncated while reading tensor 'v'"):
        f["v"]
    assert f["w"].tobytes() == tensors["w"].tobytes()
