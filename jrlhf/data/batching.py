"""Fixed-shape batches: length buckets, padding, packing, and a resumable, process-sharded batch iterator.

Batch contract (numpy int32 arrays):

* SFT: ``input_ids``, ``attention_mask``, ``loss_mask`` ``[B, T]``, right-padded; with packing also
  ``segment_ids`` ``[B, T]`` (1, 2, ... per packed example, 0 on padding) and ``positions`` ``[B, T]`` (restarting
  at 0 in each segment).
* Preference: ``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_loss_mask``, ``rejected_input_ids``,
  ``rejected_attention_mask``, ``rejected_loss_mask`` ``[B, T]``, right-padded, one ``T`` for both sides.
* Prompts: :class:`PromptBatch` with ``prompt_ids``, ``prompt_mask`` ``[B, P]``, **left**-padded, and the records.

``loss_mask[b, t] = 1`` marks token ``t`` as a target, predicted by the logits at ``t - 1``. Masks are built from
lengths, never from ``ids != pad_id``, so the pad id may equal EOS. ``T`` (and ``P``) is the smallest length bucket
that holds the batch's longest sequence, so a jitted step compiles once per bucket at most.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np

from jrlhf.data.sources import DataError


# --------------------------------------------------------------------------------------------------- buckets


def length_buckets(max_length: int | None, buckets=None, *, min_bucket: int = 16,
                   pad_to_multiple_of: int | None = None) -> tuple[int, ...]:
    """The padded lengths a batch may take (one compilation of a step per bucket a batch lands in).

    Args:
      max_length: the longest allowed sequence; always the last bucket. ``None``: unbounded powers of two.
      buckets: explicit bucket lengths (sorted, deduplicated, capped at ``max_length``); default: powers of two from
        ``min_bucket`` below ``max_length``, then ``max_length``.
      min_bucket: the smallest default bucket.
      pad_to_multiple_of: with ``max_length`` and no ``buckets``: powers of two from ``min_bucket`` below it, then
        its multiples below ``max_length``, then ``max_length`` (64 and 512: 16, 32, 64, 128, 192, ..., 448, 512;
        the name is TRL's / transformers' collator option). Finer buckets pad less and compile more often.

    Returns:
      Increasing tuple of ints (empty only for ``max_length=None`` and no ``buckets``: powers of two then apply).

    Raises:
      DataError: a bucket or ``pad_to_multiple_of`` below 1.
    """
    if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool) or int(pad_to_multiple_of) < 1):
        raise DataError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
    if buckets:
        values = sorted({int(b) for b in buckets})
        if values[0] < 1:
            raise DataError(f"length buckets must be positive, got {list(buckets)}")
        if max_length is not None:
            values = [b for b in values if b < max_length] + [max_length]
        return tuple(values)
    if max_length is None:
        return ()
    values, length = [], min_bucket
    while length < max_length and (pad_to_multiple_of is None or length < pad_to_multiple_of):
        values.append(length)
        length *= 2
    if pad_to_multiple_of is not None:
        length = int(pad_to_multiple_of)
        while length < max_length:
            if length >= min_bucket:
                values.append(length)
            length += int(pad_to_multiple_of)
    return tuple(sorted(set(values)) + [max_length])


def bucket_length(length: int, buckets: tuple[int, ...]) -> int:
    """Smallest bucket ``>= length`` (next power of two when ``buckets`` is empty).

    Raises:
      DataError: ``length`` exceeds the largest bucket.
    """
    if not buckets:
        return max(1, 1 << (max(1, length) - 1).bit_length())
    for bucket in buckets:
        if bucket >= length:
            return bucket
    raise DataError(
        f"a sequence of {length} tokens exceeds the largest length bucket {buckets[-1]}; tokenise with "
        f"max_length <= {buckets[-1]} or add a larger bucket"
    )


def _padded_length(lengths, buckets, length):
    longest = max(lengths)
    if length is not None:
        if longest > length:
            raise DataError(f"a sequence of {longest} tokens does not fit the fixed length {length}")
        return length
    return bucket_length(longest, buckets)


def _right_pad(sequences, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(sequences), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(sequences), length), dtype=np.int32)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    return ids, mask


def _right_pad_values(sequences, length: int, fill: int = 0) -> np.ndarray:
    out = np.full((len(sequences), length), fill, dtype=np.int32)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = sequence
    return out


def _collate_fields(examples, batch: dict, length: int) -> dict:
    """Adds the carried per-record ``fields`` of the examples: a scalar per example -> ``batch[name]`` float32
    ``[B]``; a per-token array (packed rows) -> float32 ``[B, T]``, right-padded with 0."""
    if "fields" not in examples[0]:
        return batch
    for name in examples[0]["fields"]:
        values = [e["fields"][name] for e in examples]
        if np.ndim(values[0]) == 0:
            batch[name] = np.asarray(values, dtype=np.float32)
        else:
            out = np.zeros((len(values), length), dtype=np.float32)
            for row, value in enumerate(values):
                out[row, : len(value)] = value
            batch[name] = out
    return batch


# ------------------------------------------------------------------------------------------------ collation


def collate_sft(examples, *, pad_id: int, buckets: tuple[int, ...] = (), length: int | None = None) -> dict:
    """Stacks SFT examples (plain or packed) into a right-padded batch.

    Args:
      examples: dicts with ``input_ids`` and ``loss_mask`` ``[L]`` (and ``segment_ids``/``positions`` if packed).
      pad_id: id written into padding (may equal EOS).
      buckets: allowed padded lengths (see :func:`length_buckets`).
      length: fixed padded length instead of a bucket.

    Returns:
      ``input_ids``, ``attention_mask``, ``loss_mask`` int32 ``[B, T]`` (+ ``segment_ids``, ``positions``), plus
      each carried record field (``example["fields"]``): float32 ``[B]``, or ``[B, T]`` per token when packed.
    """
    sequences = [e["input_ids"] for e in examples]
    length = _padded_length([len(s) for s in sequences], buckets, length)
    input_ids, attention_mask = _right_pad(sequences, length, pad_id)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": _right_pad_values([e["loss_mask"] for e in examples], length),
    }
    if "segment_ids" in examples[0]:
        batch["segment_ids"] = _right_pad_values([e["segment_ids"] for e in examples], length)
        batch["positions"] = _right_pad_values([e["positions"] for e in examples], length)
    return _collate_fields(examples, batch, length)


def collate_preference(examples, *, pad_id: int, buckets: tuple[int, ...] = (), length: int | None = None) -> dict:
    """Stacks preference examples into right-padded ``[B, T]`` arrays, one ``T`` for chosen and rejected.

    Returns:
      ``{chosen,rejected}_{input_ids,attention_mask,loss_mask}`` int32 ``[B, T]``, plus each carried record field
      (``example["fields"]``, e.g. ``margin``) as float32 ``[B]``.
    """
    lengths = [len(e[f"{side}_input_ids"]) for e in examples for side in ("chosen", "rejected")]
    length = _padded_length(lengths, buckets, length)
    batch = {}
    for side in ("chosen", "rejected"):
        ids, mask = _right_pad([e[f"{side}_input_ids"] for e in examples], length, pad_id)
        batch[f"{side}_input_ids"] = ids
        batch[f"{side}_attention_mask"] = mask
        batch[f"{side}_loss_mask"] = _right_pad_values([e[f"{side}_loss_mask"] for e in examples], length)
    return _collate_fields(examples, batch, length)


class PromptBatch(NamedTuple):
    """Prompts for sampling: left-padded ids and mask ``[B, P]`` int32, the records (list of ``B`` dicts, passed
    to reward functions), and ``example_mask`` ``[B]`` int32 (0 on rows that only fill the last batch)."""

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    records: list
    example_mask: np.ndarray

    def arrays(self) -> dict:
        """The array fields as a dict (what goes to the device)."""
        return {"prompt_ids": self.prompt_ids, "prompt_mask": self.prompt_mask}


def collate_prompts(examples, *, pad_id: int, buckets: tuple[int, ...] = (), length: int | None = None) -> PromptBatch:
    """Stacks prompt examples into a **left**-padded :class:`PromptBatch`: ``prompt_ids``, ``prompt_mask`` int32
    ``[B, P]``."""
    sequences = [e["prompt_ids"] for e in examples]
    length = _padded_length([len(s) for s in sequences], buckets, length)
    ids = np.full((len(sequences), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(sequences), length), dtype=np.int32)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            ids[row, length - len(sequence) :] = sequence
            mask[row, length - len(sequence) :] = 1
    return PromptBatch(ids, mask, [e["record"] for e in examples], np.ones(len(sequences), dtype=np.int32))


COLLATE_FUNCTIONS = {"sft": collate_sft, "preference": collate_preference, "prompt": collate_prompts}


# --------------------------------------------------------------------------------------------------- packing


def pack_examples(examples, row_length: int) -> list[dict]:
    """Packs SFT examples into rows of at most ``row_length`` tokens (first-fit, longest first; deterministic).

    Each returned row has ``input_ids``, ``loss_mask``, ``segment_ids`` (1, 2, ... per example) and ``positions``
    (0, 1, ... within each example), all int32 ``[L <= row_length]``; attention must stay inside a segment
    (block-diagonal), which ``segment_ids`` tells the model. Carried record ``fields`` become float32 ``[L]``
    arrays holding each example's value on its tokens.

    Raises:
      DataError: an example is longer than ``row_length``.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        size = len(examples[i]["input_ids"])
        if size > row_length:
            raise DataError(
                f"example from record {examples[i].get('record_index', i) + 1} has {size} tokens > packing row length "
                f"{row_length}; tokenise with max_length <= {row_length}"
            )
        for row, space in enumerate(free):
            if space >= size:
                rows[row].append(i)
                free[row] -= size
                break
        else:
            rows.append([i])
            free.append(row_length - size)
    packed = []
    for members in rows:
        parts = [examples[i] for i in members]
        packed.append(
            {
                "input_ids": np.concatenate([p["input_ids"] for p in parts]).astype(np.int32),
                "loss_mask": np.concatenate([p["loss_mask"] for p in parts]).astype(np.int32),
                "segment_ids": np.concatenate(
                    [np.full(len(p["input_ids"]), s + 1, dtype=np.int32) for s, p in enumerate(parts)]
                ),
                "positions": np.concatenate([np.arange(len(p["input_ids"]), dtype=np.int32) for p in parts]),
                "record_index": [p.get("record_index") for p in parts],
            }
        )
        if "fields" in parts[0]:  # a carried record field becomes per-token: each example's value on its tokens
            packed[-1]["fields"] = {
                name: np.concatenate([np.full(len(p["input_ids"]), p["fields"][name], np.float32) for p in parts])
                for name in parts[0]["fields"]
            }
    return packed


# -------------------------------------------------------------------------------------------------- iterator


def _take_rows(batch, start: int, stop: int):
    if isinstance(batch, PromptBatch):
        return PromptBatch(
            batch.prompt_ids[start:stop], batch.prompt_mask[start:stop], batch.records[start:stop],
            batch.example_mask[start:stop],
        )
    return {key: value[start:stop] for key, value in batch.items()}


class BatchIterator:
    """Iterates fixed-size batches over examples for epochs, shuffled per epoch, resumable, sharded by process.

    Every process builds the same global batch of ``batch_size`` rows (same seed, same order, same padded length)
    and keeps its own contiguous slice of ``batch_size // process_count`` rows, so the slices are disjoint and
    together cover the global batch.

    Args:
      examples: the items to batch (tokenised examples, or packed rows).
      batch_size: the *global* batch size (divisible by ``process_count``).
      collate_fn: ``list of examples -> batch`` (dict of ``[B, ...]`` arrays, or :class:`PromptBatch`).
      seed: shuffling seed; epoch ``e`` uses the permutation of ``numpy.random.default_rng([seed, e])``.
      shuffle: shuffle each epoch (else the input order).
      drop_remainder: drop the last partial batch of an epoch. When False, the last batch is filled up by
        repeating examples from the start of the epoch's order, and every batch carries ``example_mask`` ``[B]``
        int32 (1 real, 0 filler) so shapes stay fixed.
      num_epochs: stop after this many epochs (``None``: never stop).
      process_index, process_count: this process's slice; default ``jax.process_index()`` / ``process_count()``.
    """

    def __init__(
        self,
        examples,
        batch_size: int,
        collate_fn,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_remainder: bool = True,
        num_epochs: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not examples:
            raise DataError("no examples to batch (were all records dropped? see the tokenisation report)")
        if batch_size < 1 or batch_size % process_count:
            raise DataError(
                f"batch_size={batch_size} must be a positive multiple of the process count {process_count}"
            )
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index={process_index} must be in [0, {process_count})")
        if drop_remainder and len(examples) < batch_size:
            raise DataError(
                f"{len(examples)} examples are fewer than batch_size={batch_size}, so drop_remainder=True yields no "
                "batch; lower batch_size or set drop_remainder=False"
            )
        self.examples = examples
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.seed = seed
        self.shuffle = shuffle
        self.drop_remainder = drop_remainder
        self.num_epochs = num_epochs
        self.process_index = process_index
        self.process_count = process_count
        self.epoch = 0
        self.batch_index = 0
        self._order_epoch = None
        self._order = None

    @property
    def batches_per_epoch(self) -> int:
        """Number of batches in one epoch."""
        count, remainder = divmod(len(self.examples), self.batch_size)
        return count if (self.drop_remainder or not remainder) else count + 1

    @property
    def local_batch_size(self) -> int:
        """Rows per process: ``batch_size // process_count``."""
        return self.batch_size // self.process_count

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            else:
                self._order = np.arange(len(self.examples))
            self._order_epoch = epoch
        return self._order

    def __iter__(self):
        return self

    def __next__(self):
        if self.batch_index >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_index = 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        order = self._epoch_order(self.epoch)
        indices = order[self.batch_index * self.batch_size : (self.batch_index + 1) * self.batch_size]
        real = len(indices)
        if real < self.batch_size:
            indices = np.concatenate([indices, np.resize(order, self.batch_size - real)])
        batch = self.collate_fn([self.examples[i] for i in indices])
        if not self.drop_remainder:
            example_mask = (np.arange(self.batch_size) < real).astype(np.int32)
            if isinstance(batch, PromptBatch):
                batch = batch._replace(example_mask=example_mask)
            else:
                batch["example_mask"] = example_mask
        self.batch_index += 1
        start = self.process_index * self.local_batch_size
        return _take_rows(batch, start, start + self.local_batch_size)

    def state_dict(self) -> dict:
        """The position of the next batch: ``{"epoch", "batch_index", "seed", "num_examples", "batch_size"}``."""
        return {
            "epoch": int(self.epoch),
            "batch_index": int(self.batch_index),
            "seed": int(self.seed),
            "num_examples": len(self.examples),
            "batch_size": int(self.batch_size),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resumes at the batch :meth:`state_dict` pointed to.

        Raises:
          DataError: the state was saved for another dataset size, batch size or seed (the order would differ).
        """
        for key, current in (
            ("num_examples", len(self.examples)), ("batch_size", self.batch_size), ("seed", self.seed)
        ):
            if key in state and int(state[key]) != current:
                raise DataError(
                    f"data iterator state has {key}={state[key]} but this iterator has {key}={current}; resume "
                    "with the same data, batch size and seed"
                )
        self.epoch = int(state["epoch"])
        self.batch_index = int(state["batch_index"])


def make_batch_iterator(
    data,
    batch_size: int,
    *,
    pad_id: int,
    max_length: int | None = None,
    buckets=None,
    packing: bool = False,
    pad_to_multiple_of: int | None = None,
    **iterator_kwargs: Any,
) -> BatchIterator:
    """A :class:`BatchIterator` over :class:`jrlhf.data.TokenizedData`, collated by its kind.

    Args:
      data: tokenised data (``kind`` ``"sft"``, ``"preference"`` or ``"prompt"``).
      batch_size: global batch size.
      pad_id: padding id (``tokenizer.pad_token_id``).
      max_length: the largest bucket (prompts: the largest prompt length); default the longest example.
      buckets: explicit bucket lengths (see :func:`length_buckets`).
      pad_to_multiple_of: the bucket rule of :func:`length_buckets` when ``buckets`` is not given.
      packing: SFT only: pack examples into rows of exactly ``max_length`` tokens (adds ``segment_ids``,
        ``positions``).
      **iterator_kwargs: ``seed``, ``shuffle``, ``drop_remainder``, ``num_epochs``, ``process_index``,
        ``process_count``.
    """
    if data.kind not in COLLATE_FUNCTIONS:
        raise DataError(f"unknown data kind {data.kind!r}")
    examples = data.examples
    if max_length is None:
        key = {"sft": ("input_ids",), "prompt": ("prompt_ids",)}.get(
            data.kind, ("chosen_input_ids", "rejected_input_ids")
        )
        max_length = max((len(e[k]) for e in examples for k in key), default=1)
    collate = COLLATE_FUNCTIONS[data.kind]
    if packing:
        if data.kind != "sft":
            raise DataError(f"packing applies to SFT data only, not {data.kind!r}")
        examples = pack_examples(examples, max_length)
        collate = functools.partial(collate, pad_id=pad_id, length=max_length)
    else:
        collate = functools.partial(collate, pad_id=pad_id, buckets=length_buckets(
            max_length, buckets, pad_to_multiple_of=pad_to_multiple_of))
    return BatchIterator(examples, batch_size, collate, **iterator_kwargs)
