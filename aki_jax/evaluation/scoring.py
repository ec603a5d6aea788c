"""Prediction methods on an AKI model: option log-likelihood and generation with answer extraction.

Both implement the runner's `Scorer` protocol. One model call handles `rows_per_step` rows of this
process; on a mesh the rows of all processes form one global batch split over the batch axes
(`aki_jax.sharding`'s "act_batch" rule), so every call is one SPMD computation.

Likelihood ("likelihood" mode, multiple choice and yes/no): each candidate answer is scored on the SFT
encoding of the conversation (user prompt, assistant candidate) — exactly what training supervises — by
the sum of log-probabilities of its supervised tokens: the candidate's tokens plus the `<|end|>` that
closes the turn, so "A" means "the answer is exactly A". The prediction is the best candidate (ties: the
first). All candidates of an item share one row (`shared_prefix_row`): the common prompt (image included)
once, then each candidate's own tokens as a branch that sees the prompt and itself only, with the
positions it has in its own encoding. The prompt's tokens never see a branch (branches are assistant
text, which neither causal attention nor MMA lets earlier tokens read), so every score equals the one
its own full row gives, at the cost of one prompt instead of one per candidate. VQA items have no
candidates and are generated even in this mode.

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
from aki_jax.evaluation.runner import Distribution, ItemFailed, ItemUnreadable
from aki_jax.mask import TEXT

MODES = ("likelihood", "generate")


def shared_prefix_row(examples: list[dict]) -> dict:
    """The SFT encodings of one item's candidates -> one row that scores all of them.

    The common prefix P (where the encodings agree, cut so that it holds no supervised prediction but
    its last token's) appears once; candidate k's tokens after it, up to its last supervised position,
    follow as branch k + 1 (prefix: branch 0) with positions continuing from P. Candidate k's targets and
    weights sit at its own branch and, for its first answer token, at the prefix's last position.

    Returns numpy {"input_ids", "modality_ids", "positions", "branch": int32[n], "targets": int32[K, n],
    "weights": f32[K, n], "pixel_values": f32[I, S, S, 3]}. Raises ValueError when the encodings share no
    prefix, a candidate has no supervised token, or a branch holds anything but TEXT tokens.
    """
    if not examples:
        raise ValueError("no candidates to score")
    ids = [np.asarray(e["input_ids"]) for e in examples]
    modality = [np.asarray(e["modality_ids"]) for e in examples]
    prefix = min(len(x) for x in ids)
    for x, m in zip(ids[1:], modality[1:], strict=True):
        differs = np.flatnonzero((x[:prefix] != ids[0][:prefix]) | (m[:prefix] != modality[0][:prefix]))
        if differs.size:
            prefix = int(differs[0])
    supervised = [np.flatnonzero(np.asarray(e["weights"]) > 0) for e in examples]
    if any(s.size == 0 for s in supervised):
        raise ValueError("a candidate has no supervised token")
    prefix = min([prefix] + [int(s[0]) + 1 for s in supervised])
    if prefix < 1:
        raise ValueError("the candidates' encodings share no prefix")
    branches = [slice(prefix, int(s[-1]) + 1) for s in supervised]
    for k, (m, b) in enumerate(zip(modality, branches, strict=True)):
        if np.any(m[b] != TEXT):
            raise ValueError(f"candidate {k}: its tokens after the shared prompt are not all TEXT")
    length = prefix + sum(b.stop - b.start for b in branches)
    row = {
        "input_ids": np.zeros(length, np.int32),
        "modality_ids": np.zeros(length, np.int32),
        "positions": np.zeros(length, np.int32),
        "branch": np.zeros(length, np.int32),
        "targets": np.zeros((len(examples), length), np.int32),
        "weights": np.zeros((len(examples), length), np.float32),
        "pixel_values": np.asarray(examples[0]["pixel_values"], np.float32),
    }
    row["input_ids"][:prefix] = ids[0][:prefix]
    row["modality_ids"][:prefix] = modality[0][:prefix]
    row["positions"][:prefix] = np.arange(prefix)
    start = prefix
    for k, (e, b) in enumerate(zip(examples, branches, strict=True)):
        n = b.stop - b.start
        where = slice(start, start + n)
        row["input_ids"][where] = ids[k][b]
        row["modality_ids"][where] = TEXT
        row["positions"][where] = np.arange(prefix, prefix + n)
        row["branch"][where] = k + 1
        row["targets"][k, prefix - 1] = e["targets"][prefix - 1]
        row["weights"][k, prefix - 1] = e["weights"][prefix - 1]
        row["targets"][k, where] = np.asarray(e["targets"])[b]
        row["weights"][k, where] = np.asarray(e["weights"])[b]
        start += n
    return row


def branch_attention_mask(modality_ids, branch, kind: str):
    """The modality mask, restricted so that a branch sees the prefix (branch 0) and itself only."""
    from aki_jax.mask import attention_mask

    own = (branch[:, :, None] == branch[:, None, :]) | (branch[:, None, :] == 0)
    return attention_mask(modality_ids, None, kind=kind) & own


@functools.partial(jax.jit, static_argnames=("model",))
def _branch_log_likelihoods(params, batch, *, model):
    """Shared-prefix rows -> per-candidate sum of log p(target) over its weighted positions f32[B, K].

    A module-level jit keyed on the (hashable) model, so every runner of one model shares compilations.
    """
    mask = branch_attention_mask(batch["modality_ids"], batch["branch"], model.config.attention)
    logits = model.apply(
        {"params": params},
        batch["pixel_values"],
        batch["input_ids"],
        batch["modality_ids"],
        positions=batch["positions"],
        attention_mask=mask,
    ).astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, L]
    picked = jnp.take_along_axis(logits, jnp.swapaxes(batch["targets"], 1, 2), axis=-1)  # [B, L, K]
    return jnp.einsum("blk,bkl->bk", picked - log_z[..., None], batch["weights"])


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

    def log_likelihoods(self, rows: list[dict]) -> list[np.ndarray]:
        """Candidate scores of each `shared_prefix_row` (one model call): f32[K] per row.

        Rows are right-padded to a length that is a multiple of `length_multiple`, and the candidate
        axis to a multiple of 4, both agreed by all processes (few compiled shapes).
        """
        longest = max((len(r["input_ids"]) for r in rows), default=1)
        length = self.dist.max(math.ceil(longest / self.length_multiple) * self.length_multiple)
        most = self.dist.max(max((len(r["targets"]) for r in rows), default=1))
        candidates = math.ceil(most / 4) * 4
        s = self.config.vision.image_size
        b = self.rows_per_step
        batch = {
            "input_ids": np.full((b, length), self.processor.tokenizer.pad_token_id, np.int32),
            "modality_ids": np.zeros((b, length), np.int32),  # PAD
            "positions": np.zeros((b, length), np.int32),
            "branch": np.full((b, length), -1, np.int32),
            "targets": np.zeros((b, candidates, length), np.int32),
            "weights": np.zeros((b, candidates, length), np.float32),
            "pixel_values": np.zeros((b, 1, s, s, 3), np.float32),
        }
        batch["modality_ids"][:, 0] = TEXT  # unused rows: one token, so no row attends to nothing
        batch["branch"][:, 0] = 0
        for i, row in enumerate(rows):
            n, k = len(row["input_ids"]), len(row["targets"])
            for key in ("input_ids", "modality_ids", "positions", "branch"):
                batch[key][i, :n] = row[key]
            batch["targets"][i, :k, :n] = row["targets"]
            batch["weights"][i, :k, :n] = row["weights"]
            if len(row["pixel_values"]) > 1:
                raise ValueError(f"a scoring row holds {len(row['pixel_values'])} images; at most 1 is supported")
            batch["pixel_values"][i, : len(row["pixel_values"])] = row["pixel_values"]
        self.calls += 1
        with self._context():
            scores = _branch_log_likelihoods(self.params, self._place(batch), model=self.model)
        scores = local_rows(scores)
        return [scores[i, : len(row["targets"])] for i, row in enumerate(rows)]

    def generate(self, examples: list[dict]) -> list[list[int]]:
        """Greedy continuation token ids of each prompt example, cut before the first stop token."""
        from aki_jax.generation import Sampling, generate

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
                sampling=Sampling(eos_ids=stops, pad_id=tokenizer.pad_token_id),
            )
        new_ids = local_rows(new_ids)[: len(examples)]
        out = []
        for row in new_ids.tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            out.append(row[:cut])
        return out


@dataclasses.dataclass
class Prepared:
    """An item ready to run: the example of its one row."""

    item: Item
    example: dict  # a `shared_prefix_row` of all candidates (likelihood) or a prompt example (generation)
    labels: list[str]  # candidate labels (likelihood); empty for generation


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

    def prepare(self, item: Item) -> Prepared:
        processor = self.runner.processor
        pixel_values = None
        if item.image is not None:
            from aki_jax.processing.image import ImageError, preprocess_images

            try:
                pixel_values = preprocess_images([item.image.load()], processor.image_size)
            except ImageError as e:  # decoded when the file was read, so it changed since: skip it too
                raise ItemUnreadable(str(e)) from None
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
                return Prepared(item, shared_prefix_row(examples), [label for label, _ in pairs])
            return Prepared(item, processor.prompt_example([user], pixel_values=pixel_values), [])
        except ValueError as e:
            raise ItemFailed(f"prompt could not be encoded: {e}") from None

    def run(self, prepared: list[Prepared]) -> list[Any]:
        """One model call per kind of row present on any process (likelihood rows, generation rows)."""
        scored = [p for p in prepared if p.labels]
        generated = [p for p in prepared if not p.labels]
        results: dict[int, Any] = {}
        agree = self.runner.dist.max  # every process must make the same model calls (SPMD), even with no rows
        if agree(int(bool(scored))):
            values = self.runner.log_likelihoods([p.example for p in scored])
            for p, v in zip(scored, values, strict=True):
                results[id(p)] = [float(x) for x in v]
        if agree(int(bool(generated))):
            texts = self.runner.generate([p.example for p in generated])
            for p, ids in zip(generated, texts, strict=True):
                results[id(p)] = ids
        return [results[id(p)] for p in prepared]

    def finish(self, item: Item, output: Any) -> dict:
        if self._uses_likelihood(item):
            labels = [label for label, _ in prompts.candidate_answers(item, self.continuation)]
            scores = dict(zip(labels, output, strict=True))
            best = max(labels, key=lambda label: (scores[label], -labels.index(label)))
            return {"prediction": best, "log_likelihoods": scores}
        text = self.runner.processor.tokenizer.decode(output)
        if item.task == "multiple_choice":
            prediction = answers.extract_choice(text, item.options)
        elif item.task == "yes_no":
            prediction = answers.extract_yes_no(text)
        else:
            prediction = answers.extract_short_answer(text)
        return {"prediction": prediction, "output": text}
