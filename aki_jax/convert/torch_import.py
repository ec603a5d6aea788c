"""PyTorch AKI checkpoint -> aki-jax pretrained folder, streamed leaf by leaf, all-or-nothing.

    report = convert_pytorch_to_orbax("AKI-4B/", "aki-4b-jax/", dtype="bfloat16")

Order of work: open the source (headers only), translate the config, check every key and shape
against the mapping table (nothing is written before this passes), then stream: each aki-jax leaf is
assembled from its tensors, written as an Orbax partial save and released. Everything goes to a
temporary folder beside `dst` that is renamed to `dst` only at the end, so a failed conversion
leaves nothing at `dst`; one killed mid-write leaves its temporary folder, removed by the next run
(`clean_stale_temp_dirs`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from aki_jax.checkpoint import CONFIG_FILE, PARAMS_DIR, copy_tokenizer_files, write_params_streaming
from aki_jax.config import AKIConfig
from aki_jax.convert.hf_config import read_original_args, translate_config
from aki_jax.convert.mapping import (
    TABLE,
    as_dtype,
    check_keys,
    iter_params,
    raise_for_keys,
    strip_prefixes,
    validate_shapes,
)
from aki_jax.convert.sources import open_checkpoint

REPORT_FILE = "conversion_report.json"
ORIGINAL_CONFIG_FILE = "config.json"


@dataclasses.dataclass
class ImportReport:
    source: str
    dst: str
    config: dict
    skipped: list[str]
    tensors: int
    bytes_written: int
    seconds: float


def convert_pytorch_to_orbax(
    src: str | Path,
    dst: str | Path,
    dtype: str | None = None,
    lm_config: str | Path | None = None,
    vision_config: str | Path | None = None,
    config: AKIConfig | None = None,
    compress: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> ImportReport:
    """Convert `src` (folder, .safetensors, or .pt) into the pretrained folder `dst`.

    dtype: cast every parameter ("float32", "bfloat16"); None keeps the checkpoint's dtype.
    config: use this AKIConfig instead of translating the checkpoint's configs.
    """
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    check_destination(dst, overwrite)  # before the (possibly long) reading of the source
    state_dict, description = open_checkpoint(src)
    log(f"source: {description}, {len(state_dict)} tensors")
    folder = src if src.is_dir() else None
    state_dict = strip_prefixes(state_dict)
    if config is None:
        config, original_args = translate_config(
            folder, lm_config, vision_config, log=log, keys=state_dict.keys(), shape=state_dict.shape,
            tokenizer_dir=folder if folder is not None else src.parent,
        )  # fmt: skip
    else:
        original_args = read_original_args(folder)
    if dtype is not None:
        config = config.replace(param_dtype=as_dtype(dtype).name)
    keys = check_keys(state_dict.keys(), config)
    raise_for_keys(keys, str(src))
    validate_shapes(state_dict, config)
    if keys.skipped:
        log(f"skipped {len(keys.skipped)} tensors with no aki-jax parameter (SigLIP pooling head): {keys.skipped}")

    tmp = make_temp_dir(dst, "converting", log)
    try:
        config.to_json(tmp / CONFIG_FILE)
        if original_args:
            (tmp / ORIGINAL_CONFIG_FILE).write_text(json.dumps(original_args, indent=2) + "\n")
        written = write_params_streaming(tmp / PARAMS_DIR, iter_params(state_dict, config, dtype), compress=compress)
        copied = copy_tokenizer_files(folder, tmp)
        if copied:
            log(f"copied tokenizer files: {copied}")
        report = ImportReport(
            source=str(src),
            dst=str(dst),
            config=config.to_dict(),
            skipped=keys.skipped,
            tensors=len(state_dict) - len(keys.skipped),
            bytes_written=written,
            seconds=time.perf_counter() - start,
        )
        (tmp / REPORT_FILE).write_text(json.dumps(dataclasses.asdict(report), indent=2) + "\n")
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {dst}: {len(TABLE)} parameters, {written / 1e9:.3f} GB in {report.seconds:.1f} s")
    return report


def check_destination(dst: Path, overwrite: bool) -> None:
    """Fail early, naming `dst`, when the output cannot be written there: not empty, not a folder, read-only."""
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} is a file; the output is a folder: choose another destination")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    ancestor = dst.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{dst}: {ancestor} is a file, so no folder can be created under it")
    try:  # the real test of writability (os.access is wrong for root, ACLs, read-only mounts)
        os.rmdir(tempfile.mkdtemp(prefix=".aki-write-test-", dir=ancestor))
    except OSError as e:
        raise type(e)(f"{dst}: cannot write in {ancestor} ({e.strerror or e}); choose a writable destination") from e


# Temporary folders beside `dst` are named `.{dst name}.{what}-{pid}@{host}@{random}`, so that a later run
# can tell one left by a killed process on this host (removed) from one still being written (left alone).
_TEMP_KINDS = ("converting", "exporting", "old")


def make_temp_dir(dst: Path, what: str, log: Callable[[str], None] = print) -> Path:
    """An empty folder beside `dst` (same filesystem, so the final rename is atomic), with normal permissions.

    Stale temporary folders of `dst` left by killed runs are removed first (`clean_stale_temp_dirs`).
    """
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temp_dirs(dst, log)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dst, what), dir=dst.parent))
    except OSError as e:
        raise type(e)(f"{dst}: cannot write in {dst.parent} ({e.strerror or e}); choose a writable destination") from e
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700
    return tmp


def _temp_prefix(dst: Path, what: str) -> str:
    return f".{dst.name}.{what}-{os.getpid()}@{socket.gethostname()}@"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def clean_stale_temp_dirs(dst: Path, log: Callable[[str], None] = print) -> tuple[list[Path], list[Path]]:
    """Remove the temporary folders of `dst` whose process (on this host) is gone; report the others.

    A conversion killed mid-write (SIGKILL, power loss) cannot clean up after itself; its folder can be
    as large as the model. Returns (removed, kept): kept are folders of a process still running, of
    another host (a shared filesystem: whether it still runs cannot be told from here) or of an unknown
    format; each kept one is logged with its path, so that it can be removed by hand.
    """
    removed, kept = [], []
    pattern = re.compile(rf"^\.{re.escape(dst.name)}\.({'|'.join(_TEMP_KINDS)})-(?:(\d+)@([^@]+)@)?")
    if not dst.parent.is_dir():
        return removed, kept
    host = socket.gethostname()
    for path in sorted(dst.parent.iterdir()):
        match = pattern.match(path.name)
        if not match or not path.is_dir():
            continue
        pid, owner = match.group(2), match.group(3)
        if pid is not None and owner == host and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            log(f"removed {path}: left by an interrupted run (process {pid} is gone)")
        else:
            kept.append(path)
            why = (
                f"process {pid} is still running" if owner == host
                else f"made on host {owner}" if owner else "made by an older version"
            )  # fmt: skip
            log(f"left {path} alone ({why}); remove it by hand if no conversion is writing it")
    return removed, kept


def _replace_dir(tmp: Path, dst: Path) -> None:
    """Move the finished `tmp` to `dst` (an existing `dst` is removed only now, after success)."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(dst, "old"), dir=dst.parent))
        old.rmdir()
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dst)
