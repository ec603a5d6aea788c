"""keep_freed_memory: a freed large buffer is reused without faulting its pages in again (glibc, Linux)."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = r"""
import ctypes, json, resource, sys
from aki_jax.training.host_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20  # 65536 pages of 4 KiB
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc",
    reason="keep_freed_memory tunes glibc's malloc; with another C library (musl, macOS) it does nothing by design",
)


def _probe(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, timeout=300)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _thp_always() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[always]" in path.read_text()


def test_freed_buffer_is_reused_without_page_faults():
    kept = _probe("keep")
    assert kept["applied"] is True
    # The first round faults the heap in; the later rounds reuse it (a few pages of bookkeeping at most).
    assert kept["faults"][0] > 30000
    assert max(kept["faults"][1:]) < 1000, kept
    if not _thp_always():  # the control: glibc's default unmaps the buffer and faults it in every round
        plain = _probe("plain")
        assert min(plain["faults"]) > 30000, plain


def test_environment_turns_it_off():
    off = _probe("keep", AKI_KEEP_FREED_MEMORY="0")
    assert off["applied"] is False
    if not _thp_always():
        assert min(off["faults"]) > 30000, off
