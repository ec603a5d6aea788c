"""Open an original PyTorch AKI checkpoint as a lazy {original key: np.ndarray} mapping.

Accepted sources:
  - a released folder: `model.safetensors`, or shards listed in `model.safetensors.index.json`
    (a folder holding only `pytorch_model.bin` is read like a training checkpoint);
  - a single `.safetensors` file;
  - a training checkpoint `.pt` / `.pth` / `.bin` written by `torch.save`, either a plain state dict or
    `{"model_state_dict": {...}}`, keys possibly prefixed `module.` (stripped by the mapping).
Pickles are loaded with `torch.load(weights_only=True)` only; one that needs arbitrary code is refused.

Memory: safetensors are read with positioned reads, one tensor at a time, so the converter's resident
memory stays about one aki-jax leaf. Training `.pt` files are memory-mapped by torch (`mmap=True`):
pages already read stay mapped until the conversion ends and show up as resident memory, although
they are file-backed and reclaimable by the kernel.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from aki_jax.convert.mapping import ConversionError
from aki_jax.convert.safetensors_io import SafetensorsFile, ShardedSafetensors

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model")


def open_checkpoint(src: str | Path) -> tuple[Mapping[str, np.ndarray], str]:
    """(lazy state dict, a one-line description of what was opened)."""
    src = Path(src)
    if not src.exists():
        raise ConversionError(f"{src}: no such file or folder")
    if src.is_dir():
        if (src / "model.safetensors.index.json").exists():
            index = src / "model.safetensors.index.json"
            return ShardedSafetensors(index), f"sharded safetensors ({index})"
        if (src / "model.safetensors").exists():
            return SafetensorsFile(src / "model.safetensors"), f"safetensors ({src / 'model.safetensors'})"
        for name in ("pytorch_model.bin", "model.pt", "checkpoint.pt"):
            if (src / name).exists():
                return open_checkpoint(src / name)
        raise ConversionError(
            f"{src}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin in this folder"
        )
    if src.suffix == ".safetensors":
        return SafetensorsFile(src), f"safetensors ({src})"
    if src.suffix == ".json" and src.name.endswith(".index.json"):
        return ShardedSafetensors(src), f"sharded safetensors ({src})"
    if src.suffix in PICKLE_SUFFIXES:
        return load_torch_pickle(src), f"torch pickle, weights_only ({src})"
    raise ConversionError(f"{src}: unknown checkpoint type (expected a folder, .safetensors, or .pt/.pth/.bin)")


def load_torch_pickle(path: Path) -> Mapping[str, np.ndarray]:
    """A `torch.save` file as a lazy numpy mapping; memory-mapped where the file format allows."""
    import pickle

    import torch

    def load(mmap: bool):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            obj = load(mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped
                raise
            obj = load(mmap=False)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"{path}: refused: this pickle needs arbitrary code to load (torch.load weights_only=True failed). "
            "Checkpoints are never unpickled with code execution; re-save it as a plain state dict of tensors "
            f"(or safetensors) with a trusted script. Detail: {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise ConversionError(f"{path}: corrupt or truncated torch checkpoint ({str(e).splitlines()[0]})") from e
    state = obj
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if key in obj and isinstance(obj[key], dict):
                state = obj[key]
                break
    if not isinstance(state, dict) or not state:
        raise ConversionError(f"{path}: expected a state dict or {{'model_state_dict': ...}}, got {type(obj).__name__}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: state dict entries that are not tensors: {bad[:10]}")
    return TorchTensors(state)


class TorchTensors(Mapping):
    """{key: torch.Tensor} read as numpy, one tensor per access (bfloat16 via ml_dtypes)."""

    def __init__(self, tensors: dict):
        self._tensors = tensors

    def __getitem__(self, key) -> np.ndarray:
        return torch_to_numpy(self._tensors[key])

    def shape(self, key) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self):
        return len(self._tensors)

    def __contains__(self, key):
        return key in self._tensors


def torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()
