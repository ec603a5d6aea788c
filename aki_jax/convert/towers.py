"""The paper's starting point: a Hugging Face SigLIP folder + a Phi-3 folder -> an aki-jax pretrained folder.

    report = init_from_towers("siglip-so400m-patch14-384/", "Phi-3.5-mini-instruct/", "aki-4b-init/")

The towers' weights go through the converter's one mapping table (`aki_jax.convert.mapping.TABLE`): a
tower key is the original AKI key with its prefix translated (`vision_encoder.` <-> SigLIP's
`vision_model.`, `lang_model.` <-> nothing, so `lang_model.model.*` <-> Phi-3's `model.*`). The parts
AKI adds are drawn fresh, each as the original does when it wraps the two towers (see `new_parameter_inits`).
The SigLIP text tower (`text_model.*`, `logit_scale`, `logit_bias`) and pooling head are not used and are
reported. The tokenizer is extended as the original factory does (`aki_jax.processing.tokenizer.load_tokenizer`),
which fixes `initial_tokenizer_len` and `pad_token_id`.

Failure behaviour is the converter's: headers and shapes are checked before anything is written, then the
leaves are streamed one at a time into a hidden folder beside `dst`, renamed to `dst` at the end. Each leaf is
built (tensors mapped from the towers' files, transposed into place, new ones drawn) in one reused block the
size of the largest leaf, while the leaves before it are saved on a background thread
(`aki_jax.checkpoint.ParamsWriter`): peak memory is about that block.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from aki_jax.checkpoint import CONFIG_FILE, PARAMS_DIR, ParamsWriter
from aki_jax.config import AKIConfig, ResamplerConfig
from aki_jax.convert.hf_config import decoder_from_phi3, original_constructor_args, vision_from_siglip
from aki_jax.convert.mapping import (
    SKIPPED_PREFIXES,
    TABLE,
    ConversionError,
    as_dtype,
    expected_torch_shapes,
    iter_params,
    leaf_shape,
    num_layers,
    tensor_shape,
    torch_keys,
)
from aki_jax.convert.sources import open_checkpoint
from aki_jax.convert.torch_import import ORIGINAL_CONFIG_FILE, _replace_dir, make_temp_dir

REPORT_FILE = "init_report.json"
SIGLIP_MODEL_TYPES = ("siglip", "siglip_vision_model")
PHI3_MODEL_TYPES = ("phi3",)
# AKI key prefix -> the tower checkpoint's prefix for the same tensor.
VISION_PREFIX = ("vision_encoder.", "vision_model.")
LM_PREFIX = ("lang_model.", "")
PHI3_INITIALIZER_RANGE = 0.02  # transformers' Phi3Config default, for a config.json that omits it


@dataclasses.dataclass(frozen=True)
class Init:
    """How one new parameter is drawn: "normal" (mean 0, std `scale`), "uniform" (U(-scale, scale)),
    "ones" or "zeros"."""

    kind: str
    scale: float = 0.0

    def describe(self) -> str:
        return {"normal": f"normal(0, {self.scale:.6g})", "uniform": f"uniform(+-{self.scale:.6g})"}.get(
            self.kind, self.kind
        )

    def draw(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        if self.kind == "normal":
            return rng.standard_normal(shape, dtype=np.float32) * np.float32(self.scale)
        if self.kind == "uniform":  # U[0, 1) in float32 (twice as fast as float64), moved to [-scale, scale)
            x = rng.random(shape, dtype=np.float32)
            x *= np.float32(2 * self.scale)
            x -= np.float32(self.scale)
            return x
        return (np.ones if self.kind == "ones" else np.zeros)(shape, np.float32)


ONES, ZEROS = Init("ones"), Init("zeros")


def linear_default(fan_in: int) -> Init:
    """torch.nn.Linear's own init, for its weight and its bias alike: kaiming_uniform(a=sqrt(5)) gives the
    bound gain * sqrt(3 / fan_in) with gain sqrt(2 / (1 + 5)), i.e. 1/sqrt(fan_in); the bias uses 1/sqrt(fan_in)."""
    return Init("uniform", 1.0 / math.sqrt(fan_in))


def new_parameter_inits(config: AKIConfig, initializer_range: float = PHI3_INITIALIZER_RANGE) -> dict[str, Init]:
    """{original AKI key (with `{i}` per layer): distribution} of every parameter AKI adds to the towers.

    As read in Sony's AKI release (`codes/open_flamingo/src/helpers.py`, `vlm.py`, `aki.py`, `factory.py`):
    - Perceiver resampler (`helpers.PerceiverResampler`): `latents = torch.randn(num_latents, dim)`, i.e.
      N(0, 1); every Linear (to_q, to_kv, to_out, the two feed-forward Linears, the output projection and
      its bias) keeps PyTorch's default U(+-1/sqrt(fan_in)); every LayerNorm ones / zeros.
    - `DecoupledEmbedding.additional_embedding` (the rows of `<image>`, `<|endofchunk|>`): created as an
      nn.Embedding, then redrawn by `VLM.__init__` as N(0, lm config `initializer_range`) (0.02 for Phi-3).
    - `DecoupledLinear` (the output head): built as `nn.Linear(hidden, vocab_rows, bias=True)` whose weight
      is then replaced by the language model's `lm_head.weight`. Phi-3's head has no bias (its `bias` is
      None, so the wrapper receives `_bias=None`), so the head's bias keeps nn.Linear's default
      U(+-1/sqrt(hidden)). Its `additional_fc` weight is redrawn N(0, initializer_range); its bias keeps
      U(+-1/sqrt(hidden)).
    Nothing re-initialises them afterwards: AKI is a plain nn.Module (no transformers `post_init`), the
    factory only adds tokens and sets requires_grad, and the training script only seeds, casts and wraps
    the model. The embedding and head rows of the towers are used as they are (no resize, no copy).
    """
    e, d, r = config.vision.hidden_size, config.decoder.hidden_size, config.resampler
    layer = "vision_tokenizer.layers.{i}."
    out = {"vision_tokenizer.latents": Init("normal", 1.0)}
    for norm in (f"{layer}0.norm_media", f"{layer}0.norm_latents", f"{layer}1.0", "vision_tokenizer.norm"):
        out[f"{norm}.weight"], out[f"{norm}.bias"] = ONES, ZEROS
    out.update(
        {
            f"{layer}0.to_q.weight": linear_default(e),
            f"{layer}0.to_kv.weight": linear_default(e),
            f"{layer}0.to_out.weight": linear_default(r.num_heads * r.head_dim),
            f"{layer}1.1.weight": linear_default(e),
            f"{layer}1.3.weight": linear_default(e * r.ff_mult),
            "vision_tokenizer.projection.weight": linear_default(e),
            "vision_tokenizer.projection.bias": linear_default(e),
            "lang_model.model.embed_tokens.additional_embedding.weight": Init("normal", initializer_range),
            "lang_model.lm_head.bias": linear_default(d),
            "lang_model.lm_head.additional_fc.weight": Init("normal", initializer_range),
            "lang_model.lm_head.additional_fc.bias": linear_default(d),
        }
    )
    return out


def draw_parameter(key: str, init: Init, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """One new tensor (original layout, float32); its stream depends only on (seed, key), not on order."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    return init.draw(tuple(shape), rng)


@dataclasses.dataclass
class Tower:
    """One opened Hugging Face folder: its config.json, lazy tensors and how its keys read as AKI keys."""

    folder: Path
    config_path: Path
    config: dict
    tensors: Mapping
    description: str
    prefix: tuple[str, str]  # (AKI prefix, this tower's prefix)

    def aki_key(self, key: str) -> str | None:
        aki, own = self.prefix
        return aki + key[len(own) :] if key.startswith(own) else None

    def own_key(self, aki_key: str) -> str | None:
        aki, own = self.prefix
        return own + aki_key[len(aki) :] if aki_key.startswith(aki) else None

    def file_of(self, key: str) -> str:
        path_of = getattr(self.tensors, "path_of", None)
        return str(path_of(key)) if path_of is not None else str(self.folder)


def _open_tower(folder, kind: str, model_types: tuple[str, ...], prefix: tuple[str, str]) -> Tower:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: not a folder (expected a Hugging Face {kind} folder)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{config_path}: missing; {folder} is not a Hugging Face {kind} folder")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{config_path}: cannot read it ({e})") from e
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in model_types:
        raise ConversionError(
            f"{config_path}: model_type {model_type!r} is not a {kind} checkpoint (expected "
            + " or ".join(repr(t) for t in model_types)
            + ")"
        )
    tensors, description = open_checkpoint(folder)
    tower = Tower(folder, config_path, config, tensors, description, prefix)
    if not any(tower.aki_key(k) for k in tensors.keys()):
        raise ConversionError(f"{folder}: no {prefix[1]}* tensors in {description}; not a {kind} checkpoint")
    return tower


class _InitialState(Mapping):
    """{original AKI key: array}: tower tensors through the prefix translation, new parameters drawn on access.

    This is the state dict the original AKI holds right after its factory wrapped the two towers, read
    lazily one tensor at a time so that `mapping.iter_params` can stream it.
    """

    def __init__(self, towers: list[Tower], inits: dict[str, Init], config: AKIConfig, seed: int):
        self._shapes = expected_torch_shapes(config)
        self._source: dict[str, tuple[Tower, str]] = {}
        self._new: dict[str, Init] = {}
        patterns = {}
        for entry in TABLE:
            for key in torch_keys(entry, config):
                patterns[key] = entry.torch_key
        for key in self._shapes:
            for tower in towers:
                own = tower.own_key(key)
                if own is not None and own in tower.tensors:
                    self._source[key] = (tower, own)
                    break
            else:
                if patterns[key] in inits:
                    self._new[key] = inits[patterns[key]]
        self.seed = seed

    @property
    def new_keys(self) -> dict[str, Init]:
        return self._new

    def sources(self) -> list[tuple[Tower, str]]:
        """(tower, its key) of every tensor taken from a tower."""
        return list(self._source.values())

    def __getitem__(self, key):
        if key in self._source:
            tower, own = self._source[key]
            return tower.tensors[own]
        return draw_parameter(key, self._new[key], self._shapes[key], self.seed)

    def shape(self, key) -> tuple[int, ...]:
        if key in self._source:
            tower, own = self._source[key]
            return tensor_shape(tower.tensors, own)
        return tuple(self._shapes[key])

    def __iter__(self):
        return iter(list(self._source) + list(self._new))

    def __len__(self):
        return len(self._source) + len(self._new)

    def __contains__(self, key):
        return key in self._source or key in self._new


@dataclasses.dataclass
class TowersReport:
    vision: str
    lm: str
    tokenizer: str
    dst: str
    config: dict
    dtype: str
    seed: int
    special_tokens: dict
    initialised: dict  # original key pattern -> distribution
    ignored: list[str]  # tower tensors aki-jax does not use (SigLIP text tower, pooling head)
    bytes_written: int
    seconds: float


def _check_tower_tensors(tower: Tower, kind: str, config: AKIConfig) -> list[str]:
    """Refuse missing, surplus or misshapen tower tensors (naming the file); returns the ignored keys."""
    expected = expected_torch_shapes(config)
    aki, own = tower.prefix
    wanted = {
        key: shape
        for key, shape in expected.items()
        if key.startswith(aki) and key not in NEW_WITHOUT_TOWER_TENSOR and tower.own_key(key) is not None
    }
    present = set(tower.tensors.keys())
    missing = [tower.own_key(k) for k in wanted if tower.own_key(k) not in present]
    if missing:
        more = f" (first 10 of {len(missing)})" if len(missing) > 10 else ""
        raise ConversionError(
            f"{tower.folder}: {kind} tensors that {tower.config_path} calls for are missing{more}: "
            + ", ".join(missing[:10])
        )
    ignored, surplus = [], []
    for key in sorted(present):
        aki_key = tower.aki_key(key)
        if aki_key is None or aki_key.startswith(SKIPPED_PREFIXES):
            ignored.append(key)
        elif aki_key not in expected:
            surplus.append(key)
    if surplus:
        raise ConversionError(
            f"{tower.file_of(surplus[0])}: {len(surplus)} {kind} tensor(s) that {tower.config_path} does not "
            f"account for (a layer count or architecture that disagrees with config.json): " + ", ".join(surplus[:10])
        )
    for aki_key, want in wanted.items():
        key = tower.own_key(aki_key)
        got = tensor_shape(tower.tensors, key)
        if tuple(got) != tuple(want):
            raise ConversionError(
                f"{tower.file_of(key)}: tensor {key!r} has shape {tuple(got)}, but {tower.config_path} implies "
                f"{tuple(want)}"
            )
    return ignored


# AKI keys whose parameter the towers never hold (drawn fresh) -- unless the language model has a head bias,
# which the original wrapper would then keep (it passes `lm_head.bias` on as `_bias`).
NEW_WITHOUT_TOWER_TENSOR = frozenset(
    {
        "lang_model.model.embed_tokens.additional_embedding.weight",
        "lang_model.lm_head.bias",
        "lang_model.lm_head.additional_fc.weight",
        "lang_model.lm_head.additional_fc.bias",
    }
)


def _load_tokenizer(folder: Path):
    from aki_jax.processing.tokenizer import load_tokenizer

    if not folder.is_dir():
        raise ConversionError(f"{folder}: tokenizer folder does not exist")
    try:
        return load_tokenizer(folder)
    except Exception as e:  # the tokenizers library raises bare Exceptions on bad files
        raise ConversionError(
            f"{folder}: cannot read the tokenizer ({str(e).splitlines()[0] if str(e) else e!r})"
        ) from e


def towers_config(
    vision: Tower,
    lm: Tower,
    tokenizer,
    tokenizer_dir: Path,
    num_latents: int | None = None,
    resampler: ResamplerConfig | None = None,
) -> AKIConfig:
    """The aki-jax config of AKI over these towers: their config.json's, the original resampler, the tokenizer's ids."""
    resampler = resampler or ResamplerConfig()  # the original's PerceiverResampler: depth 6, 8 heads of 64, x4
    if num_latents is not None:
        if num_latents < 1:
            raise ValueError(f"num_latents must be >= 1, got {num_latents}")
        resampler = dataclasses.replace(resampler, num_latents=int(num_latents))
    decoder = decoder_from_phi3(lm.config, str(lm.config_path))
    if tokenizer.initial_tokenizer_len > decoder.vocab_size:
        raise ConversionError(
            f"{tokenizer_dir}: the tokenizer has {tokenizer.initial_tokenizer_len} tokens before <image>, more than "
            f"the {decoder.vocab_size} embedding rows of {lm.config_path} (vocab_size)"
        )
    return AKIConfig(
        vision=vision_from_siglip(vision.config, str(vision.config_path)),
        resampler=resampler,
        decoder=decoder,
        initial_tokenizer_len=tokenizer.initial_tokenizer_len,
        pad_token_id=tokenizer.pad_token_id,
    )


def init_from_towers(
    vision: str | Path,
    lm: str | Path,
    dst: str | Path,
    tokenizer: str | Path | None = None,
    dtype: str = "float32",
    num_latents: int | None = None,
    seed: int = 0,
    resampler: ResamplerConfig | None = None,
    compress: bool = False,
    overwrite: bool = False,
    overlap: bool = True,
    log: Callable[[str], None] = print,
) -> TowersReport:
    """Write the pretrained folder `dst` of a freshly assembled AKI (what the paper's pretraining starts from).

    vision: a SigLIP folder (`SiglipModel` or `SiglipVisionModel`); lm: a `Phi3ForCausalLM` folder; each
    with `model.safetensors` or shards + `model.safetensors.index.json`. tokenizer: its folder (default `lm`).
    dtype: of every parameter, "float32" by default as in the original (which builds both towers in float32 and
    trains fp32 master weights); "bfloat16" halves the folder. num_latents: resampler latents (default 144).
    seed: the draws of the new parameters. resampler: a whole ResamplerConfig instead of the original's.
    overlap: build each leaf while the previous ones are written (`aki_jax.checkpoint.ParamsWriter`), within
    the memory of the largest leaf; False writes each batch before building the next (the same folder).
    """
    start = time.perf_counter()
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    vision_tower = _open_tower(vision, "SigLIP", SIGLIP_MODEL_TYPES, VISION_PREFIX)
    lm_tower = _open_tower(lm, "Phi-3", PHI3_MODEL_TYPES, LM_PREFIX)
    log(f"vision tower: {vision_tower.description}")
    log(f"language model: {lm_tower.description}")
    tokenizer_dir = Path(tokenizer) if tokenizer is not None else lm_tower.folder
    tok = _load_tokenizer(tokenizer_dir)
    config = towers_config(vision_tower, lm_tower, tok, tokenizer_dir, num_latents, resampler)
    ignored = _check_tower_tensors(vision_tower, "SigLIP", config)
    ignored += _check_tower_tensors(lm_tower, "Phi-3", config)

    inits = new_parameter_inits(config, float(lm_tower.config.get("initializer_range") or PHI3_INITIALIZER_RANGE))
    state = _InitialState([vision_tower, lm_tower], inits, config, seed)
    dtype = as_dtype(dtype).name
    shapes, config = config, config.replace(param_dtype=dtype)  # `shapes`: the config the leaf shapes were traced for
    text_tower = [k for k in ignored if not k.startswith("vision_model.head.")]
    log(
        f"special tokens: pad {tok.pad_token!r} = {tok.pad_token_id}, initial_tokenizer_len "
        f"{tok.initial_tokenizer_len}, <image> = {tok.image_token_id}, <|endofchunk|> = {tok.end_of_chunk_token_id}"
    )
    if ignored:
        log(
            f"not used: {len(text_tower)} SigLIP text-tower / contrastive tensors and "
            f"{len(ignored) - len(text_tower)} pooling-head tensors"
        )
    log(f"new parameters (seed {seed}): {len(state.new_keys)} tensors drawn as the original initialises them")

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(dst, "initialising")
    try:
        config.to_json(tmp / CONFIG_FILE)
        recorded = {
            "vision_encoder_path": str(vision_tower.folder.absolute()),
            "lang_model_path": str(lm_tower.folder.absolute()),
        }
        (tmp / ORIGINAL_CONFIG_FILE).write_text(
            json.dumps(original_constructor_args(config, recorded), indent=2) + "\n"
        )
        leaf_bytes = [math.prod(leaf_shape(shapes, e)) * (num_layers(shapes, e.layers) or 1) for e in TABLE]
        arena = max(leaf_bytes) * as_dtype(dtype).itemsize  # the serial path's peak memory: one leaf
        with ParamsWriter(tmp / PARAMS_DIR, compress, overlap=overlap, arena_bytes=arena) as writer:
            for leaf_path, leaf in iter_params(state, shapes, dtype, allocate=writer.allocate):
                writer.add(leaf_path, leaf)
                del leaf
        written = writer.bytes_written
        tok.save(tmp)
        if (lm_tower.folder / "generation_config.json").is_file():
            shutil.copy2(lm_tower.folder / "generation_config.json", tmp / "generation_config.json")
        report = TowersReport(
            vision=str(vision_tower.folder),
            lm=str(lm_tower.folder),
            tokenizer=str(tokenizer_dir),
            dst=str(dst),
            config=config.to_dict(),
            dtype=dtype,
            seed=seed,
            special_tokens={
                "pad": [tok.pad_token, tok.pad_token_id],
                "initial_tokenizer_len": tok.initial_tokenizer_len,
                "<image>": tok.image_token_id,
                "<|endofchunk|>": tok.end_of_chunk_token_id,
            },
            initialised={pattern: init.describe() for pattern, init in inits.items()},
            ignored=ignored,
            bytes_written=written,
            seconds=time.perf_counter() - start,
        )
        if "lang_model.lm_head.bias" not in state.new_keys:
            report.initialised.pop("lang_model.lm_head.bias")
            log("the language model has its own lm_head.bias: kept (as the original wrapper does)")
        (tmp / REPORT_FILE).write_text(json.dumps(dataclasses.asdict(report), indent=2) + "\n")
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {dst}: {written / 1e9:.3f} GB ({dtype}) in {report.seconds:.1f} s")
    return report
