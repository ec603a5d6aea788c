"""Scores from per-item predictions: accuracy (overall, per category, per task), POPE and MME.

Every function here is pure: records in, numbers out. A record is the merged prediction of one item
(see `aki_jax.evaluation.runner`): {"index", "task", "category", "group", "answers", "prediction",
"score", "error"?}. `score` is 1/0 for multiple choice and yes/no, the VQA accuracy for vqa, and None
for items without a reference (counted as `unscored`, left out of every mean). A prediction that could
not be parsed (None) or an item that failed (`error`) scores 0: dropping them would inflate the scores.

POPE (any yes/no items; "yes" is the positive class): accuracy, precision, recall, F1 and the ratio
of "yes" answers, overall and per category (POPE's categories are its adversarial/popular/random splits).
An unparsed answer is neither a true nor a false positive; it counts as wrong in accuracy. As in
VLMEvalKit's `POPE_rating`, a row whose `category` lists several splits ("adversarial,random": one
question that VLMEvalKit's POPE.tsv shares between splits) counts once in each of its splits, in the
per-split figures and in the overall POPE figures alike (`pope.rows` unique rows, `pope.shared_rows`
of them in several splits, `pope.overall.count` rows after the expansion). The per-category accuracy of
yes/no items uses the same expansion; the benchmark's top-level `accuracy` is over unique items.

MMBench circular evaluation (VLMEvalKit's TSVs hold each question's option rotations at indices
i + k * 1,000,000): when multiple-choice items share `index % 1,000,000`, `circular_accuracy` counts a
question right only if every rotation is right; per category and per `l2-category` (an extra column
of MMBench's TSVs) too, a question taking the category of its lowest-index row, as VLMEvalKit's
`report_acc` over its circular results does. `accuracy` stays the per-item mean.

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


def _circular_questions(records) -> list[list[dict]]:
    """Multiple-choice records grouped by question (`index % CIRCULAR_STRIDE`), lowest index first."""
    groups = defaultdict(list)
    for r in records:
        if isinstance(r["index"], int):
            groups[r["index"] % CIRCULAR_STRIDE].append(r)
    return [sorted(g, key=lambda r: r["index"]) for g in groups.values()]


def _all_right(question: list[dict]) -> float:
    return float(all(r["score"] == 1.0 for r in question))


def circular_accuracy(records) -> float | None:
    """MMBench's circular rule (see the module docstring); None when no question has rotations."""
    questions = _circular_questions(records)
    if not any(len(q) > 1 for q in questions):
        return None
    return _mean(_all_right(q) for q in questions)


def pope_splits(category: str) -> list[str]:
    """The POPE splits a row belongs to: `category` split at commas ("adversarial,random")."""
    splits = [c.strip() for c in category.split(",") if c.strip()]
    return splits or [category.strip()]


def _l2_category(record) -> str:
    value = (record.get("extra") or {}).get("l2-category")
    return "" if value is None else str(value).strip()


def _grouped(records, key) -> dict:
    """{group: {"accuracy", "count"[, "circular_accuracy", "questions"]}}; key(record) -> [group, ...]."""
    by_group = defaultdict(list)
    for r in records:
        for group in key(r):
            by_group[group].append(r)
    circular = [r for r in records if r["task"] == "multiple_choice"]
    questions = _circular_questions(circular) if circular_accuracy(circular) is not None else []
    out = {}
    for group, rs in sorted(by_group.items(), key=lambda kv: kv[0]):
        out[group] = {"accuracy": _mean(r["score"] for r in rs), "count": len(rs)}
        mine = [q for q in questions if group in key(q[0])]
        if mine:
            out[group]["circular_accuracy"] = _mean(_all_right(q) for q in mine)
            out[group]["questions"] = len(mine)
    return out


def is_mme(records) -> bool:
    categories = {_mme_key(r["category"]) for r in records if r["task"] == "yes_no"}
    known = set(MME_PERCEPTION) | set(MME_COGNITION)
    return bool(categories) and categories <= known


def benchmark_scores(records, read_errors: int = 0) -> dict:
    """All scores of one benchmark from its merged records (sorted or not).

    Records marked `unreadable` (an image that stopped decoding after the file was read) are left out
    of everything but `unreadable` / `unreadable_indices`, like the rows the reader skipped.
    """
    unreadable = [r["index"] for r in records if r.get("unreadable")]
    records = [r for r in records if not r.get("unreadable")]
    scored = [r for r in records if r["score"] is not None]
    unparsed = [r["index"] for r in records if r["prediction"] is None and not r.get("error")]
    result = {
        "items": len(records),
        "scored": len(scored),
        "unscored": len(records) - len(scored),
        "unparsed": len(unparsed),
        "unparsed_indices": unparsed,
        "failed": sum(bool(r.get("error")) for r in records),
        "read_errors": read_errors,
        "unreadable": len(unreadable),
        "unreadable_indices": unreadable,
        "accuracy": _mean(r["score"] for r in scored),
    }

    def categories(r):
        return pope_splits(r["category"]) if r["task"] == "yes_no" else [r["category"]]

    per_category = _grouped(scored, categories)
    if len(per_category) > 1 or (per_category and "" not in per_category):
        result["per_category"] = per_category
    if any(_l2_category(r) for r in scored):
        result["per_l2_category"] = _grouped([r for r in scored if _l2_category(r)], lambda r: [_l2_category(r)])
    tasks = defaultdict(list)
    for r in scored:
        tasks[r["task"]].append(r["score"])
    result["per_task"] = {t: {"accuracy": _mean(s), "count": len(s)} for t, s in sorted(tasks.items())}

    circular = circular_accuracy(r for r in scored if r["task"] == "multiple_choice")
    if circular is not None:
        result["circular_accuracy"] = circular

    yes_no = [r for r in scored if r["task"] == "yes_no"]
    if yes_no:
        expanded = [(split, r) for r in yes_no for split in pope_splits(r["category"])]
        pope = {
            "overall": pope_scores([r for _, r in expanded]),
            "rows": len(yes_no),
            "shared_rows": sum(len(pope_splits(r["category"])) > 1 for r in yes_no),
        }
        by_split = defaultdict(list)
        for split, r in expanded:
            by_split[split].append(r)
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
            if s["pope"].get("shared_rows"):
                extra.append(f"{s['pope']['shared_rows']} rows in several splits")
        skipped = s["read_errors"] + s.get("unreadable", 0)
        if s["unparsed"] or s["failed"] or skipped:
            extra.append(f"unparsed {s['unparsed']}, failed {s['failed']}, skipped (unreadable) {skipped}")
        lines.append(
            f"| {name} | {r['mode']} | {s['items']} | {s['scored']} | {_fmt(s['accuracy'])} | {'; '.join(extra)} |"
        )
    for name, r in results.items():
        s = r["scores"]
        if "mme" in s:
            lines += ["", f"**{name}** (MME)", "", "| category | acc (%) | acc+ (%) | score |", "|---|---:|---:|---:|"]
            for c, v in s["mme"]["categories"].items():
                lines.append(f"| {c} | {_fmt(v['acc'])} | {_fmt(v['acc_plus'])} | {v['score']:.2f} |")
        for key, title in (("per_category", "category"), ("per_l2_category", "l2-category")):
            if key not in s or (key == "per_category" and "mme" in s):
                continue
            rows = s[key]
            circular = any("circular_accuracy" in v for v in rows.values())
            head = f"| {title} | count | accuracy (%) |" + (" circular (%) |" if circular else "")
            lines += ["", f"**{name}** per {title}", "", head, "|---|---:|---:|" + ("---:|" if circular else "")]
            for c, v in rows.items():
                row = f"| {c or '(none)'} | {v['count']} | {_fmt(v['accuracy'])} |"
                lines.append(row + (f" {_fmt(v.get('circular_accuracy'))} |" if circular else ""))
    return "\n".join(lines) + "\n"
