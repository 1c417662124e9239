"""Critic-free REINFORCE variants: RLOO (leave-one-out baseline), REINFORCE++ (KL-penalised token rewards, reward-to-go
and global whitening) and ReMax (greedy-rollout baseline), plus discounted returns.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jrlhf.losses.common import Array, _bool_mask, _f32, _groups, aggregate_loss, masked_whiten
from jrlhf.losses.ppo import kl_penalized_rewards, last_token_mask


def rloo_advantages(
    rewards,
    group_size: int,
    *,
    normalize: bool = False,
    epsilon: float = 1e-4,
) -> Array:
    """RLOO advantages ``r_i - mean_{j != i} r_j`` within each contiguous group of ``group_size`` (Ahmadian et al.).

    Same in TRL 1.16, OpenRLHF (``rloo``) and verl (``rloo``, written ``G/(G-1) (r - mean)``). TRL's sequence-level KL
    penalty is applied to the rewards first: pass ``rewards - beta * masked_sum(kl_penalty(old_logps, ref_logps,
    "k1"), mask, axis=-1)``. ``normalize=True`` is TRL's ``normalize_advantages``: ``(A - mean) / (std + ε)`` over
    the batch (Bessel-corrected std), which needs the whole batch. NaN rewards (unscorable) are left out of the
    baselines and get advantage 0, as in TRL; so does a group with fewer than two scorable rewards. Advantages
    carry no gradient.

    Args:
      rewards: ``[N]`` rewards, ``N = num_prompts * group_size``, any float dtype.
      group_size: completions per prompt (>= 2 for a non-zero advantage).
      normalize: whiten the advantages over the batch.
      epsilon: ε of the normalisation.

    Returns:
      ``[N]`` float32 advantages.
    """
    grouped, valid, clean, count = _groups(rewards, group_size, "rloo_advantages")
    baseline = (jnp.sum(clean, axis=1, keepdims=True) - clean) / jnp.maximum(count - 1.0, 1.0)
    ok = (valid & (count > 1)).reshape(-1)
    advantages = (clean - baseline).reshape(-1)
    if normalize:
        n = jnp.sum(ok).astype(jnp.float32)
        mean = jnp.sum(jnp.where(ok, advantages, 0.0)) / jnp.maximum(n, 1.0)
        var = jnp.sum(jnp.where(ok, jnp.square(advantages - mean), 0.0)) / jnp.maximum(n - 1.0, 1.0)
        advantages = (advantages - mean) / (jnp.sqrt(var) + epsilon)
        ok = ok & (n > 1)
    return jnp.where(ok, advantages, 0.0)


def rloo_loss(
    seq_logps,
    old_seq_logps,
    advantages,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    normalizer=None,
) -> tuple[Array, dict[str, Array]]:
    """TRL 1.16's RLOO policy loss: PPO clipping on the *sequence* ratio, averaged over sequences.

    ``ρ = exp(seq_logps - old_seq_logps)``, per-sequence loss ``-min(ρ A, clip(ρ, 1 - ε_low, 1 + ε_high) A)``,
    summed and divided by ``normalizer`` (default: the number of sequences ``B``; pass the global count of the
    accumulated batch under micro-batching).

    Args:
      seq_logps: ``[B]`` policy log-probs of each completion, summed over its tokens
        (``masked_sum(token_logps, mask, axis=-1)``).
      old_seq_logps: ``[B]`` same under the rollout policy.
      advantages: ``[B]`` advantages (:func:`rloo_advantages`).
      epsilon_low: lower clip ε.
      epsilon_high: upper clip ε; default ``epsilon_low``.
      normalizer: global number of sequences.

    Returns:
      ``(loss, metrics)``: float32 scalar and local ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
      ``clip_ratio/region_mean``, ``clip_ratio/low_min``, ``clip_ratio/high_max``, as TRL logs them.
    """
    seq_logps, old_seq_logps, advantages = _f32(seq_logps), _f32(old_seq_logps), _f32(advantages)
    chex.assert_rank(seq_logps, 1, custom_message="rloo_loss: seq_logps must be [B] (summed over tokens)")
    chex.assert_equal_shape(
        [seq_logps, old_seq_logps, advantages],
        custom_message="rloo_loss: seq_logps, old_seq_logps and advantages must all be [B]",
    )
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    ratio = jnp.exp(seq_logps - old_seq_logps)
    clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + eps_high)
    per_sequence = -jnp.minimum(ratio * advantages, clipped * advantages)
    ones = jnp.ones((seq_logps.shape[0], 1), jnp.bool_)
    loss = aggregate_loss(per_sequence[:, None], ones, mode="seq_mean_token_sum", normalizer=normalizer)
    low = ((ratio < 1.0 - epsilon_low) & (advantages < 0)).astype(jnp.float32)
    high = ((ratio > 1.0 + eps_high) & (advantages > 0)).astype(jnp.float32)
    region = jnp.maximum(low, high)
    metrics = {
        "clip_ratio/low_mean": jnp.mean(low),
        "clip_ratio/low_min": jnp.min(low),
        "clip_ratio/high_mean": jnp.mean(high),
        "clip_ratio/high_max": jnp.max(high),
        "clip_ratio/region_mean": jnp.mean(region),
    }
    return loss, metrics


def discounted_returns(rewards, mask, *, gamma: float = 1.0) -> Array:
    """Reward-to-go ``G_t = r_t + γ G_next`` over real tokens, a right-to-left ``lax.scan``.

    Masked tokens are skipped (their reward is ignored and the discount is not applied across them), so the
    return at each real token is the discounted sum of the rewards at the real tokens after it. With right-padded
    masks this equals OpenRLHF's ``get_cumulative_returns`` and verl's REINFORCE++ returns; with ``gamma = 1`` (the
    default of all REINFORCE variants) it equals them for any mask.

    Args:
      rewards: ``[B, T]`` per-token rewards, any float dtype.
      mask: ``[B, T]``; 1 = real token.
      gamma: discount γ.

    Returns:
      ``[B, T]`` float32 returns, 0 at masked positions.
    """
    rewards = _f32(rewards)
    chex.assert_rank(rewards, 2, custom_message="discounted_returns: rewards must be [B, T]")
    chex.assert_equal_shape(
        [rewards, jnp.asarray(mask)],
        custom_message="discounted_returns: rewards and mask must both be [B, T]",
    )
    mask = _bool_mask(mask)
    rewards = jnp.where(mask, rewards, 0.0)

    def step(next_return, inputs):
        reward, real = inputs
        current = reward + gamma * next_return
        return jnp.where(real, current, next_return), jnp.where(real, current, 0.0)

    _, returns = jax.lax.scan(
        step, jnp.zeros((rewards.shape[0],), jnp.float32), (rewards.T, mask.T), reverse=True
    )
    return returns.T


def reinforce_pp_advantages(
    scores,
    mask,
    *,
    logps=None,
    ref_logps=None,
    kl_coef: float = 0.0,
    kl_kind: str = "k1",
    log_ratio_clip: float | None = None,
    kl_clip: float | None = None,
    gamma: float = 1.0,
    group_size: int | None = None,
    whiten: bool = True,
    unbiased: bool = False,
    eps: float = 1e-8,
    eps_mode: str = "clamp",
) -> tuple[Array, Array]:
    """REINFORCE++ advantages (Hu, 2025): token-level KL in the reward, reward-to-go, global batch whitening.

    Rewards are ``-kl_coef * KL_t`` per token plus the score at the last real token
    (:func:`jrlhf.losses.kl_penalized_rewards`), returns are :func:`discounted_returns`, and the advantages are the
    returns whitened over *all* real tokens of the batch, so this needs the whole batch: compute it before
    splitting into micro-batches. With ``group_size`` the scores first have their group mean subtracted
    (REINFORCE++-baseline; groups contiguous as in :func:`jrlhf.losses.grpo_advantages`).

    Defaults are OpenRLHF's (``reinforce`` / ``reinforce_baseline``): biased variance, ``rsqrt(max(var, 1e-8))``;
    add ``kl_clip=10.0`` for its ``compute_approx_kl`` clamp. verl's ``reinforce_plus_plus`` is ``unbiased=True,
    eps_mode="add"`` (its KL-in-reward is ``kl_kind="k1"``). Advantages carry no gradient.

    A NaN score marks an unscorable completion (no reward applied to it): its row is left out of the group means,
    of the whitening statistics and of the returned mask's tokens, and gets advantage and return 0.

    Args:
      scores: ``[B]`` sequence rewards (NaN: unscorable).
      mask: ``[B, T]``; 1 = real token.
      logps: ``[B, T]`` rollout-policy token log-probs (needed when ``kl_coef != 0``).
      ref_logps: ``[B, T]`` reference token log-probs (needed when ``kl_coef != 0``).
      kl_coef: KL coefficient in the reward.
      kl_kind: KL estimator, see :func:`jrlhf.losses.kl_penalty`.
      log_ratio_clip: see :func:`jrlhf.losses.kl_penalty`.
      kl_clip: see :func:`jrlhf.losses.kl_penalty`.
      gamma: discount γ.
      group_size: subtract group-mean scores first (REINFORCE++-baseline), or ``None``.
      whiten: whiten the returns over the batch (``False``: OpenRLHF ``no_advantage_std_norm`` still centres; use
        ``returns`` directly for neither).
      unbiased: Bessel-corrected variance in the whitening.
      eps: variance floor.
      eps_mode: ``"clamp"`` or ``"add"``, see :func:`jrlhf.losses.masked_whiten`.

    Returns:
      ``(advantages, returns)``, ``[B, T]`` float32, 0 at masked positions.
    """
    scores = jax.lax.stop_gradient(_f32(scores))
    chex.assert_rank(scores, 1, custom_message="reinforce_pp_advantages: scores must be [B]")
    mask = _bool_mask(mask)
    chex.assert_rank(mask, 2, custom_message="reinforce_pp_advantages: mask must be [B, T]")
    scorable = ~jnp.isnan(scores)
    mask = mask & scorable[:, None]
    if group_size is not None:
        if group_size < 1 or scores.shape[0] % group_size:
            raise ValueError(
                f"reinforce_pp_advantages: {scores.shape[0]} scores do not split into groups of {group_size}."
            )
        _, valid, clean, count = _groups(scores, group_size, "reinforce_pp_advantages")
        mean = jnp.sum(clean, axis=1, keepdims=True) / jnp.maximum(count, 1.0)
        scores = jnp.where(valid, clean - mean, 0.0).reshape(-1)
    scores = jnp.where(scorable, scores, 0.0)
    if logps is None or ref_logps is None:
        if not (isinstance(kl_coef, (int, float)) and kl_coef == 0):
            raise ValueError("reinforce_pp_advantages: kl_coef != 0 needs logps and ref_logps.")
        rewards = jnp.where(last_token_mask(mask), scores[:, None], 0.0)
    else:
        rewards, _ = kl_penalized_rewards(
            scores,
            jax.lax.stop_gradient(_f32(logps)),
            jax.lax.stop_gradient(_f32(ref_logps)),
            mask,
            kl_coef=kl_coef,
            kl_kind=kl_kind,
            log_ratio_clip=log_ratio_clip,
            kl_clip=kl_clip,
        )
    returns = discounted_returns(rewards, mask, gamma=gamma)
    if whiten:
        advantages = masked_whiten(returns, mask, unbiased=unbiased, eps=eps, eps_mode=eps_mode)
    else:
        mean = jnp.sum(returns) / jnp.maximum(jnp.sum(mask).astype(jnp.float32), 1.0)
        advantages = jnp.where(mask, returns - mean, 0.0)
    return advantages, returns


def remax_advantages(rewards, baseline_scores, mask) -> tuple[Array, Array]:
    """ReMax advantages (Li et al., 2023): undiscounted reward-to-go minus the greedy rollout's score.

    ``returns_t = sum_{s >= t} r_s`` over real tokens and ``A_t = returns_t - b`` with ``b`` the reward of the
    greedy completion of the same prompt (computed by the caller and passed in). Same as verl's ``remax``.

    Args:
      rewards: ``[B, T]`` per-token rewards (possibly KL-penalised), or ``[B]`` sequence scores (placed at the last
        real token); NaN marks an unscorable completion.
      baseline_scores: ``[B]`` scores of the greedy completions.
      mask: ``[B, T]``; 1 = real token.

    Returns:
      ``(advantages, returns)``, ``[B, T]`` float32, 0 at masked positions and on unscorable rows (a NaN sequence
      score or a NaN reward on a real token, or a NaN baseline: the greedy completion could not be scored). No
      gradient.
    """
    mask = _bool_mask(mask)
    chex.assert_rank(mask, 2, custom_message="remax_advantages: mask must be [B, T]")
    rewards = jax.lax.stop_gradient(_f32(rewards))
    if rewards.ndim == 1:
        rewards = jnp.where(last_token_mask(mask), rewards[:, None], 0.0)
    chex.assert_equal_shape([rewards, mask], custom_message="remax_advantages: rewards must be [B] or [B, T] like mask")
    baseline = jax.lax.stop_gradient(_f32(baseline_scores))
    chex.assert_shape(baseline, (mask.shape[0],), custom_message="remax_advantages: baseline_scores must be [B]")
    scorable = ~jnp.isnan(baseline) & ~jnp.any(mask & jnp.isnan(rewards), axis=-1)
    mask = mask & scorable[:, None]
    rewards = jnp.where(mask, rewards, 0.0)
    baseline = jnp.where(scorable, baseline, 0.0)
    returns = discounted_returns(rewards, mask, gamma=1.0)
    return jnp.where(mask, returns - baseline[:, None], 0.0), returns
