"""Host-side data: sources, tokenisation with counted truncation, fixed-shape batches, the shipped task.

Typical use::

    tokenizer = jrlhf.data.load_tokenizer("char")
    records = jrlhf.data.load_records("builtin:addition/sft_train.jsonl")
    data = jrlhf.data.tokenize_sft(records, tokenizer, max_length=32)
    batches = jrlhf.data.make_batch_iterator(data, 64, pad_id=tokenizer.pad_token_id, max_length=32, seed=0)
    batch = next(batches)  # {"input_ids", "attention_mask", "loss_mask"}: int32 [64, T]
"""

from jrlhf.data.batching import (
    BatchIterator,
    PromptBatch,
    bucket_length,
    collate_preference,
    collate_prompts,
    collate_sft,
    length_buckets,
    make_batch_iterator,
    pack_examples,
)
from jrlhf.data.preprocess import (
    InvalidRecordError,
    LengthLimits,
    TokenizationReport,
    TokenizedData,
    tokenize,
    tokenize_preference,
    tokenize_prompts,
    tokenize_sft,
)
from jrlhf.data.sources import DataError, builtin_path, load_records, read_jsonl, write_jsonl
from jrlhf.data.tokenizer import (
    TokenizerError,
    build_char_tokenizer,
    char_tokenizer_dir,
    check_tokenizer,
    load_tokenizer,
    save_char_tokenizer,
)

__all__ = [
    "BatchIterator",
    "DataError",
    "InvalidRecordError",
    "LengthLimits",
    "PromptBatch",
    "TokenizationReport",
    "TokenizedData",
    "TokenizerError",
    "bucket_length",
    "build_char_tokenizer",
    "builtin_path",
    "char_tokenizer_dir",
    "check_tokenizer",
    "collate_preference",
    "collate_prompts",
    "collate_sft",
    "length_buckets",
    "load_records",
    "load_tokenizer",
    "make_batch_iterator",
    "pack_examples",
    "read_jsonl",
    "save_char_tokenizer",
    "tokenize",
    "tokenize_preference",
    "tokenize_prompts",
    "tokenize_sft",
    "write_jsonl",
]
