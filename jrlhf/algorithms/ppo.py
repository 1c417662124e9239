"""PPO for language models as in InstructGPT (Ouyang et al., 2022) and TRL's former ``PPOTrainer`` (defaults),
with verl's metric names.

Per iteration: ``num_generations`` completions per prompt; the sequence score (reward functions and/or a reward
model, plus ``missing_eos_penalty`` for completions without EOS) is placed at the last completion token and a
per-token KL penalty ``-kl_coef * KL_t`` to the reference is added to every token
(:func:`jrlhf.losses.kl_penalized_rewards`); GAE over the critic's values of the rollout
(:func:`jrlhf.losses.gae`), advantages whitened over the rollout (and optionally the rewards); then ``ppo_epochs``
passes of ``num_mini_batches`` optimizer steps on ``pg_loss + vf_coef * vf_loss`` (clipped surrogate and clipped
value loss, token means), all in one compiled program. With ``adaptive_kl`` the coefficient lives in the algorithm
state and follows Ziegler et al.'s controller in-graph after each update.

The critic is a value head on the policy's trunk (``critic: shared``, model head ``lm+value``) or a separate model
(``critic: separate``) loaded from ``critic_model`` (default: the policy's checkpoint) with a fresh value head; the
trained params are then ``{"policy": ..., "critic": ...}`` and only the policy is exported.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jrlhf import losses
from jrlhf.algorithms import onpolicy
from jrlhf.algorithms.base import AlgorithmSetup, OnPolicy, tokenize_train
from jrlhf.config import ConfigError
from jrlhf.models import logical_axes
from jrlhf.step import microbatch_share

DATA_KIND = onpolicy.DATA_KIND
CRITICS = ("shared", "separate")


@dataclasses.dataclass
class Config(onpolicy.RolloutConfig):
    """PPO settings: TRL's former ``PPOConfig`` names and defaults where it had them (plus the rollout settings of
    :class:`jrlhf.algorithms.onpolicy.RolloutConfig`; PPO samples at TRL's temperature 0.7).

    Attributes:
      critic: ``shared`` (value head on the policy trunk) or ``separate`` (its own model).
      critic_model: HF directory of the separate critic's trunk; ``None``: the policy's initial checkpoint.
      kl_coef: initial KL coefficient β.
      kl_estimator: per-token KL estimator of the penalty (``k1``, TRL/InstructGPT; see
        :func:`jrlhf.losses.kl_penalty`).
      adaptive_kl: adapt β toward ``target_kl`` (mean per-sequence KL) with horizon ``kl_horizon``.
      gamma, lam: GAE discount and λ.
      cliprange: policy ratio clip ε.
      cliprange_value: value clip (``None``: unclipped value loss).
      vf_coef: weight of the value loss.
      whiten_rewards: whiten the per-token rewards over the rollout before GAE (mean kept).
      use_score_scaling: divide the sequence scores by their running std over all rollouts so far
        (:func:`jrlhf.losses.scale_scores`; TRL's former ``PPOConfig`` name); the moments live in the algorithm
        state (``score_mean``, ``score_var``, ``score_count``), so they are checkpointed and resumed.
      use_score_norm: with ``use_score_scaling``, also subtract the running mean.
      score_baseline: ``group``: subtract from each score the mean score of its prompt's ``num_generations``
        scorable completions, before scaling and clipping (the group baseline of RLOO / GRPO / ReMax, applied to the
        score that PPO's KL-penalised reward starts from). A Bradley-Terry reward model is fitted on pairs of
        answers to the same prompt, so its scores are defined only up to a per-prompt offset; centring in the group
        removes that offset instead of leaving it to the value head. ``None``: off.
      score_clip: clip the (scaled) sequence scores to ``[-score_clip, score_clip]`` before the KL penalty
        (``None``: off).
      whiten_advantages: whiten the advantages over the rollout.
      missing_eos_penalty: subtracted from the score of completions that end without EOS (``None``: off).
      ppo_epochs: passes over each rollout batch.
      num_mini_batches: optimizer steps per pass.
    """

    num_generations: int = 1
    temperature: float = 0.7
    critic: str = "shared"
    critic_model: str | None = None
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    adaptive_kl: bool = False
    target_kl: float = 6.0
    kl_horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float | None = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False
    use_score_scaling: bool = False
    use_score_norm: bool = False
    score_baseline: str | None = None
    score_clip: float | None = None
    whiten_advantages: bool = True
    missing_eos_penalty: float | None = None
    ppo_epochs: int = 4
    num_mini_batches: int = 1


def head(cfg) -> str:
    """The trained model's head: ``lm+value`` with a shared critic, else ``lm``."""
    critic = getattr(cfg.algo, "critic", "shared")
    return "lm+value" if critic == "shared" else "lm"


def check_config(run) -> None:
    """Rejects settings that cannot work together, naming the keys."""
    onpolicy.check_rollout_config(run)
    check_algo(run.cfg.algo)


def check_algo(algo: Config) -> None:
    """The run-free checks of a :class:`Config` (:class:`jrlhf.config.ConfigError` naming the key)."""
    if algo.critic not in CRITICS:
        raise ConfigError(f"algo.critic '{algo.critic}' is not one of {', '.join(CRITICS)}")
    if algo.critic_model and algo.critic != "separate":
        raise ConfigError("algo.critic_model is only read with algo.critic: separate")
    if algo.kl_estimator not in losses.KL_KINDS:
        raise ConfigError(f"algo.kl_estimator '{algo.kl_estimator}' is not one of {', '.join(losses.KL_KINDS)}")
    for key in ("ppo_epochs", "num_mini_batches"):
        value = getattr(algo, key)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"algo.{key}={value!r}: must be a positive integer")
    if algo.kl_coef < 0:
        raise ConfigError(f"algo.kl_coef={algo.kl_coef}: must be >= 0")
    if algo.adaptive_kl and (algo.target_kl <= 0 or algo.kl_horizon <= 0):
        raise ConfigError("algo.target_kl and algo.kl_horizon must be positive with adaptive_kl")
    if algo.use_score_norm and not algo.use_score_scaling:
        raise ConfigError("algo.use_score_norm needs algo.use_score_scaling: true (it centres the running-std "
                          "scaled scores)")
    if algo.score_clip is not None and not algo.score_clip > 0:
        raise ConfigError(f"algo.score_clip={algo.score_clip}: must be > 0 (a symmetric bound), or null for no clip")
    if algo.score_baseline not in (None, "group"):
        raise ConfigError(f"algo.score_baseline={algo.score_baseline!r}: must be 'group' or null (off)")
    if algo.score_baseline == "group" and algo.num_generations < 2:
        raise ConfigError(f"algo.score_baseline: group needs groups: num_generations={algo.num_generations} (>= 2)")


SCORE_MOMENTS = ("score_mean", "score_var", "score_count")


def group_centred_scores(scores, scorable, group_size: int):
    """``scores [R]`` minus the mean of the scorable scores of their group (rows ``b * group_size + i`` form group
    ``b``): float32 ``[R]``; a group with no scorable row gives 0. ``scorable [R]`` bool."""
    scores = scores.astype(jnp.float32).reshape(-1, group_size)
    keep = scorable.reshape(-1, group_size).astype(jnp.float32)
    mean = jnp.sum(scores * keep, axis=1, keepdims=True) / jnp.maximum(jnp.sum(keep, axis=1, keepdims=True), 1.0)
    return ((scores - mean) * keep).reshape(-1)


def shaped_scores(batch: dict, algo: Config, moments=None):
    """``(scores [R] float32, new moments or None)``: the rollout's sequence scores (NaN -> 0) after
    ``score_baseline`` (:func:`group_centred_scores`), ``use_score_scaling`` / ``use_score_norm`` (running moments
    ``moments = (mean, var, count)`` updated with this rollout's scorable rows first, as TRL did) and
    ``score_clip``."""
    scores, _ = onpolicy.scorable_scores(batch)
    scorable = ~jnp.isnan(batch["scores"].astype(jnp.float32))
    if algo.score_baseline == "group":
        scores = group_centred_scores(scores, scorable, algo.num_generations)
    new = None
    if algo.use_score_scaling:
        mean, var, count = moments if moments is not None else (0.0, 1.0, 0.0)
        new = losses.running_moments_update(mean, var, count, scores, scorable)
        scores = losses.scale_scores(scores, *new, use_score_norm=algo.use_score_norm, score_clip=algo.score_clip)
    elif algo.score_clip is not None:
        scores = jnp.clip(scores, -algo.score_clip, algo.score_clip)
    return scores, new


def rollout_advantages(batch: dict, kl_coef, algo: Config, moments=None):
    """GAE of one rollout: ``(advantages [R, N], returns [R, N], trained mask [R, N], per-token KL [R, N])``.

    Completions that no reward applies to (NaN score) are masked out, so they enter neither the reward whitening
    nor the advantage whitening. The scores are shaped first (:func:`shaped_scores`, with ``moments``)."""
    scores, _ = shaped_scores(batch, algo, moments)
    _, mask = onpolicy.scorable_scores(batch)
    rewards, kl = losses.kl_penalized_rewards(scores, batch["old_logps"], batch["ref_logps"], mask, kl_coef=kl_coef,
                                              kl_kind=algo.kl_estimator)
    if algo.whiten_rewards:
        rewards = losses.masked_whiten(rewards, mask, shift_mean=False)
    adv, returns = losses.gae(rewards, batch["old_values"], mask, gamma=algo.gamma, lam=algo.lam)
    if algo.whiten_advantages:
        adv = losses.masked_whiten(adv, mask)
    return adv, returns, mask, kl


def make_prepare_batch(algo: Config, model=None):
    """``prepare_batch``: KL-penalised token rewards, GAE and whitening with the current ``kl_coef`` of the algorithm
    state, once per rollout. Globals: ``kl`` (mean per-sequence summed KL, the controller's measure),
    ``kl_coef``, ``advantages_mean``, ``returns_mean``, ``non_score_reward``. Without ``ref_logps`` in the batch,
    the reference log-probs come from ``frozen.ref_params`` and ``model`` (``reference_logps: update``)."""

    def prepare_batch(batch, frozen, algo_state):
        batch = onpolicy.with_reference_logps(batch, frozen, model, algo, "ppo")
        batch = onpolicy.drop_unscorable(batch)
        kl_coef = algo_state["kl_coef"]
        moments = tuple(algo_state[k] for k in SCORE_MOMENTS) if algo.use_score_scaling else None
        _, new_moments = shaped_scores(batch, algo, moments)
        adv, returns, mask, kl = rollout_advantages(batch, kl_coef, algo, moments)
        n = adv.shape[1]
        batch["advantages"], batch["returns"] = adv, returns
        batch["loss_mask"] = batch["loss_mask"].at[:, -n:].set(mask.astype(batch["loss_mask"].dtype))
        seq_kl = onpolicy.scorable_mean(jnp.sum(kl, axis=-1), batch)
        extra = {}
        if new_moments is not None:
            extra = {f"score/running_{k[len('score_'):]}": v for k, v in zip(SCORE_MOMENTS, new_moments)}
        return batch, {
            **extra,
            "kl": seq_kl,
            "kl_coef": jnp.asarray(kl_coef, jnp.float32),
            "non_score_reward": -jnp.asarray(kl_coef, jnp.float32) * seq_kl,
            "advantages_mean": losses.masked_mean(adv, mask),
            "returns_mean": losses.masked_mean(returns, mask),
        }

    return prepare_batch


def make_loss_fn(model, algo: Config, critic_model=None):
    """``loss_fn(params, batch, frozen, ctx)``: ``pg_loss + vf_coef * vf_loss`` on one micro-batch, each a token
    mean over the mini-batch's trained tokens; verl-named metrics ``actor/*``, ``critic/*`` plus ``kl``,
    ``kl_coef`` and ``entropy``."""

    def loss_fn(params, batch, frozen, ctx):
        policy = params if critic_model is None else params["policy"]
        mask, logps, entropies, values = onpolicy.rollout_forward(model, policy, batch, algo)
        if critic_model is not None:
            values = critic_values(critic_model, params["critic"], batch["input_ids"], batch["attention_mask"],
                                   mask.shape[1])
        normalizer = jnp.maximum(ctx.globals["num_tokens"], 1.0)
        pg_loss, metrics = losses.ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask,
                                                  clip_eps=algo.cliprange, normalizer=normalizer)
        vf_loss, vf_metrics = losses.ppo_value_loss(values, batch["old_values"], batch["returns"], mask,
                                                    cliprange_value=algo.cliprange_value, normalizer=normalizer)
        metrics.update(vf_metrics)
        share = microbatch_share(jnp.sum(mask), ctx)
        metrics = {k: v * share for k, v in metrics.items()}  # token means of this micro-batch
        if entropies is not None:
            metrics["actor/entropy"] = losses.masked_mean(entropies, mask) * share
        metrics["critic/advantages/mean"] = ctx.globals["advantages_mean"]
        metrics["critic/returns/mean"] = ctx.globals["returns_mean"]
        metrics["critic/values/mean"] = losses.masked_mean(values, mask) * share
        metrics["kl"] = ctx.globals["kl"]
        metrics["kl_coef"] = ctx.globals["kl_coef"]
        metrics["non_score_reward"] = ctx.globals["non_score_reward"]
        if algo.use_score_scaling:
            for key in SCORE_MOMENTS:
                name = f"score/running_{key[len('score_'):]}"
                metrics[name] = ctx.globals[name]
        return pg_loss + algo.vf_coef * vf_loss, metrics

    return loss_fn


def critic_values(critic_model, critic_params, input_ids, attention_mask, num_completion_tokens: int):
    """A separate critic's values of the state before each completion token: ``[B, N]`` float32."""
    values = critic_model.apply(critic_params, input_ids, attention_mask)
    start = input_ids.shape[1] - num_completion_tokens - 1
    return values[:, start:-1].astype(jnp.float32)


def make_update_algo_state(algo: Config, rollout_rows: int):
    """``update_algo_state``: the adaptive KL controller (``n_steps`` = rollout rows, as TRL counted samples) and
    the running score moments of ``use_score_scaling``."""

    def update(algo_state, metrics):
        algo_state = dict(algo_state)
        if algo.use_score_scaling:
            for key in SCORE_MOMENTS:
                algo_state[key] = metrics[f"score/running_{key[len('score_'):]}"]
        if algo.adaptive_kl:
            algo_state["kl_coef"] = losses.adaptive_kl_update(algo_state["kl_coef"], metrics["kl"], rollout_rows,
                                                              target=algo.target_kl, horizon=algo.kl_horizon)
        return algo_state

    return update


def init_algo_state(algo: Config) -> dict:
    """``{"kl_coef"}`` float32, plus ``score_mean`` 0, ``score_var`` 1 and ``score_count`` 0 with
    ``use_score_scaling``."""
    state = {"kl_coef": np.float32(algo.kl_coef)}
    if algo.use_score_scaling:
        state.update(score_mean=np.float32(0.0), score_var=np.float32(1.0), score_count=np.float32(0.0))
    return state


def make(model, config: Config | dict | None = None, *, critic_model=None,
         rollout_rows: int | None = None) -> onpolicy.OnPolicyAlgorithm:
    """PPO as plain functions, without a run config.

    Args:
      model: the policy: ``lm+value`` (``critic: shared``, the value head on the shared trunk) or ``lm``
        (``critic: separate``).
      config: a :class:`Config` (or a dict of its fields).
      critic_model: the separate critic (``head="value"``) with ``critic: separate``; the trained params are then
        ``{"policy": policy params, "critic": critic params}``.
      rollout_rows: rows per rollout (prompts x ``num_generations``), the adaptive KL controller's ``n_steps``;
        required with ``adaptive_kl``.

    Returns:
      An :class:`jrlhf.algorithms.onpolicy.OnPolicyAlgorithm`; its rollout computes ``old_values`` and applies
      ``missing_eos_penalty``; ``init_algo_state()`` gives ``{"kl_coef": float32}``; ``init_frozen(params)`` gives
      ``Frozen(ref_params=<the policy params>)``.

    Raises:
      ConfigError: a wrong config type, an unknown field, an invalid setting, a missing ``critic_model`` /
        ``rollout_rows`` (each named).
    """
    algo = onpolicy.as_config(config, Config, "ppo")
    onpolicy.check_rollout_settings(algo, algorithm="ppo")
    check_algo(algo)
    if algo.critic == "separate" and critic_model is None:
        raise ConfigError("ppo.make: critic='separate' needs critic_model= (a head='value' model)")
    if algo.critic == "shared" and model.head != "lm+value":
        raise ConfigError(f"ppo.make: critic='shared' needs a model with head='lm+value', got head='{model.head}'")
    if algo.adaptive_kl and rollout_rows is None:
        raise ConfigError("ppo.make: adaptive_kl needs rollout_rows= (prompts x num_generations per rollout)")
    if critic_model is not None:
        policy_params = lambda p: p["policy"]  # noqa: E731

        def values_fn(p, ids, attention, n):
            return critic_values(critic_model, p["critic"], ids, attention, n)
    else:
        policy_params = lambda p: p  # noqa: E731

        def values_fn(p, ids, attention, n):
            _, _, values = onpolicy.completion_forward(model, p, ids, attention, n, temperature=algo.temperature,
                                                       chunk_size=algo.logprob_chunk_size, with_entropy=False)
            return values

    penalty = algo.missing_eos_penalty

    def host_score(scores, truncated):
        if penalty is None:
            return scores
        return scores - np.float32(penalty) * truncated.astype(np.float32)

    policy_lm = onpolicy.lm_view(model)
    return onpolicy.make_algorithm(
        "ppo", model, algo, loss_fn=make_loss_fn(policy_lm if critic_model is not None else model, algo,
                                                 critic_model),
        prepare_batch=make_prepare_batch(algo, model), uses_reference=True, num_epochs=algo.ppo_epochs,
        num_minibatches=algo.num_mini_batches,
        update_algo_state=make_update_algo_state(algo, int(rollout_rows or 0)),
        init_algo_state=lambda: init_algo_state(algo),
        values_fn=values_fn, policy_params=policy_params, host_score_fn=host_score)


def setup(run) -> AlgorithmSetup:
    """Builds the PPO parts for the loop: :func:`make` plus the run's data, reward sources, critic and
    evaluation."""
    cfg, algo, model = run.cfg, run.cfg.algo, run.model
    check_config(run)
    train_data = tokenize_train(run, DATA_KIND)
    rewards = onpolicy.load_reward_sources(run)
    frozen, frozen_specs = onpolicy.frozen_parts(run, ref=True, rewards=rewards)
    critic_model, params, param_specs, export = None, None, None, None
    if algo.critic == "separate":
        critic_model, critic_params = run.load_model(algo.critic_model, "value")
        params = {"policy": run.params, "critic": critic_params}
        param_specs = {"policy": logical_axes(model), "critic": logical_axes(critic_model)}
        export = lambda p: p["policy"]  # noqa: E731
    parts = make(model, algo, critic_model=critic_model, rollout_rows=cfg.data.batch_size * algo.num_generations)
    collect = onpolicy.make_collect(run, rewards, onpolicy.Collector(
        policy_params=parts.policy_params, need_ref=True, values_fn=parts.values_fn,
        host_score_fn=parts.host_score_fn))
    return AlgorithmSetup(
        loss_fn=parts.loss_fn,
        train_data=train_data,
        frozen=frozen,
        frozen_specs=frozen_specs,
        prepare_batch=parts.prepare_batch,
        update_algo_state=parts.update_algo_state,
        algo_state=parts.init_algo_state(),
        evaluate=onpolicy.make_evaluate(run, parts.policy_params, reward_model=rewards.model),
        onpolicy=OnPolicy(collect=collect, num_epochs=parts.num_epochs, num_minibatches=parts.num_minibatches),
        params=params,
        param_specs=param_specs,
        export_params=export,
    )
