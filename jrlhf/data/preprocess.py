"""Tokenisation of records into per-example token arrays, with length limits that are counted, never silent.

Record kinds:

* SFT: ``{prompt, completion}`` (strings, or chat message lists) or ``{messages}`` (a conversation; every assistant
  turn is a target).
* Preference: ``{prompt, chosen, rejected}`` (strings, or chat message lists).
* Prompt (RL): ``{prompt, ...}``; the whole record is kept and passed on to the reward functions.

Strings are tokenised as text: the prompt with the tokenizer's special tokens (e.g. BOS), the completion without,
then EOS is appended to the completion (unless it already ends with EOS) so that the model learns to stop. Chat
message lists (``[{"role": ..., "content": ...}]``) go through the tokenizer's chat template: the prompt with
``add_generation_prompt=True``, each assistant turn as the text the template adds for it (the template's own
end-of-turn marks the stop; no extra EOS). A string prompt paired with message-list completions (or the reverse) is
read as a user message (assistant message).

Length limits (in tokens), applied in this order:

1. ``max_prompt_length``: a longer prompt is cut to its last (``truncation_mode="keep_end"``, the default: keeps
   the question and generation prompt) or first (``"keep_start"``) tokens.
2. ``max_completion_length``: a longer completion keeps its first tokens (its EOS is then cut off).
3. ``max_length``: prompt + completion longer than this cuts the completion's end; a prompt that leaves no room for
   a single completion token cannot fit.

``overlong`` says what an over-long record gets: ``"truncate"`` (cut as above; a record that cannot fit is
dropped), ``"drop"`` (the record is dropped) or ``"error"`` (raise, naming the record and field).

``invalid_records`` says what a record with a missing, empty or ill-typed field gets (an empty answer, a message
without content, a conversation with no assistant turn): ``"error"`` (the default: raise, naming the record and
field) or ``"drop"`` (skip it). Every cut and drop is counted in the :class:`TokenizationReport` (record indices and
reasons) and logged once as a warning. Messages name records by number, counted from 1 in the input order (the line
number of a JSONL file without blank lines); ``record_index`` in the examples and the report is the 0-based index.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from jrlhf.data.sources import DataError
from jrlhf.data.tokenizer import TokenizerError, check_tokenizer

logger = logging.getLogger("jrlhf.data")

TRUNCATION_MODES = ("keep_end", "keep_start")
OVERLONG_POLICIES = ("truncate", "drop", "error")
INVALID_RECORD_POLICIES = ("error", "drop")


def _numbers(indices, shown: int = 20) -> str:
    """``"3, 17, 204"`` (1-based record numbers of 0-based indices), the first ``shown`` then ``", ..."``."""
    text = ", ".join(str(i + 1) for i in indices[:shown])
    return text + (", ..." if len(indices) > shown else "")


@dataclasses.dataclass
class TokenizationReport:
    """What tokenisation did to the records: counts and record indices of every cut and drop."""

    kind: str
    num_records: int = 0
    num_examples: int = 0
    truncated_prompts: list = dataclasses.field(default_factory=list)
    truncated_completions: list = dataclasses.field(default_factory=list)
    dropped: list = dataclasses.field(default_factory=list)  # (record index, reason): over-long
    invalid: list = dataclasses.field(default_factory=list)  # (record index, reason): dropped as invalid

    def summary(self) -> str:
        """One line: records in, examples out, prompts/completions cut, over-long records dropped (first few named),
        invalid records dropped (their 1-based numbers and the first reason)."""
        text = (
            f"{self.kind}: {self.num_records} records -> {self.num_examples} examples; "
            f"{len(self.truncated_prompts)} prompts truncated, {len(self.truncated_completions)} completions "
            f"truncated, {len(self.dropped)} records dropped"
        )
        if self.dropped:
            shown = "; ".join(f"record {i + 1}: {reason}" for i, reason in self.dropped[:3])
            text += f" ({shown}{'; ...' if len(self.dropped) > 3 else ''})"
        if self.invalid:
            text += (f"; {len(self.invalid)} invalid records dropped (records {_numbers([i for i, _ in self.invalid])}"
                     f"; record {self.invalid[0][0] + 1}: {self.invalid[0][1]})")
        return text


@dataclasses.dataclass
class TokenizedData:
    """Per-example token arrays of one kind (``"sft"``, ``"preference"`` or ``"prompt"``) and the report.

    SFT example: ``input_ids`` int32 ``[L]``, ``loss_mask`` int32 ``[L]`` (1 on target tokens), ``prompt_length``.
    Preference example: ``chosen_input_ids``/``chosen_loss_mask`` ``[Lc]``, ``rejected_input_ids``/
    ``rejected_loss_mask`` ``[Lr]`` (int32), ``prompt_length``.
    Prompt example: ``prompt_ids`` int32 ``[P]`` and ``record`` (the input dict).
    Every example also has ``record_index`` (position in the input records).
    """

    kind: str
    examples: list
    report: TokenizationReport

    def __len__(self) -> int:
        return len(self.examples)


@dataclasses.dataclass(frozen=True)
class LengthLimits:
    """Token limits and the policies for over-long and invalid records (see the module docstring)."""

    max_length: int | None = None
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    truncation_mode: str = "keep_end"
    overlong: str = "truncate"
    invalid_records: str = "error"

    def __post_init__(self):
        if self.truncation_mode not in TRUNCATION_MODES:
            raise DataError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {self.truncation_mode!r}")
        if self.overlong not in OVERLONG_POLICIES:
            raise DataError(f"overlong must be one of {OVERLONG_POLICIES}, got {self.overlong!r}")
        if self.invalid_records not in INVALID_RECORD_POLICIES:
            raise DataError(f"invalid_records must be one of {INVALID_RECORD_POLICIES}, got {self.invalid_records!r}")
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise DataError(f"{name} must be a positive int or None, got {value!r}")


_FIX = "raise the limit, or set overlong='truncate' (cut, counted) or 'drop' (skipped, counted)"


class InvalidRecordError(DataError):
    """A record has a missing, empty or ill-typed field. ``index`` is the record's 0-based index, ``reason`` the
    message without the record number; dropped (and counted) instead of raised with ``invalid_records="drop"``."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"record {index + 1}: {reason}; fix or remove the record, or set "
                         "data.invalid_records='drop' (skipped, counted)")
        self.index = index
        self.reason = reason


class _Dropped(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _over_limit(limits: LengthLimits, index: int, field: str, length: int, limit_name: str, limit: int):
    message = f"record {index + 1}: field '{field}' has {length} tokens > {limit_name}={limit}"
    if limits.overlong == "error":
        raise DataError(f"{message}; {_FIX}")
    if limits.overlong == "drop":
        raise _Dropped(f"'{field}' has {length} tokens > {limit_name}={limit}")


# ----------------------------------------------------------------------------------------------- record fields


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def _get_field(record: dict, index: int, field: str, kind: str, required: tuple) -> Any:
    if not isinstance(record, dict):
        raise InvalidRecordError(index, f"expected a dict, got {type(record).__name__}")
    if field not in record or record[field] is None:
        raise InvalidRecordError(
            index,
            f"missing field '{field}' ({kind} records need {', '.join(required)}; "
            f"fields present: {', '.join(sorted(k for k in record if record[k] is not None)) or 'none'})",
        )
    value = record[field]
    if isinstance(value, str):
        if not value.strip():
            raise InvalidRecordError(index, f"field '{field}' is empty")
        return value
    if _is_messages(value):
        if not value:
            raise InvalidRecordError(index, f"field '{field}' is an empty message list")
        for position, message in enumerate(value):
            if "role" not in message or "content" not in message:
                raise InvalidRecordError(
                    index, f"field '{field}' message {position} needs 'role' and 'content' keys, got {sorted(message)}"
                )
            if not isinstance(message["content"], str) or not message["content"].strip():
                raise InvalidRecordError(index, f"field '{field}' message {position} has empty content")
        return value
    raise InvalidRecordError(
        index,
        f"field '{field}' must be a string or a list of chat messages ({{'role', 'content'}} dicts), got "
        f"{type(value).__name__}",
    )


# ------------------------------------------------------------------------------------------------ tokenisation


class _Encoder:
    """Turns prompt/completion text or messages into token id lists with the tokenizer."""

    def __init__(self, tokenizer, add_eos: bool = True):
        check_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.eos_id = int(tokenizer.eos_token_id)
        self.add_eos = add_eos

    def text(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def render(self, messages: list, generation_prompt: bool, index: int) -> str:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise TokenizerError(
                f"record {index + 1}: chat messages need a tokenizer with a chat template; set "
                "tokenizer.chat_template or give the record plain-string fields"
            )
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def prompt(self, prompt, conversational: bool, index: int) -> tuple[list[int], str | list]:
        if not conversational:
            return self.text(prompt, special=True), prompt
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return self.text(self.render(messages, True, index), special=False), messages

    def completion(self, prompt_messages, completion, conversational: bool, index: int, field: str):
        """Returns (completion ids, per-token target mask) for one completion."""
        if not conversational:
            ids = self.text(completion, special=False)
            if self.add_eos and (not ids or ids[-1] != self.eos_id):
                ids.append(self.eos_id)
            return ids, [1] * len(ids)
        messages = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        return self.turns(list(prompt_messages) + list(messages), len(prompt_messages), index, field)

    def turns(self, messages: list, start: int, index: int, field: str):
        """Ids and target mask of ``messages[start:]`` rendered after ``messages[:start]``: assistant turns are
        targets, every other text the template adds is not."""
        rendered = self.render(messages[:start], True, index) if start else ""
        ids, mask = [], []

        def add(text: str, target: int):
            piece = self.text(text, special=False) if text else []
            ids.extend(piece)
            mask.extend([target] * len(piece))

        for position in range(start, len(messages)):
            if messages[position]["role"] != "assistant":
                continue
            before = self.render(messages[:position], True, index)
            after = self.render(messages[: position + 1], False, index)
            if not before.startswith(rendered) or not after.startswith(before):
                raise TokenizerError(
                    f"record {index + 1}: field '{field}': the chat template does not render a conversation as a "
                    "prefix of its continuation, so assistant turns cannot be located; use a prefix-preserving "
                    "template"
                )
            add(before[len(rendered):], 0)
            add(after[len(before):], 1)
            rendered = after
        if not any(mask):
            raise InvalidRecordError(index, f"field '{field}' has no assistant message to learn from")
        return ids, mask


def _cut(ids: list, limit: int, mode: str) -> list:
    return ids[-limit:] if mode == "keep_end" else ids[:limit]


def _fit_prompt(prompt_ids, limits: LengthLimits, index: int, report: TokenizationReport, field="prompt"):
    if limits.max_prompt_length is not None and len(prompt_ids) > limits.max_prompt_length:
        _over_limit(limits, index, field, len(prompt_ids), "max_prompt_length", limits.max_prompt_length)
        report.truncated_prompts.append(index)
        prompt_ids = _cut(prompt_ids, limits.max_prompt_length, limits.truncation_mode)
    return prompt_ids


def _fit_completion(prompt_length, ids, mask, limits: LengthLimits, index, field, report):
    """Cuts a completion to the limits (keep_start); returns (ids, mask, was_truncated)."""
    truncated = False
    if limits.max_completion_length is not None and len(ids) > limits.max_completion_length:
        _over_limit(limits, index, field, len(ids), "max_completion_length", limits.max_completion_length)
        ids, mask, truncated = ids[: limits.max_completion_length], mask[: limits.max_completion_length], True
    if limits.max_length is not None and prompt_length + len(ids) > limits.max_length:
        room = limits.max_length - prompt_length
        if room < 1:
            message = (
                f"record {index + 1}: the prompt has {prompt_length} tokens, leaving no room for '{field}' within "
                f"max_length={limits.max_length}"
            )
            if limits.overlong == "error":
                raise DataError(f"{message}; raise max_length or set max_prompt_length below it")
            raise _Dropped(f"prompt of {prompt_length} tokens leaves no room within max_length={limits.max_length}")
        _over_limit(limits, index, f"prompt+{field}", prompt_length + len(ids), "max_length", limits.max_length)
        ids, mask, truncated = ids[:room], mask[:room], True
    if not any(mask):
        raise _Dropped(f"no target token of '{field}' is left after truncation")
    return ids, mask, truncated


def _array(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


def _invalid(limits: LengthLimits, report: TokenizationReport, error: InvalidRecordError) -> None:
    """Counts an invalid record under ``invalid_records="drop"``; re-raises it under ``"error"``."""
    if limits.invalid_records != "drop":
        raise error
    report.invalid.append((error.index, error.reason))


def _finish(kind, records, examples, report) -> TokenizedData:
    report.num_records = len(records)
    report.num_examples = len(examples)
    if report.dropped or report.invalid or report.truncated_prompts or report.truncated_completions:
        logger.warning("%s", report.summary())
    if records and not examples:
        raise DataError(f"no example is left after tokenisation ({report.summary()}); raise the length limits or "
                        "fix the records")
    return TokenizedData(kind=kind, examples=examples, report=report)


def tokenize_sft(records, tokenizer, *, add_eos: bool = True, **limits) -> TokenizedData:
    """Tokenises SFT records (``{prompt, completion}`` or ``{messages}``).

    Args:
      records: sequence of dicts.
      tokenizer: a Hugging Face tokenizer with pad and EOS tokens.
      add_eos: append EOS to plain-string completions (chat completions end as the template ends a turn).
      **limits: :class:`LengthLimits` fields (``max_length``, ``max_prompt_length``, ``max_completion_length``,
        ``truncation_mode``, ``overlong``, ``invalid_records``).

    Returns:
      :class:`TokenizedData` of kind ``"sft"``: examples with ``input_ids`` and ``loss_mask`` int32 ``[L]``.

    Raises:
      InvalidRecordError (a DataError): missing/empty/ill-typed field (record number and field named) with
        ``invalid_records="error"``.
      DataError: over-long record with ``overlong="error"``; no example left.
      TokenizerError: no pad/EOS token, chat messages without a chat template.
    """
    limits = LengthLimits(**limits)
    encoder = _Encoder(tokenizer, add_eos)
    report = TokenizationReport(kind="sft")
    examples = []
    for index, record in enumerate(records):
        try:
            if isinstance(record, dict) and "messages" in record and "prompt" not in record:
                messages = _get_field(record, index, "messages", "sft", ("prompt+completion", "or messages"))
                if not isinstance(messages, list):
                    raise InvalidRecordError(index, "field 'messages' must be a list of chat messages")
                if not any(m["role"] == "assistant" for m in messages):
                    raise InvalidRecordError(index, "field 'messages' has no assistant message to learn from")
                ids, mask = encoder.turns(messages, 0, index, "messages")
                # Everything before the first assistant turn is the prompt.
                split = mask.index(1)
                prompt_ids, ids, mask = ids[:split], ids[split:], mask[split:]
                completion_field = "messages"
            else:
                required = ("prompt", "completion")
                prompt = _get_field(record, index, "prompt", "sft", required)
                completion = _get_field(record, index, "completion", "sft", required)
                conversational = _is_messages(prompt) or _is_messages(completion)
                prompt_ids, prompt_messages = encoder.prompt(prompt, conversational, index)
                ids, mask = encoder.completion(prompt_messages, completion, conversational, index, "completion")
                completion_field = "completion"
            prompt_ids = _fit_prompt(prompt_ids, limits, index, report)
            ids, mask, truncated = _fit_completion(len(prompt_ids), ids, mask, limits, index, completion_field, report)
        except _Dropped as dropped:
            report.dropped.append((index, dropped.reason))
            continue
        except InvalidRecordError as error:
            _invalid(limits, report, error)
            continue
        if truncated:
            report.truncated_completions.append(index)
        examples.append(
            {
                "input_ids": _array(prompt_ids + ids),
                "loss_mask": _array([0] * len(prompt_ids) + mask),
                "prompt_length": len(prompt_ids),
                "record_index": index,
            }
        )
    return _finish("sft", records, examples, report)


def tokenize_preference(records, tokenizer, *, add_eos: bool = True, **limits) -> TokenizedData:
    """Tokenises preference records ``{prompt, chosen, rejected}`` (strings or chat message lists).

    Chosen and rejected share the (possibly truncated) prompt; a pair is dropped if either side cannot fit.

    Returns:
      :class:`TokenizedData` of kind ``"preference"``: examples with ``chosen_input_ids``, ``chosen_loss_mask``,
      ``rejected_input_ids``, ``rejected_loss_mask`` (int32 ``[L]``) and ``prompt_length``.

    Raises:
      DataError / TokenizerError as :func:`tokenize_sft`.
    """
    limits = LengthLimits(**limits)
    encoder = _Encoder(tokenizer, add_eos)
    report = TokenizationReport(kind="preference")
    examples = []
    required = ("prompt", "chosen", "rejected")
    for index, record in enumerate(records):
        try:
            prompt = _get_field(record, index, "prompt", "preference", required)
            chosen = _get_field(record, index, "chosen", "preference", required)
            rejected = _get_field(record, index, "rejected", "preference", required)
            conversational = any(_is_messages(x) for x in (prompt, chosen, rejected))
            prompt_ids, prompt_messages = encoder.prompt(prompt, conversational, index)
            sides = {
                name: encoder.completion(prompt_messages, value, conversational, index, name)
                for name, value in (("chosen", chosen), ("rejected", rejected))
            }
        except InvalidRecordError as error:
            _invalid(limits, report, error)
            continue
        try:
            prompt_ids = _fit_prompt(prompt_ids, limits, index, report)
            fitted = {
                name: _fit_completion(len(prompt_ids), ids, mask, limits, index, name, report)
                for name, (ids, mask) in sides.items()
            }
        except _Dropped as dropped:
            report.dropped.append((index, dropped.reason))
            continue
        if any(truncated for _, _, truncated in fitted.values()):
            report.truncated_completions.append(index)
        example = {"prompt_length": len(prompt_ids), "record_index": index}
        for name, (ids, mask, _) in fitted.items():
            example[f"{name}_input_ids"] = _array(prompt_ids + ids)
            example[f"{name}_loss_mask"] = _array([0] * len(prompt_ids) + mask)
        examples.append(example)
    return _finish("preference", records, examples, report)


def tokenize_prompts(records, tokenizer, **limits) -> TokenizedData:
    """Tokenises prompt records ``{prompt, ...}`` for sampling; of the limits only ``max_prompt_length`` and
    ``truncation_mode`` apply (``max_length`` and ``max_completion_length`` are accepted and ignored, so that one set
    of limits serves every kind of record).

    Returns:
      :class:`TokenizedData` of kind ``"prompt"``: examples with ``prompt_ids`` int32 ``[P]`` and ``record`` (the
      input dict, passed on to reward functions).
    """
    limits = LengthLimits(**limits)
    encoder = _Encoder(tokenizer)
    report = TokenizationReport(kind="prompt")
    examples = []
    for index, record in enumerate(records):
        try:
            prompt = _get_field(record, index, "prompt", "prompt", ("prompt",))
        except InvalidRecordError as error:
            _invalid(limits, report, error)
            continue
        prompt_ids, _ = encoder.prompt(prompt, _is_messages(prompt), index)
        try:
            prompt_ids = _fit_prompt(prompt_ids, limits, index, report)
        except _Dropped as dropped:
            report.dropped.append((index, dropped.reason))
            continue
        examples.append({"prompt_ids": _array(prompt_ids), "record": record, "record_index": index})
    return _finish("prompt", records, examples, report)


def tokenize(records, tokenizer, kind: str, **kwargs) -> TokenizedData:
    """Dispatches to :func:`tokenize_sft`, :func:`tokenize_preference` or :func:`tokenize_prompts` by ``kind``."""
    functions = {"sft": tokenize_sft, "preference": tokenize_preference, "prompt": tokenize_prompts}
    if kind not in functions:
        raise DataError(f"kind must be one of {sorted(functions)}, got {kind!r}")
    return functions[kind](records, tokenizer, **kwargs)
