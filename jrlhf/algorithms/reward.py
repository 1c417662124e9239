"""Reward modelling: Bradley-Terry loss on a scalar head, scored at the last real token.

:func:`make` gives the update as plain functions (:class:`jrlhf.algorithms.base.Algorithm`): nothing frozen, the
preference batch fields :data:`jrlhf.algorithms.base.PREFERENCE_FIELDS` (and an optional ``margin``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jrlhf import losses
from jrlhf.algorithms.base import (PREFERENCE_FIELDS, Algorithm, AlgorithmSetup, check_chunk_setting, concat_pairs,
                                   length_limits, pair_scores, preference_eval_records, preference_globals,
                                   resolve_chunk_size, tokenize_train, with_input_checks)
from jrlhf.config import ConfigError
from jrlhf.models import (logits_from_hidden, sequence_scores, token_logprobs_from_hidden, token_logprobs_from_logits,
                          unembedding_matrix)

DATA_KIND = "preference"
RECORD_FIELDS = ("margin",)  # optional per-record fields the loss reads (carried into the batches)
OPTIONAL_BATCH_FIELDS = {"margin": "[B] float32: the required score margin of each pair (the records' 'margin')"}


@dataclasses.dataclass
class Config:
    """Reward-model settings (TRL 1.16 ``RewardConfig`` names).

    Attributes:
      center_rewards_coefficient: weight of the ``(r_c + r_r)^2`` centring penalty (``None``: off; TRL suggests 0.01).
      lm_loss_coefficient: weight of a next-token loss on the chosen completions, added to the Bradley-Terry loss
        (hidden-state regularisation as in Yang et al. 2024, "Regularizing Hidden States Enables Learning
        Generalizable Reward Models"). ``0`` (default, TRL's reward model): a plain score model. ``> 0`` trains the
        backbone with both an LM head and the score head; the exported checkpoint is the score model alone.
      logprob_chunk_size: vocabulary chunk of the regulariser's log-softmax (as :class:`jrlhf.algorithms.dpo.Config`:
        ``"auto"``, ``None`` for full logits, or an int).
    """

    center_rewards_coefficient: float | None = None
    lm_loss_coefficient: float = 0.0
    logprob_chunk_size: int | str | None = "auto"

    def __post_init__(self):
        check_chunk_setting(self.logprob_chunk_size)
        if self.lm_loss_coefficient < 0:
            raise ConfigError(f"algo.lm_loss_coefficient={self.lm_loss_coefficient}: must be >= 0 (0 turns the "
                             "next-token regulariser off)")


def head(cfg) -> str:
    """The trained model's head: a scalar score, plus the LM head when ``algo.lm_loss_coefficient > 0``."""
    return "lm+value" if cfg.algo.lm_loss_coefficient > 0 else "score"


def _pair_scores_and_nll(model, params, batch, with_lm: bool, chunk_size="auto"):
    """``(chosen [B], rejected [B], chosen completion NLL summed over tokens (f32 scalar) or None)`` from one
    forward of the concatenated pairs; the LM head runs on the chosen rows only."""
    if not with_lm:
        chosen, rejected = pair_scores(model, params, batch)
        return chosen, rejected, None
    ids, attn, _ = concat_pairs(batch)
    hidden, values = model.apply(params, ids, attn, return_hidden=True)
    scores = sequence_scores(values, attn)
    half = ids.shape[0] // 2
    hidden, targets = hidden[:half, :-1], batch["chosen_input_ids"][:, 1:]
    chunk = resolve_chunk_size(chunk_size, targets.size, model.config.vocab_size)
    if chunk is None:
        token_logps = token_logprobs_from_logits(logits_from_hidden(hidden, unembedding_matrix(model, params)), targets)
    else:
        token_logps = token_logprobs_from_hidden(hidden, unembedding_matrix(model, params), targets, chunk)
    nll = -losses.masked_sum(token_logps, batch["chosen_loss_mask"][:, 1:] > 0)
    return scores[:half], scores[half:], nll


def make_loss_fn(model, algo: Config):
    """``loss_fn(params, batch, frozen, ctx)``: mean Bradley-Terry loss over the global pair count; metrics as TRL
    1.16's ``RewardTrainer`` (``accuracy``, ``margin``, ``min_reward``, ``mean_reward``, ``max_reward``). A batch
    field ``margin [B]`` float32 (the records' ``margin``, carried by tokenisation and collation) is the required
    margin of each pair when present: ``-log σ(r_c - r_r - margin)``. With ``algo.lm_loss_coefficient > 0`` (an
    ``lm+value`` model) the loss adds that weight times the chosen completions' mean token NLL (metric
    ``lm_loss``)."""
    with_lm = algo.lm_loss_coefficient > 0

    def loss_fn(params, batch, frozen, ctx):
        chosen, rejected, nll = _pair_scores_and_nll(model, params, batch, with_lm, algo.logprob_chunk_size)
        per_example = losses.bradley_terry_loss(chosen, rejected, margin=batch.get("margin"),
                                                center_rewards_coefficient=algo.center_rewards_coefficient)
        loss = jnp.sum(per_example) / ctx.globals["num_sequences"]
        extra = {}
        if with_lm:
            lm_loss = nll / jnp.maximum(ctx.globals["num_chosen_tokens"], 1.0)
            loss = loss + algo.lm_loss_coefficient * lm_loss
            extra["lm_loss"] = lm_loss * ctx.globals.get("num_microbatches", 1.0)  # the step averages
        both = jnp.concatenate([chosen, rejected])
        metrics = {
            "accuracy": jnp.mean((chosen > rejected).astype(jnp.float32)),
            "margin": jnp.mean(chosen - rejected),
            "min_reward": jnp.min(both),
            "mean_reward": jnp.mean(both),
            "max_reward": jnp.max(both),
            **extra,
        }
        return loss, metrics

    return loss_fn


def make(model, config: Config) -> Algorithm:
    """The reward model's update as plain functions: ``loss_fn`` (:func:`make_loss_fn`, checking the preference
    fields), ``prepare_batch`` :func:`jrlhf.algorithms.base.preference_globals` (the global pair and chosen-token
    counts the loss divides by), nothing frozen.

    Args:
      model: a model with the head :func:`head` names: ``"score"``, or ``"lm+value"`` when
        ``config.lm_loss_coefficient > 0``.
      config: a :class:`Config` (checked when built).
    """
    loss_fn, prepare = with_input_checks("reward", make_loss_fn(model, config), preference_globals,
                                         PREFERENCE_FIELDS)
    return Algorithm(name="reward", loss_fn=loss_fn, prepare_batch=prepare, batch_fields=PREFERENCE_FIELDS,
                     optional_batch_fields=OPTIONAL_BATCH_FIELDS)


def setup(run) -> AlgorithmSetup:
    """Builds the reward-model parts for the loop; evaluation is held-out preference accuracy."""
    from jrlhf.evaluation import preference_scores

    cfg = run.cfg
    eval_records = preference_eval_records(cfg.data)
    with_lm = cfg.algo.lm_loss_coefficient > 0
    score = jax.jit(lambda params, batch: _pair_scores_and_nll(run.model, params, batch, with_lm)[:2])

    def evaluate(params, frozen):
        chosen, rejected = preference_scores(lambda b: score(params, b), run.tokenizer, eval_records,
                                             batch_size=cfg.data.eval_batch_size, limits=length_limits(cfg.data),
                                             max_tokens=cfg.data.eval_max_tokens)
        return {"accuracy": float((chosen > rejected).mean()), "margin": float((chosen - rejected).mean()),
                "num_examples": int(len(chosen))}

    return AlgorithmSetup.from_algorithm(make(run.model, cfg.algo), run.params,
                                         tokenize_train(run, DATA_KIND, fields=RECORD_FIELDS),
                                         evaluate=evaluate if eval_records else None, export_head="score")
