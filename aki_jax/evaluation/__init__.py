"""Benchmark evaluation: readers, prompts, likelihood / generation scoring, sharded resumable runs, metrics.

items.py     `Item`: one question (multiple_choice | yes_no | vqa), its image source and references.
readers.py   VLMEvalKit-style TSV and JSONL -> items + reported bad rows; `write_benchmark`.
prompts.py   the user turn per task (original AKI / LLaVA-style instructions); likelihood candidates.
answers.py   option letter / yes-no / short answer from generated text.
vqa.py       VQA answer normalisation and accuracy (official leave-one-out form, or the simple form).
metrics.py   accuracy per category / task, MMBench circular, POPE, MME; markdown tables.
scoring.py   the model side: `ModelRunner` (padded batches on a mesh), `EvaluationScorer`.
runner.py    one benchmark: work split over processes, resumable shards, deterministic merge.
job.py       several benchmarks -> results.json / results.md; `evaluate_checkpoint` (tools/evaluate.py).
"""

from aki_jax.evaluation.answers import extract_choice, extract_short_answer, extract_yes_no
from aki_jax.evaluation.items import OPTION_LETTERS, TASKS, ImageSource, Item
from aki_jax.evaluation.metrics import benchmark_scores, markdown_table, mme_scores, pope_scores
from aki_jax.evaluation.prompts import candidate_answers, user_prompt
from aki_jax.evaluation.readers import Benchmark, read_benchmark
from aki_jax.evaluation.runner import (
    Distribution,
    ItemFailed,
    ItemUnreadable,
    evaluate_benchmark,
    merge_predictions,
    run_predictions,
)
from aki_jax.evaluation.vqa import normalize_answer, vqa_accuracy

__all__ = [
    "OPTION_LETTERS",
    "TASKS",
    "Benchmark",
    "Distribution",
    "ImageSource",
    "Item",
    "ItemFailed",
    "ItemUnreadable",
    "benchmark_scores",
    "candidate_answers",
    "evaluate_benchmark",
    "extract_choice",
    "extract_short_answer",
    "extract_yes_no",
    "markdown_table",
    "merge_predictions",
    "mme_scores",
    "normalize_answer",
    "pope_scores",
    "read_benchmark",
    "run_predictions",
    "user_prompt",
    "vqa_accuracy",
]
