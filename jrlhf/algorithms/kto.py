"""KTO (Kahneman-Tversky Optimization, Ethayarajh et al. 2024) on unpaired desirable / undesirable completions, as
TRL 1.16's ``KTOTrainer`` defines it.

Data: unpaired records ``{prompt, completion, label}`` (``label`` a bool, ``true`` = desirable; strings or chat
message lists, tokenised as SFT records are) or paired records ``{prompt, chosen, rejected}``, which give one
desirable and one undesirable example each (:func:`unpair_preference_records`, TRL's
``unpair_preference_dataset``). Tokenisation, length limits and the invalid-record policy are
:mod:`jrlhf.data.preprocess`'s (``data.max_length``, ``data.overlong``, ``data.invalid_records``...).

The loss (:func:`jrlhf.losses.kto_loss`): with ``x = log π(y|x) - log π_ref(y|x)`` and the reference point ``z``,
desirable examples get ``λ_D (1 - σ(β(x - z)))``, undesirable ones ``λ_U (1 - σ(β(z - x)))``, averaged over the
batch. ``z`` is :func:`jrlhf.losses.kto_kl_estimate` over *mismatched* pairs: row ``i`` of a batch paired with
the completion of row ``i - 1`` (row 0 with the last row's), TRL 1.16's rotation by one within the batch. ``z``
is computed once per optimizer step on the whole batch (``prepare_batch``, under the current params), so every
micro-batch uses the same value and gradient accumulation is exact. ``loss_type="apo_zero_unpaired"`` needs no
``z``.

Without the config system::

    algorithm = kto.make(model, kto.Config(beta=0.1))
    frozen = algorithm.init_frozen(params)                 # kto.Frozen(ref_params=params)
    step = algorithm.train_step(optimizer, mesh, state_shardings=shardings)
    data = kto.tokenize_kto(records, tokenizer, max_length=64)
    batch = kto.collate_kto(data.examples[:8], pad_id=tokenizer.pad_token_id)
    state, metrics = step(state, batch, frozen)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jrlhf import losses
from jrlhf.algorithms.base import (Algorithm, AlgorithmInputError, AlgorithmSetup, check_chunk_setting, check_fields,
                                   check_frozen, completion_logps, concat_pairs, generation_eval, implicit_reward_eval,
                                   load_eval_records, preference_eval_records, tokenize_train)
from jrlhf.config import ConfigError
from jrlhf.models import logical_axes
from jrlhf.models.lora import base_model, has_adapters

DATA_KIND = "kto"
LOSS_TYPES = ("kto", "apo_zero_unpaired")
UNPAIR_CHUNK = 1000
"""Pairs per chunk of :func:`unpair_preference_records`: TRL unpairs with ``datasets.map(batched=True)``, whose
default batch is 1,000 rows, and each map batch lists its desirable examples before its undesirable ones."""

BATCH_FIELDS = {
    "input_ids": "[B, T] int32: prompt + completion token ids (right-padded)",
    "attention_mask": "[B, T] int32: 1 on real tokens",
    "loss_mask": "[B, T] int32: 1 on the completion tokens",
    "label": "[B] int32: 1 = desirable, 0 = undesirable",
}
KL_FIELDS = {
    "kl_input_ids": "[B, T] int32: row i's prompt + row (i-1)'s completion (the mismatched pairs of the KL estimate)",
    "kl_attention_mask": "[B, T] int32: 1 on real tokens of the mismatched rows",
    "kl_loss_mask": "[B, T] int32: 1 on the completion tokens of the mismatched rows",
}
REFERENCE_FIELDS = {
    "ref_logps": "[B] float32: the reference's summed completion log-prob of each row",
    "ref_kl_logps": "[B] float32: the reference's summed completion log-prob of each mismatched (KL) row",
}
"""Precomputed reference log-probs (``precompute_ref_log_probs``); ``ref_kl_logps`` only with ``loss_type="kto"``."""


@flax.struct.dataclass
class Frozen:
    """What the KTO loss reads and does not train (a pytree).

    Attributes:
      ref_params: the reference model's params (the same model as the policy; by default the initial policy,
        held without a copy: :func:`jrlhf.step.init_train_state` copies the trained ones).
    """

    ref_params: Any


@dataclasses.dataclass
class Config:
    """KTO settings; names and defaults follow TRL 1.16's ``KTOConfig``.

    Attributes:
      beta: β, the temperature of the implicit reward ``β (log π - log π_ref)``.
      desirable_weight: λ_D, the weight of the desirable examples' losses.
      undesirable_weight: λ_U, the weight of the undesirable examples' losses (TRL suggests keeping
        ``λ_D n_D / (λ_U n_U)`` in ``[1, 4/3]``, Eq. (8) of the KTO paper).
      loss_type: ``"kto"`` (with the KL reference point) or ``"apo_zero_unpaired"`` (APO-zero, unpaired: no KL
        rows are built or scored).
      precompute_ref_log_probs: compute the reference log-probs once for the dataset before training (with
        ``"kto"`` the mismatched pairs are then fixed: batches must come in data order, ``data.shuffle: false``,
        which is TRL's ``train_sampling_strategy="sequential"``).
      logprob_chunk_size: the log-softmax over the vocabulary, as :class:`jrlhf.algorithms.dpo.Config`:
        ``"auto"``, ``None`` (full logits) or an int chunk size.
    """

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    loss_type: str = "kto"
    precompute_ref_log_probs: bool = False
    logprob_chunk_size: int | str | None = "auto"


def head(cfg) -> str:
    """The trained model's head."""
    return "lm"


def uses_kl(algo: Config) -> bool:
    """Whether the loss reads the KL reference point (and batches carry :data:`KL_FIELDS`)."""
    return algo.loss_type == "kto"


def check_config(algo: Config) -> None:
    """Rejects settings that cannot work, naming the key.

    Raises:
      ConfigError: an unknown ``loss_type``, a negative weight or a non-positive ``beta``.
    """
    if algo.loss_type not in LOSS_TYPES:
        raise ConfigError(f"algo.loss_type '{algo.loss_type}' is not one of {', '.join(LOSS_TYPES)}")
    for key in ("desirable_weight", "undesirable_weight"):
        if not getattr(algo, key) >= 0:
            raise ConfigError(f"algo.{key} must be >= 0, got {getattr(algo, key)!r}")
    if not algo.beta > 0:
        raise ConfigError(f"algo.beta must be > 0, got {algo.beta!r}")
    check_chunk_setting(algo.logprob_chunk_size)


# ------------------------------------------------------------------------------------------------ data


def is_paired(records) -> bool:
    """Whether ``records`` are paired preference records: the first record has ``chosen`` and ``rejected`` (TRL
    decides on the first example the same way)."""
    first = next((r for r in records if isinstance(r, dict)), None)
    return first is not None and "chosen" in first and "rejected" in first


def unpair_preference_records(records, chunk: int = UNPAIR_CHUNK) -> list[dict]:
    """``{prompt, chosen, rejected, ...}`` records -> ``{prompt, completion, label, ...}`` records, as TRL 1.16's
    ``unpair_preference_dataset``: each pair gives ``{completion: chosen, label: True}`` and ``{completion:
    rejected, label: False}`` with the same prompt and the other fields copied; within each run of ``chunk`` pairs
    the desirable examples come first, then the undesirable ones, in the pairs' order."""
    out = []
    for start in range(0, len(records), chunk):
        part = records[start:start + chunk]
        for side, label in (("chosen", True), ("rejected", False)):
            for record in part:
                rest = {k: v for k, v in record.items() if k not in ("chosen", "rejected")}
                out.append({**rest, "completion": record.get(side), "label": label})
    return out


def _label_error(record, index: int):
    """The :class:`jrlhf.data.InvalidRecordError` of a record whose ``label`` is missing or not a bool, or ``None``."""
    from jrlhf.data import InvalidRecordError

    if not isinstance(record, dict):
        return None  # tokenisation names it
    if record.get("label") is None:
        fields = ", ".join(sorted(k for k in record if record[k] is not None)) or "none"
        return InvalidRecordError(index, f"missing field 'label' (unpaired KTO records need prompt, completion and "
                                         f"a bool label; fields present: {fields})")
    if not isinstance(record["label"], (bool, np.bool_)):
        return InvalidRecordError(index, f"field 'label' must be a bool (true = desirable, false = undesirable), got "
                                         f"{record['label']!r}")
    return None


def tokenize_kto(records, tokenizer, *, add_eos: bool = True, **limits):
    """Tokenises KTO records into unpaired examples with :mod:`jrlhf.data.preprocess`'s SFT / preference paths.

    Unpaired records ``{prompt, completion, label}`` (or ``{messages, label}``) go through
    :func:`jrlhf.data.tokenize_sft`; paired records ``{prompt, chosen, rejected}`` through
    :func:`jrlhf.data.tokenize_preference` (both sides share the cut prompt; a pair that cannot be used is dropped
    or raised whole, per the policies) and are then unpaired in :func:`unpair_preference_records`'s order.

    Args:
      records: a sequence of dicts.
      tokenizer: a Hugging Face tokenizer with pad and EOS tokens.
      add_eos: append EOS to plain-string completions (TRL's KTO does the same).
      **limits: :class:`jrlhf.data.LengthLimits` fields (``max_length``, ``invalid_records``...).

    Returns:
      :class:`jrlhf.data.TokenizedData` of kind ``"kto"``: examples with ``input_ids``, ``loss_mask`` int32 ``[L]``,
      ``prompt_length``, ``label`` (bool) and ``record_index`` (the record's 0-based position).

    Raises:
      InvalidRecordError (a DataError): a missing or non-bool ``label``, a missing or empty field (record number and
        field named) under ``invalid_records="error"``.
      DataError: over-long records under ``overlong="error"``; no example left.
    """
    from jrlhf.data import DataError, LengthLimits, TokenizedData, tokenize_preference, tokenize_sft

    policy = LengthLimits(**limits)
    if is_paired(records):
        data = tokenize_preference(records, tokenizer, add_eos=add_eos, **limits)
        examples = []
        for start in range(0, len(records), UNPAIR_CHUNK):
            part = [e for e in data.examples if start <= e["record_index"] < start + UNPAIR_CHUNK]
            for side, label in (("chosen", True), ("rejected", False)):
                for e in part:
                    examples.append({"input_ids": e[f"{side}_input_ids"], "loss_mask": e[f"{side}_loss_mask"],
                                     "prompt_length": e["prompt_length"], "label": label,
                                     "record_index": e["record_index"]})
        report = data.report
    else:
        bad = {}
        for index, record in enumerate(records):
            error = _label_error(record, index)
            if error is not None:
                if policy.invalid_records != "drop":
                    raise error
                bad[index] = error.reason
        data = tokenize_sft(records, tokenizer, add_eos=add_eos, **limits)
        report = data.report
        already = {i for i, _ in report.invalid}
        report.invalid = sorted(report.invalid + [(i, r) for i, r in bad.items() if i not in already])
        examples = [{**e, "label": bool(records[e["record_index"]]["label"])}
                    for e in data.examples if e["record_index"] not in bad]
    report.kind = "kto"
    report.num_examples = len(examples)
    if records and not examples:
        raise DataError(f"no example is left after tokenisation ({report.summary()}); raise the length limits or "
                        "fix the records")
    return TokenizedData(kind="kto", examples=examples, report=report)


def collate_kto(examples, *, pad_id: int, buckets: tuple[int, ...] = (), max_length: int | None = None,
                kl: bool = True, length: int | None = None) -> dict:
    """Stacks unpaired examples into right-padded ``[B, T]`` arrays, with the mismatched KL rows.

    KL row ``i`` is example ``i``'s prompt followed by example ``i - 1``'s completion (row 0 takes the last
    example's): TRL 1.16's rotation of the completions by one within the batch. A KL row longer than
    ``max_length`` keeps its first ``max_length`` tokens (TRL's collator cuts the same way); every prompt is
    shorter than ``max_length``, so at least one completion token stays.

    Args:
      examples: :func:`tokenize_kto` examples (with ``ref_logps`` / ``ref_kl_logps`` when precomputed).
      pad_id: the padding id.
      buckets: allowed padded lengths (:func:`jrlhf.data.length_buckets`); one ``T`` for both sets of rows.
      max_length: the cut of the KL rows (``None``: none).
      kl: build the KL rows (``loss_type="kto"``).
      length: a fixed padded length instead of a bucket.

    Returns:
      :data:`BATCH_FIELDS` (+ :data:`KL_FIELDS` with ``kl``, + :data:`REFERENCE_FIELDS` when the examples carry
      them) as numpy arrays.

    Raises:
      DataError: precomputed KL log-probs whose batch is not the one they were computed for (shuffled batches).
    """
    from jrlhf.data import DataError
    from jrlhf.data.batching import _padded_length, _right_pad, _right_pad_values

    rows = {"": ([e["input_ids"] for e in examples], [e["loss_mask"] for e in examples])}
    if kl:
        kl_ids, kl_mask = [], []
        for i, e in enumerate(examples):
            other = examples[i - 1]
            cut = other["prompt_length"]
            ids = np.concatenate([e["input_ids"][:e["prompt_length"]], other["input_ids"][cut:]])
            mask = np.concatenate([np.zeros(e["prompt_length"], np.int32), other["loss_mask"][cut:]])
            if max_length is not None:
                ids, mask = ids[:max_length], mask[:max_length]
            kl_ids.append(ids)
            kl_mask.append(mask)
        rows["kl_"] = (kl_ids, kl_mask)
    length = _padded_length([len(s) for ids, _ in rows.values() for s in ids], buckets, length)
    batch = {}
    for prefix, (ids, mask) in rows.items():
        batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"] = _right_pad(ids, length, pad_id)
        batch[f"{prefix}loss_mask"] = _right_pad_values(mask, length)
    batch["label"] = np.asarray([bool(e["label"]) for e in examples], np.int32)
    if "ref_logps" in examples[0]:
        batch["ref_logps"] = np.asarray([e["ref_logps"] for e in examples], np.float32)
        if kl:
            slots = [e.get("kl_slot") for e in examples]
            if slots != [(slots[0][0], j) for j in range(len(examples))]:
                raise DataError("kto: the precomputed reference KL log-probs belong to the batches in data order; "
                                "set data.shuffle: false, or algo.precompute_ref_log_probs: false")
            batch["ref_kl_logps"] = np.asarray([e["ref_kl_logps"] for e in examples], np.float32)
    return batch


# ------------------------------------------------------------------------------------------------ loss


def _sequence_logps(model, params, batch, prefix: str, algo: Config):
    summed, _, _ = completion_logps(model, params, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"],
                                    batch[f"{prefix}loss_mask"], chunk_size=algo.logprob_chunk_size)
    return summed


def _reference(model, frozen, params):
    """(reference model, its params): the base model on the same params with LoRA, else ``frozen.ref_params``."""
    if has_adapters(model):
        return base_model(model), params
    if isinstance(frozen, Frozen):
        return model, frozen.ref_params
    raise AlgorithmInputError(f"kto: frozen must be kto.Frozen(ref_params=...) (Algorithm.init_frozen(params)), or "
                              f"the batch must carry {' and '.join(REFERENCE_FIELDS)}; got {type(frozen).__name__}")


def reference_logps(model, ref_params, batch, algo: Config):
    """The reference's summed completion log-probs of a KTO batch: ``(ref_logps [B], ref_kl_logps [B] or None)``
    float32, gradient stopped."""
    ref = jax.lax.stop_gradient(_sequence_logps(model, ref_params, batch, "", algo))
    ref_kl = jax.lax.stop_gradient(_sequence_logps(model, ref_params, batch, "kl_", algo)) if uses_kl(algo) else None
    return ref, ref_kl


def make_prepare_batch(model, algo: Config):
    """``prepare_batch(batch, frozen, algo_state, params)`` (``reads_params``: :func:`jrlhf.step.make_train_step`
    passes the current params): once on the whole batch, the global counts ``num_sequences``, ``num_desirable``,
    ``num_undesirable`` (float32) and, for ``"kto"``, the reference point ``kl`` =
    :func:`jrlhf.losses.kto_kl_estimate` of the policy and reference log-probs of every KL row of the batch
    (TRL's ``kl``: the mean over the global batch, clamped at 0). The KL rows are then dropped from the batch (the
    micro-batches do not read them).

    Raises:
      AlgorithmInputError: a missing field, no ``params``, a batch of one row with ``"kto"`` (its only mismatched
        pair would be its own completion, as TRL refuses).
    """

    def prepare_batch(batch, frozen, algo_state, params=None):
        check_fields("kto", batch, BATCH_FIELDS)
        labels = batch["label"] > 0
        rows = batch["input_ids"].shape[0]
        out = {"num_sequences": jnp.float32(rows), "num_desirable": jnp.sum(labels.astype(jnp.float32))}
        out["num_undesirable"] = jnp.float32(rows) - out["num_desirable"]
        if uses_kl(algo):
            check_fields("kto", batch, KL_FIELDS)
            if rows < 2:
                raise AlgorithmInputError("kto: the KL estimate needs at least 2 rows per batch (one row is paired "
                                          "with its own completion); raise data.batch_size")
            if params is None:
                raise AlgorithmInputError("kto: prepare_batch needs the current params (params=...) for the KL "
                                          "estimate; jrlhf.step.make_train_step passes them")
            policy_kl = jax.lax.stop_gradient(_sequence_logps(model, params, batch, "kl_", algo))
            if "ref_kl_logps" in batch:
                ref_kl = batch["ref_kl_logps"]
            else:
                ref_model, ref_params = _reference(model, frozen, params)
                ref_kl = jax.lax.stop_gradient(_sequence_logps(ref_model, ref_params, batch, "kl_", algo))
            out["kl"] = losses.kto_kl_estimate(policy_kl, ref_kl)
        batch = {k: v for k, v in batch.items() if k not in KL_FIELDS and k != "ref_kl_logps"}
        return batch, out

    prepare_batch.reads_params = True
    return prepare_batch


def _share(values, mask, ctx, key):
    """This micro-batch's sum of ``values`` over ``mask`` times ``num_microbatches / globals[key]``: averaged over
    the micro-batches (as the step does) it is the mean over the whole batch; 0 when the global count is 0."""
    total = ctx.globals[key]
    micro = ctx.globals.get("num_microbatches", 1.0)
    summed = jnp.sum(jnp.where(mask, values, 0.0))
    return jnp.where(total > 0, summed * micro / jnp.maximum(total, 1.0), 0.0)


def make_loss_fn(model, algo: Config, frozen_type=None):
    """``loss_fn(params, batch, frozen, ctx)``: the sum of the per-example KTO losses over the global row count
    (TRL's mean over the batch), with the reference point ``ctx.globals["kl"]`` from :func:`make_prepare_batch`.

    Metrics, named as TRL 1.16 logs them and exact over micro-batches: ``rewards/chosen`` / ``rewards/rejected``
    (mean ``β (log π - log π_ref)`` of the desirable / undesirable rows, 0 when there are none),
    ``rewards/margins`` (their difference), ``logps/chosen`` / ``logps/rejected`` (mean summed completion
    log-probs), ``kl`` (the reference point, 0 for ``"apo_zero_unpaired"``), and ``count/desirable`` /
    ``count/undesirable`` (rows in the batch).
    """

    def loss_fn(params, batch, frozen, ctx):
        check_fields("kto", batch, BATCH_FIELDS)
        check_frozen("kto", frozen, frozen_type)
        logps = _sequence_logps(model, params, batch, "", algo)
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
        else:
            ref_model, ref_params = _reference(model, frozen, params)
            ref = jax.lax.stop_gradient(_sequence_logps(ref_model, ref_params, batch, "", algo))
        kl = ctx.globals["kl"] if uses_kl(algo) else None
        per, rewards = losses.kto_loss(logps, ref, batch["label"], kl, beta=algo.beta,
                                       desirable_weight=algo.desirable_weight,
                                       undesirable_weight=algo.undesirable_weight, loss_type=algo.loss_type)
        loss = jnp.sum(per) / ctx.globals["num_sequences"]
        desirable = batch["label"] > 0
        chosen = _share(rewards, desirable, ctx, "num_desirable")
        rejected = _share(rewards, ~desirable, ctx, "num_undesirable")
        metrics = {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
            "logps/chosen": _share(logps, desirable, ctx, "num_desirable"),
            "logps/rejected": _share(logps, ~desirable, ctx, "num_undesirable"),
            "kl": jnp.zeros((), jnp.float32) if kl is None else kl,
            "count/desirable": ctx.globals["num_desirable"],
            "count/undesirable": ctx.globals["num_undesirable"],
        }
        return loss, metrics

    return loss_fn


def make(model, config: Config) -> Algorithm:
    """KTO as plain functions (:class:`jrlhf.algorithms.base.Algorithm`).

    ``loss_fn`` (:func:`make_loss_fn`), ``prepare_batch`` (:func:`make_prepare_batch`: the counts and the KL
    reference point on the whole batch); ``frozen`` a :class:`Frozen` with the reference params, or ``None`` with
    ``precompute_ref_log_probs`` (the batch carries :data:`REFERENCE_FIELDS`) and with LoRA (the reference is the
    base model: the same params with the adapters off).

    Raises:
      ConfigError: :func:`check_config`.
    """
    check_config(config)
    needs_ref_params = not config.precompute_ref_log_probs and not has_adapters(model)
    frozen_type = Frozen if needs_ref_params else None
    fields = {**BATCH_FIELDS, **(KL_FIELDS if uses_kl(config) else {})}
    if config.precompute_ref_log_probs:
        fields.update({k: v for k, v in REFERENCE_FIELDS.items() if k == "ref_logps" or uses_kl(config)})
    return Algorithm(
        name="kto",
        loss_fn=make_loss_fn(model, config, frozen_type),
        prepare_batch=make_prepare_batch(model, config),
        batch_fields=fields,
        optional_batch_fields=REFERENCE_FIELDS if needs_ref_params else {},
        frozen_type=frozen_type,
        init_frozen=(lambda params: Frozen(ref_params=params)) if needs_ref_params else (lambda params: None),
        frozen_specs=Frozen(ref_params=logical_axes(model)) if needs_ref_params else None,
    )


# ------------------------------------------------------------------------------------------------ host-side glue


def precompute_reference(model, ref_params, examples, collate, algo: Config, batch_size: int) -> None:
    """Attaches ``ref_logps`` (and with ``"kto"`` ``ref_kl_logps`` and the slot it was computed in) to every
    example, in place: the examples in data order, in consecutive batches of ``batch_size`` (the training
    batches when ``data.shuffle`` is false), each collated by ``collate`` (its KL rows as in training)."""
    fn = jax.jit(lambda p, b: reference_logps(model, p, b, algo))
    for number, start in enumerate(range(0, len(examples), batch_size)):
        part = examples[start:start + batch_size]
        batch = collate(part)
        ref, ref_kl = fn(ref_params, {k: jnp.asarray(v) for k, v in batch.items()})
        ref, ref_kl = np.asarray(ref), (None if ref_kl is None else np.asarray(ref_kl))
        for j, e in enumerate(part):
            e["ref_logps"] = np.float32(ref[j])
            if ref_kl is not None:
                e["ref_kl_logps"] = np.float32(ref_kl[j])
                e["kl_slot"] = (number, j)


def _pair_logps(model, params, batch, algo: Config):
    ids, attn, lmask = concat_pairs(batch)
    summed, _, _ = completion_logps(model, params, ids, attn, lmask, chunk_size=algo.logprob_chunk_size)
    half = summed.shape[0] // 2
    return summed[:half], summed[half:]


def setup(run) -> AlgorithmSetup:
    """Builds the KTO parts for the loop: :func:`make` (the reference a copy of the initial policy), the
    tokenised data (:func:`tokenize_kto`) with :func:`collate_kto` batches, the reference log-probs attached once
    with ``precompute_ref_log_probs``, and evaluation: held-out preference accuracy on paired ``data.eval`` records
    (implicit reward ``β (log π - log π_ref)`` of chosen > rejected) and exact match on ``data.eval_prompts``.

    Raises:
      ConfigError: ``data.batch_size`` < 2 with ``"kto"``; ``data.packing``; precomputed KL log-probs with
        ``data.shuffle: true``.
    """
    from jrlhf.data import length_buckets

    cfg, algo, model = run.cfg, run.cfg.algo, run.model
    check_config(algo)
    if uses_kl(algo) and cfg.data.batch_size < 2:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size}: KTO's KL estimate pairs each prompt with another "
                          "row's completion, so a batch needs at least 2 rows (or set algo.loss_type: "
                          "apo_zero_unpaired)")
    if cfg.data.packing:
        raise ConfigError("data.packing does not apply to KTO (each row is scored as a whole sequence); set "
                          "data.packing: false")
    if uses_kl(algo) and algo.precompute_ref_log_probs and cfg.data.shuffle:
        raise ConfigError("algo.precompute_ref_log_probs with loss_type 'kto' fixes the mismatched KL pairs of each "
                          "batch, so the batches must come in data order (TRL's train_sampling_strategy="
                          "'sequential'): set data.shuffle: false, or precompute_ref_log_probs: false")
    algorithm = make(model, algo)
    train_data = tokenize_train(run, DATA_KIND, tokenize_fn=tokenize_kto)
    collate = functools.partial(collate_kto, pad_id=run.tokenizer.pad_token_id, max_length=cfg.data.max_length,
                                kl=uses_kl(algo),
                                buckets=length_buckets(cfg.data.max_length, cfg.data.buckets or None,
                                                       pad_to_multiple_of=cfg.data.pad_to_multiple_of))
    ref_model = base_model(model)
    if algo.precompute_ref_log_probs:
        precompute_reference(ref_model, run.params, train_data.examples, collate, algo, cfg.data.batch_size)

    pref_records = preference_eval_records(cfg.data)
    if pref_records is not None and not is_paired(pref_records):
        pref_records = None  # unpaired held-out records give no preference accuracy
    gen_records = load_eval_records(cfg.data.eval_prompts, cfg.data.max_eval_examples, key="data.eval_prompts")
    gen_eval = generation_eval(run, gen_records) if gen_records else None
    lora_ref = has_adapters(model)
    eval_ref = run.params if algorithm.frozen_type is None and not lora_ref else None
    score_policy = jax.jit(lambda p, b: _pair_logps(model, p, b, algo))
    score_reference = jax.jit(lambda p, b: _pair_logps(ref_model, p, b, algo))
    pref_eval = implicit_reward_eval(run, pref_records, score_policy, score_reference,
                                     algo.beta) if pref_records else None

    def evaluate(params, frozen_now):
        out = {}
        if pref_eval is not None:
            ref = params if lora_ref else (frozen_now.ref_params if isinstance(frozen_now, Frozen) else eval_ref)
            out.update(pref_eval(params, ref))
        if gen_eval is not None:
            out.update(gen_eval(params, frozen_now))
        return out

    return AlgorithmSetup.from_algorithm(algorithm, run.params, train_data, collate=collate,
                                         evaluate=evaluate if (pref_records or gen_eval) else None)
