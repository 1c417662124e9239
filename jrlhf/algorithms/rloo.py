"""RLOO (Ahmadian et al., 2024) with the semantics and defaults of TRL 1.16's ``RLOOTrainer``.

``num_generations`` completions per prompt; each reward gets the sequence-level KL penalty ``-beta * sum_t (old_t -
ref_t)`` (k1, from the rollout's log-probs), then the leave-one-out baseline of its group is subtracted
(:func:`jrlhf.losses.rloo_advantages`, optionally whitened over the batch). The policy loss is PPO clipping on the
*sequence* log-prob ratio averaged over sequences (:func:`jrlhf.losses.rloo_loss`), ``num_iterations`` passes of
``steps_per_generation`` mini-batches per rollout.
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


@dataclasses.dataclass
class Config(onpolicy.RolloutConfig):
    """RLOO settings: TRL 1.16 ``RLOOConfig`` names and defaults (plus the rollout settings of
    :class:`jrlhf.algorithms.onpolicy.RolloutConfig`).

    Attributes:
      beta: coefficient of the sequence-level KL penalty in the reward (0 loads no reference).
      num_iterations: policy updates per rollout batch.
      steps_per_generation: optimizer steps (mini-batches) per pass over a rollout batch; ``None`` = 1.
      epsilon: lower clip ε of the sequence ratio (and the upper one unless ``epsilon_high``).
      epsilon_high: upper clip ε.
      normalize_advantages: whiten the advantages over the batch (ε = 1e-4).
      reward_clip_range: optional ``[low, high]`` clamp of the rewards before the KL penalty.
    """

    num_generations: int = 2
    beta: float = 0.05
    num_iterations: int = 1
    steps_per_generation: int | None = None
    epsilon: float = 0.2
    epsilon_high: float | None = None
    normalize_advantages: bool = False
    reward_clip_range: tuple | None = None


def head(cfg) -> str:
    """The trained model's head."""
    return "lm"


def check_config(run) -> None:
    """Rejects settings that cannot work together, naming the keys."""
    onpolicy.check_rollout_config(run, min_generations=2)
    check_algo(run.cfg.algo)


def check_algo(algo: Config) -> None:
    """The run-free checks of a :class:`Config` (:class:`jrlhf.config.ConfigError` naming the key)."""
    for key in ("num_iterations", "steps_per_generation"):
        value = getattr(algo, key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"algo.{key}={value!r}: must be a positive integer")
    if algo.beta < 0:
        raise ConfigError(f"algo.beta={algo.beta}: must be >= 0")
    if algo.reward_clip_range is not None and len(algo.reward_clip_range) != 2:
        raise ConfigError(f"algo.reward_clip_range={list(algo.reward_clip_range)}: give [low, high]")


def advantages(batch: dict, algo: Config):
    """``(advantages [R], per-token k1 KL [R, N])`` of a rollout: rewards minus ``beta`` times the summed k1 KL of
    the rollout policy to the reference, then the leave-one-out baseline (TRL 1.16)."""
    _, mask = onpolicy.completion_part(batch)
    rewards = batch["scores"].astype(jnp.float32)
    if algo.reward_clip_range is not None:
        rewards = jnp.clip(rewards, algo.reward_clip_range[0], algo.reward_clip_range[1])
    kl = None
    if algo.beta != 0.0:
        kl = losses.kl_penalty(batch["old_logps"], batch["ref_logps"], "k1", mask=mask)
        rewards = rewards - algo.beta * jnp.sum(kl, axis=-1)
    adv = losses.rloo_advantages(rewards, algo.num_generations, normalize=algo.normalize_advantages,
                                 epsilon=1e-4)
    return adv, kl


def make_prepare_batch(algo: Config, model=None):
    """``prepare_batch``: KL-penalised rewards and leave-one-out advantages, once per rollout; the rollout's token
    mean of the k1 KL goes to ``globals["kl"]`` (TRL's ``kl`` metric). With ``beta > 0`` and no ``ref_logps`` in
    the batch, the reference log-probs come from ``frozen.ref_params`` and ``model`` (``reference_logps: update``)."""

    def prepare_batch(batch, frozen, algo_state):
        if algo.beta != 0.0:
            batch = onpolicy.with_reference_logps(batch, frozen, model, algo, "rloo")
        batch = onpolicy.drop_unscorable(batch)
        batch["advantages"], kl = advantages(batch, algo)
        out = {}
        if kl is not None:
            _, mask = onpolicy.completion_part(batch)  # unscorable rows already dropped
            out["kl"] = losses.masked_mean(kl, mask)
        return batch, out

    return prepare_batch


def make_loss_fn(model, algo: Config):
    """``loss_fn(params, batch, frozen, ctx)``: :func:`jrlhf.losses.rloo_loss` on the summed completion log-probs,
    normalised by the mini-batch's sequence count; metrics ``entropy``, ``clip_ratio/*`` and ``kl`` (beta > 0)."""

    def loss_fn(params, batch, frozen, ctx):
        mask, logps, entropies, _ = onpolicy.rollout_forward(model, params, batch, algo)
        seq = losses.masked_sum(logps, mask, axis=-1)
        old_seq = losses.masked_sum(batch["old_logps"], mask, axis=-1)
        loss, metrics = losses.rloo_loss(seq, old_seq, batch["advantages"], epsilon_low=algo.epsilon,
                                         epsilon_high=algo.epsilon_high, normalizer=ctx.globals["num_sequences"])
        if entropies is not None:
            metrics["entropy"] = losses.masked_mean(entropies, mask) * microbatch_share(jnp.sum(mask), ctx)
        if "kl" in ctx.globals:
            metrics["kl"] = ctx.globals["kl"]
        return loss, metrics

    return loss_fn


def make(model, config: Config | dict | None = None) -> onpolicy.OnPolicyAlgorithm:
    """RLOO as plain functions, without a run config: ``make(model, rloo.Config(...))`` gives an
    :class:`jrlhf.algorithms.onpolicy.OnPolicyAlgorithm` (``loss_fn``, ``prepare_batch``, ``init_frozen`` ->
    :class:`~jrlhf.algorithms.onpolicy.Frozen` when ``beta > 0``, ``rollout``, ``update``); see
    :func:`jrlhf.algorithms.grpo.make`.

    Raises:
      ConfigError: a wrong config type, an unknown field, or an invalid setting (the field named).
    """
    algo = onpolicy.as_config(config, Config, "rloo")
    onpolicy.check_rollout_settings(algo, min_generations=2, algorithm="rloo")
    check_algo(algo)
    return onpolicy.make_algorithm(
        "rloo", model, algo, loss_fn=make_loss_fn(model, algo), prepare_batch=make_prepare_batch(algo, model),
        uses_reference=algo.beta != 0.0, num_epochs=algo.num_iterations,
        num_minibatches=onpolicy.num_minibatches(algo))


def setup(run) -> AlgorithmSetup:
    """Builds the RLOO parts for the loop: :func:`make` plus the run's data, reward sources and evaluation."""
    check_config(run)
    parts = make(run.model, run.cfg.algo)
    return onpolicy.policy_gradient_setup(run, parts.loss_fn, parts.prepare_batch, use_ref=parts.uses_reference,
                                          num_epochs=parts.num_epochs, num_minibatches=parts.num_minibatches)
