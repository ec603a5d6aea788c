"""Data: grain pipelines over the formats training data comes in, with packing and deterministic resume.

API (numpy batches in the contract's format; see each module for details):

    from aki_jax.data import DataConfig, SourceConfig, make_train_iterator, make_eval_iterator, digits_tokenizer

    tok = digits_tokenizer(out_dir)                      # small tokenizer for the built-in digits data
    config = aki_jax.tiny(initial_tokenizer_len=tok.initial_tokenizer_len)
    processor = aki_jax.processing.Processor.from_config(config, tok)

    data = DataConfig(                                   # default: the digits, padded, batch 32, seq_len 64
        sources=(SourceConfig("llava", "llava/mix665k.json", image_root="llava/images", weight=3),
                 SourceConfig("vqa", "qa/{0..9}.jsonl", image_root="qa", template="short_answer"),
                 SourceConfig("webdataset", "kale/{00000..01000}.tar"),
                 SourceConfig("tfds", "my_vqa:1.0.0", split="train", data_dir="~/tensorflow_datasets",
                              features={"image": "image", "question": "question", "answer": "answers/text"})),
        seq_len=512, packing=True, batch_size=32, workers=2, seed=0)

    it = make_train_iterator(data, processor, config)    # process index/count default to jax's
    batch = next(it)    # {"pixel_values" f32[B, I, S, S, 3], "input_ids", "modality_ids", "segment_ids",
                        #  "positions", "targets" int32[B, L], "weights" f32[B, L]}, B = batch_size // processes
    state = it.get_state()     # small JSON-serialisable dict: store it with the checkpoint
    it.set_state(state)        # continues with exactly the batch that followed when `state` was taken
    it.stats()                 # records read, bad records per "source/reason", skipped while indexing
    it.close()                 # stops worker processes

    for batch in make_eval_iterator(data, processor, config):   # digits held-out set (data.eval_sources):
        ...                    # one ordered pass, one example per row, same batch count on every process

Source kinds (SourceConfig.kind): "digits" (built in, split "train" | "heldout" | "heldout_shuffled"), "webdataset" (tar
shards of `{key}.jpg|png|webp` + `{key}.txt|json`, brace/glob patterns; streamed shard by shard in
training, each process and worker reading whole shards; indexed for random access in evaluation),
"llava" (LLaVA JSON/JSONL with `conversations` + image root), "vqa" (JSONL of image/question/answer
[/choices], templates "plain" | "short_answer" | "multiple_choice"), "tfds" (prepared array_record
dataset read without TensorFlow, feature keys mapped). Sources are mixed by weight (deterministic
proportions); random-access sources are split per process by record (p, p+P, ...) and reshuffled
each epoch. Bad data (missing or corrupt image, unreadable JSON line,
too long for seq_len, unsafe tar member, ...) is skipped and counted; past `max_bad_fraction` the
run fails with BadDataError. Configuration mistakes (no file matches, unknown kind) fail at start.

Packing puts several examples in a row with segment ids 1, 2, ... and positions restarting at 0, so
`aki_jax.mask.attention_mask(modality_ids, segment_ids)` keeps causal and MMA attention inside each
example; no token is cut.
"""

from aki_jax.data.config import SOURCE_KINDS, DataConfig, SourceConfig
from aki_jax.data.digits import DigitsSource, digits_texts, digits_tokenizer
from aki_jax.data.packing import PackIterDataset, make_row
from aki_jax.data.pipeline import (
    BadDataError,
    DataIterator,
    EvalIterator,
    build_source,
    make_eval_iterator,
    make_train_iterator,
)
from aki_jax.data.records import Bad
from aki_jax.data.sources import LlavaSource, TfdsSource, VqaJsonlSource, WebDatasetShards, WebDatasetSource

__all__ = [
    "Bad",
    "BadDataError",
    "DataConfig",
    "DataIterator",
    "DigitsSource",
    "EvalIterator",
    "LlavaSource",
    "PackIterDataset",
    "SOURCE_KINDS",
    "SourceConfig",
    "TfdsSource",
    "VqaJsonlSource",
    "WebDatasetShards",
    "WebDatasetSource",
    "build_source",
    "digits_texts",
    "digits_tokenizer",
    "make_eval_iterator",
    "make_row",
    "make_train_iterator",
]
