"""The one mapping table between original PyTorch AKI state-dict keys and aki-jax parameter paths.

Every entry says: the original key (with `{i}` for the layer index of a per-layer tensor), the aki-jax
path (per-layer tensors are stacked on the leading "layers" axis of that leaf), and a transform that is
used in both directions. Target shapes come from `aki_jax.abstract_params(config)`, so the table holds
no shape arithmetic of its own:

  Same       the same array (LayerNorm weights, embeddings, the head's bias, latents).
  Flatten    a torch vector split into (N, H) on the JAX side (SigLIP q/k/v biases).
  Linear(k)  a torch Linear weight (out, in) -> kernel (in..., out...) whose first k axes are the input:
             `W.T.reshape(shape)`. This gives the fused layouts directly because torch's output index
             is row-major over them: qkv (D, 3, N, H) [q; k; v], gate_up (D, 2, F) [gate; up],
             o_proj (N, H, D) with k=2, resampler to_kv (E, 2, 8, 64) [k; v].
  Conv       an OIHW convolution kernel <-> HWIO.

`to_jax` / `to_torch` define each transform; the streaming paths use `write_jax` / `torch_array`, which
move raw bits (bit-exact in any dtype) and transpose large matrices tile by tile.

`torch_to_params` / `params_to_torch` convert whole in-memory dicts; `iter_params` / `iter_torch`
yield one leaf (or one tensor) at a time so converters can stream.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from aki_jax.config import AKIConfig

# Original keys that exist in released checkpoints but have no aki-jax parameter: the SigLIP
# attention-pooling head (AKI uses last_hidden_state). Reported as skipped on import.
SKIPPED_PREFIXES = ("vision_encoder.head.",)

# Prefixes that training checkpoints add in front of every key (DDP / FSDP wrappers).
WRAPPER_PREFIXES = ("module.",)


class ConversionError(ValueError):
    """A checkpoint that does not fit the mapping; the message names the tensor at fault."""


class Transform:
    """`to_jax` / `to_torch` define a transform; `write_jax` / `torch_array` are the copying forms used
    when streaming (Linear overrides them with a cache-blocked transpose)."""

    def write_jax(self, x, out) -> None:
        out[...] = self.to_jax(x, out.shape)

    def torch_array(self, x) -> np.ndarray:
        return np.ascontiguousarray(self.to_torch(x))


@dataclasses.dataclass(frozen=True)
class Same(Transform):
    def torch_shape(self, shape):
        return tuple(shape)

    def to_jax(self, x, shape):
        return x

    def to_torch(self, x):
        return x


@dataclasses.dataclass(frozen=True)
class Flatten(Transform):
    def torch_shape(self, shape):
        return (math.prod(shape),)

    def to_jax(self, x, shape):
        return x.reshape(shape)

    def to_torch(self, x):
        return x.reshape(-1)


@dataclasses.dataclass(frozen=True)
class Linear(Transform):
    in_axes: int = 1

    def torch_shape(self, shape):
        return (math.prod(shape[self.in_axes :]), math.prod(shape[: self.in_axes]))

    def to_jax(self, x, shape):
        return x.T.reshape(shape)

    def to_torch(self, x):
        return x.reshape(math.prod(x.shape[: self.in_axes]), -1).T

    def write_jax(self, x, out) -> None:
        n_in = math.prod(out.shape[: self.in_axes])
        transpose_into(x, out.reshape(n_in, -1))  # `out` is a contiguous leaf slice: reshape is a view

    def torch_array(self, x) -> np.ndarray:
        x = np.ascontiguousarray(x).reshape(math.prod(x.shape[: self.in_axes]), -1)
        out = np.empty(x.shape[::-1], x.dtype)
        transpose_into(x, out)
        return out


@dataclasses.dataclass(frozen=True)
class Conv(Transform):
    def torch_shape(self, shape):
        h, w, i, o = shape
        return (o, i, h, w)

    def to_jax(self, x, shape):
        return x.transpose(2, 3, 1, 0)

    def to_torch(self, x):
        return x.transpose(3, 2, 0, 1)


# src rows x src cols per tile. Single-thread CPU time (bf16, AKI-4B shapes, 2-core machine under load): 128x256
# beat 16x1024, 32x512, 64x256, 128x128, 256x128 on gate_up/qkv/fc1/fc2 (1.1-2.5 vs 0.7-0.9 GB/s for 32x512),
# ~30% less time over the whole model; down_proj (16 KB rows) runs ~1 GB/s whatever the tile.
TRANSPOSE_TILE = (128, 256)
TRANSPOSE_THREADS = min(8, os.cpu_count() or 1)


@functools.cache
def _transpose_pool():
    """One process-wide thread pool for `transpose_into` (numpy releases the GIL while copying a tile)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(TRANSPOSE_THREADS, thread_name_prefix="transpose")


def _transpose_rows(src, dst, start: int, stop: int) -> None:
    tile_rows, tile_cols = TRANSPOSE_TILE
    for i in range(start, stop, tile_rows):
        end = min(i + tile_rows, stop)
        for j in range(0, src.shape[1], tile_cols):
            dst[j : j + tile_cols, i:end] = src[i:end, j : j + tile_cols].T


def transpose_into(src, dst, threads: int | None = None) -> None:
    """dst[...] = src.T for 2-D arrays, tile by tile, in `threads` bands of rows (None: all pool threads
    for matrices of 4 MB or more).

    A plain strided transpose of a large matrix misses the cache on every element; tiles of
    `TRANSPOSE_TILE` run 5-15x faster (0.14 GB/s naive vs 1-2.5 GB/s for bf16 on this 2-core machine).
    """
    rows, cols = src.shape
    if dst.shape != (cols, rows):
        raise ValueError(f"transpose_into: {src.shape} -> {dst.shape}")
    if threads is None:  # small matrices are not worth the hand-off
        threads = TRANSPOSE_THREADS if src.nbytes >= (4 << 20) else 1
    if threads == 1:
        _transpose_rows(src, dst, 0, rows)
        return
    tile_rows = TRANSPOSE_TILE[0]
    band = -(-rows // threads // tile_rows) * tile_rows
    pool = _transpose_pool()
    futures = [pool.submit(_transpose_rows, src, dst, i, min(i + band, rows)) for i in range(0, rows, band)]
    for future in futures:
        future.result()


@dataclasses.dataclass(frozen=True)
class Entry:
    """One original tensor (or one per layer) <-> one aki-jax leaf.

    `layers` names the part whose layer count stacks this leaf ("vision", "resampler", "decoder"),
    None for a tensor that is not per layer.
    """

    torch_key: str
    path: tuple[str, ...]
    transform: Transform
    layers: str | None = None


def _vision_entries():
    layer = "vision_encoder.encoder.layers.{i}."
    out = [
        Entry("vision_encoder.embeddings.patch_embedding.weight", ("vision", "embeddings", "patch_kernel"), Conv()),
        Entry("vision_encoder.embeddings.patch_embedding.bias", ("vision", "embeddings", "patch_bias"), Same()),
        Entry(
            "vision_encoder.embeddings.position_embedding.weight",
            ("vision", "embeddings", "position_embedding"),
            Same(),
        ),
    ]
    for name in ("q", "k", "v"):
        out.append(Entry(f"{layer}self_attn.{name}_proj.weight", ("vision", "layers", f"{name}_kernel"), Linear(1)))
        out.append(Entry(f"{layer}self_attn.{name}_proj.bias", ("vision", "layers", f"{name}_bias"), Flatten()))
    out += [
        Entry(f"{layer}self_attn.out_proj.weight", ("vision", "layers", "out_kernel"), Linear(2)),
        Entry(f"{layer}self_attn.out_proj.bias", ("vision", "layers", "out_bias"), Same()),
    ]
    for norm in ("layer_norm1", "layer_norm2"):
        out.append(Entry(f"{layer}{norm}.weight", ("vision", "layers", norm, "scale"), Same()))
        out.append(Entry(f"{layer}{norm}.bias", ("vision", "layers", norm, "bias"), Same()))
    for fc in ("fc1", "fc2"):
        out.append(Entry(f"{layer}mlp.{fc}.weight", ("vision", "layers", f"{fc}_kernel"), Linear(1)))
        out.append(Entry(f"{layer}mlp.{fc}.bias", ("vision", "layers", f"{fc}_bias"), Same()))
    out += [
        Entry("vision_encoder.post_layernorm.weight", ("vision", "post_layernorm", "scale"), Same()),
        Entry("vision_encoder.post_layernorm.bias", ("vision", "post_layernorm", "bias"), Same()),
    ]
    return [e if "{i}" not in e.torch_key else dataclasses.replace(e, layers="vision") for e in out]


def _resampler_entries():
    # open_flamingo layout: layers.{i}.0 = PerceiverAttention, layers.{i}.1 = FeedForward
    # Sequential(LayerNorm, Linear, GELU, Linear) -> indices 0, 1, 3.
    layer = "vision_tokenizer.layers.{i}."
    out = [Entry("vision_tokenizer.latents", ("resampler", "latents"), Same())]
    for norm in ("norm_media", "norm_latents"):
        out.append(Entry(f"{layer}0.{norm}.weight", ("resampler", "layers", norm, "scale"), Same()))
        out.append(Entry(f"{layer}0.{norm}.bias", ("resampler", "layers", norm, "bias"), Same()))
    out += [
        Entry(f"{layer}0.to_q.weight", ("resampler", "layers", "q_kernel"), Linear(1)),
        Entry(f"{layer}0.to_kv.weight", ("resampler", "layers", "kv_kernel"), Linear(1)),
        Entry(f"{layer}0.to_out.weight", ("resampler", "layers", "out_kernel"), Linear(2)),
        Entry(f"{layer}1.0.weight", ("resampler", "layers", "ff_norm", "scale"), Same()),
        Entry(f"{layer}1.0.bias", ("resampler", "layers", "ff_norm", "bias"), Same()),
        Entry(f"{layer}1.1.weight", ("resampler", "layers", "ff1_kernel"), Linear(1)),
        Entry(f"{layer}1.3.weight", ("resampler", "layers", "ff2_kernel"), Linear(1)),
        Entry("vision_tokenizer.norm.weight", ("resampler", "norm", "scale"), Same()),
        Entry("vision_tokenizer.norm.bias", ("resampler", "norm", "bias"), Same()),
        Entry("vision_tokenizer.projection.weight", ("resampler", "projection_kernel"), Linear(1)),
        Entry("vision_tokenizer.projection.bias", ("resampler", "projection_bias"), Same()),
    ]
    return [e if "{i}" not in e.torch_key else dataclasses.replace(e, layers="resampler") for e in out]


def _decoder_entries():
    layer = "lang_model.model.layers.{i}."
    out = [
        Entry("lang_model.model.embed_tokens.weight", ("decoder", "embed_tokens"), Same()),
        Entry("lang_model.model.embed_tokens.additional_embedding.weight", ("decoder", "additional_embedding"), Same()),
        Entry(f"{layer}self_attn.qkv_proj.weight", ("decoder", "layers", "qkv_kernel"), Linear(1)),
        Entry(f"{layer}self_attn.o_proj.weight", ("decoder", "layers", "o_kernel"), Linear(2)),
        Entry(f"{layer}mlp.gate_up_proj.weight", ("decoder", "layers", "gate_up_kernel"), Linear(1)),
        Entry(f"{layer}mlp.down_proj.weight", ("decoder", "layers", "down_kernel"), Linear(1)),
        Entry(f"{layer}input_layernorm.weight", ("decoder", "layers", "input_layernorm", "scale"), Same()),
        Entry(
            f"{layer}post_attention_layernorm.weight",
            ("decoder", "layers", "post_attention_layernorm", "scale"),
            Same(),
        ),
        Entry("lang_model.model.norm.weight", ("decoder", "norm", "scale"), Same()),
        Entry("lang_model.lm_head.weight", ("decoder", "lm_head_kernel"), Linear(1)),
        Entry("lang_model.lm_head.bias", ("decoder", "lm_head_bias"), Same()),
        Entry("lang_model.lm_head.additional_fc.weight", ("decoder", "additional_head_kernel"), Linear(1)),
        Entry("lang_model.lm_head.additional_fc.bias", ("decoder", "additional_head_bias"), Same()),
    ]
    return [e if "{i}" not in e.torch_key else dataclasses.replace(e, layers="decoder") for e in out]


TABLE: tuple[Entry, ...] = tuple(_vision_entries() + _resampler_entries() + _decoder_entries())


def num_layers(config: AKIConfig, part: str | None) -> int | None:
    return {
        None: None,
        "vision": config.vision.num_layers,
        "resampler": config.resampler.depth,
        "decoder": config.decoder.num_layers,
    }[part]


@functools.lru_cache(maxsize=8)
def _leaf_shapes(config: AKIConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    import jax

    from aki_jax.model import abstract_params

    shapes, _ = abstract_params(config)
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}


def leaf_shape(config: AKIConfig, entry: Entry) -> tuple[int, ...]:
    """The aki-jax shape of one (per-layer) tensor of `entry`, without the stacked layer axis."""
    shape = _leaf_shapes(config)[entry.path]
    return shape[1:] if entry.layers else shape


def torch_keys(entry: Entry, config: AKIConfig) -> list[str]:
    n = num_layers(config, entry.layers)
    return [entry.torch_key] if n is None else [entry.torch_key.format(i=i) for i in range(n)]


def expected_torch_shapes(config: AKIConfig) -> dict[str, tuple[int, ...]]:
    """Every original key aki-jax uses -> its PyTorch shape."""
    out = {}
    for entry in TABLE:
        shape = entry.transform.torch_shape(leaf_shape(config, entry))
        for key in torch_keys(entry, config):
            out[key] = shape
    return out


def strip_wrapper_prefix(key: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


@dataclasses.dataclass
class Report:
    """What an import did with the source keys."""

    skipped: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)


def check_keys(keys, config: AKIConfig) -> Report:
    """Compare source keys (wrapper prefixes already stripped) with the table; nothing is read."""
    expected = expected_torch_shapes(config)
    keys = list(keys)
    present = set(keys)
    report = Report()
    report.skipped = sorted(k for k in keys if k.startswith(SKIPPED_PREFIXES))
    report.unexpected = sorted(k for k in keys if k not in expected and not k.startswith(SKIPPED_PREFIXES))
    report.missing = [k for k in expected if k not in present]
    return report


def raise_for_keys(report: Report, source: str = "checkpoint") -> None:
    problems = []
    if report.missing:
        problems.append(f"{len(report.missing)} missing key(s): " + ", ".join(report.missing[:20]))
    if report.unexpected:
        problems.append(f"{len(report.unexpected)} unexpected key(s): " + ", ".join(report.unexpected[:20]))
    if problems:
        more = " (first 20 shown)" if max(len(report.missing), len(report.unexpected)) > 20 else ""
        raise ConversionError(f"{source} does not match the AKI layout{more}: " + "; ".join(problems))


FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def as_dtype(dtype) -> np.dtype:
    """A numpy dtype from a name or dtype; "bfloat16" included (via ml_dtypes)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)


def _check_tensor(key: str, x, want_shape, want_dtype) -> None:
    if tuple(x.shape) != tuple(want_shape):
        raise ConversionError(f"tensor {key!r}: shape {tuple(x.shape)} in the checkpoint, expected {tuple(want_shape)}")
    if str(x.dtype) not in FLOAT_DTYPES:
        raise ConversionError(f"tensor {key!r}: dtype {x.dtype} in the checkpoint, expected a float dtype")
    if want_dtype is not None and np.dtype(x.dtype) != want_dtype:
        raise ConversionError(
            f"tensor {key!r}: dtype {x.dtype} differs from {want_dtype} of the other layers of the same parameter"
        )


def tensor_shape(state_dict: Mapping, key: str) -> tuple[int, ...]:
    """A tensor's shape, from the header where the mapping can tell it without reading the data."""
    if hasattr(state_dict, "shape"):
        return tuple(state_dict.shape(key))
    return tuple(state_dict[key].shape)


def validate_shapes(state_dict: Mapping, config: AKIConfig) -> None:
    """Check every expected tensor's shape before anything is converted; raises naming the tensor."""
    for key, want in expected_torch_shapes(config).items():
        shape = tensor_shape(state_dict, key)
        if shape != tuple(want):
            raise ConversionError(f"tensor {key!r}: shape {shape} in the checkpoint, expected {tuple(want)}")


def iter_params(
    state_dict: Mapping[str, np.ndarray],
    config: AKIConfig,
    dtype=None,
    allocate: Callable[[tuple[int, ...], np.dtype], np.ndarray] = np.empty,
) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Yield (aki-jax path, leaf) one leaf at a time, reading the source tensor by tensor.

    `state_dict` maps original keys (no wrapper prefix) to arrays; lazy mappings are read one key at a
    time. Per-layer tensors are written into one preallocated stacked leaf. `dtype`: cast every leaf
    to it (None keeps the source dtype). `allocate(shape, dtype)` gives the array each leaf is built in
    (a writer can hand out memory it reuses: `aki_jax.checkpoint.ParamsWriter.allocate`). Keys are not
    checked here; see `check_keys`.
    """
    cast = None if dtype is None else as_dtype(dtype)
    for entry in TABLE:
        shape = leaf_shape(config, entry)
        torch_shape = entry.transform.torch_shape(shape)
        keys = torch_keys(entry, config)
        leaf = dtype_of_leaf = None  # filled as raw bits (see `_bits`), viewed as the real dtype at the end
        for i, key in enumerate(keys):
            if key not in state_dict:
                raise ConversionError(f"missing key {key!r} (for aki-jax parameter {'/'.join(entry.path)})")
            x = _as_numpy(state_dict[key])
            _check_tensor(key, x, torch_shape, None if leaf is None or cast is not None else dtype_of_leaf)
            if cast is not None and x.dtype != cast:
                x = x.astype(cast)
            if leaf is None:
                dtype_of_leaf = x.dtype
                leaf = allocate((len(keys),) + tuple(shape) if entry.layers else tuple(shape), _bits(x.dtype))
            target = leaf[i] if entry.layers else leaf
            entry.transform.write_jax(x.view(_bits(x.dtype)), target)
            del x, target
        yield entry.path, leaf.view(dtype_of_leaf)


def _as_numpy(x) -> np.ndarray:
    """numpy arrays pass through; torch tensors (e.g. a module's state_dict()) are viewed as numpy."""
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch"):
        from aki_jax.convert.sources import torch_to_numpy

        return torch_to_numpy(x)
    return np.asarray(x)


def _bits(dtype) -> np.dtype:
    """The unsigned integer dtype of the same width: layout moves on raw bits are bit-exact and take
    numpy's fast copy loops (ml_dtypes' bfloat16 copies element by element otherwise)."""
    return np.dtype(f"u{np.dtype(dtype).itemsize}")


def entry_to_torch(entry: Entry, leaf, config: AKIConfig) -> Iterator[tuple[str, np.ndarray]]:
    """The original tensors (key, contiguous numpy) held by one aki-jax leaf (per layer for stacked leaves)."""
    leaf = np.asarray(leaf)
    want = _leaf_shapes(config)[entry.path]
    if tuple(leaf.shape) != want:
        raise ConversionError(
            f"aki-jax parameter {'/'.join(entry.path)}: shape {tuple(leaf.shape)}, expected {want} for this config"
        )
    bits = leaf.view(_bits(leaf.dtype))
    if entry.layers is None:
        yield entry.torch_key, entry.transform.torch_array(bits).view(leaf.dtype)
    else:
        for key, layer in zip(torch_keys(entry, config), bits, strict=True):
            yield key, entry.transform.torch_array(layer).view(leaf.dtype)


def iter_torch(params, config: AKIConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (original key, tensor as numpy) from an aki-jax param tree (numpy or jax leaves), in table order."""
    for entry in TABLE:
        yield from entry_to_torch(entry, _get(params, entry.path), config)


def torch_to_params(state_dict: Mapping[str, np.ndarray], config: AKIConfig, dtype=None, strict: bool = True) -> dict:
    """Original state dict (numpy arrays or torch tensors; `module.` prefixes allowed) -> aki-jax params (numpy).

    With `strict`, missing or unexpected keys raise `ConversionError` listing them; the SigLIP pooling
    head (`vision_encoder.head.*`) is always skipped.
    """
    state_dict = _StrippedView(state_dict)
    report = check_keys(state_dict.keys(), config)
    if strict:
        raise_for_keys(report)
        validate_shapes(state_dict, config)
    params: dict = {}
    for path, leaf in iter_params(state_dict, config, dtype):
        _set(params, path, leaf)
    return params


def params_to_torch(params, config: AKIConfig) -> dict[str, np.ndarray]:
    """aki-jax param tree -> original state dict {key: numpy array} (without the SigLIP pooling head)."""
    return dict(iter_torch(params, config))


class _StrippedView(Mapping):
    """A read-only view of a state dict with wrapper prefixes (`module.`) removed from its keys."""

    def __init__(self, source: Mapping):
        self._source = source
        self._keys = {}
        for key in source.keys():
            stripped = strip_wrapper_prefix(key)
            if stripped in self._keys:
                raise ConversionError(f"key {stripped!r} appears twice (with and without a wrapper prefix)")
            self._keys[stripped] = key

    def __getitem__(self, key):
        return self._source[self._keys[key]]

    def shape(self, key) -> tuple[int, ...]:
        return tensor_shape(self._source, self._keys[key])

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key):
        return key in self._keys


def strip_prefixes(source: Mapping) -> Mapping:
    return _StrippedView(source)


def _get(tree, path):
    for key in path:
        try:
            tree = tree[key]
        except (KeyError, TypeError) as e:
            raise ConversionError(f"aki-jax parameter {'/'.join(path)} is missing from the param tree") from e
    return tree


def _set(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def leaf_paths(config: AKIConfig) -> list[tuple[str, ...]]:
    """All aki-jax leaf paths, in table order (each exactly once)."""
    return [e.path for e in TABLE]
