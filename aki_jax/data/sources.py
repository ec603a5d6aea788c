"""Readers of the formats training data comes in. Each is a random-access source of raw examples.

A source has `name`, `__len__`, `__getitem__(i) -> raw example | Bad` (see `records.py`) and
`index_bad`: counts of records skipped while indexing (unsafe tar members, incomplete samples, ...),
with `index_bad_examples` describing the first few. Sources are picklable so that grain can hand them
to worker processes; open files are reopened lazily in each process.

  WebDatasetSource   tar shards (`shard-{00000..01000}.tar`) of `{key}.jpg|png|webp` + `{key}.txt|json`
  WebDatasetShards   the same shards streamed shard by shard (training: no index built at start)
  LlavaSource        LLaVA instruction JSON / JSONL (`image`, `conversations` of human/gpt turns) + image root
  VqaJsonlSource     JSONL of `image`, `question`, `answer` (optional `choices`, `id`) + image root
  TfdsSource         a prepared TFDS dataset read through `as_data_source` (array_record), feature keys mapped
"""

from __future__ import annotations

import collections
import json
import os
import tarfile

import numpy as np

from aki_jax.data import records
from aki_jax.data.paths import resolve_files
from aki_jax.data.records import Bad
from aki_jax.data.templates import format_question
from aki_jax.processing.tokenizer import IMAGE_TOKEN

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "json")
CAPTION_KEYS = ("caption", "text", "txt")
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_SHOWN = 5  # bad records described in full per source; the rest are only counted


class _Files:
    """Per-process cache of read-only file descriptors; `pread` is safe from several threads."""

    def __init__(self):
        self._fds = {}
        self._pid = os.getpid()

    def read(self, path: str, offset: int, size: int) -> bytes:
        if os.getpid() != self._pid:  # forked: descriptors belong to the parent
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return os.pread(fd, size, offset)

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


class _Source:
    """Bookkeeping shared by all sources."""

    name: str

    def _init_bad(self):
        self.index_bad = collections.Counter()
        self.index_bad_examples = []

    def _skip(self, reason: str, where: str, detail: str = ""):
        self.index_bad[reason] += 1
        if len(self.index_bad_examples) < _SHOWN:
            self.index_bad_examples.append(str(Bad(reason, self.name, where, detail)))


def _unsafe_member(member: tarfile.TarInfo) -> str:
    """Why a tar member must not be used ("" when it is fine): escaping paths and links."""
    name = member.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "path with '..'"
    if member.issym() or member.islnk():
        return "link"
    return ""


def index_shard(path: str) -> tuple[list[tuple[int, int, int, int, int]], list[tuple[str, str, str]]]:
    """Samples of one tar shard from its headers, without reading member data.

    Members are grouped by key: the path up to the first dot of the file name (`a/b.0.jpg` has key `a/b`
    and extension `0.jpg`, matched on its last part). A sample needs one image and one caption. A key
    that comes back with an image (or caption) its sample already has starts a second sample under that
    key (tars concatenated or written twice): both are kept, never one silently dropped; a second one
    left without its image or caption is counted as `duplicate_key`.
    Returns (samples, skipped): samples as (image offset, image size, text offset, text size, is_json),
    in order of first appearance; skipped as (reason, where, detail) for unsafe members (absolute paths,
    `..`, links), incomplete samples and a damaged shard (whose samples before the damage are kept).
    """
    entries = []  # {"key", "repeat", "image": (offset, size), "text": (offset, size, is_json)}
    by_key = {}  # key -> its entries, in order
    skipped = []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.isdir():
                    continue
                unsafe = _unsafe_member(member)
                if unsafe:
                    skipped.append(("unsafe_tar_member", f"{path}:{member.name}", unsafe))
                    continue
                if not member.isfile():
                    continue
                directory, base = os.path.split(member.name)
                if "." not in base:
                    continue
                stem, extension = base.split(".", 1)
                kind = extension.lower().rsplit(".", 1)[-1]
                slot = "image" if kind in IMAGE_EXTENSIONS else "text" if kind in CAPTION_EXTENSIONS else None
                if slot is None:
                    continue
                key = os.path.join(directory, stem)
                same_key = by_key.setdefault(key, [])
                entry = next((e for e in same_key if slot not in e), None)  # the first that lacks this member
                if entry is None:
                    entry = {"key": key, "repeat": bool(same_key)}
                    same_key.append(entry)
                    entries.append(entry)
                if slot == "image":
                    entry["image"] = (member.offset_data, member.size)
                else:
                    entry["text"] = (member.offset_data, member.size, int(kind == "json"))
    except (tarfile.TarError, OSError, EOFError) as e:
        skipped.append(("bad_shard", path, str(e)))
    found = []
    for entry in entries:
        if "image" not in entry or "text" not in entry:
            missing = "image" if "image" not in entry else "caption"
            if entry["repeat"]:
                detail = f"a second {'caption' if missing == 'image' else 'image'} under this key, with no {missing}"
                skipped.append(("duplicate_key", f"{path}:{entry['key']}", detail))
            else:
                skipped.append(("incomplete_sample", f"{path}:{entry['key']}", f"no {missing}"))
            continue
        found.append((*entry["image"], *entry["text"]))
    return found, skipped


class _TarSamples(_Source):
    """Reading one indexed sample of a shard (shared by the random-access and the streaming reader)."""

    def _read_sample(self, path: str, sample, where: str):
        image_offset, image_size, text_offset, text_size, is_json = map(int, sample)
        text = self._files.read(path, text_offset, text_size)
        try:
            caption = text.decode("utf-8")
            if is_json:
                data = json.loads(caption)
                caption = next((data[k] for k in self.caption_keys if isinstance(data.get(k), str)), None)
                if caption is None:
                    return Bad("bad_record", self.name, where, f"json caption has none of {self.caption_keys}")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            return Bad("bad_json", self.name, where, str(e))
        image = self._files.read(path, image_offset, image_size)
        return records.caption_example(self.name, where, [image], caption.strip())


class WebDatasetSource(_TarSamples):
    """Caption pairs from webdataset-style tar shards, all indexed at start (headers only): random access.

    For evaluation sets and moderate sizes (indexing reads every member header: a few thousand samples
    per second); training streams shards instead (`WebDatasetShards`). A `.json` caption is read from its
    first key among `caption_keys`. Skipped members are counted in `index_bad`.
    Index arrays: `shard` int32[N], `samples` int64[N, 5] (image offset, size, text offset, size, is_json).
    """

    def __init__(self, pattern: str, name: str = "", caption_keys=CAPTION_KEYS):
        self.name = name or f"webdataset:{pattern}"
        self.caption_keys = tuple(caption_keys)
        self.shards = resolve_files(pattern, self.name)
        self._init_bad()
        shard, table = [], []
        for shard_index, path in enumerate(self.shards):
            found, skipped = index_shard(path)
            for reason, where, detail in skipped:
                self._skip(reason, where, detail)
            shard += [shard_index] * len(found)
            table += found
        self.shard = np.asarray(shard, np.int32)
        self.samples = np.asarray(table, np.int64).reshape(-1, 5)
        self._files = _Files()

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, index: int):
        index = int(index)
        path = self.shards[self.shard[index]]
        return self._read_sample(path, self.samples[index], f"{path}#{index}")


class WebDatasetShards(_TarSamples):
    """Streaming webdataset reader for training: shards are the unit of shuffling and sharding.

    Only the shard list is resolved at start. `shard_samples(path)` indexes one shard when the stream
    reaches it (yielding its samples' references and a `Bad` per skipped member, so that they are
    counted with the other bad records) and `read(ref)` reads one sample. See `aki_jax.data.pipeline`.
    """

    def __init__(self, pattern: str, name: str = "", caption_keys=CAPTION_KEYS):
        self.name = name or f"webdataset:{pattern}"
        self.caption_keys = tuple(caption_keys)
        self.shards = resolve_files(pattern, self.name)
        self._init_bad()
        self._files = _Files()

    def shard_samples(self, path: str) -> list:
        found, skipped = index_shard(path)
        bad = [Bad(reason, self.name, where, detail) for reason, where, detail in skipped]
        return [(path, i, *sample) for i, sample in enumerate(found)] + bad

    def read(self, ref):
        if isinstance(ref, Bad):
            return ref
        path, index, *sample = ref
        return self._read_sample(path, sample, f"{path}#{index}")


class _JsonRecords(_Source):
    """Records of JSON (a top-level list) or JSONL files; JSONL lines are parsed only when read."""

    def __init__(self, pattern: str, name: str):
        self.name = name
        self.files = resolve_files(pattern, name)
        self._init_bad()
        self._loaded = []  # (file index, parsed record) from .json files
        spans = []  # (file index, start, end) of the lines of .jsonl files
        for file_index, path in enumerate(self.files):
            if path.endswith(".jsonl"):
                spans.extend((file_index, start, end) for start, end in _line_spans(path))
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.name}: {path} is not valid JSON ({e}); JSONL files must end in .jsonl") from e
            if not isinstance(data, list):
                raise ValueError(f"{self.name}: {path} must hold a JSON list of records, got {type(data).__name__}")
            self._loaded.extend((file_index, record) for record in data)
        self._spans = np.array(spans, np.int64).reshape(-1, 3)
        self._files = _Files()

    def __len__(self) -> int:
        return len(self._loaded) + len(self._spans)

    def _record(self, index: int):
        """(record or Bad, where)."""
        index = int(index)
        if index < len(self._loaded):
            file_index, record = self._loaded[index]
            return record, f"{self.files[file_index]}[{index}]"
        file_index, start, end = map(int, self._spans[index - len(self._loaded)])
        path = self.files[file_index]
        line = self._files.read(path, start, end - start)
        where = f"{path}@{start}"
        try:
            return json.loads(line), where
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return Bad("bad_json", self.name, where, str(e)), where


def _line_spans(path: str, chunk: int = 1 << 24):
    """(start, end) byte spans of the non-blank lines of a file, found without parsing them."""
    offset = 0
    start = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            for newline in np.flatnonzero(np.frombuffer(block, np.uint8) == 10):
                end = offset + int(newline)
                if end > start:
                    yield start, end
                start = end + 1
            offset += len(block)
    if offset > start:
        yield start, offset


def _check_image_root(image_root: str, name: str) -> None:
    if image_root and not os.path.isdir(image_root):
        raise FileNotFoundError(f"{name}: image_root {image_root!r} is not a directory")


class _UnsafeImagePath(ValueError):
    """An image path of a record that would leave its `image_root`."""


def _image_paths(value, image_root: str) -> list[str]:
    """The record's image file names joined to `image_root`; each must stay inside it.

    With an `image_root`, absolute names and names whose `..` climb out of it are refused
    (`_UnsafeImagePath`): a data file must not make training read arbitrary files. Without one, names are
    taken as written (relative to the working directory, or absolute). The check is on the names only:
    symbolic links inside the root (a common way to assemble datasets) are followed.
    """
    if value is None:
        return []
    names = value if isinstance(value, list) else [value]
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"'image' must be a file name or a list of file names, got {value!r}")
    if not image_root:
        return list(names)
    root = os.path.normpath(image_root)
    paths = []
    for name in names:
        if os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
            raise _UnsafeImagePath(f"{name!r} is absolute; names must be relative to image_root {image_root!r}")
        path = os.path.normpath(os.path.join(root, name))
        if os.path.commonpath([root, path]) != root or path == root:
            raise _UnsafeImagePath(f"{name!r} resolves outside image_root {image_root!r}")
        paths.append(os.path.join(image_root, name))
    return paths


def _turn_order_problem(conversation: list[dict]) -> str:
    """Why the roles of a chat are out of order ("" when fine): an optional system turn first, then
    user/assistant alternating, starting with user and ending with assistant. (Out of order, an answer
    could be trained before its question, or a question trained with no answer.)"""
    roles = [turn["role"] for turn in conversation]
    offset = int(bool(roles) and roles[0] == "system")  # turn numbers in messages count the system turn
    roles = roles[offset:]
    if "system" in roles:
        return "a system turn after the start (only the first turn may be system)"
    if not roles:
        return "no human/gpt turns"
    for i, role in enumerate(roles):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            speaker = {"user": "human", "assistant": "gpt"}
            where = f"turn {i + 1 + offset} is {speaker[role]}"
            return f"{where}, expected {speaker[expected]} (turns must alternate, starting with human)"
    if roles[-1] != "assistant":
        return "ends with a human turn that has no gpt answer"
    return ""


class LlavaSource(_JsonRecords):
    """LLaVA instruction data: `{"id", "image" (optional, str or list), "conversations": [{"from", "value"}]}`.

    Image paths are relative to `image_root` and must stay inside it. Turns `from` human/gpt (also
    user/assistant/system) become user/assistant/system. A record with images but no `<image>` in its
    text gets one placeholder per image in front of its first user turn. Bad records (each counted under
    its reason): placeholder count differing from the image count (`image_count_mismatch`), turns not
    alternating human/gpt from human (`bad_turn_order`), an empty gpt turn (`empty_answer`), an image path
    outside `image_root` (`unsafe_image_path`), missing fields or unknown speakers (`bad_record`).
    """

    def __init__(self, pattern: str, image_root: str = "", name: str = ""):
        super().__init__(pattern, name or f"llava:{pattern}")
        _check_image_root(image_root, self.name)
        self.image_root = image_root

    def __getitem__(self, index: int):
        record, where = self._record(index)
        if isinstance(record, Bad):
            return record
        try:
            images = _image_paths(record.get("image"), self.image_root)
            conversation = []
            for turn in record["conversations"]:
                role = ROLE_NAMES.get(turn["from"])
                if role is None:
                    raise ValueError(f"unknown speaker {turn['from']!r}")
                if not isinstance(turn["value"], str):
                    raise ValueError("turn value is not a string")
                conversation.append({"role": role, "content": turn["value"]})
        except _UnsafeImagePath as e:
            return Bad("unsafe_image_path", self.name, where, str(e))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            return Bad("bad_record", self.name, where, f"{type(e).__name__}: {e}")
        if not any(turn["role"] == "assistant" for turn in conversation):
            return Bad("bad_record", self.name, where, "no gpt turn")
        problem = _turn_order_problem(conversation)
        if problem:
            return Bad("bad_turn_order", self.name, where, problem)
        empty = [
            i + 1 for i, turn in enumerate(conversation) if turn["role"] == "assistant" and not turn["content"].strip()
        ]
        if empty:
            return Bad("empty_answer", self.name, where, f"gpt turn(s) {empty} are empty")
        placeholders = sum(turn["content"].count(IMAGE_TOKEN) for turn in conversation)
        if images and placeholders == 0:
            first_user = next(i for i, t in enumerate(conversation) if t["role"] == "user")
            turn = conversation[first_user]
            conversation[first_user] = {**turn, "content": "<image>\n" * len(images) + turn["content"]}
        elif placeholders != len(images):
            return Bad("image_count_mismatch", self.name, where, f"{placeholders} <image> for {len(images)} images")
        where = f"{where} id={record.get('id', '?')}"
        return records.chat_example(self.name, where, images, conversation)


class VqaJsonlSource(_JsonRecords):
    """Quick custom data: JSONL (or a JSON list) of `{"image", "question", "answer"}`, optional `choices`."""

    def __init__(self, pattern: str, image_root: str = "", name: str = "", template: str = "plain"):
        super().__init__(pattern, name or f"vqa:{pattern}")
        _check_image_root(image_root, self.name)
        self.image_root = image_root
        self.template = template
        format_question(template, "q", "A", ["x"])  # fail at start on an unknown template

    def __getitem__(self, index: int):
        record, where = self._record(index)
        if isinstance(record, Bad):
            return record
        try:
            images = _image_paths(record.get("image"), self.image_root)
            question, answer = format_question(
                self.template, str(record["question"]), str(record["answer"]), record.get("choices")
            )
        except _UnsafeImagePath as e:
            return Bad("unsafe_image_path", self.name, where, str(e))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            return Bad("bad_record", self.name, where, f"{type(e).__name__}: {e}")
        return records.chat_example(self.name, where, images, records.question_answer(question, answer, len(images)))


def _feature(example: dict, path: str):
    value = example
    for part in path.split("/"):
        value = value[part]
    return value


def _text(value) -> str:
    if isinstance(value, np.ndarray):
        if value.size == 0:
            raise ValueError("empty text feature")
        value = value.reshape(-1)[0]  # several reference answers: the first
    elif isinstance(value, (list, tuple)):
        value = value[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsSource(_Source):
    """A prepared TFDS dataset (file format array_record) read with random access, no TensorFlow needed.

    `features` maps roles to feature keys (nested keys with "/"): `image` plus either `question` and
    `answer` (optional `choices`) or `caption`. Several reference answers (an array) use the first.
    The dataset must already be prepared under `data_dir` (nothing is downloaded).
    """

    def __init__(self, dataset: str, split: str = "train", data_dir: str = "", features=None, name: str = "",
                 template: str = "plain"):  # fmt: skip
        self.name = name or f"tfds:{dataset}/{split}"
        self.features = dict(features or {"image": "image", "question": "question", "answer": "answer"})
        if "image" not in self.features or not (
            {"question", "answer"} <= set(self.features) or "caption" in self.features
        ):
            raise ValueError(
                f"{self.name}: features must map 'image' and 'question'+'answer' or 'caption', got {self.features}"
            )
        self.template = template
        format_question(template, "q", "A", ["x"])
        self._init_bad()
        self._where = (dataset, split, data_dir)
        builder = self._open()
        self._length = len(self._data)
        missing = [k for k in self.features.values() if k.split("/")[0] not in builder.info.features]
        if missing:
            raise ValueError(f"{self.name}: no feature {missing} (has {sorted(builder.info.features)})")

    def _open(self):
        import tensorflow_datasets as tfds

        dataset, split, data_dir = self._where
        try:
            builder = tfds.builder(dataset, data_dir=data_dir or None)
            self._data = builder.as_data_source(split=split)
        except Exception as e:  # tfds raises many types (DatasetNotFoundError, AssertionError, ...)
            raise ValueError(f"{self.name}: cannot open prepared TFDS dataset {dataset!r} in {data_dir!r}: {e}") from e
        return builder

    def __getstate__(self):
        # Worker processes reopen the files themselves (the open data source need not be picklable).
        return {k: v for k, v in self.__dict__.items() if k != "_data"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._data = None

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int):
        where = f"{self.name}#{index}"
        if self._data is None:
            self._open()
        try:
            example = self._data[int(index)]
            image = np.asarray(_feature(example, self.features["image"]))
            images = list(image) if image.ndim == 4 else [image]
            if "caption" in self.features:
                return records.caption_example(
                    self.name, where, images, _text(_feature(example, self.features["caption"]))
                )
            choices = None
            if "choices" in self.features:
                choices = [_text(c) for c in _feature(example, self.features["choices"])]
            question, answer = format_question(
                self.template,
                _text(_feature(example, self.features["question"])),
                _text(_feature(example, self.features["answer"])),
                choices,
            )
        except (KeyError, ValueError, IndexError, UnicodeDecodeError) as e:
            return Bad("bad_record", self.name, where, f"{type(e).__name__}: {e}")
        return records.chat_example(self.name, where, images, records.question_answer(question, answer, len(images)))
