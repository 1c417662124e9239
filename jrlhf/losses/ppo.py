"""PPO: generalised advantage estimation, the clipped policy and value losses, KL-penalised per-token rewards and
the adaptive KL controller.

TRL 1.16 no longer ships a PPO trainer, so these follow the PPO paper and verl's ``core_algos`` (metric names
``actor/...`` and ``critic/...`` as verl logs them), with arguments that reproduce OpenRLHF and TRL's former
``PPOTrainer`` where they differ.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jrlhf.losses.common import (
    AGGREGATIONS,
    Array,
    _bool_mask,
    _f32,
    aggregate_loss,
    kl_penalty,
    masked_mean,
)


def gae(rewards, values, mask, *, gamma: float = 1.0, lam: float = 0.95) -> tuple[Array, Array]:
    """Generalised advantage estimation (Schulman et al., 2016), a right-to-left ``lax.scan`` over tokens.

    ``δ_t = r_t + γ V_next - V_t`` and ``A_t = δ_t + γλ A_next`` where "next" is the next *real* token: masked
    tokens are skipped (their value and TD error are not used and the recursion carries across them), and after
    the last real token ``V_next = A_next = 0``. For right-padded masks this is exactly TRL's former PPO trainer,
    OpenRLHF and verl; for masks with interior holes (tool/observation tokens) it is verl's current GAE. Returns
    are ``A + V``. No whitening: follow with :func:`jrlhf.losses.masked_whiten` (verl: default arguments;
    OpenRLHF: ``unbiased=False, eps_mode="clamp"``), on the whole batch.

    Args:
      rewards: ``[B, T]`` per-token rewards (e.g. from :func:`kl_penalized_rewards`), any float dtype.
      values: ``[B, T]`` value estimates of the rollout policy's critic.
      mask: ``[B, T]``; 1 = real (action) token.
      gamma: discount γ.
      lam: GAE λ.

    Returns:
      ``(advantages, returns)``, each ``[B, T]`` float32, 0 at masked positions.
    """
    rewards, values = _f32(rewards), _f32(values)
    chex.assert_rank(rewards, 2, custom_message="gae: rewards must be [B, T]")
    chex.assert_equal_shape(
        [rewards, values, jnp.asarray(mask)],
        custom_message="gae: rewards, values and mask must all be [B, T]",
    )
    mask = _bool_mask(mask)
    rewards = jnp.where(mask, rewards, 0.0)
    values = jnp.where(mask, values, 0.0)

    def step(carry, inputs):
        next_value, next_advantage = carry
        reward, value, real = inputs
        delta = reward + gamma * next_value - value
        advantage = delta + gamma * lam * next_advantage
        carry = (jnp.where(real, value, next_value), jnp.where(real, advantage, next_advantage))
        return carry, jnp.where(real, advantage, 0.0)

    batch = rewards.shape[0]
    init = (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.float32))
    _, advantages = jax.lax.scan(step, init, (rewards.T, values.T, mask.T), reverse=True)
    advantages = advantages.T
    returns = jnp.where(mask, advantages + values, 0.0)
    return advantages, returns


def ppo_policy_loss(
    logps,
    old_logps,
    advantages,
    mask,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    log_ratio_clip: float | None = None,
    aggregation: str = "token_mean",
    normalizer=None,
) -> tuple[Array, dict[str, Array]]:
    """PPO's clipped surrogate (Schulman et al., 2017), aggregated over tokens.

    With ``ρ = exp(logps - old_logps)``: ``L = max(-A ρ, -A clip(ρ, 1 - ε_low, 1 + ε_high))``; with ``dual_clip = c``
    (Ye et al., 2020) negative-advantage tokens use ``min(L, -A c)``.

    Defaults are TRL's former PPO trainer and OpenRLHF (no dual clip, no log-ratio clamp, token mean). verl's
    ``compute_policy_loss`` is ``dual_clip=3.0, log_ratio_clip=20.0`` (its ``clip_ratio_c`` and the ±20 clamp of
    ``log_prob - old_log_prob``). Clip-higher (DAPO) is ``clip_eps_high``. OpenRLHF's ``token_level_loss=False`` and
    verl's ``loss_agg_mode`` map to ``aggregation`` (see :func:`jrlhf.losses.aggregate_loss`).

    Args:
      logps: ``[B, T]`` log-probs of the sampled tokens under the current policy, any float dtype.
      old_logps: ``[B, T]`` log-probs under the rollout policy.
      advantages: ``[B, T]`` (or ``[B]``, broadcast over tokens) advantages.
      mask: ``[B, T]``; 1 = real token.
      clip_eps: ε_low (and ε_high unless given).
      clip_eps_high: ε_high; default ``clip_eps``.
      dual_clip: c > 1 of dual-clip PPO, or ``None``.
      log_ratio_clip: clamp of ``logps - old_logps`` before ``exp``, or ``None``.
      aggregation: ``token_mean`` (default), ``seq_mean_token_mean``, ``seq_mean_token_sum`` or ``token_sum_norm``.
      normalizer: the aggregation's global denominator (token count for ``token_mean``), default the local value.

    Returns:
      ``(loss, metrics)``: float32 scalar and verl-named local token means ``actor/pg_loss``, ``actor/pg_clipfrac``
      (fraction where the clipped term is taken), ``actor/ppo_kl`` (mean ``old_logps - logps``) and
      ``actor/pg_clipfrac_lower`` (fraction where the dual clip binds).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"ppo_policy_loss: dual_clip must be > 1, got {dual_clip}.")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"ppo_policy_loss: aggregation must be one of {AGGREGATIONS}, got {aggregation!r}.")
    logps, old_logps = _f32(logps), _f32(old_logps)
    chex.assert_rank(logps, 2, custom_message="ppo_policy_loss: logps must be [B, T]")
    chex.assert_equal_shape(
        [logps, old_logps, jnp.asarray(mask)],
        custom_message="ppo_policy_loss: logps, old_logps and mask must all be [B, T]",
    )
    mask = _bool_mask(mask)
    advantages = _f32(advantages)
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    advantages = jnp.where(mask, jnp.broadcast_to(advantages, logps.shape), 0.0)
    log_ratio = jnp.where(mask, logps, 0.0) - jnp.where(mask, old_logps, 0.0)
    if log_ratio_clip is not None:
        log_ratio = jnp.clip(log_ratio, -log_ratio_clip, log_ratio_clip)
    ratio = jnp.exp(log_ratio)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    per_token = jnp.maximum(unclipped, clipped)
    dual_bound = jnp.zeros(per_token.shape, jnp.bool_)
    if dual_clip is not None:
        dual_term = -advantages * dual_clip
        dual_bound = (per_token > dual_term) & (advantages < 0)
        per_token = jnp.where(advantages < 0, jnp.minimum(per_token, dual_term), per_token)
    loss = aggregate_loss(per_token, mask, mode=aggregation, normalizer=normalizer)
    metrics = {
        "actor/pg_loss": aggregate_loss(per_token, mask, mode=aggregation),
        "actor/pg_clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "actor/ppo_kl": masked_mean(-log_ratio, mask),
        "actor/pg_clipfrac_lower": masked_mean(_f32(dual_bound), mask),
    }
    return loss, metrics


def ppo_value_loss(
    values,
    old_values,
    returns,
    mask,
    *,
    cliprange_value: float | None = 0.2,
    aggregation: str = "token_mean",
    normalizer=None,
) -> tuple[Array, dict[str, Array]]:
    """Clipped value loss: ``0.5 * max((V - R)**2, (clip(V, V_old - c, V_old + c) - R)**2)``, aggregated.

    The 0.5 factor and the clipping are those of TRL's former PPO trainer, OpenRLHF and verl; ``cliprange_value``
    defaults to TRL's 0.2 (verl's default is 0.5; OpenRLHF's ``value_clip=None`` is ``cliprange_value=None``, no
    clipping).

    Args:
      values: ``[B, T]`` current value predictions, any float dtype.
      old_values: ``[B, T]`` value predictions at rollout time.
      returns: ``[B, T]`` targets (``returns`` of :func:`gae`).
      mask: ``[B, T]``; 1 = real token.
      cliprange_value: c, or ``None`` for the unclipped loss.
      aggregation: see :func:`jrlhf.losses.aggregate_loss`.
      normalizer: the aggregation's global denominator, default the local value.

    Returns:
      ``(loss, metrics)``: float32 scalar and local ``critic/vf_loss`` and ``critic/vf_clipfrac``.
    """
    values, old_values, returns = _f32(values), _f32(old_values), _f32(returns)
    chex.assert_rank(values, 2, custom_message="ppo_value_loss: values must be [B, T]")
    chex.assert_equal_shape(
        [values, old_values, returns, jnp.asarray(mask)],
        custom_message="ppo_value_loss: values, old_values, returns and mask must all be [B, T]",
    )
    mask = _bool_mask(mask)
    values = jnp.where(mask, values, 0.0)
    old_values = jnp.where(mask, old_values, 0.0)
    returns = jnp.where(mask, returns, 0.0)
    unclipped = jnp.square(values - returns)
    if cliprange_value is None:
        per_token = unclipped
        clipfrac = jnp.zeros((), jnp.float32)
    else:
        values_clipped = jnp.clip(values, old_values - cliprange_value, old_values + cliprange_value)
        clipped = jnp.square(values_clipped - returns)
        per_token = jnp.maximum(unclipped, clipped)
        clipfrac = masked_mean((clipped > unclipped).astype(jnp.float32), mask)
    loss = 0.5 * aggregate_loss(per_token, mask, mode=aggregation, normalizer=normalizer)
    metrics = {
        "critic/vf_loss": 0.5 * aggregate_loss(per_token, mask, mode=aggregation),
        "critic/vf_clipfrac": clipfrac,
    }
    return loss, metrics


def last_token_mask(mask) -> Array:
    """One-hot ``[B, T]`` marking each row's last real token (all zeros for an all-masked row).

    Args:
      mask: ``[B, T]``; 1 = real token.

    Returns:
      ``[B, T]`` bool.
    """
    mask = _bool_mask(mask)
    chex.assert_rank(mask, 2, custom_message="last_token_mask: mask must be [B, T]")
    length = mask.shape[1]
    last = length - 1 - jnp.argmax(mask[:, ::-1], axis=-1)
    onehot = jnp.arange(length)[None, :] == last[:, None]
    return onehot & jnp.any(mask, axis=-1, keepdims=True)


def kl_penalized_rewards(
    scores,
    logps,
    ref_logps,
    mask,
    *,
    kl_coef: float = 0.05,
    kl_kind: str = "k1",
    log_ratio_clip: float | None = None,
    kl_clip: float | None = None,
    score_clip: tuple[float, float] | None = None,
) -> tuple[Array, Array]:
    """Per-token RLHF rewards: ``-kl_coef * KL_t`` at every real token plus the sequence score at the last real one.

    This is TRL's former PPO trainer (``kl_coef`` 0.05, k1), OpenRLHF's ``compute_reward`` (``kl_clip=10.0``, its
    ``reward_clip_range`` is ``score_clip``) and verl's ``apply_kl_penalty`` (``kl_coef`` = its β; for its
    ``low_var_kl`` use ``kl_kind="k3", log_ratio_clip=20.0, kl_clip=10.0``). ``kl_coef`` may be a traced scalar
    (see :func:`adaptive_kl_update`).

    Args:
      scores: ``[B]`` sequence-level rewards (reward model or reward functions).
      logps: ``[B, T]`` rollout-policy log-probs of the sampled tokens.
      ref_logps: ``[B, T]`` reference log-probs.
      mask: ``[B, T]``; 1 = real token.
      kl_coef: KL coefficient β.
      kl_kind: estimator, see :func:`jrlhf.losses.kl_penalty`.
      log_ratio_clip: see :func:`jrlhf.losses.kl_penalty`.
      kl_clip: see :func:`jrlhf.losses.kl_penalty`.
      score_clip: optional ``(low, high)`` clamp of the scores.

    Returns:
      ``(rewards, kl)``: ``[B, T]`` float32 rewards and the per-token KL estimate (0 at masked positions).
    """
    scores = _f32(scores)
    chex.assert_rank(scores, 1, custom_message="kl_penalized_rewards: scores must be [B]")
    mask = _bool_mask(mask)
    kl = kl_penalty(logps, ref_logps, kl_kind, mask=mask, log_ratio_clip=log_ratio_clip, kl_clip=kl_clip)
    chex.assert_equal_shape_prefix(
        [scores, kl], 1,
        custom_message="kl_penalized_rewards: scores [B] must match the batch axis of logps [B, T]",
    )
    if score_clip is not None:
        scores = jnp.clip(scores, score_clip[0], score_clip[1])
    rewards = -_f32(kl_coef) * kl + jnp.where(last_token_mask(mask), scores[:, None], 0.0)
    return jnp.where(mask, rewards, 0.0), kl


def adaptive_kl_update(kl_coef, current_kl, n_steps, *, target: float, horizon: float) -> Array:
    """Adaptive KL controller of Ziegler et al. (2019), as a pure function.

    ``error = clip(current_kl / target - 1, -0.2, 0.2)``; returns ``kl_coef * (1 + error * n_steps / horizon)``.
    Same as TRL's former ``AdaptiveKLController``, OpenRLHF's and verl's.

    Args:
      kl_coef: current coefficient (scalar).
      current_kl: measured KL of the last batch (scalar, e.g. the mean per-sequence KL).
      n_steps: number of samples (or steps) since the last update (scalar).
      target: target KL.
      horizon: horizon of the controller.

    Returns:
      float32 scalar, the new coefficient.
    """
    if target <= 0 or horizon <= 0:
        raise ValueError(f"adaptive_kl_update: target and horizon must be positive, got {target}, {horizon}.")
    error = jnp.clip(_f32(current_kl) / target - 1.0, -0.2, 0.2)
    return _f32(kl_coef) * (1.0 + error * _f32(n_steps) / horizon)


def running_moments_update(mean, var, count, values, mask=None) -> tuple[Array, Array, Array]:
    """Running mean and (population) variance of a stream of values, updated with one batch (Chan, Golub and
    LeVeque's pairwise combination; what TRL's former ``RunningMoments`` and OpenRLHF's reward normaliser keep).

    With the batch's ``n`` values, mean ``m_b`` and population variance ``v_b``, ``N = count + n``,
    ``δ = m_b - mean``: ``mean' = mean + δ n / N`` and
    ``var' = (var count + v_b n + δ² count n / N) / N``; ``count' = N``. A batch with no values leaves the
    moments unchanged; from ``count = 0`` the result is the batch's own moments.

    Args:
      mean, var, count: current moments (float32 scalars; ``count`` the number of values seen).
      values: ``[B]`` new values (e.g. the sequence scores of one rollout).
      mask: optional ``[B]``; 1 = the value counts (e.g. the scorable rows).

    Returns:
      ``(mean, var, count)`` float32 scalars.
    """
    values = _f32(values)
    chex.assert_rank(values, 1, custom_message="running_moments_update: values must be [B]")
    weight = jnp.ones_like(values) if mask is None else _bool_mask(mask).astype(jnp.float32)
    n = jnp.sum(weight)
    safe_n = jnp.maximum(n, 1.0)
    batch_mean = jnp.sum(weight * values) / safe_n
    batch_var = jnp.sum(weight * jnp.square(values - batch_mean)) / safe_n
    mean, var, count = _f32(mean), _f32(var), _f32(count)
    total = count + n
    safe_total = jnp.maximum(total, 1e-30)
    delta = batch_mean - mean
    new_mean = mean + delta * n / safe_total
    new_var = (var * count + batch_var * n + jnp.square(delta) * count * n / safe_total) / safe_total
    keep = n == 0
    return (jnp.where(keep, mean, new_mean), jnp.where(keep, var, new_var), total)


def scale_scores(scores, mean, var, count, *, use_score_norm: bool = False, score_clip: float | None = None,
                 eps: float = 1.1920929e-07) -> Array:
    """Sequence scores scaled by the running standard deviation, optionally centred, then optionally clipped:
    TRL's former ``PPOConfig`` ``use_score_scaling`` / ``use_score_norm`` / ``score_clip`` (OpenRLHF's
    ``normalize_reward`` and ``reward_clip_range`` play the same role).

    ``std = sqrt(var count / (count - 1))`` (Bessel-corrected running std; 1 while ``count <= 1``);
    ``scores / (std + eps)``, or ``(scores - mean) / (std + eps)`` with ``use_score_norm``; then
    ``clip(., -score_clip, score_clip)``. ``eps`` defaults to float32's machine epsilon, as TRL's.

    Args:
      scores: ``[B]`` sequence scores.
      mean, var, count: the running moments (:func:`running_moments_update`, already including this batch).
      use_score_norm: subtract the running mean too.
      score_clip: symmetric clip bound (``None``: no clip).
      eps: added to the std.

    Returns:
      ``[B]`` float32.
    """
    scores = _f32(scores)
    count = _f32(count)
    std = jnp.where(count > 1.0, jnp.sqrt(_f32(var) * count / jnp.maximum(count - 1.0, 1e-30)), 1.0)
    centred = scores - _f32(mean) if use_score_norm else scores
    out = centred / (std + eps)
    if score_clip is not None:
        out = jnp.clip(out, -score_clip, score_clip)
    return out
