"""Masked statistics, token log-probabilities, entropy, KL estimators and loss aggregation.

Conventions shared by the whole loss library:

* Every function takes arrays and returns arrays; nothing here calls a model.
* Masks are explicit, ``1`` (or ``True``) marks a real token, ``0`` padding. Masks may be bool, int or float.
* Inputs of any floating dtype (bf16 included) are promoted to float32 before any arithmetic; outputs are float32.
* Values at masked positions never reach a nonlinearity: they are replaced with ``jnp.where`` first, so any value
  there (``±1e6``, ``inf``) changes neither a loss nor its gradient.
* Token-level losses that aggregate take ``normalizer``: the denominator of the final aggregation (token count,
  sequence count or ``B * max_completion_length``, see :func:`aggregate_loss`). Leaving it ``None`` uses the local
  value; passing the value of the whole accumulated batch makes micro-batch losses *sum* to the full-batch loss.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp

Array = jax.Array

KL_KINDS = ("k1", "k2", "k3", "abs", "mse")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm")


def _f32(x) -> Array:
    """Returns ``x`` as a float32 array (bf16/fp16/int inputs are promoted)."""
    return jnp.asarray(x, dtype=jnp.float32)


def _groups(rewards, group_size: int, name: str):
    """Splits ``[N]`` rewards into contiguous groups: ``(grouped [G, k], valid [G, k], clean [G, k], count [G, 1])``
    with NaN rewards (not scorable) marked invalid and zeroed in ``clean``; gradient stopped."""
    rewards = jax.lax.stop_gradient(_f32(rewards))
    chex.assert_rank(rewards, 1, custom_message=f"{name}: rewards must be [N] (one per completion)")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"{name}: {rewards.shape[0]} rewards do not split into groups of {group_size}; "
            "pass all completions of each prompt together."
        )
    grouped = rewards.reshape(-1, group_size)
    valid = ~jnp.isnan(grouped)
    clean = jnp.where(valid, grouped, 0.0)
    count = jnp.sum(valid, axis=1, keepdims=True).astype(jnp.float32)
    return grouped, valid, clean, count


def _bool_mask(mask) -> Array:
    """Returns ``mask`` as a bool array (nonzero = real)."""
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def _denominator(count: Array, normalizer) -> Array:
    """The aggregation denominator: ``normalizer`` if given, else ``max(count, 1)``; never zero."""
    if normalizer is None:
        return jnp.maximum(_f32(count), 1.0)
    normalizer = _f32(normalizer)
    return jnp.where(normalizer > 0, normalizer, 1.0)


def masked_sum(values, mask, axis=None) -> Array:
    """Sum of ``values`` over positions where ``mask`` is set.

    Args:
      values: ``[...]`` array, any float dtype.
      mask: same shape as ``values`` (or broadcastable to it); 1 = include.
      axis: axis or axes to reduce; ``None`` reduces everything.

    Returns:
      float32 array with ``axis`` reduced. Values at masked positions (even NaN/inf) do not contribute.
    """
    values = _f32(values)
    mask = jnp.broadcast_to(_bool_mask(mask), values.shape)
    return jnp.sum(jnp.where(mask, values, 0.0), axis=axis)


def masked_mean(values, mask, axis=None, normalizer=None) -> Array:
    """Mean of ``values`` over positions where ``mask`` is set.

    Args:
      values: ``[...]`` array, any float dtype.
      mask: same shape as ``values`` (or broadcastable); 1 = include.
      axis: axis or axes to reduce; ``None`` reduces everything.
      normalizer: optional denominator replacing the local count of real positions (e.g. the token count of the whole
        accumulated batch, so that micro-batch means sum to the full-batch mean). Scalar or broadcastable to the
        reduced shape.

    Returns:
      float32 array with ``axis`` reduced. Where the mask is empty the result is 0 (the count is clamped to 1).
    """
    values = _f32(values)
    mask = jnp.broadcast_to(_bool_mask(mask), values.shape)
    total = jnp.sum(jnp.where(mask, values, 0.0), axis=axis)
    count = jnp.sum(mask.astype(jnp.float32), axis=axis)
    return total / _denominator(count, normalizer)


def masked_var(values, mask, *, unbiased: bool = True) -> Array:
    """Variance of ``values`` over all positions where ``mask`` is set (one scalar for the whole array).

    Args:
      values: ``[...]`` array, any float dtype.
      mask: same shape; 1 = include.
      unbiased: apply Bessel's correction ``n / (n - 1)`` (verl, TRL <= 0.x ``masked_var``); ``False`` gives the
        biased variance OpenRLHF uses. With fewer than two real positions no correction is applied.

    Returns:
      float32 scalar.
    """
    values = _f32(values)
    mask = jnp.broadcast_to(_bool_mask(mask), values.shape)
    mean = masked_mean(values, mask)
    var = masked_mean(jnp.square(values - mean), mask)
    if unbiased:
        count = jnp.sum(mask.astype(jnp.float32))
        var = var * jnp.where(count > 1, count / jnp.maximum(count - 1.0, 1.0), 1.0)
    return var


def masked_whiten(
    values,
    mask,
    *,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
    eps_mode: Literal["add", "clamp"] = "add",
) -> Array:
    """Whitens ``values`` with the mean and variance of its real positions (the whole array: a *global* statistic).

    Needs the whole batch: when used for advantage whitening, call it on the global batch before splitting into
    micro-batches, not per micro-batch.

    ``(values - mean) / sqrt(var + eps)`` with ``eps_mode="add"`` (verl ``masked_whiten``, TRL's former PPO
    trainer); ``(values - mean) * rsqrt(max(var, eps))`` with ``eps_mode="clamp"`` (OpenRLHF, together with
    ``unbiased=False``). With ``shift_mean=False`` the mean is added back after scaling.

    Args:
      values: ``[...]`` array, any float dtype.
      mask: same shape; 1 = real.
      shift_mean: keep the result centred (``True``) or add the mean back (``False``).
      unbiased: Bessel-corrected variance (see :func:`masked_var`).
      eps: numerical floor of the variance.
      eps_mode: ``"add"`` or ``"clamp"``, see above.

    Returns:
      float32 array shaped like ``values``; masked positions are set to 0.
    """
    if eps_mode not in ("add", "clamp"):
        raise ValueError(f"masked_whiten: eps_mode must be 'add' or 'clamp', got {eps_mode!r}.")
    values = _f32(values)
    mask = jnp.broadcast_to(_bool_mask(mask), values.shape)
    clean = jnp.where(mask, values, 0.0)
    mean = masked_mean(clean, mask)
    var = masked_var(clean, mask, unbiased=unbiased)
    if eps_mode == "add":
        rstd = jax.lax.rsqrt(var + eps)
    else:
        rstd = jax.lax.rsqrt(jnp.maximum(var, eps))
    whitened = (clean - mean) * rstd
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask, whitened, 0.0)


def logprobs_from_logits(logits, tokens, *, temperature: float = 1.0) -> Array:
    """Log-probability of ``tokens`` under ``softmax(logits / temperature)``.

    Computed as ``logits[token] - logsumexp(logits)`` in float32, without materialising a full log-softmax copy
    (under ``jit`` the float32 cast fuses into the reduction). Same as TRL's ``selective_log_softmax``.

    Args:
      logits: ``[..., V]`` float array (bf16 allowed).
      tokens: ``[...]`` integer array of token ids in ``[0, V)``.
      temperature: positive sampling temperature the logits are divided by.

    Returns:
      ``[...]`` float32 log-probabilities.
    """
    if temperature <= 0:
        raise ValueError(f"logprobs_from_logits: temperature must be positive, got {temperature}.")
    logits = jnp.asarray(logits)
    tokens = jnp.asarray(tokens)
    chex.assert_equal_shape_prefix(
        [logits, tokens], tokens.ndim,
        custom_message="logprobs_from_logits: tokens [...] must match the leading shape of logits [..., V]",
    )
    chex.assert_rank(
        logits, tokens.ndim + 1,
        custom_message="logprobs_from_logits: logits must have one more axis (the vocabulary) than tokens",
    )
    logits = _f32(logits)
    if temperature != 1.0:
        logits = logits / temperature
    selected = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return selected - jax.nn.logsumexp(logits, axis=-1)


def entropy_from_logits(logits, *, temperature: float = 1.0) -> Array:
    """Shannon entropy (nats) of ``softmax(logits / temperature)`` along the last axis.

    ``logsumexp(z) - sum(softmax(z) * z)`` in float32; ``-inf`` logits (banned tokens) contribute 0.
    Same as TRL's ``entropy_from_logits``.

    Args:
      logits: ``[..., V]`` float array (bf16 allowed).
      temperature: positive temperature the logits are divided by.

    Returns:
      ``[...]`` float32 entropies.
    """
    if temperature <= 0:
        raise ValueError(f"entropy_from_logits: temperature must be positive, got {temperature}.")
    logits = _f32(logits)
    if temperature != 1.0:
        logits = logits / temperature
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    probs = jnp.exp(logits - lse)
    finite = jnp.isfinite(logits)
    return lse[..., 0] - jnp.sum(probs * jnp.where(finite, logits, 0.0), axis=-1)


def kl_penalty(
    logps,
    ref_logps,
    kind: str = "k3",
    *,
    mask=None,
    log_ratio_clip: float | None = None,
    kl_clip: float | None = None,
) -> Array:
    """Per-token KL estimator between the policy and a reference, from sampled-token log-probs (Schulman, 2020).

    With ``d = logps - ref_logps``:

    * ``k1``: ``d`` (unbiased, can be negative);
    * ``k2`` / ``mse``: ``0.5 * d**2``;
    * ``k3``: ``exp(-d) + d - 1`` = ``exp(ref - logp) - (ref - logp) - 1`` (unbiased, non-negative; TRL GRPO);
    * ``abs``: ``|d|``.

    Defaults follow TRL (no clamping). verl's ``low_var_kl``/``k3`` is ``log_ratio_clip=20.0, kl_clip=10.0`` (verl
    clamps only k3); OpenRLHF's ``compute_approx_kl`` is ``kl_clip=10.0`` for every kind.

    Args:
      logps: ``[...]`` policy log-probs of the sampled tokens.
      ref_logps: same shape, reference log-probs.
      kind: one of ``k1``, ``k2``, ``k3``, ``abs``, ``mse``.
      mask: optional, same shape; masked positions are sanitised before ``exp`` and output 0.
      log_ratio_clip: if set, ``ref - logp`` is clipped to ``[-c, c]`` before ``exp`` (k3 only).
      kl_clip: if set, the estimate is clipped to ``[-c, c]``.

    Returns:
      float32 array shaped like ``logps``.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kl_penalty: kind must be one of {KL_KINDS}, got {kind!r}.")
    logps, ref_logps = _f32(logps), _f32(ref_logps)
    chex.assert_equal_shape(
        [logps, ref_logps],
        custom_message="kl_penalty: logps and ref_logps must have the same shape",
    )
    if mask is not None:
        mask = jnp.broadcast_to(_bool_mask(mask), logps.shape)
        logps = jnp.where(mask, logps, 0.0)
        ref_logps = jnp.where(mask, ref_logps, 0.0)
    diff = logps - ref_logps
    if kind == "k1":
        kl = diff
    elif kind in ("k2", "mse"):
        kl = 0.5 * jnp.square(diff)
    elif kind == "abs":
        kl = jnp.abs(diff)
    else:
        neg = -diff
        if log_ratio_clip is not None:
            neg = jnp.clip(neg, -log_ratio_clip, log_ratio_clip)
        kl = jnp.exp(neg) - neg - 1.0
    if kl_clip is not None:
        kl = jnp.clip(kl, -kl_clip, kl_clip)
    if mask is not None:
        kl = jnp.where(mask, kl, 0.0)
    return kl


def aggregate_loss(
    per_token_loss,
    mask,
    *,
    mode: str = "token_mean",
    normalizer=None,
    max_completion_length: int | None = None,
) -> Array:
    """Reduces a ``[B, T]`` per-token loss to a scalar.

    Modes (verl's ``loss_agg_mode`` names in brackets):

    * ``token_mean`` (``token-mean``; TRL bnpo/dapo/cispo): ``sum(loss * mask) / normalizer``, default
      normalizer = number of real tokens.
    * ``seq_mean_token_mean`` (``seq-mean-token-mean``; TRL grpo/sapo): per-sequence token means, summed and divided
      by ``normalizer``, default = number of sequences ``B``.
    * ``seq_mean_token_sum`` (``seq-mean-token-sum``; TRL luspo): per-sequence token sums, summed and divided by
      ``normalizer``, default ``B``.
    * ``token_sum_norm`` (``seq-mean-token-sum-norm``; TRL dr_grpo): ``sum(loss * mask) / normalizer``, default
      ``B * max_completion_length`` (``max_completion_length`` defaults to ``T``).

    Args:
      per_token_loss: ``[B, T]`` float array (bf16 allowed); ``[B, 1]`` broadcasts over ``T``.
      mask: ``[B, T]``; 1 = real token.
      mode: one of the modes above.
      normalizer: optional global denominator (see module docstring).
      max_completion_length: the constant of ``token_sum_norm``.

    Returns:
      float32 scalar.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregate_loss: mode must be one of {AGGREGATIONS}, got {mode!r}.")
    mask = _bool_mask(mask)
    chex.assert_rank(mask, 2, custom_message="aggregate_loss: mask must be [B, T]")
    per_token_loss = jnp.broadcast_to(_f32(per_token_loss), mask.shape)
    maskf = mask.astype(jnp.float32)
    clean = jnp.where(mask, per_token_loss, 0.0)
    batch = mask.shape[0]
    if mode == "token_mean":
        return jnp.sum(clean) / _denominator(jnp.sum(maskf), normalizer)
    if mode == "token_sum_norm":
        length = mask.shape[1] if max_completion_length is None else max_completion_length
        return jnp.sum(clean) / _denominator(jnp.asarray(batch * length, jnp.float32), normalizer)
    seq = jnp.sum(clean, axis=-1)
    if mode == "seq_mean_token_mean":
        seq = seq / jnp.maximum(jnp.sum(maskf, axis=-1), 1.0)
    return jnp.sum(seq) / _denominator(jnp.asarray(batch, jnp.float32), normalizer)


def sft_loss(token_logps, mask, *, normalizer=None) -> tuple[Array, dict[str, Array]]:
    """Negative log-likelihood averaged over target tokens (the SFT loss; TRL's ``sft`` DPO term).

    Args:
      token_logps: ``[B, T]`` log-probs of the target tokens (e.g. from :func:`logprobs_from_logits`), any float dtype.
      mask: ``[B, T]``; 1 = target token (``loss_mask[:, 1:]`` in the batch convention).
      normalizer: optional token count of the whole accumulated batch; default the local count.

    Returns:
      ``(loss, metrics)``: float32 scalar loss and ``{"nll": local token-mean NLL, "num_tokens": local count}``.
    """
    token_logps = _f32(token_logps)
    chex.assert_rank(token_logps, 2, custom_message="sft_loss: token_logps must be [B, T]")
    chex.assert_equal_shape(
        [token_logps, jnp.asarray(mask)],
        custom_message="sft_loss: token_logps and mask must both be [B, T]",
    )
    mask = _bool_mask(mask)
    nll = -jnp.where(mask, token_logps, 0.0)
    loss = aggregate_loss(nll, mask, mode="token_mean", normalizer=normalizer)
    count = jnp.sum(mask.astype(jnp.float32))
    metrics = {"nll": jnp.sum(nll) / jnp.maximum(count, 1.0), "num_tokens": count}
    return loss, metrics
