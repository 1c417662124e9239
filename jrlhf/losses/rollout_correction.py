"""Rollout/train mismatch: importance weights that correct for the sampler's numerics, the metrics that measure the
mismatch, and the high-entropy token selection of "Beyond the 80/20 Rule" (TRL's ``top_entropy_quantile``).

The sampler (a KV-cache decode) and the trainer (a full forward, possibly in another precision or kernel) give the
same policy different log-probs. With ``log r = logp_trainer - logp_sampler`` on each sampled completion token:

* token level: ``r_t = exp(log r_t)``; sequence level: ``r = exp(sum_t log r_t)`` (the product of the token
  ratios), broadcast over the sequence's tokens;
* ``*_truncate`` (truncated IS, "TIS"): the weight ``clip(r, C_min, C_max)`` multiplies the per-token policy loss;
* ``*_mask`` (masked IS / rejection): tokens (sequences) whose ratio leaves ``[C_min, C_max]`` are dropped from the
  loss mask, so they leave every count the loss divides by (verl's ``rollout_rs`` semantics); the kept ones keep
  their ratio as weight (TRL's mask modes).

Mode names and bounds are TRL 1.16's (``vllm_importance_sampling_mode``, ``vllm_importance_sampling_clip_max``
default 3, ``vllm_importance_sampling_clip_min`` default none). The weights carry no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jrlhf.losses.common import Array, _bool_mask, _f32

IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _check(mode: str, clip_min, clip_max) -> None:
    if mode not in IS_MODES:
        raise ValueError(f"rollout correction: mode must be one of {IS_MODES}, got {mode!r}.")
    if mode.endswith("_truncate") and clip_max is None:
        raise ValueError(f"rollout correction: {mode} needs clip_max (the cap C of the truncated weight).")
    if clip_max is not None and clip_max <= 0 or clip_min is not None and clip_min < 0:
        raise ValueError(f"rollout correction: bounds must be positive, got clip_min={clip_min}, clip_max={clip_max}.")
    if clip_max is not None and clip_min is not None and clip_min > clip_max:
        raise ValueError(f"rollout correction: clip_min={clip_min} > clip_max={clip_max}.")


def rollout_log_ratio(trainer_logps, sampler_logps, mask) -> Array:
    """``logp_trainer - logp_sampler`` on the masked tokens, 0 elsewhere: ``[B, T]`` float32."""
    mask = _bool_mask(mask)
    return jnp.where(mask, _f32(trainer_logps) - _f32(sampler_logps), 0.0)


def rollout_importance_weights(trainer_logps, sampler_logps, mask, *, mode: str = "token_truncate",
                               clip_max: float | None = 3.0, clip_min: float | None = None) -> tuple[Array, Array]:
    """Importance weights of a rollout's completion tokens against the sampler (TRL 1.16's
    ``vllm_importance_sampling_mode``; see the module docstring for the four modes).

    Args:
      trainer_logps: ``[B, T]`` the trained policy's log-probs of the sampled tokens, recomputed by the trainer's
        forward at the rollout's params (the old log-probs of the PPO ratio), any float dtype.
      sampler_logps: ``[B, T]`` the sampler's log-probs of the same tokens (same temperature).
      mask: ``[B, T]`` completion tokens trained on (1 = real).
      mode: ``token_truncate``, ``token_mask``, ``sequence_truncate`` or ``sequence_mask``.
      clip_max: ``C_max`` (TRL default 3); ``None`` only in the mask modes (no upper bound).
      clip_min: ``C_min`` (default none: no lower clip / bound).

    Returns:
      ``(weights [B, T] float32, keep [B, T] bool)``: the weight multiplying each token's policy loss (0 on padding
      and dropped tokens), and the mask after the mask modes' drops (``mask`` itself in the truncate modes). No
      gradient.

    Raises:
      ValueError: an unknown mode, or bounds that are not ``0 <= C_min <= C_max``.
    """
    _check(mode, clip_min, clip_max)
    mask = _bool_mask(mask)
    log_ratio = jax.lax.stop_gradient(rollout_log_ratio(trainer_logps, sampler_logps, mask))
    if mode.startswith("sequence"):
        log_ratio = jnp.broadcast_to(jnp.sum(log_ratio, axis=-1, keepdims=True), mask.shape)
    upper = jnp.inf if clip_max is None else jnp.log(jnp.float32(clip_max))
    lower = -jnp.inf if not clip_min else jnp.log(jnp.float32(clip_min))
    if mode.endswith("_truncate"):
        # clip in log space: exp never overflows for a long sequence's sum
        weights = jnp.exp(jnp.clip(log_ratio, lower, upper))
        keep = mask
    else:
        inside = (log_ratio >= lower) & (log_ratio <= upper)
        keep = mask & inside
        weights = jnp.exp(jnp.where(keep, log_ratio, 0.0))
    return jnp.where(keep, weights, 0.0), keep


def rollout_mismatch_metrics(trainer_logps, sampler_logps, mask, *, clip_max: float = 3.0,
                             clip_min: float | None = None) -> dict[str, Array]:
    """How far the sampler's log-probs are from the trainer's, over the masked completion tokens of the whole batch
    (float32 scalars; 0 when no token is masked in):

    * ``sampling/sampling_logp_difference/mean`` and ``.../max``: mean and max of ``|logp_sampler - logp_trainer|``
      (TRL's names);
    * ``sampling/k3_kl``: mean of ``r - 1 - log r`` with ``log r = logp_trainer - logp_sampler``, the k3 estimate of
      ``KL(sampler || trainer)`` from the sampler's tokens (Schulman's k3; verl's ``rollout_corr/k3_kl``);
    * ``sampling/importance_sampling_ratio/frac_outside``: the share of tokens whose ratio ``r`` leaves
      ``[C_min, C_max]`` (``C_min`` default ``1 / C_max``), i.e. those a ``token_mask`` correction would drop.
    """
    mask = _bool_mask(mask)
    count = jnp.sum(mask.astype(jnp.float32))
    denom = jnp.maximum(count, 1.0)
    log_ratio = rollout_log_ratio(trainer_logps, sampler_logps, mask)
    diff = jnp.abs(log_ratio)
    # r - 1 - log r; near r = 1 its Taylor series (float32 exp(x) - 1 - x cancels to noise once |x| < 1e-3,
    # the size of a float32 sampler/trainer mismatch)
    x = log_ratio
    series = x * x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x / 120.0)))
    k3 = jnp.where(mask, jnp.where(jnp.abs(x) < 1e-2, series, jnp.expm1(x) - x), 0.0)
    lower = jnp.log(jnp.float32(clip_min if clip_min else 1.0 / clip_max))
    outside = mask & ((log_ratio < lower) | (log_ratio > jnp.log(jnp.float32(clip_max))))
    return {
        "sampling/sampling_logp_difference/mean": jnp.sum(diff) / denom,
        "sampling/sampling_logp_difference/max": jnp.max(jnp.where(mask, diff, 0.0)),
        "sampling/k3_kl": jnp.sum(k3) / denom,
        "sampling/importance_sampling_ratio/frac_outside": jnp.sum(outside.astype(jnp.float32)) / denom,
    }


def importance_weight_metrics(weights, keep, mask, mode: str) -> dict[str, Array]:
    """TRL's ``sampling/importance_sampling_ratio/{min,mean,max}`` of the applied weights (over the kept tokens; per
    sequence in the sequence modes) and ``sampling/importance_sampling_ratio/dropped_frac``: the share of tokens
    (token modes) or sequences (sequence modes, counting those with any token) the mask modes dropped."""
    mask = _bool_mask(mask)
    keep = _bool_mask(keep)
    weights = _f32(weights)
    if mode.startswith("sequence"):
        has = jnp.any(mask, axis=-1)
        kept = jnp.any(keep, axis=-1)
        values = jnp.max(jnp.where(keep, weights, 0.0), axis=-1)
        total, dropped, where = jnp.sum(has), jnp.sum(has & ~kept), kept
    else:
        values, total, dropped, where = weights, jnp.sum(mask), jnp.sum(mask & ~keep), keep
    n = jnp.sum(where.astype(jnp.float32))
    return {
        "sampling/importance_sampling_ratio/min": jnp.where(n > 0, jnp.min(jnp.where(where, values, jnp.inf)), 0.0),
        "sampling/importance_sampling_ratio/mean": jnp.sum(jnp.where(where, values, 0.0)) / jnp.maximum(n, 1.0),
        "sampling/importance_sampling_ratio/max": jnp.where(n > 0, jnp.max(jnp.where(where, values, -jnp.inf)), 0.0),
        "sampling/importance_sampling_ratio/dropped_frac": dropped.astype(jnp.float32)
        / jnp.maximum(total.astype(jnp.float32), 1.0),
    }


def high_entropy_mask(entropies, mask, top_entropy_quantile: float) -> Array:
    """The tokens kept by TRL's ``top_entropy_quantile`` ρ ("Beyond the 80/20 Rule", arXiv 2506.01939): those whose
    entropy is at least the ``1 - ρ`` quantile (linear interpolation, as ``torch.quantile``) of the masked tokens'
    entropies. ``ρ = 1`` keeps every masked token; ``ρ = 0`` keeps the highest-entropy token(s) only.

    Args:
      entropies: ``[B, T]`` token entropies (nats), any float dtype.
      mask: ``[B, T]`` tokens that enter the quantile and may be kept (1 = real).
      top_entropy_quantile: ρ in ``[0, 1]`` (static).

    Returns:
      ``[B, T]`` bool, a subset of ``mask``; all False when ``mask`` is empty. No gradient.
    """
    if not 0.0 <= top_entropy_quantile <= 1.0:
        raise ValueError(f"high_entropy_mask: top_entropy_quantile must be in [0, 1], got {top_entropy_quantile}.")
    mask = _bool_mask(mask)
    if top_entropy_quantile >= 1.0:
        return mask
    values = jax.lax.stop_gradient(_f32(entropies))
    flat = jnp.sort(jnp.where(mask, values, jnp.inf).reshape(-1))
    n = jnp.sum(mask.astype(jnp.int32))
    position = (1.0 - top_entropy_quantile) * jnp.maximum(n - 1, 0).astype(jnp.float32)
    low = jnp.floor(position).astype(jnp.int32)
    high = jnp.minimum(low + 1, jnp.maximum(n - 1, 0))
    frac = position - low.astype(jnp.float32)
    threshold = flat[low] + frac * (flat[high] - flat[low])
    threshold = jnp.where(frac > 0, threshold, flat[low])  # no inf - inf when the position is exact
    return mask & (values >= threshold) & (n > 0)
