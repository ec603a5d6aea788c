"""Prediction methods on an AKI model: option log-likelihood and generation with answer extraction.

Both implement the runner's `Scorer` protocol. One model call handles `rows_per_step` rows of this
process; on a mesh the rows of all processes form one global batch split over the batch axes
(`aki_jax.sharding`'s "act_batch" rule), so every call is one SPMD computation.

Likelihood ("likelihood" mode, multiple choice and yes/no): one row per candidate answer. A row is the
SFT encoding of the conversation (user prompt, assistant candidate) — exactly what training supervises —
and its score is the sum of log-probabilities of the supervised tokens: the candidate's tokens plus the
`<|end|>` that closes the turn, so "A" means "the answer is exactly A". The prediction is the best
candidate (ties: the first). VQA items have no candidates and are generated even in this mode.

Generation ("generate" mode, and VQA in any mode): greedy decoding of the prompt, cut at the first stop
token, then `answers.extract_*`.

Sequence lengths are padded up to a multiple of `length_multiple` (agreed across processes), so the
number of compiled shapes stays small.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aki_jax.evaluation import answers, prompts
from aki_jax.evaluation.items import Item
from aki_jax.evaluation.runner import Distribution, ItemFailed
from aki_jax.losses import next_token_loss
from aki_jax.mask import TEXT

MODES = ("likelihood", "generate")


def row_log_likelihoods(logits, targets, weights):
    """Sum of log p(target) over weighted positions, per row: f[B, L, V], int[B, L], f[B, L] -> f32[B]."""

    def one(logit, t, w):
        mean, count = next_token_loss(logit[None], t[None], w[None])
        return -mean * count

    return jax.vmap(one)(logits, targets, weights)


@functools.partial(jax.jit, static_argnames=("model",))
def _batch_log_likelihoods(params, batch, *, model):
    """The model on a padded batch -> per-row log-likelihood of its weighted targets f32[B].

    A module-level jit keyed on the (hashable) model, so every runner of one model shares compilations.
    """
    logits = model.apply(
        {"params": params},
        batch["pixel_values"],
        batch["input_ids"],
        batch["modality_ids"],
        batch["segment_ids"],
        batch["positions"],
    )
    return row_log_likelihoods(logits, batch["targets"], batch["weights"])


def local_rows(array) -> np.ndarray:
    """This process's rows of a global array split on axis 0, in the order it passed them in."""
    if jax.process_count() == 1:
        return np.asarray(array)
    pieces = {}
    for shard in array.addressable_shards:
        pieces.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
    return np.concatenate([pieces[k] for k in sorted(pieces)])


@dataclasses.dataclass
class ModelRunner:
    """A model, its params and processor, placed on an optional mesh; runs padded fixed-shape batches.

    mesh/rules: from `aki_jax.sharding` (batch split by the "act_batch" rule); None runs on the
    default device. `calls` counts model calls (tests use it to prove resumed runs skip work).
    """

    model: Any
    params: Any
    processor: Any
    rows_per_step: int
    mesh: Any = None
    rules: Any = None
    length_multiple: int = 64
    max_new_tokens: int = 16
    dist: Distribution = dataclasses.field(default_factory=Distribution)
    calls: int = 0

    def __post_init__(self):
        if self.rows_per_step < 1:
            raise ValueError(f"rows per step must be positive, got {self.rows_per_step}")
        if self.mesh is not None:
            from aki_jax import sharding

            self.rules = self.rules if self.rules is not None else sharding.logical_rules()
            divisor = sharding.batch_divisor(self.mesh, self.rules)
            global_rows = self.rows_per_step * self.dist.process_count
            if global_rows % divisor:
                raise ValueError(
                    f"batch size {global_rows} is not divisible by the {divisor} devices the batch is split over "
                    f"(mesh {dict(self.mesh.shape)}); pick a multiple of {divisor}"
                )

    @property
    def config(self):
        return self.model.config

    def _context(self):
        import contextlib

        if self.mesh is None:
            return contextlib.nullcontext()
        from aki_jax import sharding

        return sharding.activation_context(self.mesh, self.rules)

    def _place(self, batch: dict) -> dict:
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        from aki_jax import sharding

        return sharding.make_global_batch(batch, self.mesh, self.rules)

    def _pad(self, examples: list[dict], padding_side: str) -> dict:
        """Collate to [rows_per_step, L] with L a multiple of `length_multiple` agreed by all processes."""
        longest = max((len(e["input_ids"]) for e in examples), default=1)
        length = self.dist.max(math.ceil(longest / self.length_multiple) * self.length_multiple)
        filler = self._filler()
        rows = list(examples) + [filler] * (self.rows_per_step - len(examples))
        return self.processor.collate(rows, length, max_images=1, padding_side=padding_side)

    def _filler(self) -> dict:
        """A one-token row that fills unused batch slots (its outputs are dropped)."""
        pad = self.processor.tokenizer.pad_token_id
        s = self.config.vision.image_size
        return {
            "input_ids": np.asarray([pad], np.int32),
            "modality_ids": np.asarray([TEXT], np.int32),
            "targets": np.asarray([pad], np.int32),
            "weights": np.zeros(1, np.float32),
            "pixel_values": np.zeros((0, s, s, 3), np.float32),
        }

    def log_likelihoods(self, examples: list[dict]) -> np.ndarray:
        """Sum of supervised-token log-probs of each example (one model call): f32[len(examples)]."""
        batch = self._pad(examples, "right")
        self.calls += 1
        with self._context():
            scores = _batch_log_likelihoods(self.params, self._place(batch), model=self.model)
        return local_rows(scores)[: len(examples)]

    def generate(self, examples: list[dict]) -> list[list[int]]:
        """Greedy continuation token ids of each prompt example, cut before the first stop token."""
        from aki_jax.generation import generate

        batch = self._pad(examples, "left")
        placed = self._place({k: batch[k] for k in ("pixel_values", "input_ids", "modality_ids")})
        tokenizer = self.processor.tokenizer
        stops = tuple(tokenizer.stop_token_ids)
        self.calls += 1
        with self._context():
            new_ids = generate(
                self.model,
                self.params,
                placed["pixel_values"],
                placed["input_ids"],
                placed["modality_ids"],
                max_new_tokens=self.max_new_tokens,
                eos_ids=stops,
                pad_id=tokenizer.pad_token_id,
            )
        new_ids = local_rows(new_ids)[: len(examples)]
        out = []
        for row in new_ids.tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            out.append(row[:cut])
        return out


@dataclasses.dataclass
class Prepared:
    """An item ready to run: its preprocessed image and the examples of its rows."""

    item: Item
    examples: list[dict]
    labels: list[str]  # candidate labels (likelihood rows); empty for a generation row


class EvaluationScorer:
    """The runner's `Scorer`: likelihood or generation per item (see the module docstring)."""

    def __init__(self, runner: ModelRunner, mode: str = "likelihood", continuation: str = "letter", settings=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if continuation not in ("letter", "option"):
            raise ValueError(f"continuation must be 'letter' or 'option', got {continuation!r}")
        self.runner = runner
        self.mode = mode
        self.continuation = continuation
        self.extra_settings = dict(settings or {})

    @property
    def rows_per_step(self) -> int:
        return self.runner.rows_per_step

    def settings(self) -> dict:
        return {
            "mode": self.mode,
            "continuation": self.continuation if self.mode == "likelihood" else None,
            "max_new_tokens": self.runner.max_new_tokens,
            "prompts": {
                "multiple_choice": prompts.MC_INSTRUCTION,
                "yes_no": prompts.YES_NO_INSTRUCTION,
                "vqa": prompts.VQA_INSTRUCTION,
            },
            **self.extra_settings,
        }

    def _uses_likelihood(self, item: Item) -> bool:
        return self.mode == "likelihood" and item.task != "vqa"

    def item_rows(self, item: Item) -> int:
        if self._uses_likelihood(item):
            return len(prompts.candidate_answers(item, self.continuation))
        return 1

    def prepare(self, item: Item) -> Prepared:
        processor = self.runner.processor
        pixel_values = None
        if item.image is not None:
            try:
                from aki_jax.processing.image import preprocess_images

                pixel_values = preprocess_images([item.image.load()], processor.image_size)
            except (OSError, ValueError) as e:
                raise ItemFailed(f"image ({item.image.describe()[:60]}) failed to decode: {e}") from None
        else:
            s = processor.image_size
            pixel_values = np.zeros((0, s, s, 3), np.float32)
        user = {"role": "user", "content": prompts.user_prompt(item)}
        try:
            if self._uses_likelihood(item):
                pairs = prompts.candidate_answers(item, self.continuation)
                examples = [
                    processor.sft_example([user, {"role": "assistant", "content": text}], pixel_values=pixel_values)
                    for _, text in pairs
                ]
                return Prepared(item, examples, [label for label, _ in pairs])
            return Prepared(item, [processor.prompt_example([user], pixel_values=pixel_values)], [])
        except ValueError as e:
            raise ItemFailed(f"prompt could not be encoded: {e}") from None

    def run(self, rows: list[tuple[Prepared, int]]) -> list[Any]:
        """One model call per kind of row present on any process (likelihood rows, generation rows)."""
        scored = [(p, r) for p, r in rows if p.labels]
        generated = [(p, r) for p, r in rows if not p.labels]
        results: dict[tuple[int, int], Any] = {}
        agree = self.runner.dist.max  # every process must make the same model calls (SPMD), even with no rows
        if agree(int(bool(scored))):
            values = self.runner.log_likelihoods([p.examples[r] for p, r in scored])
            for (p, r), v in zip(scored, values, strict=True):
                results[id(p), r] = float(v)
        if agree(int(bool(generated))):
            texts = self.runner.generate([p.examples[0] for p, _ in generated])
            for (p, r), ids in zip(generated, texts, strict=True):
                results[id(p), r] = ids
        return [results[id(p), r] for p, r in rows]

    def finish(self, item: Item, outputs: list[Any]) -> dict:
        if self._uses_likelihood(item):
            labels = [label for label, _ in prompts.candidate_answers(item, self.continuation)]
            scores = dict(zip(labels, outputs, strict=True))
            best = max(labels, key=lambda label: (scores[label], -labels.index(label)))
            return {"prediction": best, "log_likelihoods": scores}
        text = self.runner.processor.tokenizer.decode(outputs[0])
        if item.task == "multiple_choice":
            prediction = answers.extract_choice(text, item.options)
        elif item.task == "yes_no":
            prediction = answers.extract_yes_no(text)
        else:
            prediction = answers.extract_short_answer(text)
        return {"prediction": prediction, "output": text}
