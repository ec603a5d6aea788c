"""Benchmark readers: VLMEvalKit-style TSV and its JSONL equivalent -> `Item`s plus a list of bad rows.

TSV columns (tab-separated, pandas-style quoting; the header names them, order free):
  index       unique id (int or string).
  image       base64-encoded image bytes, or (64 characters or fewer) the `index` of another row whose
              image to reuse, as VLMEvalKit writes MME's second question of each image.
  image_path  file path, relative to the benchmark file's folder (used when `image` is absent/empty).
  question    the question text.
  hint        optional context (MMBench), empty when absent.
  A .. H      options; empty cells (or "nan") for absent options.
  answer      reference: an option letter, yes/no, a short answer, or a list of references written as
              a Python/JSON list (`['two', '2', ...]`, the VQA form).
  category    used for per-category scores (and for MME's perception/cognition split).
  any other   kept verbatim in `Item.extra` and copied into the predictions.

JSONL: one object per line with the same keys; options may also be given as `"options": {"A": ..}` or
`"options": ["..", ".."]` (lettered in order) and references as `"answers": [..]`.

Column (and JSONL key) names are matched without regard to case ("Question" is `question`, "a" is `A`);
a UTF-8 byte-order mark before the header is ignored, as pandas (and so VLMEvalKit) ignores it.

The task is inferred per row (options -> multiple_choice; a list of references -> vqa; yes/no -> yes_no;
anything else -> vqa) unless `task=` forces it.

One rule for what cannot be read: a row that cannot be read or whose image does not decode (every image
is fully decoded here, once per distinct image, so truncated data and decompression bombs are caught
now) is skipped and reported in `Benchmark.errors` as "file:line: reason"; it is never predicted or
scored. A file that cannot be a benchmark at all is a ValueError naming the file: empty, a header and no
rows, no `index` or `question` column (no row with that key, in JSONL), or no row that could be read.
"""

from __future__ import annotations

import ast
import base64
import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np

from aki_jax.evaluation.items import OPTION_LETTERS, TASKS, ImageSource, Item, index_sort_key, parse_index

KNOWN_COLUMNS = {"index", "image", "image_path", "question", "hint", "answer", "answers", "category", "options"}
KNOWN_COLUMNS |= set(OPTION_LETTERS)
REQUIRED_COLUMNS = ("index", "question")
_CANONICAL = {name.lower(): name for name in KNOWN_COLUMNS}
ABSENT = {"", "nan", "NaN", "None", "none", "null"}
IMAGE_REFERENCE_MAX_CHARS = 64  # VLMEvalKit's rule: an `image` cell this short names another row


@dataclasses.dataclass
class Benchmark:
    """Items sorted by index, plus the rows that could not be read (`"file:line: reason"`)."""

    name: str
    path: str
    items: list[Item]
    errors: list[str]


class RowError(ValueError):
    pass


def read_benchmark(path, task: str | None = None, name: str | None = None, image_root=None) -> Benchmark:
    """Read a `.tsv` or `.jsonl` benchmark file. `image_root` resolves relative image paths (default: its folder)."""
    path = Path(path)
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".txt"):
        rows = _tsv_rows(path)
    elif suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(path)
    else:
        raise ValueError(f"benchmark file {path}: unknown format {suffix!r} (expected .tsv or .jsonl)")
    root = Path(image_root) if image_root is not None else path.parent
    benchmark = _build(name or path.stem, str(path), rows, task, root)
    if not benchmark.items:
        raise ValueError(
            f"{path}: none of its {len(benchmark.errors)} rows could be read (first: {benchmark.errors[0]})"
        )
    return benchmark


def _canonical(names) -> list[str]:
    """Known column names in their canonical case ("Question" -> "question", "a" -> "A"); others as given."""
    return [_CANONICAL.get(str(n).strip().lower(), str(n).strip()) for n in names]


def _tsv_rows(path: Path):
    """Yields (line, dict | RowError). Base64 images overflow csv's default field limit, hence the raise."""
    csv.field_size_limit(2**31 - 1)
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark is dropped
        reader = csv.reader(f, delimiter="\t", quotechar='"')
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path}: empty file (a benchmark TSV starts with a header row)") from None
        header = _canonical(header)
        twice = sorted({h for h in header if header.count(h) > 1})
        if twice:
            raise ValueError(f"{path}: columns {twice} appear more than once (names are matched without case)")
        for column in REQUIRED_COLUMNS:
            if column not in header:
                raise ValueError(f"{path}: the header has no `{column}` column (columns: {header[:20]})")
        line = reader.line_num
        rows = 0
        for cells in reader:
            start, line = line + 1, reader.line_num
            if not any(c.strip() for c in cells):
                continue
            rows += 1
            if len(cells) != len(header):
                yield start, RowError(f"{len(cells)} cells, the header has {len(header)}")
                continue
            yield start, dict(zip(header, cells, strict=True))
        if not rows:
            raise ValueError(f"{path}: a header but no rows")


def _jsonl_rows(path: Path):
    seen_keys, rows = set(), 0
    with open(path, encoding="utf-8-sig") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            rows += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield line_number, RowError(f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(row, dict):
                yield line_number, RowError(f"expected a JSON object, got {type(row).__name__}")
                continue
            keys = _canonical(row)
            twice = sorted({k for k in keys if keys.count(k) > 1})
            if twice:
                yield line_number, RowError(f"keys {twice} appear more than once (names are matched without case)")
                continue
            row = dict(zip(keys, row.values(), strict=True))
            seen_keys.update(row)
            yield line_number, row
    if not rows:
        raise ValueError(f"{path}: empty file (a benchmark JSONL holds one JSON object per line)")
    for column in REQUIRED_COLUMNS:
        if seen_keys and column not in seen_keys:
            raise ValueError(f"{path}: no row has a `{column}` key (keys: {sorted(seen_keys)[:20]})")


def _build(name, where, rows, task, root) -> Benchmark:
    errors, parsed = [], []
    raw_images = {}
    for line, row in rows:
        if isinstance(row, RowError):
            errors.append(f"{where}:{line}: {row}")
            continue
        parsed.append((line, row))
        if "index" in row and _text(row.get("image")):
            raw_images[parse_index(row["index"])] = _text(row["image"])

    items, seen, decoded = [], set(), {}
    for line, row in parsed:
        try:
            item = _item(row, task, root, raw_images, decoded)
            if item.index in seen:
                raise RowError(f"duplicate index {item.index!r}")
        except RowError as e:
            label = f" index {row.get('index')!r}" if "index" in row else ""
            errors.append(f"{where}:{line}:{label} {e}")
            continue
        seen.add(item.index)
        items.append(item)
    items.sort(key=lambda it: index_sort_key(it.index))
    return Benchmark(name=name, path=where, items=items, errors=errors)


def _text(value) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    return "" if text.strip() in ABSENT else text


def _item(row: dict, task, root: Path, raw_images: dict, decoded: dict) -> Item:
    if _text(row.get("index")) == "":
        raise RowError("no `index`")
    index = parse_index(row["index"])
    question = _text(row.get("question")).strip()
    if not question:
        raise RowError("empty `question`")
    options = _options(row)
    answers = _answers(row)
    if task is None:
        task = _infer_task(options, answers, row)
    if task == "multiple_choice":
        if len(options) < 2:
            raise RowError(f"multiple choice needs at least two options, found {[k for k, _ in options]}")
        letters = {k for k, _ in options}
        answers = tuple(a.strip().upper() for a in answers)
        if len(answers) > 1 or (answers and answers[0] not in letters):
            raise RowError(f"answer {list(answers)} is not one of the option letters {sorted(letters)}")
    elif task == "yes_no":
        answers = tuple(a.strip().lower() for a in answers)
        if any(a not in ("yes", "no") for a in answers) or len(answers) > 1:
            raise RowError(f"yes/no answer expected, got {list(answers)}")
    else:
        answers = tuple(str(a) for a in answers)
    image, group = _image(row, index, root, raw_images, decoded)
    extra = {k: v for k, v in row.items() if k not in KNOWN_COLUMNS}
    return Item(
        index=index,
        task=task,
        question=question,
        image=image,
        answers=answers,
        options=options if task == "multiple_choice" else (),
        hint=_text(row.get("hint")).strip(),
        category=_text(row.get("category")).strip(),
        group=group,
        extra=extra,
    )


def _options(row: dict) -> tuple[tuple[str, str], ...]:
    given = row.get("options")
    if isinstance(given, dict):
        pairs = [(str(k).strip().upper(), _text(v)) for k, v in given.items()]
    elif isinstance(given, list):
        if len(given) > len(OPTION_LETTERS):
            raise RowError(f"{len(given)} options, at most {len(OPTION_LETTERS)} supported")
        pairs = list(zip(OPTION_LETTERS, (_text(v) for v in given), strict=False))
    else:
        pairs = [(letter, _text(row.get(letter))) for letter in OPTION_LETTERS]
    bad = [k for k, _ in pairs if k not in OPTION_LETTERS]
    if bad:
        raise RowError(f"option keys {bad} are not letters A..H")
    return tuple(sorted(((k, v.strip()) for k, v in pairs if v.strip()), key=lambda kv: kv[0]))


def _answers(row: dict) -> tuple[str, ...]:
    value = row.get("answers", row.get("answer"))
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    text = _text(value).strip()
    if not text:
        return ()
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                raise RowError(f"answer looks like a list but does not parse: {text[:80]!r}") from None
        if isinstance(parsed, list | tuple):
            return tuple(str(v) for v in parsed)
    return (text,)


def _infer_task(options, answers, row) -> str:
    if options:
        return "multiple_choice"
    if isinstance(row.get("answers"), list) or (len(answers) != 1):
        return "vqa"
    raw = _text(row.get("answer")).strip()
    if raw.startswith("["):
        return "vqa"
    return "yes_no" if raw.lower() in ("yes", "no") else "vqa"


def _image(row: dict, index, root: Path, raw_images: dict, decoded: dict) -> tuple[ImageSource | None, str]:
    """The row's image and its group key (MME pairs: questions sharing an image share a group).

    decoded: {ImageSource: error or None} of the images decoded so far, so that each decodes once.
    """
    cell = _text(row.get("image")).strip()
    path_cell = _text(row.get("image_path")).strip()
    origin = index
    source = None
    if cell and len(cell) <= IMAGE_REFERENCE_MAX_CHARS:
        origin = parse_index(cell)
        target = raw_images.get(origin)
        if target is None or len(target.strip()) <= IMAGE_REFERENCE_MAX_CHARS:
            raise RowError(f"`image` {cell!r} is neither base64 nor the index of a row holding an image")
        cell = target.strip()
    if cell:
        source = ImageSource(base64=cell)
        _check_image(source, decoded)
    elif path_cell:
        path = Path(path_cell)
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise RowError(f"image_path {path_cell!r} not found (looked at {path})")
        source = ImageSource(path=str(path))
        _check_image(source, decoded)
    elif "image" in row or "image_path" in row:
        raise RowError("no image: both `image` and `image_path` are empty")
    group = path_cell or str(origin)
    return source, group


def _check_image(source: ImageSource, decoded: dict) -> None:
    """Decode the image fully now (`ImageSource.load`), so that no unreadable image reaches the model."""
    from aki_jax.processing.image import ImageError

    if source not in decoded:
        try:
            source.load()
            decoded[source] = None
        except ImageError as e:
            decoded[source] = str(e)
    if decoded[source] is not None:
        raise RowError(f"image {decoded[source][:300]}")


def encode_image(image, format: str = "PNG") -> str:
    """Base64 text of an image (PIL image or uint8 array), as the `image` column of a TSV holds it."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_benchmark(rows: list[dict], path) -> None:
    """Write rows (dicts of column -> value) as a VLMEvalKit-style TSV or as JSONL, by the file suffix.

    TSV columns are the union of the rows' keys in first-seen order; missing cells are empty; lists are
    written as JSON lists (how VQA references are stored). Quoting follows pandas' `to_csv(sep="\\t")`.
    """
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", quotechar='"', lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            cells = []
            for column in columns:
                value = row.get(column, "")
                cells.append(json.dumps(value) if isinstance(value, list | dict) else "" if value is None else value)
            writer.writerow(cells)
