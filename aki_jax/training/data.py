"""What training reads, built from a `TrainConfig`: a resumable batch iterator and a held-out pass.

The pipelines live in `aki_jax.data`; this module only wires them to the loop: it picks the tokenizer
(`TrainConfig.tokenizer`, else the `--init-from` folder's, else for digits-only data the built-in
digits tokenizer), fits the model's
vocabulary fields to it, and builds `make_train_iterator` / `make_eval_iterator`. With
`synthetic_data=true` it yields deterministic random batches with example ids instead (tests, benchmarks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import jax

from aki_jax.config import AKIConfig
from aki_jax.training.synthetic import SyntheticBatches


@dataclasses.dataclass
class DataBundle:
    train: Iterator  # per-process batch dicts; has get_state() / set_state(state)
    make_eval: Callable[[], Iterable[dict]]  # a fresh held-out pass of per-process batches (empty rows: weight 0)
    model_config: AKIConfig  # the configured model, vocabulary fields fitted to the tokenizer
    tokenizer_dir: str | None = None
    description: str = ""

    def close(self):
        close = getattr(self.train, "close", None)
        if close is not None:
            close()


def build_data(config) -> DataBundle:
    if config.synthetic_data:
        return synthetic_data(config)
    return pipeline_data(config)


def pipeline_data(config) -> DataBundle:
    from aki_jax.data import digits_tokenizer, make_eval_iterator, make_train_iterator
    from aki_jax.processing import Processor, load_tokenizer

    d = config.data
    out_dir = Path(config.checkpoint.dir)
    tokenizer_dir = config.tokenizer or config.init_from  # a pretrained folder carries its tokenizer
    if config.init_from and not config.tokenizer:
        from aki_jax.checkpoint import check_pretrained_folder

        check_pretrained_folder(config.init_from, "--init-from")  # else the tokenizer's error would be the first
        if not any((Path(config.init_from) / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
            raise FileNotFoundError(
                f"--init-from {config.init_from}: the folder holds no tokenizer (tokenizer.json or tokenizer.model); "
                f"pass tokenizer=/path/to/tokenizer/folder"
            )
    if tokenizer_dir:
        tokenizer = load_tokenizer(tokenizer_dir)
    elif all(s.kind == "digits" for s in d.sources + d.eval_sources):
        tokenizer_dir = str(out_dir / "tokenizer")
        # Deterministic, so each process trains its own; one writes the folder (shared by all hosts).
        tokenizer = digits_tokenizer(tokenizer_dir if jax.process_index() == 0 else None)
    else:
        raise ValueError(
            "this data needs a tokenizer: pass tokenizer=/path/to/folder (or --init-from a pretrained folder)"
        )
    model_config = fit_vocabulary(config.model, tokenizer)
    processor = Processor.from_config(model_config, tokenizer)
    train = make_train_iterator(d, processor, model_config)
    eval_batch = config.eval.batch_size or d.batch_size

    def make_eval():
        iterator = make_eval_iterator(d, processor, model_config, batch_size=eval_batch)
        if config.eval.max_batches:
            return (b for b, _ in zip(iterator, range(config.eval.max_batches), strict=False))
        return iterator

    names = ", ".join(s.name or f"{s.kind}:{s.path or s.split}" for s in d.sources)
    return DataBundle(train, make_eval, model_config, tokenizer_dir, names)


def fit_vocabulary(config: AKIConfig, tokenizer) -> AKIConfig:
    """`initial_tokenizer_len` and `pad_token_id` from the tokenizer; the embedding must have room for it."""
    if tokenizer.initial_tokenizer_len > config.decoder.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.initial_tokenizer_len} tokens but model.decoder.vocab_size is "
            f"{config.decoder.vocab_size}: raise model.decoder.vocab_size"
        )
    return config.replace(initial_tokenizer_len=tokenizer.initial_tokenizer_len, pad_token_id=tokenizer.pad_token_id)


def synthetic_data(config) -> DataBundle:
    d = config.data
    images = max(d.images_per_row, 1)
    train = SyntheticBatches(
        config.model, d.batch_size, d.seq_len, images, seed=d.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )  # fmt: skip
    eval_batch = config.eval.batch_size or d.batch_size

    def make_eval():
        held_out = SyntheticBatches(
            config.model, eval_batch, d.seq_len, images, seed=d.seed + 10_000,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )  # fmt: skip
        return [next(held_out) for _ in range(max(config.eval.max_batches, 1))]

    return DataBundle(train, make_eval, config.model, None, f"synthetic (seed {d.seed})")
