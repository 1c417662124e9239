"""DPO and its relatives: every loss type of :func:`jrlhf.losses.dpo_loss`, plus SimPO and ORPO.

Chosen and rejected go through one concatenated forward. The reference log-probs come from the reference params in
``frozen`` per batch, or are precomputed once for the dataset (``precompute_ref_log_probs``). Options: reference-free
DPO, TR-DPO reference sync (every ``ref_model_sync_steps`` steps the reference becomes
``α·policy + (1-α)·reference``), an NLL term on the chosen completions (RPO, ``rpo_alpha``), LD-DPO (``ld_alpha``),
and BCO's running-mean baseline (``bco_running_mean``, TRL <= 0.28).

:func:`make` gives the update as plain functions (:class:`jrlhf.algorithms.base.Algorithm`): the loss reads the
preference fields :data:`jrlhf.algorithms.base.PREFERENCE_FIELDS` and ``frozen`` a :class:`Frozen` holding the
reference params (or the batch fields :data:`REFERENCE_FIELDS` with ``precompute_ref_log_probs``)::

    algorithm = dpo.make(model, dpo.Config(beta=0.1))
    frozen = algorithm.init_frozen(params)                 # dpo.Frozen(ref_params=params)
    step = algorithm.train_step(optimizer, mesh, state_shardings=shardings)
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
from jrlhf.algorithms.base import (PREFERENCE_FIELDS, Algorithm, AlgorithmInputError, AlgorithmSetup,
                                   check_chunk_setting, completion_logps, concat_pairs, generation_eval,
                                   implicit_reward_eval, load_eval_records, preference_eval_records, preference_globals,
                                   tokenize_train, with_input_checks)
from jrlhf.config import ConfigError
from jrlhf.models import logical_axes
from jrlhf.models.lora import base_model, has_adapters

DATA_KIND = "preference"
REFERENCE_FREE_TYPES = ("simpo", "orpo")
WHOLE_BATCH_TYPES = ("aot", "aot_unpaired", "aot_pair")
REFERENCE_FIELDS = {
    "ref_chosen_logps": "[B] float32: the reference's summed completion log-prob of each chosen sequence",
    "ref_rejected_logps": "[B] float32: the reference's summed completion log-prob of each rejected sequence",
}
"""Precomputed reference log-probs (:func:`reference_logps` of the reference params); when a batch carries them the
loss uses them instead of a reference forward."""


@flax.struct.dataclass
class Frozen:
    """What the DPO loss reads and does not train (a pytree: pass it as ``frozen`` to the step; jit, sharding and
    checkpoints treat it as they treat a dict).

    Attributes:
      ref_params: the reference model's params: the same model as the policy, by default the initial policy
        (``Algorithm.init_frozen(params)`` holds ``params`` itself, no copy: :func:`jrlhf.step.init_train_state`
        copies the trained ones). TR-DPO's ``after_step`` replaces it and donates the old buffers, so with
        ``sync_ref_model`` pass ``init_frozen`` a copy of device params you still use.
    """

    ref_params: Any


@dataclasses.dataclass
class Config:
    """DPO settings; names and defaults follow TRL 1.16's ``DPOConfig`` (``simpo_gamma`` follows ``CPOConfig``).

    Attributes:
      beta: β (τ for IPO; λ for ORPO).
      loss_type: a :data:`jrlhf.losses.DPO_LOSS_TYPES` name, ``"simpo"``, ``"orpo"``, or a list of DPO types
        combined with ``loss_weights`` (MPO).
      loss_weights: one weight per loss type.
      label_smoothing: cDPO / rDPO / EXO ε (0 = TRL 1.16's plain sigmoid).
      reference_free: use no reference (log-ratios are the policy log-probs).
      f_divergence_type, f_alpha_divergence_coef, discopop_tau: as in TRL.
      simpo_gamma: SimPO's target margin γ.
      rpo_alpha: weight of an NLL term on the chosen completions (RPO; CPO-SimPO); ``None`` = off. ORPO always
        adds its NLL term, over the whole chosen sequence (prompt included) as TRL's ``ORPOTrainer`` does.
      ld_alpha: LD-DPO weight of the tokens past the shared length (``None`` = off).
      bco_running_mean: for ``bco_pair``, use the running mean of the batch-mean rewards as δ (TRL <= 0.28).
      precompute_ref_log_probs: compute the reference log-probs once for the dataset before training.
      sync_ref_model: TR-DPO reference sync; ``ref_model_mixup_alpha`` α, every ``ref_model_sync_steps`` steps.
      logprob_chunk_size: how the policy, reference and evaluation passes compute the log-softmax over the
        vocabulary: ``"auto"`` (full logits while ``[2B, T, V]`` float32 fits
        :data:`jrlhf.algorithms.base.LOGITS_BUDGET_BYTES`, otherwise the completion tokens only, in position tiles
        within that budget: :func:`jrlhf.algorithms.base.completion_logps`), ``None`` (full logits) or an int
        (every position, in vocabulary chunks of that size).
    """

    beta: float = 0.1
    loss_type: str | list = "sigmoid"
    loss_weights: list | None = None
    label_smoothing: float = 0.0
    reference_free: bool = False
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    rpo_alpha: float | None = None
    ld_alpha: float | None = None
    bco_running_mean: bool = False
    precompute_ref_log_probs: bool = False
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    logprob_chunk_size: int | str | None = "auto"


def head(cfg) -> str:
    """The trained model's head."""
    return "lm"


def uses_reference(algo: Config) -> bool:
    """Whether the loss reads reference log-probs."""
    return not (algo.reference_free or algo.loss_type in REFERENCE_FREE_TYPES)


def check_config(algo: Config, num_microbatches: int = 1) -> None:
    """Rejects settings that cannot work together, naming the keys."""
    types = algo.loss_type if isinstance(algo.loss_type, (list, tuple)) else [algo.loss_type]
    valid = tuple(losses.DPO_LOSS_TYPES) + REFERENCE_FREE_TYPES
    for t in types:
        if t not in valid:
            raise ConfigError(f"algo.loss_type '{t}' is not one of {', '.join(valid)}")
    if len(types) > 1 and any(t in REFERENCE_FREE_TYPES for t in types):
        raise ConfigError("algo.loss_type: simpo and orpo cannot be combined with other loss types")
    if num_microbatches > 1 and any(t in WHOLE_BATCH_TYPES for t in types):
        raise ConfigError(f"algo.loss_type '{algo.loss_type}' sorts over the whole batch; set "
                          "train.num_microbatches=1 (micro-batches would sort each part apart)")
    if algo.sync_ref_model and (algo.precompute_ref_log_probs or not uses_reference(algo)):
        raise ConfigError("algo.sync_ref_model needs reference params: turn off precompute_ref_log_probs "
                          "and reference_free")


def check_lora(algo: Config, model) -> None:
    """With LoRA the reference is the frozen base itself; TR-DPO would move it (a second copy).

    Raises:
      ConfigError: ``sync_ref_model`` with a LoRA model.
    """
    if algo.sync_ref_model and has_adapters(model):
        raise ConfigError("algo.sync_ref_model moves the reference toward the policy, but with model.lora the "
                          "reference is the frozen base model (no copy): turn off sync_ref_model or model.lora")


def _policy_logps(model, params, batch, algo: Config):
    ids, attn, lmask = concat_pairs(batch)
    # ORPO's NLL reads every real token of the chosen sequences; the other types the completion tokens only
    summed, token_logps, mask = completion_logps(model, params, ids, attn, lmask,
                                                 chunk_size=algo.logprob_chunk_size,
                                                 score_mask=attn if algo.loss_type == "orpo" else None)
    if algo.ld_alpha is not None:
        lengths = jnp.sum(mask, axis=-1)
        half = ids.shape[0] // 2
        shared = jnp.minimum(lengths[:half], lengths[half:])
        summed = losses.ld_dpo_logps(token_logps, mask, jnp.concatenate([shared, shared]), ld_alpha=algo.ld_alpha)
    return summed, token_logps, mask


def reference_logps(model, ref_params, batch, algo: Config):
    """Reference log-probs of a preference batch: ``(chosen [B], rejected [B])`` float32, gradient stopped."""
    summed, _, _ = _policy_logps(model, ref_params, batch, algo)
    return _split_pairs(jax.lax.stop_gradient(summed))


def dpo_terms(model, params, batch, frozen, algo: Config, bco_delta=0.0, counts=None):
    """The per-example loss pieces of one preference batch.

    ``counts``: the step's batch-global counts (``num_chosen_tokens``, ``num_sequences``) for the ``sft`` type, so
    that micro-batches sum to the batch loss; ``None``: this batch's own.

    Returns:
      dict with ``losses [B]``, ``chosen_rewards [B]``, ``rejected_rewards [B]``, ``chosen_logps [B]``,
      ``rejected_logps [B]``, ``chosen_token_logps [B, T-1]``, ``chosen_mask [B, T-1]`` (+ ORPO extras).
    """
    summed, token_logps, mask = _policy_logps(model, params, batch, algo)
    half = summed.shape[0] // 2
    chosen, rejected = summed[:half], summed[half:]
    lengths = jnp.sum(mask, axis=-1).astype(jnp.float32)
    chosen_len, rejected_len = lengths[:half], lengths[half:]
    out = {"chosen_logps": chosen, "rejected_logps": rejected, "chosen_token_logps": token_logps[:half],
           "chosen_mask": mask[:half], "chosen_lengths": chosen_len, "rejected_lengths": rejected_len}
    if algo.loss_type == "simpo":
        per, cr, rr = losses.simpo_loss(chosen, rejected, chosen_lengths=chosen_len, rejected_lengths=rejected_len,
                                        beta=algo.beta, gamma=algo.simpo_gamma, label_smoothing=algo.label_smoothing)
    elif algo.loss_type == "orpo":
        per, cr, rr, ratio, log_odds = losses.orpo_loss(chosen, rejected, chosen_lengths=chosen_len,
                                                        rejected_lengths=rejected_len, beta=algo.beta)
        out.update(log_odds_ratio=ratio, log_odds_chosen=log_odds)
    else:
        if "ref_chosen_logps" in batch:
            ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        elif uses_reference(algo) and has_adapters(model):  # LoRA: the reference is the base, the same params
            ref_c, ref_r = reference_logps(base_model(model), params, batch, algo)
        elif uses_reference(algo):
            ref_c, ref_r = reference_logps(model, _ref_params(frozen), batch, algo)
        else:
            ref_c = ref_r = None
        types = algo.loss_type if isinstance(algo.loss_type, str) else tuple(algo.loss_type)
        per, cr, rr = losses.dpo_loss(
            chosen, rejected, ref_c, ref_r, beta=algo.beta, loss_type=types,
            loss_weights=None if algo.loss_weights is None else tuple(algo.loss_weights),
            label_smoothing=algo.label_smoothing, reference_free=algo.reference_free,
            chosen_lengths=chosen_len, rejected_lengths=rejected_len, discopop_tau=algo.discopop_tau,
            f_divergence_type=algo.f_divergence_type, f_alpha_divergence_coef=algo.f_alpha_divergence_coef,
            bco_delta=bco_delta,
            num_chosen_tokens=None if counts is None else counts["num_chosen_tokens"],
            num_pairs=None if counts is None else counts["num_sequences"])
    out.update(losses=per, chosen_rewards=cr, rejected_rewards=rr)
    return out


def _ref_params(frozen):
    """``frozen.ref_params``, or an :class:`AlgorithmInputError` saying what to pass."""
    if isinstance(frozen, Frozen):
        return frozen.ref_params
    raise AlgorithmInputError(f"dpo: frozen must be dpo.Frozen(ref_params=...) (Algorithm.init_frozen(params)), or "
                              f"the batch must carry {' and '.join(REFERENCE_FIELDS)}; got "
                              f"{type(frozen).__name__}")


def make_loss_fn(model, algo: Config):
    """``loss_fn(params, batch, frozen, ctx)``: the mean per-example loss over the global pair count (plus the NLL
    term over the global chosen-token count); metrics named as TRL 1.16 logs them."""

    def loss_fn(params, batch, frozen, ctx):
        delta = ctx.algo_state["bco_mean"] if algo.bco_running_mean else 0.0
        micro = ctx.globals.get("num_microbatches", 1.0)
        t = dpo_terms(model, params, batch, frozen, algo, bco_delta=delta, counts=ctx.globals)
        loss = jnp.sum(t["losses"]) / ctx.globals["num_sequences"]
        cr, rr = t["chosen_rewards"], t["rejected_rewards"]
        metrics = {
            "rewards/chosen": jnp.mean(cr),
            "rewards/rejected": jnp.mean(rr),
            "rewards/accuracies": jnp.mean((cr > rr).astype(jnp.float32)),
            "rewards/margins": jnp.mean(cr - rr),
            "logps/chosen": jnp.mean(t["chosen_logps"]),
            "logps/rejected": jnp.mean(t["rejected_logps"]),
        }
        if algo.loss_type in REFERENCE_FREE_TYPES:  # TRL's CPO/ORPO trainers log per-token averages
            metrics["logps/chosen"] = jnp.mean(t["chosen_logps"] / jnp.maximum(t["chosen_lengths"], 1.0))
            metrics["logps/rejected"] = jnp.mean(t["rejected_logps"] / jnp.maximum(t["rejected_lengths"], 1.0))
        if algo.loss_type == "orpo":  # NLL over the whole chosen sequence (prompt included), as TRL's ORPOTrainer
            seq_mask = batch["chosen_attention_mask"][:, 1:] > 0
            nll, _ = losses.sft_loss(t["chosen_token_logps"], seq_mask,
                                     normalizer=ctx.globals["num_chosen_sequence_tokens"])
            loss = loss + nll
            metrics["nll_loss"] = nll * micro  # this micro-batch's share x M: the step averages
        elif algo.rpo_alpha:
            nll, _ = losses.sft_loss(t["chosen_token_logps"], t["chosen_mask"],
                                     normalizer=ctx.globals["num_chosen_tokens"])
            loss = loss + algo.rpo_alpha * nll
            metrics["nll_loss"] = nll * micro  # this micro-batch's share x M: the step averages
        if algo.loss_type == "orpo":
            metrics["log_odds_ratio"] = jnp.mean(t["log_odds_ratio"])
            metrics["log_odds_chosen"] = jnp.mean(t["log_odds_chosen"])
        if algo.bco_running_mean:
            metrics["bco_batch_mean"] = jnp.mean(jnp.concatenate([cr, rr]))
        return loss, metrics

    return loss_fn


def update_bco_mean(algo_state, metrics):
    """In-graph running mean of the batch-mean rewards (BCO's δ), once per step."""
    mean, count = losses.bco_running_mean_update(algo_state["bco_mean"], algo_state["bco_count"],
                                                 metrics["bco_batch_mean"][None], metrics["bco_batch_mean"][None])
    return {"bco_mean": mean, "bco_count": count}


def _precompute(model, ref_params, examples, tokenizer, algo: Config, batch_size: int, max_tokens: int | None = None):
    """Attaches ``ref_chosen_logps`` / ``ref_rejected_logps`` (float32) to every tokenised example, in place; batches
    of at most ``batch_size`` pairs and ``max_tokens`` padded tokens."""
    from jrlhf.data import BatchIterator, collate_preference
    from jrlhf.evaluation import scoring_batch_size

    length = max(max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in examples)
    batch_size = scoring_batch_size(batch_size, 2, length, max_tokens)
    collate = functools.partial(collate_preference, pad_id=tokenizer.pad_token_id, length=length)
    it = BatchIterator(examples, batch_size, collate, shuffle=False, drop_remainder=False, num_epochs=1,
                       process_index=0, process_count=1)
    fn = jax.jit(lambda p, b: reference_logps(model, p, b, algo))
    pos = 0
    for batch in it:
        real = int(np.asarray(batch.pop("example_mask")).sum())
        c, r = fn(ref_params, {k: jnp.asarray(v) for k, v in batch.items()})
        c, r = np.asarray(c), np.asarray(r)
        for i in range(real):
            examples[pos + i]["ref_chosen_logps"] = np.float32(c[i])
            examples[pos + i]["ref_rejected_logps"] = np.float32(r[i])
        pos += real


def collate_with_reference(examples, collate):
    """A preference collate that also stacks precomputed ``ref_chosen_logps`` / ``ref_rejected_logps`` ``[B]``."""
    batch = collate(examples)
    batch["ref_chosen_logps"] = np.asarray([e["ref_chosen_logps"] for e in examples], np.float32)
    batch["ref_rejected_logps"] = np.asarray([e["ref_rejected_logps"] for e in examples], np.float32)
    return batch


def make(model, config: Config, *, num_microbatches: int = 1) -> Algorithm:
    """DPO (every ``config.loss_type``, SimPO, ORPO) as plain functions.

    The parts: ``loss_fn`` (:func:`make_loss_fn`, checking the batch fields), ``prepare_batch``
    :func:`jrlhf.algorithms.base.preference_globals` (the global pair, chosen-token and chosen-sequence-token counts
    the loss divides by); ``frozen`` a :class:`Frozen` when the loss runs a reference forward (``init_frozen(params)``
    gives ``Frozen(ref_params=params)``; ``None`` for reference-free types and with ``precompute_ref_log_probs``,
    where the batch carries :data:`REFERENCE_FIELDS` instead); BCO's running mean as ``algo_state`` with
    ``bco_running_mean``; TR-DPO's reference sync as ``after_step`` with ``sync_ref_model``.

    With a LoRA model (``model.config.lora``) the reference is the base model: the same params with the adapters
    switched off (:func:`jrlhf.models.lora.base_model`), inside the same compiled step; ``frozen`` is then
    ``None`` (no copy of the weights) and ``sync_ref_model`` is refused.

    Args:
      model: an LM-head model (the policy; the reference is the same model with ``Frozen.ref_params``, or its
        base model on the same params with LoRA).
      config: a :class:`Config`.
      num_microbatches: the accumulation micro-batches the step will use (the whole-batch ``aot`` types refuse
        more than 1).

    Raises:
      ConfigError: settings that cannot work together (:func:`check_config`), a bad ``logprob_chunk_size``.
    """
    check_config(config, num_microbatches)
    check_lora(config, model)
    check_chunk_setting(config.logprob_chunk_size)
    precomputed = uses_reference(config) and config.precompute_ref_log_probs
    # LoRA: the reference pass runs the base model (adapters off) on the trained params: nothing frozen to hold
    needs_ref_params = uses_reference(config) and not precomputed and not has_adapters(model)
    fields = {**PREFERENCE_FIELDS, **(REFERENCE_FIELDS if precomputed else {})}
    loss_fn, prepare = with_input_checks("dpo", make_loss_fn(model, config), preference_globals, fields)
    return Algorithm(
        name="dpo",
        loss_fn=loss_fn,
        prepare_batch=prepare,
        batch_fields=fields,
        optional_batch_fields=REFERENCE_FIELDS if needs_ref_params else {},
        frozen_type=Frozen if needs_ref_params else None,
        init_frozen=(lambda params: Frozen(ref_params=params)) if needs_ref_params else (lambda params: None),
        frozen_specs=Frozen(ref_params=logical_axes(model)) if needs_ref_params else None,
        init_algo_state=((lambda: {"bco_mean": np.float32(0.0), "bco_count": np.float32(0.0)})
                         if config.bco_running_mean else dict),
        update_algo_state=update_bco_mean if config.bco_running_mean else None,
        after_step=make_reference_sync(config) if config.sync_ref_model else None,
    )


def setup(run) -> AlgorithmSetup:
    """Builds the DPO parts for the loop: :func:`make` (the reference a copy of the initial policy), the tokenised
    data (with the reference log-probs attached once when ``precompute_ref_log_probs``), evaluation of held-out
    preference accuracy (implicit reward of chosen > rejected, as TRL counts it) and exact match."""
    cfg, algo, model = run.cfg, run.cfg.algo, run.model
    algorithm = make(model, algo, num_microbatches=cfg.train.num_microbatches)
    train_data = tokenize_train(run, DATA_KIND)
    ref_params = run.params if uses_reference(algo) else None
    ref_model = base_model(model)  # the model itself without LoRA; with LoRA its base (adapters off)
    collate = None
    if ref_params is not None and algo.precompute_ref_log_probs:
        _precompute(ref_model, ref_params, train_data.examples, run.tokenizer, algo, cfg.data.eval_batch_size,
                    cfg.data.eval_max_tokens)
        from jrlhf.data import collate_preference, length_buckets

        base = functools.partial(collate_preference, pad_id=run.tokenizer.pad_token_id,
                                 buckets=length_buckets(cfg.data.max_length, cfg.data.buckets or None,
                                                         pad_to_multiple_of=cfg.data.pad_to_multiple_of))
        collate = functools.partial(collate_with_reference, collate=base)

    pref_records = preference_eval_records(cfg.data)
    gen_records = load_eval_records(cfg.data.eval_prompts, cfg.data.max_eval_examples, key="data.eval_prompts")
    gen_eval = generation_eval(run, gen_records) if gen_records else None
    # with a placed reference (frozen), evaluation reads frozen's; with precomputed ones, the initial params
    lora_ref = ref_params is not None and has_adapters(model)
    eval_ref = ref_params if algorithm.frozen_type is None and not lora_ref else None
    score_policy = jax.jit(lambda p, b: _split_pairs(_policy_logps(model, p, b, algo)[0]))
    score_reference = jax.jit(lambda ref, b: reference_logps(ref_model, ref, b, algo))
    # the held-out pairs' reference log-probs are scored once unless TR-DPO moves the reference
    pref_eval = implicit_reward_eval(run, pref_records, score_policy, score_reference, algo.beta,
                                     rescore_reference=algo.sync_ref_model) if pref_records else None

    def evaluate(params, frozen_now):
        out = {}
        if pref_eval is not None:
            ref = frozen_now.ref_params if isinstance(frozen_now, Frozen) else eval_ref
            if lora_ref:  # the base: the current params with the adapters off (the base never changes)
                ref = params
            out.update(pref_eval(params, ref))
        if gen_eval is not None:
            out.update(gen_eval(params, frozen_now))
        return out

    return AlgorithmSetup.from_algorithm(algorithm, run.params, train_data, collate=collate,
                                         evaluate=evaluate if (pref_records or gen_eval) else None)


def _split_pairs(summed):
    """``[2B]`` -> the chosen rows ``[B]`` and the rejected rows ``[B]`` (chosen first, as :func:`concat_pairs`)."""
    half = summed.shape[0] // 2
    return summed[:half], summed[half:]


def make_reference_sync(algo: Config):
    """TR-DPO: ``after_step(step, state, frozen) -> frozen`` (a :class:`Frozen`) mixing the reference toward the
    policy, ``ref = α·policy + (1-α)·ref``, when ``step`` (steps done) is a multiple of ``ref_model_sync_steps``;
    the old reference's buffers are donated."""
    alpha = float(algo.ref_model_mixup_alpha)
    mix = jax.jit(lambda policy, ref: jax.tree.map(lambda p, r: (alpha * p + (1 - alpha) * r).astype(r.dtype),
                                                   policy, ref), donate_argnums=1)

    def after_step(step: int, state, frozen):
        if step % algo.ref_model_sync_steps:
            return frozen
        return frozen.replace(ref_params=mix(state.params, frozen.ref_params))

    return after_step
