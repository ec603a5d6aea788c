"""aki-jax pretrained folder -> original PyTorch AKI layout (`config.json` + `model.safetensors`).

    export_orbax_to_pytorch("aki-4b-jax/", "aki-4b-torch/")

Streams one aki-jax leaf at a time out of Orbax into one safetensors file whose header is computed up
front from the checkpoint's metadata. Writes:
  model.safetensors          every original key the mapping table knows, in the params' dtype
                             (bit-exact with the imported checkpoint)
  config.json                the original constructor arguments (as recorded at import, else the
                             aki-4b hub names), updated from the AKIConfig
  vision_encoder/config.json, lang_model/config.json   SigLIP / Phi-3 configs of this model
  aki_config.json            the exact AKIConfig (so re-importing is exact)
  tokenizer files            when the source folder has them

The SigLIP attention-pooling head (`vision_encoder.head.*`) is not an aki-jax parameter and cannot be
produced. The original code loads state dicts non-strictly, so the head then keeps its initial values
(it is unused by AKI). To carry the released head over bit-exactly, pass `vision_head_from=<the original
checkpoint>`: its `vision_encoder.head.*` tensors are copied unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from aki_jax.checkpoint import CONFIG_FILE, PARAMS_DIR, copy_tokenizer_files, iter_leaves, params_metadata
from aki_jax.config import AKIConfig
from aki_jax.convert.hf_config import original_constructor_args, phi3_config_dict, siglip_config_dict
from aki_jax.convert.mapping import (
    SKIPPED_PREFIXES,
    TABLE,
    ConversionError,
    entry_to_torch,
    leaf_shape,
    strip_prefixes,
    tensor_shape,
    torch_keys,
)
from aki_jax.convert.safetensors_io import write_safetensors
from aki_jax.convert.sources import open_checkpoint
from aki_jax.convert.torch_import import ORIGINAL_CONFIG_FILE, _replace_dir, check_destination, make_temp_dir


@dataclasses.dataclass
class ExportReport:
    source: str
    dst: str
    tensors: int
    vision_head: str
    bytes_written: int
    seconds: float


def export_orbax_to_pytorch(
    src: str | Path,
    dst: str | Path,
    vision_head_from: str | Path | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> ExportReport:
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if not (src / CONFIG_FILE).is_file() or not (src / PARAMS_DIR).is_dir():
        raise ConversionError(f"{src}: not an aki-jax pretrained folder (needs {CONFIG_FILE} and {PARAMS_DIR}/)")
    check_destination(dst, overwrite)
    config = AKIConfig.from_json(src / CONFIG_FILE)
    saved = params_metadata(src / PARAMS_DIR)

    specs = []
    for entry in TABLE:
        if entry.path not in saved:
            raise ConversionError(f"{src / PARAMS_DIR}: parameter {'/'.join(entry.path)} is missing")
        shape, dtype = saved[entry.path]
        per_layer = shape[1:] if entry.layers else shape
        if tuple(per_layer) != tuple(leaf_shape(config, entry)):
            raise ConversionError(
                f"parameter {'/'.join(entry.path)}: shape {shape} in the checkpoint does not fit {CONFIG_FILE}"
            )
        torch_shape = entry.transform.torch_shape(per_layer)
        specs += [(key, torch_shape, dtype) for key in torch_keys(entry, config)]

    head, head_keys = None, []
    if vision_head_from is not None:
        head, _ = open_checkpoint(vision_head_from)
        head = strip_prefixes(head)
        head_keys = [k for k in head if k.startswith(SKIPPED_PREFIXES)]
        if not head_keys:
            raise ConversionError(f"{vision_head_from}: has no vision_encoder.head.* tensors to copy")
        specs += [(k, tensor_shape(head, k), head[k].dtype) for k in head_keys]
        head_note = f"copied {len(head_keys)} tensors from {vision_head_from}"
    else:
        head_note = "not written (not an aki-jax parameter; the original code keeps its initial values)"
    log(f"vision_encoder.head.*: {head_note}")

    def tensors():
        leaves = iter_leaves(src / PARAMS_DIR, [entry.path for entry in TABLE])
        for entry, (_, leaf) in zip(TABLE, leaves, strict=True):
            yield from entry_to_torch(entry, leaf, config)
            del leaf
        for key in head_keys:
            yield key, head[key]

    tmp = make_temp_dir(dst, "exporting", log)
    try:
        written = write_safetensors(tmp / "model.safetensors", specs, tensors(), metadata={"format": "pt"})
        recorded = {}
        if (src / ORIGINAL_CONFIG_FILE).is_file():
            recorded = json.loads((src / ORIGINAL_CONFIG_FILE).read_text())
        _write_json(tmp / "config.json", original_constructor_args(config, recorded))
        _write_json(tmp / "vision_encoder" / "config.json", siglip_config_dict(config))
        _write_json(tmp / "lang_model" / "config.json", phi3_config_dict(config))
        config.to_json(tmp / CONFIG_FILE)
        copy_tokenizer_files(src, tmp)
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = ExportReport(str(src), str(dst), len(specs), head_note, written, time.perf_counter() - start)
    log(f"wrote {dst / 'model.safetensors'}: {len(specs)} tensors, {written / 1e9:.3f} GB in {report.seconds:.1f} s")
    return report


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
