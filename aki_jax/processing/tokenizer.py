"""Tokenizer: load a checkpoint's tokenizer (adding AKI's tokens as the original does) or train a tiny one.

The original starts from Phi-3.5's tokenizer (32011 entries), adds `<pad>` when its pad token equals
its eos token (Phi-3.5: both `<|endoftext|>`), records `initial_tokenizer_len` (32012), then appends
`<image>` (= initial_tokenizer_len) and `<|endofchunk|>` (= initial_tokenizer_len + 1).
`load_tokenizer` repeats exactly that on a plain Phi-3.5 tokenizer and leaves a tokenizer that already
holds the AKI tokens (a released AKI folder, or one written by `train_tokenizer`) as it is.

Text is encoded as the original does: `add_special_tokens=False` (the chat template writes `<s>`
itself), special tokens in the text recognised as single tokens.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

IMAGE_TOKEN = "<image>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<pad>"
# Phi-3 chat specials, in Phi-3's id order (placeholders omitted).
CHAT_TOKENS = ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")
TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclasses.dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids AKI needs.

    Attributes: backend, bos_token, eos_token, pad_token, initial_tokenizer_len.
    """

    backend: tokenizers.Tokenizer
    bos_token: str = "<s>"
    eos_token: str = "<|endoftext|>"
    pad_token: str = PAD_TOKEN
    initial_tokenizer_len: int = 0

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        index = self.backend.token_to_id(token)
        if index is None:
            raise KeyError(f"token {token!r} is not in the tokenizer's vocabulary")
        return index

    def has_token(self, token: str) -> bool:
        return self.backend.token_to_id(token) is not None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added; special tokens in the text are recognised)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and their (start, end) character spans in `text`."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def bos_token_id(self) -> int:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        return self.token_to_id(self.pad_token)

    @property
    def image_token_id(self) -> int:
        return self.token_to_id(IMAGE_TOKEN)

    @property
    def end_of_chunk_token_id(self) -> int:
        return self.token_to_id(END_OF_CHUNK_TOKEN)

    @property
    def assistant_token_id(self) -> int:
        return self.token_to_id("<|assistant|>")

    @property
    def end_token_id(self) -> int:
        return self.token_to_id("<|end|>")

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Tokens that end an answer: Phi-3.5's generation eos set (`<|end|>`, `<|assistant|>`, eos)."""
        names = ("<|end|>", "<|assistant|>", self.eos_token)
        return tuple(dict.fromkeys(self.token_to_id(n) for n in names if self.has_token(n)))

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (loadable by `load_tokenizer`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": "<unk>",
            "add_bos_token": False,
            "add_eos_token": False,
            "initial_tokenizer_len": self.initial_tokenizer_len,
            "tokenizer_class": "LlamaTokenizerFast",
        }
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def _special(content: str) -> AddedToken:
    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)


def _token_name(value) -> str | None:
    """A special token entry of tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _load_backend(directory: Path) -> tokenizers.Tokenizer:
    path = directory / "tokenizer.json"
    if path.exists():
        try:
            return tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad JSON
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from e
    if (directory / "tokenizer.model").exists():
        try:
            from transformers import LlamaTokenizerFast  # noqa: PLC0415  (optional, only for SentencePiece files)

            fast = LlamaTokenizerFast(vocab_file=str(directory / "tokenizer.model"), legacy=True)
        except Exception as e:
            raise ValueError(
                f"{directory / 'tokenizer.model'}: cannot convert the SentencePiece model "
                f"(needs transformers and sentencepiece; or provide tokenizer.json): {e}"
            ) from e
        return fast.backend_tokenizer
    raise FileNotFoundError(f"{directory}: no tokenizer.json or tokenizer.model")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load `directory`'s tokenizer and add AKI's tokens exactly as the original does.

    Reads tokenizer.json (or converts tokenizer.model) and, when present, tokenizer_config.json /
    special_tokens_map.json for the bos/eos/pad names. If the pad token is missing or equals eos,
    `<pad>` is added (unless the vocabulary has it already); `initial_tokenizer_len` is the size at
    that point, then `<image>` and `<|endofchunk|>` follow. A tokenizer that already contains
    `<image>` keeps its ids (`initial_tokenizer_len` = id of `<image>`).
    """
    directory = Path(directory)
    backend = _load_backend(directory)
    names: dict = {}
    for file in ("special_tokens_map.json", TOKENIZER_CONFIG):
        if (directory / file).exists():
            data = json.loads((directory / file).read_text())
            names.update({k: _token_name(v) for k, v in data.items() if k.endswith("_token") and v is not None})
    bos = names.get("bos_token") or "<s>"
    eos = names.get("eos_token") or "<|endoftext|>"
    pad = names.get("pad_token")
    if pad is None or pad == eos:
        pad = PAD_TOKEN
        if backend.token_to_id(PAD_TOKEN) is None:
            backend.add_special_tokens([_special(PAD_TOKEN)])
    tokenizer = Tokenizer(backend, bos_token=bos, eos_token=eos, pad_token=pad)
    if backend.token_to_id(IMAGE_TOKEN) is None:
        if backend.token_to_id(END_OF_CHUNK_TOKEN) is not None:
            raise ValueError(f"{directory}: tokenizer has {END_OF_CHUNK_TOKEN} but not {IMAGE_TOKEN}")
        tokenizer.initial_tokenizer_len = len(tokenizer)
        backend.add_special_tokens([_special(IMAGE_TOKEN), _special(END_OF_CHUNK_TOKEN)])
    else:
        tokenizer.initial_tokenizer_len = tokenizer.image_token_id
    image_id = tokenizer.image_token_id
    if tokenizer.end_of_chunk_token_id != image_id + 1:
        raise ValueError(
            f"{directory}: {END_OF_CHUNK_TOKEN} has id {tokenizer.end_of_chunk_token_id}, expected {IMAGE_TOKEN} + 1 "
            f"= {image_id + 1}"
        )
    for token in (bos, eos, pad):
        tokenizer.token_to_id(token)  # raises a clear KeyError when a named special token is missing
    return tokenizer


def _llama_like(vocab: dict[str, int], merges: list) -> tokenizers.Tokenizer:
    """Byte-fallback BPE with SentencePiece-style spaces ("▁"); newlines are always their own piece."""
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False),
        ]
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return backend


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None) -> Tokenizer:
    """Train a small Phi-3-like tokenizer on `texts` (and save it to `out_dir` when given).

    Layout: `<unk>` 0, `<s>` 1, `</s>` 2, the 256 byte-fallback pieces `<0x00>`..`<0xFF>`, learned
    BPE pieces, then `<|endoftext|>`, `<|assistant|>`, `<|system|>`, `<|end|>`, `<|user|>`, `<pad>`;
    `initial_tokenizer_len` = that size; then `<image>` and `<|endofchunk|>`. `vocab_size` is the size
    before the chat specials (the learned part may come out smaller on little text).
    """
    base = ["<unk>", "<s>", "</s>"]
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    if vocab_size <= len(base) + len(byte_pieces):
        raise ValueError(f"vocab_size must exceed {len(base) + len(byte_pieces)} (specials + byte pieces)")
    learner = _llama_like({"<unk>": 0}, [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(byte_pieces), special_tokens=base, show_progress=False, min_frequency=1
    )
    learner.train_from_iterator(texts, trainer)
    learned = json.loads(learner.to_str())["model"]
    vocab = {token: i for i, token in enumerate(base + byte_pieces)}
    for token, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        if token not in vocab:
            vocab[token] = len(vocab)
    backend = _llama_like(vocab, [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]])
    backend.add_special_tokens([_special(t) for t in base + list(CHAT_TOKENS) + [PAD_TOKEN]])
    tokenizer = Tokenizer(backend, bos_token="<s>", eos_token="<|endoftext|>", pad_token=PAD_TOKEN)
    tokenizer.initial_tokenizer_len = len(tokenizer)
    backend.add_special_tokens([_special(IMAGE_TOKEN), _special(END_OF_CHUNK_TOKEN)])
    if out_dir is not None:
        tokenizer.save(out_dir)
    return tokenizer
