"""GRPO family: group-relative advantages and the clipped token-level policy loss with its aggregation variants
(grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo), clip-higher, two-sided clipping, GSPO's sequence-level ratio and
the k3 KL to a reference. Semantics and metric names follow TRL 1.16.0's ``GRPOTrainer``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jrlhf.losses.common import Array, _bool_mask, _f32, _groups, aggregate_loss

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
_AGGREGATION = {
    "grpo": "seq_mean_token_mean",
    "sapo": "seq_mean_token_mean",
    "bnpo": "token_mean",
    "dapo": "token_mean",
    "cispo": "token_mean",
    "dr_grpo": "token_sum_norm",
    "luspo": "seq_mean_token_sum",
}
_CLIPPED_TYPES = frozenset({"grpo", "bnpo", "dr_grpo", "dapo", "luspo"})


def grpo_advantages(
    rewards,
    group_size: int,
    *,
    scale: str = "group",
    epsilon: float = 1e-4,
    unbiased_std: bool = True,
) -> Array:
    """Group-relative advantages ``(r - mean_group(r)) / (std + ε)`` (TRL 1.16 ``scale_rewards``).

    Groups are contiguous: rewards ``[k * G : (k + 1) * G]`` belong to prompt ``k``. ``scale``:

    * ``"group"`` (TRL default): std within each group;
    * ``"batch"``: std over all rewards (the mean is still the group mean); needs the whole batch;
    * ``"none"`` (Dr. GRPO, OpenRLHF ``dr_grpo`` / ``reinforce_baseline``): no division.

    The std is Bessel-corrected (``unbiased_std=True``, as ``torch.std`` in all three libraries). TRL adds
    ``epsilon=1e-4``; OpenRLHF's ``group_norm`` is ``epsilon=1e-9``; verl's ``grpo`` is ``epsilon=1e-6``.
    NaN rewards (unscorable completions) are excluded from the statistics and get advantage 0, as in TRL; a group
    with fewer than two scorable rewards gets 0 everywhere (verl instead divides a single reward by ``1 + ε``).
    Advantages carry no gradient.

    Args:
      rewards: ``[N]`` rewards, ``N = num_prompts * group_size``, any float dtype.
      group_size: completions per prompt ``G``.
      scale: ``"group"``, ``"batch"`` or ``"none"``.
      epsilon: ε added to the std.
      unbiased_std: Bessel's correction.

    Returns:
      ``[N]`` float32 advantages.
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"grpo_advantages: scale must be 'group', 'batch' or 'none', got {scale!r}.")
    grouped, valid, clean, count = _groups(rewards, group_size, "grpo_advantages")
    mean = jnp.sum(clean, axis=1, keepdims=True) / jnp.maximum(count, 1.0)
    centred = jnp.where(valid, clean - mean, 0.0)
    ok = valid & (count > 1)
    if scale == "group":
        dof = count - 1.0 if unbiased_std else count
        std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / jnp.maximum(dof, 1.0))
        advantages = centred / (std + epsilon)
    elif scale == "batch":
        total = jnp.sum(count)
        batch_mean = jnp.sum(clean) / jnp.maximum(total, 1.0)
        dof = total - 1.0 if unbiased_std else total
        batch_var = jnp.sum(jnp.where(valid, jnp.square(clean - batch_mean), 0.0)) / jnp.maximum(dof, 1.0)
        advantages = centred / (jnp.sqrt(batch_var) + epsilon)
        ok = valid & (total > 1)
    else:
        advantages = centred
    return jnp.where(ok, advantages, 0.0).reshape(-1)


def _trl_mean(x: Array, mask: Array) -> Array:
    """TRL's ``global_masked_mean`` (local): per-sequence values ``[B, 1]`` average over sequences, else tokens."""
    x = _f32(x)
    if x.shape[1] == 1:
        return jnp.mean(x)
    maskf = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(maskf), 1.0)


def _seq_means(x: Array, mask: Array) -> tuple[Array, Array]:
    """Per-sequence means of ``x`` and which sequences have any real token."""
    x = _f32(x)
    if x.shape[1] == 1:
        return x[:, 0], jnp.ones((x.shape[0],), jnp.bool_)
    count = jnp.sum(mask, axis=-1).astype(jnp.float32)
    return jnp.sum(jnp.where(mask, x, 0.0), axis=-1) / jnp.maximum(count, 1.0), count > 0


def grpo_loss(
    logps,
    old_logps,
    ref_logps,
    advantages,
    mask,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    importance_sampling_level: str = "token",
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    kl_importance_correction: bool = True,
    token_weights=None,
    entropies=None,
    normalizer=None,
) -> tuple[Array, dict[str, Array]]:
    """GRPO-family policy loss of TRL 1.16's ``GRPOTrainer``.

    Ratio ``ρ = exp(logps - old_logps)`` per token, or with ``importance_sampling_level="sequence"`` (GSPO) the
    exponential of the per-sequence token-mean log-ratio, broadcast over tokens. Per-token loss by ``loss_type``:

    * grpo, bnpo, dr_grpo, dapo, luspo: ``-min(ρ' A, clip(ρ, 1 - ε_low, 1 + ε_high) A)`` where ``ρ' = min(ρ, δ)``
      with the two-sided ``delta`` (INTELLECT-2) and ``ρ' = ρ`` otherwise;
    * cispo: ``-sg(min(ρ, ε_high)) A logps`` (``epsilon_high`` is the absolute cap; ScaleRL recommends 5.0);
    * sapo: ``-σ(τ(ρ - 1)) 4 / τ A`` with ``τ = sapo_temperature_pos`` if ``A > 0`` else ``sapo_temperature_neg``.

    ``token_weights`` multiply the policy term (TRL applies its off-policy mask, entropy mask and vLLM
    importance-sampling ratio this way). With ``beta > 0`` the k3 KL ``exp(ref - logp) - (ref - logp) - 1``, times
    ``ρ`` when ``kl_importance_correction`` (TRL's ``use_bias_correction_kl``, default on), is added as ``β KL``.

    Aggregation and the ``normalizer`` it replaces: grpo and sapo average per-sequence token means over sequences
    (normalizer: number of sequences); bnpo, dapo and cispo divide the token sum by the token count (normalizer: the
    token count of the whole accumulated batch: that is dapo; the local count is bnpo); dr_grpo divides the token
    sum by ``B * max_completion_length`` (normalizer: that product for the whole batch); luspo averages per-sequence
    token sums over sequences.

    ``old_logps=None`` means on-policy (``old = stop_gradient(logps)``, TRL's shortcut); ``ref_logps`` may be
    ``None`` when ``beta == 0``. Defaults are TRL 1.16's (dapo, β = 0, ε = 0.2, ε_high = ε).

    Args:
      logps: ``[B, T]`` policy log-probs of the sampled completion tokens, any float dtype.
      old_logps: ``[B, T]`` rollout-policy log-probs, or ``None``.
      ref_logps: ``[B, T]`` reference log-probs, or ``None`` when ``beta == 0``.
      advantages: ``[B]`` (broadcast over tokens) or ``[B, T]`` advantages.
      mask: ``[B, T]`` completion mask; 1 = real token.
      beta: KL coefficient.
      epsilon_low: lower clip ε.
      epsilon_high: upper clip ε (clip-higher, DAPO: 0.28); default ``epsilon_low``.
      loss_type: one of ``GRPO_LOSS_TYPES``.
      max_completion_length: dr_grpo's constant; default ``T``.
      importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO).
      delta: upper clamp of the unclipped ratio (two-sided GRPO), or ``None``.
      sapo_temperature_pos: SAPO τ for positive advantages.
      sapo_temperature_neg: SAPO τ for non-positive advantages.
      kl_importance_correction: multiply the KL by the ratio.
      token_weights: optional ``[B, T]`` (or ``[B, 1]``) multiplier of the policy term.
      entropies: optional ``[B, T]`` token entropies, only for the ``entropy`` metric.
      normalizer: the aggregation's global denominator (see above); default the local value.

    Returns:
      ``(loss, metrics)``: float32 scalar and local metrics named as TRL logs them: ``kl`` (if ``beta != 0``),
      ``entropy`` (if ``entropies``), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``,
      ``clip_ratio/low_min``, ``clip_ratio/high_max`` (clipped types) or ``cispo_clip_ratio`` (cispo).
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"grpo_loss: loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}.")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(
            f"grpo_loss: importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}."
        )
    if beta != 0.0 and ref_logps is None:
        raise ValueError("grpo_loss: beta != 0 needs ref_logps (the reference model's token log-probs).")
    eps_high = epsilon_low if epsilon_high is None else epsilon_high

    logps = _f32(logps)
    chex.assert_rank(logps, 2, custom_message="grpo_loss: logps must be [B, T]")
    chex.assert_equal_shape([logps, jnp.asarray(mask)], custom_message="grpo_loss: logps and mask must both be [B, T]")
    mask = _bool_mask(mask)
    logps = jnp.where(mask, logps, 0.0)
    if old_logps is None:
        old_logps = jax.lax.stop_gradient(logps)
    else:
        chex.assert_equal_shape(
            [logps, jnp.asarray(old_logps)],
            custom_message="grpo_loss: old_logps must be [B, T] like logps",
        )
        old_logps = jnp.where(mask, _f32(old_logps), 0.0)
    advantages = _f32(advantages)
    if advantages.ndim == 1:
        chex.assert_equal_shape_prefix(
            [advantages, logps], 1,
            custom_message="grpo_loss: advantages must be [B] or [B, T]",
        )
        advantages = advantages[:, None]
    else:
        chex.assert_equal_shape([advantages, logps], custom_message="grpo_loss: advantages must be [B] or [B, T]")
        advantages = jnp.where(mask, advantages, 0.0)

    log_ratio = logps - old_logps
    if importance_sampling_level == "token":
        log_weights = log_ratio
    else:
        count = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True).astype(jnp.float32), 1.0)
        log_weights = jnp.sum(log_ratio, axis=-1, keepdims=True) / count
    coef_1 = jnp.exp(log_weights)

    per_token_kl = None
    if beta != 0.0:
        ref = _f32(ref_logps)
        chex.assert_equal_shape([logps, ref], custom_message="grpo_loss: ref_logps must be [B, T] like logps")
        ref_minus = jnp.where(mask, ref, 0.0) - logps
        per_token_kl = jnp.exp(ref_minus) - ref_minus - 1.0
        if kl_importance_correction:
            per_token_kl = per_token_kl * coef_1

    if loss_type == "cispo":
        capped = jax.lax.stop_gradient(jnp.minimum(coef_1, eps_high))
        per_token_loss = -capped * advantages * logps
    elif loss_type == "sapo":
        temperature = jnp.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token_loss = -jax.nn.sigmoid(temperature * (coef_1 - 1.0)) * 4.0 / temperature * advantages
    else:
        coef_2 = jnp.clip(coef_1, 1.0 - epsilon_low, 1.0 + eps_high)
        if delta is not None:
            coef_1 = jnp.minimum(coef_1, delta)
        per_token_loss = -jnp.minimum(coef_1 * advantages, coef_2 * advantages)
    if token_weights is not None:
        weights = jnp.broadcast_to(_f32(token_weights), mask.shape)
        per_token_loss = per_token_loss * jnp.where(mask, weights, 0.0)
    if per_token_kl is not None:
        per_token_loss = per_token_loss + beta * per_token_kl

    loss = aggregate_loss(
        per_token_loss,
        mask,
        mode=_AGGREGATION[loss_type],
        normalizer=normalizer,
        max_completion_length=max_completion_length,
    )

    metrics: dict[str, Array] = {}
    if per_token_kl is not None:
        metrics["kl"] = _trl_mean(per_token_kl, mask)
    if entropies is not None:
        metrics["entropy"] = _trl_mean(entropies, mask)
    if loss_type in _CLIPPED_TYPES:
        low = (coef_1 < 1.0 - epsilon_low) & (advantages < 0)
        high = (coef_1 > 1.0 + eps_high) & (advantages > 0)
        metrics["clip_ratio/low_mean"] = _trl_mean(low, mask)
        metrics["clip_ratio/high_mean"] = _trl_mean(high, mask)
        metrics["clip_ratio/region_mean"] = _trl_mean(low | high, mask)
        low_seq, has_tokens = _seq_means(low, mask)
        high_seq, _ = _seq_means(high, mask)
        any_seq = jnp.any(has_tokens)
        metrics["clip_ratio/low_min"] = jnp.where(any_seq, jnp.min(jnp.where(has_tokens, low_seq, jnp.inf)), 0.0)
        metrics["clip_ratio/high_max"] = jnp.where(any_seq, jnp.max(jnp.where(has_tokens, high_seq, -jnp.inf)), 0.0)
    elif loss_type == "cispo":
        metrics["cispo_clip_ratio"] = _trl_mean((coef_1 > eps_high) & (advantages > 0), mask)
    return loss, metrics
