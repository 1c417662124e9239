"""Online DPO (Guo et al., 2024, "Direct Language Model Alignment from Online AI Feedback") with the semantics and
defaults of TRL 1.16's ``OnlineDPOTrainer`` (``trl.experimental.online_dpo``).

Per step: ``num_generations`` (TRL: 2) completions per prompt are sampled from the current policy
(:func:`jrlhf.algorithms.onpolicy.rollout`), scored by the reward functions and/or a jrlhf reward model, the
missing-EOS penalty is subtracted, and each prompt's completions become one (chosen, rejected) pair on which one DPO
step is taken (:func:`jrlhf.losses.dpo_loss`; the reference is a copy of the initial policy, or with ``model.lora``
the frozen base model on the same params).

**Pairing** (:func:`pair_indices`). With two completions ``(y0, y1)`` and rewards ``(r0, r1)``: ``y0`` is chosen
when ``r0 >= r1``, else ``y1`` (TRL's ``first_half >= second_half``). With more completions, the chosen one is the
first of the highest reward and the rejected one the last of the lowest, which is TRL's rule for two.
Completions no reward applies to (NaN score) are left out of the pairing; a prompt with fewer than two scored
completions gives no pair (weight 0). TRL sums the rewards with ``nansum`` (None counts as 0) instead.

**Ties** (equal rewards, e.g. both answers right or both wrong under an exact-match reward): TRL 1.16 trains them
as ordinary pairs with the first completion as chosen (``ties: first``, the default). With ``ties: drop`` a tied
pair gets weight 0. Either way the loss is ``sum_pairs w * loss / sum_pairs w`` with the weights counted over the
whole optimizer-step batch (``ctx.globals["num_sequences"]``), so gradient accumulation is exact; a batch with no
weighted pair has loss 0 (no NaN).

**Log-probs**. As TRL's ``_forward``, the DPO log-probs of the policy and of the reference are summed over the
completion tokens under the model's own logits (the sampling ``temperature`` is not applied to them); the reference
log-probs are computed once per rollout inside the compiled update (``prepare_batch``; with LoRA inside the loss, on
the base model). ``algo.reference_logps`` is not read.

**Batch layout**. ``prepare_batch`` turns the ``[R = B x n]`` rollout rows into a pair-major preference batch
(``chosen_*``/``rejected_*`` fields ``[B, T]``, the fields of :data:`jrlhf.algorithms.base.PREFERENCE_FIELDS`, with
``ref_chosen_logps``/``ref_rejected_logps`` ``[B]`` and ``sequence_mask [B]`` = the pair weights), so micro-batches
split pairs, never a pair. ``data.batch_size`` is the number of prompts (= pairs) per step.

Differences from TRL, by design: TRL truncates the prompt on the left to ``max_length`` tokens before scoring
(here ``data.max_prompt_length`` truncates prompts before sampling); TRL's ``objective/kl`` and
``objective/entropy`` also sum over padding positions after EOS (here only completion tokens count); TRL's
per-epoch ``beta`` list is not supported (one float).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jrlhf import losses
from jrlhf.algorithms import dpo, onpolicy
from jrlhf.algorithms.base import (AlgorithmInputError, AlgorithmSetup, OnPolicy, check_chunk_setting, completion_logps,
                                   concat_pairs)
from jrlhf.config import ConfigError
from jrlhf.models.lora import base_model, has_adapters
from jrlhf.sharding import BATCH_AXES, mesh_axis_size

DATA_KIND = onpolicy.DATA_KIND
LOSS_TYPES = ("sigmoid", "ipo")
TIES = ("first", "drop")
PAIR_FIELDS = {
    **{f"{side}_{key}": f"[B, P + N] int32: {what} of the {side} completion's prompt + completion row"
       for side in ("chosen", "rejected")
       for key, what in (("input_ids", "token ids"), ("attention_mask", "1 on real tokens"),
                         ("loss_mask", "1 on the completion tokens"))},
    "sequence_mask": "[B] float32: the pair's weight (0: no pair, or a tie with ties='drop')",
}


@dataclasses.dataclass
class Config(onpolicy.RolloutConfig):
    """Online DPO settings: TRL 1.16 ``OnlineDPOConfig`` names and defaults (plus the rollout settings of
    :class:`jrlhf.algorithms.onpolicy.RolloutConfig`).

    Attributes:
      num_generations: completions per prompt (TRL: always 2); with more, best vs worst (:func:`pair_indices`).
      beta: β of the DPO loss (τ of IPO). TRL's default 0.1.
      loss_type: ``sigmoid`` (DPO, ``-log σ(β d)``) or ``ipo`` (``(d - 1/(2β))²``, on summed log-ratios: no length
        normalisation, unlike the offline IPO of ``DPOTrainer``), ``d`` = the chosen minus the rejected log-ratio
        to the reference.
      max_new_tokens: TRL's name for the completion budget; the same as ``max_completion_length`` (set one; both
        set to different values is an error).
      temperature: sampling temperature (TRL's default 0.9); the DPO log-probs do not use it (as TRL).
      missing_eos_penalty: subtracted from the reward of every completion that ends without EOS (hits the budget);
        ``None``: off (TRL's default). TRL's docs suggest a positive value such as 1.0.
      ties: ``first`` (TRL 1.16: a tied pair is trained with the first completion as chosen) or ``drop`` (a tied
        pair gets weight 0; the weights are counted over the whole batch).
      logprob_chunk_size: the vocabulary projection of the DPO log-prob passes (policy and reference):
        ``"auto"`` (default, as DPO: full logits while they fit the budget, else only the completion positions),
        ``None`` (full logits) or an int (vocabulary chunks), see :func:`jrlhf.algorithms.base.completion_logps`.
    """

    num_generations: int = 2
    temperature: float = 0.9
    beta: float = 0.1
    loss_type: str = "sigmoid"
    max_new_tokens: int | None = None
    missing_eos_penalty: float | None = None
    ties: str = "first"
    logprob_chunk_size: int | str | None = "auto"

    def __post_init__(self):
        if self.max_new_tokens is not None:
            if self.max_completion_length is not None and self.max_completion_length != self.max_new_tokens:
                raise ConfigError(f"algo.max_new_tokens={self.max_new_tokens} and algo.max_completion_length="
                                  f"{self.max_completion_length} name the same budget: set only one")
            self.max_completion_length = self.max_new_tokens


def head(cfg) -> str:
    """The trained model's head."""
    return "lm"


def check_algo(algo: Config) -> None:
    """The run-free checks of a :class:`Config` (:class:`jrlhf.config.ConfigError` naming the key)."""
    if algo.loss_type not in LOSS_TYPES:
        raise ConfigError(f"algo.loss_type '{algo.loss_type}' is not one of {', '.join(LOSS_TYPES)} (TRL's online "
                          "DPO types; the offline ones are in `jrlhf train dpo`)")
    if not algo.beta > 0:
        raise ConfigError(f"algo.beta={algo.beta}: must be > 0")
    if algo.ties not in TIES:
        raise ConfigError(f"algo.ties={algo.ties!r}: use 'first' (TRL: the first completion is chosen) or 'drop' "
                          "(tied pairs get no loss)")
    if algo.missing_eos_penalty is not None and not algo.missing_eos_penalty >= 0:
        raise ConfigError(f"algo.missing_eos_penalty={algo.missing_eos_penalty}: must be >= 0 (it is subtracted)")
    check_chunk_setting(algo.logprob_chunk_size)
    for key in ("mask_truncated_completions", "log_rollout_mismatch", "vllm_importance_sampling_correction"):
        if getattr(algo, key):
            raise ConfigError(f"algo.{key}: online_dpo does not use it (its DPO loss reads no sampler log-probs; "
                              "for completions without EOS use algo.missing_eos_penalty)")


def check_config(run) -> None:
    """Rejects settings of a run that cannot work together, naming the keys."""
    onpolicy.check_rollout_config(run, min_generations=2)
    check_algo(run.cfg.algo)
    devices = mesh_axis_size(run.mesh, BATCH_AXES) if run.mesh is not None else 1
    micro = run.cfg.train.num_microbatches
    if run.cfg.data.batch_size % (devices * micro):
        raise ConfigError(f"data.batch_size={run.cfg.data.batch_size}: online_dpo trains one pair per prompt, so the "
                          f"prompts per step must divide by train.num_microbatches x data-parallel devices = "
                          f"{micro} x {devices}")


# ------------------------------------------------------------------------------------------------ pairing


def pair_indices(scores, num_generations: int, ties: str = "first"):
    """The (chosen, rejected) completion of each prompt from the rewards of a rollout (jit-safe).

    Args:
      scores: ``[R]`` float32 rewards, ``R = B * num_generations``, row ``b * n + i`` = sample ``i`` of prompt
        ``b``; NaN = no reward applies (left out).
      num_generations: ``n`` (>= 2).
      ties: ``first`` (TRL 1.16: a tie is a pair, the first completion chosen) or ``drop`` (weight 0).

    Returns:
      ``(chosen_rows [B] int32, rejected_rows [B] int32, weights [B] float32, tied [B] bool)``: rows into the
      rollout; chosen = the first completion with the highest reward, rejected = the last with the lowest (for
      ``n = 2``: TRL's ``chosen = y0 if r0 >= r1 else y1``); weight 1 for a pair that trains, 0 for a prompt with
      fewer than two scored completions or (``drop``) a tie; ``tied``: highest == lowest among >= 2 scored.
    """
    n = int(num_generations)
    grouped = jnp.asarray(scores, jnp.float32).reshape(-1, n)
    scored = ~jnp.isnan(grouped)
    high = jnp.where(scored, grouped, -jnp.inf)
    low = jnp.where(scored, grouped, jnp.inf)
    best = jnp.argmax(high, axis=1)  # first maximum
    worst = n - 1 - jnp.argmin(low[:, ::-1], axis=1)  # last minimum
    valid = jnp.sum(scored, axis=1) >= 2
    tied = valid & (jnp.max(high, axis=1) == jnp.min(low, axis=1))
    keep = valid & ~tied if ties == "drop" else valid
    base = jnp.arange(grouped.shape[0]) * n
    return ((base + best).astype(jnp.int32), (base + worst).astype(jnp.int32), keep.astype(jnp.float32), tied)


def missing_eos_score_fn(penalty: float | None):
    """The rollout's host score transform ``(scores [R], truncated [R]) -> scores``: ``penalty`` subtracted where a
    completion ended without EOS (TRL's ``rewards[~contain_eos_token] -= missing_eos_penalty``); ``None`` when
    ``penalty`` is ``None``."""
    if penalty is None:
        return None

    def host_score(scores, truncated):
        return (np.asarray(scores, np.float32)
                - np.float32(penalty) * np.asarray(truncated, np.float32)).astype(np.float32)

    return host_score


def _dpo_config(algo: Config) -> dpo.Config:
    """The :class:`jrlhf.algorithms.dpo.Config` of the scoring passes (its reference pass is reused)."""
    return dpo.Config(beta=algo.beta, loss_type="sigmoid", logprob_chunk_size=algo.logprob_chunk_size)


def make_prepare_batch(model, algo: Config):
    """``prepare_batch(rollout_batch, frozen, algo_state) -> (pair batch, globals)``, once per rollout inside the
    compiled update: pairs the completions (:func:`pair_indices`), gathers the pair-major preference batch
    (:data:`PAIR_FIELDS`), and (without LoRA) the reference log-probs ``ref_chosen_logps`` / ``ref_rejected_logps``
    ``[B]`` from ``frozen.ref_params``. Globals: ``objective/scores_margin`` (mean reward margin of the weighted
    pairs), ``objective/scores`` (mean reward of the scored completions, penalty included),
    ``val/contain_eos_token`` (share of completions that ended with EOS) and ``frac_ties`` (tied share of the
    prompts with a pair)."""
    dcfg = _dpo_config(algo)
    lora = has_adapters(model)

    def prepare_batch(batch, frozen, algo_state):
        scores = batch["scores"].astype(jnp.float32)
        chosen, rejected, weights, tied = pair_indices(scores, algo.num_generations, algo.ties)
        out = {}
        for key in ("input_ids", "attention_mask", "loss_mask"):
            out[f"chosen_{key}"] = jnp.take(batch[key], chosen, axis=0)
            out[f"rejected_{key}"] = jnp.take(batch[key], rejected, axis=0)
        out["sequence_mask"] = weights
        out["chosen_scores"] = jnp.take(scores, chosen)
        out["rejected_scores"] = jnp.take(scores, rejected)
        if not lora:
            ref_params = getattr(frozen, "ref_params", None)
            if ref_params is None:
                raise AlgorithmInputError(
                    "online_dpo: frozen has no ref_params (the reference policy): pass "
                    "frozen=algorithm.init_frozen(params) to the update")
            out["ref_chosen_logps"], out["ref_rejected_logps"] = dpo.reference_logps(model, ref_params, out, dcfg)
        count = jnp.sum(weights)
        scored_per_prompt = jnp.sum(~jnp.isnan(scores.reshape(-1, algo.num_generations)), axis=1)
        valid_pairs = jnp.sum((scored_per_prompt >= 2).astype(jnp.float32))
        margin = jnp.where(weights > 0, out["chosen_scores"] - out["rejected_scores"], 0.0)
        scored = ~jnp.isnan(scores)
        globals_ = {
            "objective/scores_margin": jnp.sum(margin) / jnp.maximum(count, 1.0),
            "objective/scores": losses.masked_mean(jnp.where(scored, scores, 0.0), scored),
            "val/contain_eos_token": 1.0 - jnp.mean(batch["truncated"].astype(jnp.float32)),
            "frac_ties": jnp.sum(tied.astype(jnp.float32)) / jnp.maximum(valid_pairs, 1.0),
        }
        return out, globals_

    return prepare_batch


def pair_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, algo: Config):
    """Per-pair online DPO losses ``[B]`` and implicit rewards ``β (log π - log π_ref)`` ``[B]`` (chosen,
    rejected), from summed completion log-probs ``[B]`` float32: :func:`jrlhf.losses.dpo_loss` with TRL online
    DPO's types (``ipo`` on summed, not length-normalised, log-ratios)."""
    ones = jnp.ones_like(chosen_logps)
    return losses.dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=algo.beta,
                           loss_type=algo.loss_type, chosen_lengths=ones, rejected_lengths=ones)


def make_loss_fn(model, algo: Config):
    """``loss_fn(params, batch, frozen, ctx)`` on one micro-batch of pairs: ``sum(w * loss) / W`` with ``W`` the
    weighted pair count of the whole step (``ctx.globals["num_sequences"]``, the sum of ``sequence_mask``).
    Metrics (TRL's names; means over the weighted pairs, exact under accumulation): ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``,
    ``objective/kl`` (summed log-ratio to the reference per completion), ``objective/entropy`` (minus the summed
    log-prob per completion), ``objective/non_score_reward`` (``-β`` x that KL), ``beta``, and the rollout's
    ``objective/scores``, ``objective/scores_margin``, ``val/contain_eos_token``, ``frac_ties``."""
    dcfg = _dpo_config(algo)
    ref_model = base_model(model) if has_adapters(model) else None

    def loss_fn(params, batch, frozen, ctx):
        ids, attn, lmask = concat_pairs(batch)
        summed, _, _ = completion_logps(model, params, ids, attn, lmask, chunk_size=algo.logprob_chunk_size)
        half = summed.shape[0] // 2
        chosen, rejected = summed[:half], summed[half:]
        if "ref_chosen_logps" in batch:
            ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:  # LoRA: the base model (adapters off) on the same params
            ref_c, ref_r = dpo.reference_logps(ref_model, params, batch, dcfg)
        per, chosen_rewards, rejected_rewards = pair_losses(chosen, rejected, ref_c, ref_r, algo)
        weights = batch["sequence_mask"].astype(jnp.float32)
        total = jnp.maximum(ctx.globals["num_sequences"], 1.0)
        micro = ctx.globals.get("num_microbatches", 1.0)
        loss = jnp.sum(weights * per) / total

        def mean(x):  # this micro-batch's share x M: the step averages the micro-batches' metrics
            return jnp.sum(weights * x) * micro / total

        kl = ((chosen - ref_c) + (rejected - ref_r)) / 2.0
        metrics = {
            "rewards/chosen": mean(chosen_rewards),
            "rewards/rejected": mean(rejected_rewards),
            "rewards/margins": mean(chosen_rewards - rejected_rewards),
            "rewards/accuracies": mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
            "logps/chosen": mean(chosen),
            "logps/rejected": mean(rejected),
            "objective/kl": mean(kl),
            "objective/entropy": mean(-(chosen + rejected) / 2.0),
            "objective/non_score_reward": mean(-algo.beta * kl),
            "beta": jnp.float32(algo.beta),
        }
        for key in ("objective/scores", "objective/scores_margin", "val/contain_eos_token", "frac_ties"):
            metrics[key] = ctx.globals[key]
        return loss, metrics

    return loss_fn


# ------------------------------------------------------------------------------------------------ the contract


def make(model, config: Config | dict | None = None) -> onpolicy.OnPolicyAlgorithm:
    """Online DPO as plain functions, without a run config.

    Args:
      model: the policy (``lm`` head), e.g. from :func:`jrlhf.models.from_pretrained` or ``init_model``.
      config: a :class:`Config` (or a dict of its fields); ``reward_funcs`` may hold Python callables.

    Returns:
      An :class:`jrlhf.algorithms.onpolicy.OnPolicyAlgorithm`: ``rollout(...)`` (the rollout of
      :func:`jrlhf.algorithms.onpolicy.rollout`, with the missing-EOS penalty), ``prepare_batch`` (pairs ->
      the pair batch of :data:`PAIR_FIELDS` and the reference log-probs), ``loss_fn`` on one micro-batch of pairs,
      ``init_frozen(params)`` (``Frozen(ref_params=<copy>)``; ``None`` with LoRA, whose reference is the base model)
      and ``update(optimizer, mesh, state_shardings=...)`` (one optimizer step per rollout).

    Raises:
      ConfigError: a wrong config type, an unknown field, or an invalid setting (the field named).
    """
    algo = onpolicy.as_config(config, Config, "online_dpo")
    onpolicy.check_rollout_settings(algo, min_generations=2, algorithm="online_dpo")
    check_algo(algo)
    parts = onpolicy.make_algorithm(
        "online_dpo", model, algo, loss_fn=make_loss_fn(model, algo), prepare_batch=make_prepare_batch(model, algo),
        uses_reference=True, num_epochs=1, num_minibatches=1,
        host_score_fn=missing_eos_score_fn(algo.missing_eos_penalty))
    # the reference is held in frozen (init_frozen) but read by prepare_batch, never as the rollout's ref_logps
    # (those are under logits / temperature): the rollout computes none
    return dataclasses.replace(parts, uses_reference=False, optional_batch_fields={})


def setup(run) -> AlgorithmSetup:
    """Builds the online DPO parts for the loop: :func:`make` plus the prompt data, the reward sources, the
    reference (a copy of the initial policy in ``frozen``; none with LoRA) and held-out exact match."""
    from jrlhf.algorithms.base import tokenize_train

    check_config(run)
    algo = run.cfg.algo
    parts = make(run.model, algo)
    train_data = tokenize_train(run, "prompt")
    rewards = onpolicy.load_reward_sources(run)
    frozen, frozen_specs = onpolicy.frozen_parts(run, ref=True, rewards=rewards)
    collect = onpolicy.make_collect(run, rewards, onpolicy.Collector(need_ref=False,
                                                                     host_score_fn=parts.host_score_fn))
    return AlgorithmSetup(
        loss_fn=parts.loss_fn,
        train_data=train_data,
        frozen=frozen,
        frozen_specs=frozen_specs,
        prepare_batch=parts.prepare_batch,
        evaluate=onpolicy.make_evaluate(run),
        onpolicy=OnPolicy(collect=collect, num_epochs=1, num_minibatches=1),
    )


__all__ = ["Config", "LOSS_TYPES", "PAIR_FIELDS", "TIES", "check_algo", "make", "make_loss_fn", "make_prepare_batch",
           "missing_eos_score_fn", "pair_indices", "pair_losses", "setup"]
