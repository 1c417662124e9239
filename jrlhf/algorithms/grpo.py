"""GRPO and its variants (Dr. GRPO, DAPO, BNPO, CISPO, SAPO, LUSPO; clip-higher; GSPO's sequence-level ratio),
with the semantics and defaults of TRL 1.16's ``GRPOTrainer``.

Per iteration: ``num_generations`` completions per prompt from one prefill, rewards from the reward functions
(and/or a reward model), group-relative advantages (``scale_rewards``), then ``num_iterations`` passes over the
rollout, each split into ``steps_per_generation`` mini-batches (one optimizer step each), all in one compiled
program. The sampler's log-probs (under ``logits / temperature``) are the old log-probs; with ``beta > 0`` the
reference log-probs are computed once per rollout from ``frozen.ref_params`` (a copy of the initial policy), by the
rollout or inside the update (``reference_logps``).

Without the config system: ``algo = grpo.make(model, grpo.Config(...))`` gives the loss, ``prepare_batch``, the
:class:`jrlhf.algorithms.onpolicy.Frozen` it expects, the rollout and the compiled update
(:class:`jrlhf.algorithms.onpolicy.OnPolicyAlgorithm`); ``examples/grpo_loop.py`` is a whole loop.

Loss normalisers (TRL 1.16), every one a count of the whole optimizer step so that gradient accumulation is exact:
``grpo``/``sapo`` average per-sequence token means over the mini-batch's sequences; ``bnpo`` divides by the
mini-batch's token count (TRL divides by each accumulation micro-batch's own count, which makes the loss depend on
how the batch is split; the two agree with ``train.num_microbatches: 1``); ``dapo``/``cispo`` divide by the
rollout's token count over ``steps_per_generation``; ``dr_grpo`` by ``mini-batch size * max_completion_length``;
``luspo`` averages per-sequence token sums. Unscorable completions (NaN score) get advantage 0 and no loss, and are
left out of the group statistics and of every count (:func:`jrlhf.algorithms.onpolicy.drop_unscorable`).
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
SCALE_REWARDS = ("group", "batch", "none")


@dataclasses.dataclass
class Config(onpolicy.RolloutConfig):
    """GRPO settings: TRL 1.16 ``GRPOConfig`` names and defaults (plus the rollout settings of
    :class:`jrlhf.algorithms.onpolicy.RolloutConfig`).

    Attributes:
      beta: KL coefficient (k3 estimator to the reference); 0 loads no reference.
      num_iterations: μ, policy updates per rollout batch.
      steps_per_generation: optimizer steps (mini-batches) per pass over a rollout batch; ``None`` = 1.
      epsilon: lower clip ε (and the upper one unless ``epsilon_high``).
      epsilon_high: upper clip ε (DAPO's clip-higher: 0.28); for ``cispo`` the absolute ratio cap.
      delta: two-sided clipping's upper bound on the unclipped ratio (``None``: off).
      loss_type: ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo`` or ``luspo``.
      scale_rewards: ``group`` (std within each group), ``batch`` (std over the batch) or ``none``.
      importance_sampling_level: ``token`` or ``sequence`` (GSPO).
      sapo_temperature_pos, sapo_temperature_neg: SAPO temperatures.
      use_bias_correction_kl: multiply the KL term by the importance ratio.
      top_entropy_quantile: ρ of "Beyond the 80/20 Rule" (TRL's name and default 1.0 = off): only the tokens whose
        entropy is at least the ``1 - ρ`` quantile of the micro-batch's trained tokens' entropies keep their policy
        term (:func:`jrlhf.losses.high_entropy_mask`; the KL term and every count are unchanged, as in TRL). The
        quantile is over the micro-batch the loss sees (TRL: per accumulation step), so with
        ``train.num_microbatches > 1`` it is a micro-batch quantile; logs ``entropy/threshold_kept_frac``.

    The rollout-correction settings (``vllm_importance_sampling_*``) and dynamic sampling are those of
    :class:`jrlhf.algorithms.onpolicy.RolloutConfig`; with the correction on, each token's policy term is
    multiplied by ``is_weights`` (:func:`jrlhf.algorithms.onpolicy.apply_rollout_correction`).
    """

    num_generations: int = 8
    beta: float = 0.0
    num_iterations: int = 1
    steps_per_generation: int | None = None
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    importance_sampling_level: str = "token"
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    use_bias_correction_kl: bool = True
    top_entropy_quantile: float = 1.0


def head(cfg) -> str:
    """The trained model's head."""
    return "lm"


def check_config(run) -> None:
    """Rejects settings that cannot work together, naming the keys."""
    onpolicy.check_rollout_config(run, min_generations=2)
    check_algo(run.cfg.algo)


def check_algo(algo: Config) -> None:
    """The run-free checks of a :class:`Config` (:class:`jrlhf.config.ConfigError` naming the key)."""
    if algo.loss_type not in losses.GRPO_LOSS_TYPES:
        raise ConfigError(f"algo.loss_type '{algo.loss_type}' is not one of {', '.join(losses.GRPO_LOSS_TYPES)}")
    if algo.scale_rewards not in SCALE_REWARDS:
        raise ConfigError(f"algo.scale_rewards '{algo.scale_rewards}' is not one of {', '.join(SCALE_REWARDS)}")
    if algo.importance_sampling_level not in ("token", "sequence"):
        raise ConfigError(f"algo.importance_sampling_level '{algo.importance_sampling_level}': use token or "
                          "sequence")
    for key in ("num_iterations", "steps_per_generation"):
        value = getattr(algo, key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"algo.{key}={value!r}: must be a positive integer")
    if algo.beta < 0:
        raise ConfigError(f"algo.beta={algo.beta}: must be >= 0")
    if not 0.0 <= algo.top_entropy_quantile <= 1.0:
        raise ConfigError(f"algo.top_entropy_quantile={algo.top_entropy_quantile}: must be in [0, 1] (1 = off)")


def advantages(scores, algo: Config):
    """Group-relative advantages of a rollout's ``[R]`` scores (TRL's ε = 1e-4, Bessel std): ``[R]`` float32."""
    return losses.grpo_advantages(scores, algo.num_generations, scale=algo.scale_rewards, epsilon=1e-4)


def make_prepare_batch(algo: Config, model=None):
    """``prepare_batch``: the group-relative advantages and the rollout-level token counts, once per rollout; with
    ``beta > 0`` and no ``ref_logps`` in the batch, the reference log-probs from ``frozen.ref_params`` and
    ``model`` (``reference_logps: update``)."""
    steps = onpolicy.num_minibatches(algo)

    def prepare_batch(batch, frozen, algo_state):
        if algo.beta != 0.0:
            batch = onpolicy.with_reference_logps(batch, frozen, model, algo, "grpo")
        batch = onpolicy.drop_unscorable(batch)
        batch = onpolicy.apply_rollout_correction(batch, algo)
        batch["advantages"] = advantages(batch["scores"], algo)
        return batch, onpolicy.sequence_globals(batch, steps)

    return prepare_batch


def policy_loss(logps, batch, algo: Config, ctx, num_microbatches: int = 1, entropies=None):
    """GRPO loss of one micro-batch from its policy log-probs ``[b, N]``, with the batch-global normaliser of
    ``algo.loss_type`` (see the module docstring); token-mean metrics scaled to stay exact under accumulation
    (:func:`jrlhf.step.microbatch_share`). ``num_microbatches`` is unused (the counts come from ``ctx``) and kept
    for callers that pass it. Returns ``(loss, metrics)``."""
    n, mask = onpolicy.completion_part(batch)
    normalizer = None
    if algo.loss_type in ("grpo", "sapo", "luspo"):
        normalizer = ctx.globals["num_sequences"]
    elif algo.loss_type == "bnpo":
        normalizer = jnp.maximum(ctx.globals["num_tokens"], 1.0)
    elif algo.loss_type == "dr_grpo":
        normalizer = ctx.globals["num_sequences"] * n
    elif algo.loss_type in ("dapo", "cispo"):
        normalizer = jnp.maximum(ctx.globals["tokens_per_minibatch"], 1.0)
    token_weights = batch.get("is_weights")
    kept_entropy = None
    if algo.top_entropy_quantile < 1.0:
        if entropies is None:
            raise ValueError("grpo: top_entropy_quantile < 1 needs the token entropies of the policy forward")
        kept_entropy = losses.high_entropy_mask(entropies, mask, algo.top_entropy_quantile)
        entropy_weights = kept_entropy.astype(jnp.float32)
        token_weights = entropy_weights if token_weights is None else token_weights * entropy_weights
    loss, metrics = losses.grpo_loss(
        logps, batch["old_logps"], batch.get("ref_logps"), batch["advantages"], mask,
        beta=algo.beta, epsilon_low=algo.epsilon, epsilon_high=algo.epsilon_high, loss_type=algo.loss_type,
        max_completion_length=n, importance_sampling_level=algo.importance_sampling_level, delta=algo.delta,
        sapo_temperature_pos=algo.sapo_temperature_pos, sapo_temperature_neg=algo.sapo_temperature_neg,
        kl_importance_correction=algo.use_bias_correction_kl, token_weights=token_weights, entropies=entropies,
        normalizer=normalizer)
    if kept_entropy is not None:
        metrics["entropy/threshold_kept_frac"] = losses.masked_mean(kept_entropy.astype(jnp.float32), mask)
    # token-mean metrics of this micro-batch -> exact batch means once averaged over micro-batches (the clip ratios
    # are per-sequence means with GSPO's sequence-level ratio, already exact)
    share = microbatch_share(jnp.sum(mask), ctx)
    token_level = {"kl", "entropy", "entropy/threshold_kept_frac"}
    if algo.importance_sampling_level == "token":
        token_level |= {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "cispo_clip_ratio"}
    return loss, {k: v * share if k in token_level else v for k, v in metrics.items()}


def make_loss_fn(model, algo: Config, num_microbatches: int = 1):
    """``loss_fn(params, batch, frozen, ctx)`` on one micro-batch of the rollout: TRL-named metrics ``kl`` (beta >
    0), ``entropy``, ``clip_ratio/*`` (``cispo_clip_ratio`` for cispo). ``num_microbatches`` is unused."""

    def loss_fn(params, batch, frozen, ctx):
        _, logps, entropies, _ = onpolicy.rollout_forward(model, params, batch, algo)
        return policy_loss(logps, batch, algo, ctx, num_microbatches, entropies)

    return loss_fn


def make(model, config: Config | dict | None = None) -> onpolicy.OnPolicyAlgorithm:
    """GRPO as plain functions, without a run config.

    Args:
      model: the policy (``lm`` head), e.g. from :func:`jrlhf.models.from_pretrained` or ``init_model``.
      config: a :class:`Config` (or a dict of its fields); ``reward_funcs`` may hold Python callables.

    Returns:
      An :class:`jrlhf.algorithms.onpolicy.OnPolicyAlgorithm`: ``loss_fn(params, batch, frozen, ctx)`` on one
      micro-batch of a :class:`~jrlhf.algorithms.onpolicy.RolloutBatch` (reads ``input_ids``, ``attention_mask``,
      ``loss_mask``, ``old_logps``, ``scores`` and, with ``beta > 0``, ``ref_logps``), ``prepare_batch`` (the
      group advantages), ``init_frozen(params)`` (``Frozen(ref_params=params)`` when ``beta > 0``, else ``None``),
      ``rollout(...)`` and ``update(optimizer, mesh, state_shardings=...)``.

    Raises:
      ConfigError: a wrong config type, an unknown field, or an invalid setting (the field named).
    """
    algo = onpolicy.as_config(config, Config, "grpo")
    onpolicy.check_rollout_settings(algo, min_generations=2, algorithm="grpo")
    check_algo(algo)
    return onpolicy.make_algorithm(
        "grpo", model, algo, loss_fn=make_loss_fn(model, algo), prepare_batch=make_prepare_batch(algo, model),
        uses_reference=algo.beta != 0.0, num_epochs=algo.num_iterations,
        num_minibatches=onpolicy.num_minibatches(algo))


def setup(run) -> AlgorithmSetup:
    """Builds the GRPO parts for the loop: :func:`make` plus the run's data, reward sources and evaluation."""
    algo = run.cfg.algo
    check_config(run)
    parts = make(run.model, algo)
    return onpolicy.policy_gradient_setup(
        run, parts.loss_fn, parts.prepare_batch, use_ref=parts.uses_reference, num_epochs=parts.num_epochs,
        num_minibatches=parts.num_minibatches,
        collector_options={"zero_std_over_batch": algo.scale_rewards == "batch"})
