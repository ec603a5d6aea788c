"""Scores from per-item predictions: accuracy (overall, per category, per task), POPE and MME.

Every function here is pure: records in, numbers out. A record is the merged prediction of one item
(see `aki_jax.evaluation.runner`): {"index", "task", "category", "group", "answers", "prediction",
"score", "error"?}. `score` is 1/0 for multiple choice and yes/no, the VQA accuracy for vqa, and None
for items without a reference (counted as `unscored`, left out of every mean). A prediction that could
not be parsed (None) or an item that failed (`error`) scores 0: dropping them would inflate the scores.

POPE (any yes/no items; "yes" is the positive class): accuracy, precision, recall, F1 and the ratio
of "yes" answers, overall and per category (POPE's categories are its adversarial/popular/random splits).
An unparsed answer is neither a true nor a false positive; it counts as wrong in accuracy.

MMBench circular evaluation (VLMEvalKit's TSVs hold each question's option rotations at indices
i + k * 1,000,000): when multiple-choice items share `index % 1,000,000`, `circular_accuracy` counts a
question right only if every rotation is right. `accuracy` stays the per-item mean.

MME (when yes/no categories are MME's): per category, acc = correct questions / questions and
acc+ = images with every question right / images (MME asks two questions per image); the category
score is 100 * (acc + acc+), at most 200. Perception sums the 10 perception categories (max 2000),
cognition the 4 cognition categories (max 800).
"""

from __future__ import annotations

from collections import defaultdict

MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "ocr",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def item_score(task: str, answers, prediction) -> float | None:
    """1/0 (multiple choice, yes/no) or VQA accuracy; None when the item has no reference."""
    if not answers:
        return None
    if prediction is None:
        return 0.0
    if task == "vqa":
        from aki_jax.evaluation.vqa import vqa_accuracy

        return vqa_accuracy(prediction, answers)
    return float(prediction == answers[0])


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _mme_key(category: str) -> str:
    return category.strip().lower().replace(" ", "_")


def pope_scores(records) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio of yes/no records (see the module docstring)."""
    tp = fp = fn = tn = yes = 0
    for r in records:
        truth, guess = r["answers"][0], r["prediction"]
        yes += guess == "yes"
        if guess == "yes":
            tp += truth == "yes"
            fp += truth == "no"
        elif guess == "no":
            tn += truth == "no"
            fn += truth == "yes"
        else:
            fn += truth == "yes"
    n = len(records)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": yes / n if n else float("nan"),
        "count": n,
    }


def mme_scores(records) -> dict:
    """MME's per-category acc / acc+ / score and perception / cognition totals (see the module docstring)."""
    by_category = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_category[_mme_key(r["category"])][r["group"]].append(r["score"])
    categories = {}
    for category, groups in sorted(by_category.items()):
        scores = [s for group in groups.values() for s in group]
        acc = _mean(scores)
        acc_plus = _mean(float(all(s == 1.0 for s in group)) for group in groups.values())
        categories[category] = {
            "acc": acc,
            "acc_plus": acc_plus,
            "score": 100.0 * (acc + acc_plus),
            "questions": len(scores),
            "images": len(groups),
        }
    perception = sum(v["score"] for k, v in categories.items() if k in MME_PERCEPTION)
    cognition = sum(v["score"] for k, v in categories.items() if k in MME_COGNITION)
    return {
        "perception": perception,
        "cognition": cognition,
        "total": perception + cognition,
        "categories": categories,
        "missing_categories": [c for c in MME_PERCEPTION + MME_COGNITION if c not in categories],
    }


CIRCULAR_STRIDE = 1_000_000


def circular_accuracy(records) -> float | None:
    """MMBench's circular rule (see the module docstring); None when no question has rotations."""
    groups = defaultdict(list)
    for r in records:
        if isinstance(r["index"], int):
            groups[r["index"] % CIRCULAR_STRIDE].append(r["score"])
    if not any(len(g) > 1 for g in groups.values()):
        return None
    return _mean(float(all(s == 1.0 for s in g)) for g in groups.values())


def is_mme(records) -> bool:
    categories = {_mme_key(r["category"]) for r in records if r["task"] == "yes_no"}
    known = set(MME_PERCEPTION) | set(MME_COGNITION)
    return bool(categories) and categories <= known


def benchmark_scores(records, read_errors: int = 0) -> dict:
    """All scores of one benchmark from its merged records (sorted or not)."""
    scored = [r for r in records if r["score"] is not None]
    result = {
        "items": len(records),
        "scored": len(scored),
        "unscored": len(records) - len(scored),
        "unparsed": sum(r["prediction"] is None and not r.get("error") for r in records),
        "failed": sum(bool(r.get("error")) for r in records),
        "read_errors": read_errors,
        "accuracy": _mean(r["score"] for r in scored),
    }
    categories = defaultdict(list)
    for r in scored:
        categories[r["category"]].append(r["score"])
    if len(categories) > 1 or (categories and "" not in categories):
        result["per_category"] = {
            c: {"accuracy": _mean(s), "count": len(s)} for c, s in sorted(categories.items(), key=lambda kv: kv[0])
        }
    tasks = defaultdict(list)
    for r in scored:
        tasks[r["task"]].append(r["score"])
    result["per_task"] = {t: {"accuracy": _mean(s), "count": len(s)} for t, s in sorted(tasks.items())}

    circular = circular_accuracy(r for r in scored if r["task"] == "multiple_choice")
    if circular is not None:
        result["circular_accuracy"] = circular

    yes_no = [r for r in scored if r["task"] == "yes_no"]
    if yes_no:
        pope = {"overall": pope_scores(yes_no)}
        by_split = defaultdict(list)
        for r in yes_no:
            by_split[r["category"]].append(r)
        if len(by_split) > 1:
            pope["per_category"] = {c: pope_scores(rs) for c, rs in sorted(by_split.items())}
        result["pope"] = pope
        if is_mme(yes_no):
            result["mme"] = mme_scores(yes_no)
    return result


def _fmt(value, percent=True) -> str:
    if value is None or value != value:  # NaN
        return "-"
    return f"{100 * value:.2f}" if percent else f"{value:.2f}"


def markdown_table(results: dict) -> str:
    """A summary table (one row per benchmark) followed by per-category tables."""
    lines = [
        "| benchmark | mode | items | scored | accuracy (%) | extra |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        s = r["scores"]
        extra = []
        if "circular_accuracy" in s:
            extra.append(f"circular {_fmt(s['circular_accuracy'])}")
        if "mme" in s:
            extra.append(f"MME perception {s['mme']['perception']:.1f}, cognition {s['mme']['cognition']:.1f}")
        elif "pope" in s:
            p = s["pope"]["overall"]
            extra.append(f"POPE F1 {_fmt(p['f1'])}, precision {_fmt(p['precision'])}, recall {_fmt(p['recall'])}")
        if s["unparsed"] or s["failed"] or s["read_errors"]:
            extra.append(f"unparsed {s['unparsed']}, failed {s['failed']}, bad rows {s['read_errors']}")
        lines.append(
            f"| {name} | {r['mode']} | {s['items']} | {s['scored']} | {_fmt(s['accuracy'])} | {'; '.join(extra)} |"
        )
    for name, r in results.items():
        s = r["scores"]
        if "mme" in s:
            lines += ["", f"**{name}** (MME)", "", "| category | acc (%) | acc+ (%) | score |", "|---|---:|---:|---:|"]
            for c, v in s["mme"]["categories"].items():
                lines.append(f"| {c} | {_fmt(v['acc'])} | {_fmt(v['acc_plus'])} | {v['score']:.2f} |")
        elif "per_category" in s:
            lines += ["", f"**{name}** per category", "", "| category | count | accuracy (%) |", "|---|---:|---:|"]
            for c, v in s["per_category"].items():
                lines.append(f"| {c or '(none)'} | {v['count']} | {_fmt(v['accuracy'])} |")
    return "\n".join(lines) + "\n"
