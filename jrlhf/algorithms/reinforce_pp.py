"""REINFORCE++ (Hu, 2025) as OpenRLHF runs it: token-level KL to the reference in the reward, reward-to-go, global
batch whitening of the returns, and PPO's clipped token-level policy loss without a critic.

Rewards are ``-kl_coef * KL_t`` per completion token plus the sequence score at the last real token
(:func:`jrlhf.losses.reinforce_pp_advantages`); ``baseline="group"`` subtracts each prompt's mean score first
(REINFORCE++-baseline, with ``num_generations > 1``). The advantages are whitened over every trained token of the
rollout batch (so they are computed once per rollout, before the mini-batch split). Then ``ppo_epochs`` passes of
``num_mini_batches`` optimizer steps, each a token-mean clipped surrogate (:func:`jrlhf.losses.ppo_policy_loss`).
Completions that no reward applies to (NaN score) get no loss and are left out of the group means, the whitening
and the token counts.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jrlhf import losses
from jrlhf.algorithms import onpolicy
from jrlhf.algorithms.base import AlgorithmSetup
from jrlhf.config import ConfigError
from jrlhf.step import microbatch_share

DATA_KIND = onpolicy.DATA_KIND
BASELINES = ("none", "group")


@dataclasses.dataclass
class Config(onpolicy.RolloutConfig):
    """REINFORCE++ settings (OpenRLHF names and defaults where it has them; plus the rollout settings of
    :class:`jrlhf.algorithms.onpolicy.RolloutConfig`).

    Attributes:
      kl_coef: coefficient of the per-token KL in the reward (OpenRLHF ``init_kl_coef``); 0 loads no reference.
      kl_estimator: ``k1``, ``k2``, ``k3`` or ``abs`` (:func:`jrlhf.losses.kl_penalty`).
      kl_clip: clamp of the per-token KL estimate (``None``: off; OpenRLHF clamps to ±10).
      gamma: discount of the reward-to-go.
      baseline: ``none`` (REINFORCE++) or ``group`` (REINFORCE++-baseline: subtract the group-mean score).
      epsilon: lower clip ε (and the upper one unless ``epsilon_high``).
      epsilon_high: upper clip ε.
      ppo_epochs: passes over each rollout batch.
      num_mini_batches: optimizer steps per pass.
    """

    num_generations: int = 1
    kl_coef: float = 0.01
    kl_estimator: str = "k1"
    kl_clip: float | None = None
    gamma: float = 1.0
    baseline: str = "none"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    ppo_epochs: int = 1
    num_mini_batches: int = 1


def head(cfg) -> str:
    """The trained model's head."""
    return "lm"


def check_config(run) -> None:
    """Rejects settings that cannot work together, naming the keys."""
    algo = run.cfg.algo
    onpolicy.check_rollout_config(run, min_generations=2 if algo.baseline == "group" else 1)
    check_algo(algo)


def check_algo(algo: Config) -> None:
    """The run-free checks of a :class:`Config` (:class:`jrlhf.config.ConfigError` naming the key)."""
    if algo.baseline not in BASELINES:
        raise ConfigError(f"algo.baseline '{algo.baseline}' is not one of {', '.join(BASELINES)}")
    if algo.kl_estimator not in losses.KL_KINDS:
        raise ConfigError(f"algo.kl_estimator '{algo.kl_estimator}' is not one of {', '.join(losses.KL_KINDS)}")
    for key in ("ppo_epochs", "num_mini_batches"):
        value = getattr(algo, key)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"algo.{key}={value!r}: must be a positive integer")
    if algo.kl_coef < 0:
        raise ConfigError(f"algo.kl_coef={algo.kl_coef}: must be >= 0")


def advantages(batch: dict, algo: Config):
    """``(advantages [R, N], returns [R, N], trained mask [R, N], per-token KL [R, N] or None)`` of a rollout."""
    _, mask = onpolicy.scorable_scores(batch)
    use_kl = algo.kl_coef != 0.0
    adv, returns = losses.reinforce_pp_advantages(  # NaN scores: left out of every statistic
        batch["scores"], mask, logps=batch["old_logps"] if use_kl else None, ref_logps=batch["ref_logps"] if use_kl else None,
        kl_coef=algo.kl_coef, kl_kind=algo.kl_estimator, kl_clip=algo.kl_clip, gamma=algo.gamma,
        group_size=algo.num_generations if algo.baseline == "group" else None)
    kl = None
    if use_kl:
        kl = losses.kl_penalty(batch["old_logps"], batch["ref_logps"], algo.kl_estimator, mask=mask,
                               kl_clip=algo.kl_clip)
    return adv, returns, mask, kl


def make_prepare_batch(algo: Config, model=None):
    """``prepare_batch``: KL-shaped token rewards, returns and globally whitened advantages, once per rollout.
    Globals: ``advantages_mean``, ``returns_mean`` (token means) and ``kl`` (mean per-sequence summed KL). With
    ``kl_coef > 0`` and no ``ref_logps`` in the batch, the reference log-probs come from ``frozen.ref_params`` and
    ``model`` (``reference_logps: update``)."""

    def prepare_batch(batch, frozen, algo_state):
        if algo.kl_coef != 0.0:
            batch = onpolicy.with_reference_logps(batch, frozen, model, algo, "reinforce_pp")
        batch = onpolicy.drop_unscorable(batch)
        adv, returns, mask, kl = advantages(batch, algo)
        batch["advantages"] = adv
        n = adv.shape[1]
        batch["loss_mask"] = batch["loss_mask"].at[:, -n:].set(mask.astype(batch["loss_mask"].dtype))
        out = {"advantages_mean": losses.masked_mean(adv, mask), "returns_mean": losses.masked_mean(returns, mask)}
        if kl is not None:
            out["kl"] = onpolicy.scorable_mean(jnp.sum(kl, axis=-1), batch)
        return batch, out

    return prepare_batch


def make_loss_fn(model, algo: Config):
    """``loss_fn(params, batch, frozen, ctx)``: token-mean clipped surrogate over the mini-batch's trained tokens
    (``ctx.globals["num_tokens"]``); metrics ``actor/pg_loss``, ``actor/pg_clipfrac``, ``actor/ppo_kl``,
    ``entropy``, ``critic/advantages/mean``, ``critic/returns/mean`` and ``kl`` (kl_coef > 0)."""

    def loss_fn(params, batch, frozen, ctx):
        mask, logps, entropies, _ = onpolicy.rollout_forward(model, params, batch, algo)
        loss, metrics = losses.ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask,
                                               clip_eps=algo.epsilon, clip_eps_high=algo.epsilon_high,
                                               normalizer=jnp.maximum(ctx.globals["num_tokens"], 1.0))
        share = microbatch_share(jnp.sum(mask), ctx)
        metrics = {k: v * share for k, v in metrics.items()}  # token means of this micro-batch
        if entropies is not None:
            metrics["entropy"] = losses.masked_mean(entropies, mask) * share
        metrics["critic/advantages/mean"] = ctx.globals["advantages_mean"]
        metrics["critic/returns/mean"] = ctx.globals["returns_mean"]
        if "kl" in ctx.globals:
            metrics["kl"] = ctx.globals["kl"]
        return loss, metrics

    return loss_fn


def make(model, config: Config | dict | None = None) -> onpolicy.OnPolicyAlgorithm:
    """REINFORCE++ as plain functions, without a run config: ``make(model, reinforce_pp.Config(...))`` gives an
    :class:`jrlhf.algorithms.onpolicy.OnPolicyAlgorithm` (``loss_fn``, ``prepare_batch``, ``init_frozen`` ->
    :class:`~jrlhf.algorithms.onpolicy.Frozen` when ``kl_coef > 0``, ``rollout``, ``update``); see
    :func:`jrlhf.algorithms.grpo.make`.

    Raises:
      ConfigError: a wrong config type, an unknown field, or an invalid setting (the field named).
    """
    algo = onpolicy.as_config(config, Config, "reinforce_pp")
    onpolicy.check_rollout_settings(algo, min_generations=2 if algo.baseline == "group" else 1,
                                    algorithm="reinforce_pp")
    check_algo(algo)
    return onpolicy.make_algorithm(
        "reinforce_pp", model, algo, loss_fn=make_loss_fn(model, algo), prepare_batch=make_prepare_batch(algo, model),
        uses_reference=algo.kl_coef != 0.0, num_epochs=algo.ppo_epochs, num_minibatches=algo.num_mini_batches)


def setup(run) -> AlgorithmSetup:
    """Builds the REINFORCE++ parts for the loop: :func:`make` plus the run's data, reward sources and
    evaluation."""
    check_config(run)
    parts = make(run.model, run.cfg.algo)
    return onpolicy.policy_gradient_setup(run, parts.loss_fn, parts.prepare_batch, use_ref=parts.uses_reference,
                                          num_epochs=parts.num_epochs, num_minibatches=parts.num_minibatches)
