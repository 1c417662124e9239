"""Offline preference losses: the DPO family (with f-divergences and weighted combinations), SimPO, ORPO, KTO and
the Bradley-Terry reward-model loss.

All functions here are per-example: they return ``[B]`` arrays and the caller averages (``losses.mean()``). Inputs
are sequence log-probabilities *summed* over completion tokens (``masked_sum(token_logps, mask, axis=-1)``), in any
float dtype; the math runs in float32. Semantics follow TRL 1.16.0 unless an argument says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp

from jrlhf.losses.common import Array, _bool_mask, _f32

DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "aot_pair",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "sft",
)
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# Loss types built on the chosen-minus-rejected score difference, the only ones with an f-divergence generalisation.
_F_DIVERGENCE_LOSS_TYPES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})
_LENGTH_LOSS_TYPES = frozenset({"ipo", "sigmoid_norm"})


def _log_sigmoid(x: Array) -> Array:
    return jax.nn.log_sigmoid(x)


def _per_length(values: Array, lengths) -> Array:
    return values / jnp.maximum(_f32(lengths), 1.0)


def _f_divergence_scores(logratios: Array, f_divergence_type: str, alpha: float) -> Array:
    """f'(π/π_ref) of the f-DPO paper, applied to the summed log-ratio (TRL 1.16 ``f_divergence_type``)."""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1.0 - jnp.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + _log_sigmoid(logratios)
    # alpha_divergence: (t^(α-1) - 1) / (α - 1); α -> 1 is the reverse-KL limit.
    if abs(alpha - 1.0) < 1e-6:
        return logratios
    t = jnp.minimum((alpha - 1.0) * logratios, 80.0)
    return (jnp.exp(t) - 1.0) / (alpha - 1.0)


def dpo_loss(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    chosen_lengths=None,
    rejected_lengths=None,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    bco_delta=0.0,
    num_chosen_tokens=None,
    num_pairs=None,
) -> tuple[Array, Array, Array]:
    """Direct-preference losses of TRL 1.16's ``DPOTrainer``, per example.

    With ``c = chosen_logps - ref_chosen_logps``, ``r = rejected_logps - ref_rejected_logps`` (summed log-ratios),
    the f-divergence scores ``s_c = f'(c)``, ``s_r = f'(r)`` (``s = c`` for the default ``reverse_kl``) and
    ``d = s_c - s_r``:

    * ``sigmoid`` (DPO): ``-log σ(β d)``. With ``label_smoothing = ε > 0`` this is conservative DPO (cDPO)
      ``-(1-ε) log σ(β d) - ε log σ(-β d)``, as in TRL <= 0.28 and OpenRLHF; TRL 1.16 ignores ``label_smoothing``
      here, so the default ``ε = 0`` equals TRL 1.16.
    * ``hinge`` (SLiC): ``relu(1 - β d)``.
    * ``ipo``: ``(d_c / n_c - d_r / n_r - 1 / (2β))**2`` with the scores divided by completion lengths (TRL's
      length-normalised IPO; needs ``chosen_lengths``/``rejected_lengths``). OpenRLHF's unnormalised IPO is
      ``chosen_lengths = rejected_lengths = 1``.
    * ``exo_pair`` (EXO, needs ``label_smoothing = ε > 0``, paper: 1e-3):
      ``σ(βd)(log σ(βd) - log(1-ε)) + σ(-βd)(log σ(-βd) - log ε)``.
    * ``nca_pair``: ``-log σ(βc) - ½ log σ(-βc) - ½ log σ(-βr)``.
    * ``robust`` (rDPO, ``0 <= ε < 0.5``): ``(-(1-ε) log σ(βd) + ε log σ(-βd)) / (1 - 2ε)``.
    * ``bco_pair``: ``-log σ(βc - δ) - log σ(-(βr - δ))``. TRL 1.16 uses ``δ = 0`` (the default ``bco_delta``);
      TRL <= 0.28 used the running mean of the batch-mean rewards, which you pass as ``bco_delta`` (see
      :func:`bco_running_mean_update`; it needs the whole batch, so update it once per global batch).
    * ``sppo_hard``: ``(c - 1/(2β))**2 + (r + 1/(2β))**2``.
    * ``aot`` (needs the whole batch): sorts ``chosen_logps - rejected_logps`` and its reference counterpart over
      the batch, then the (cDPO-smoothed) sigmoid loss on the sorted difference.
    * ``aot_unpaired`` (alias ``aot_pair``, its TRL <= 0.28 name; needs the whole batch): sorts ``c`` and ``r``
      separately, then the smoothed sigmoid loss on ``sorted(c) - sorted(r)``.
    * ``apo_zero``: ``1 - σ(βc) + σ(βr)``; ``apo_down``: ``σ(βc) + 1 - σ(β(c - r))``.
    * ``discopop``: ``(1 - m)(-log σ(βd)) + m exp(-βd)`` with ``m = σ(βd / τ)``.
    * ``sigmoid_norm``: ``-log σ(β (s_c / n_c - s_r / n_r))`` (needs lengths).
    * ``sft``: the chosen NLL averaged over the batch's chosen tokens, spread so that the mean over the batch's
      examples equals TRL's batch token mean: ``-chosen_logps * num_pairs / num_chosen_tokens``. Both counts
      default to this call's (``B`` and ``sum(chosen_lengths)``, which then needs ``chosen_lengths``); under
      gradient accumulation pass those of the whole accumulated batch, so the sum of the micro-batch means over
      ``num_pairs`` is exact.

    A sequence ``loss_type`` combines several types (MPO): the per-example loss is ``sum_k w_k * loss_k``, whose
    mean equals TRL's ``sum_k w_k * mean(loss_k)``. RPO is ``loss_type=("sigmoid", "sft"), loss_weights=(1, α)``.
    ``label_smoothing`` applies to every listed type that uses it; TRL 1.16 combining ``sigmoid`` with ``robust``,
    ``exo_pair`` or an aot type (whose smoothing its sigmoid ignores) is reproduced by adding a separate
    ``dpo_loss(...)`` call for the sigmoid term with ``label_smoothing=0``.

    Args:
      chosen_logps: ``[B]`` policy log-probs of the chosen completions, summed over completion tokens.
      rejected_logps: ``[B]`` same for the rejected completions.
      ref_chosen_logps: ``[B]`` reference log-probs of the chosen completions (ignored if ``reference_free``).
      ref_rejected_logps: ``[B]`` same for the rejected completions.
      beta: β, the inverse temperature (τ, the regulariser, for IPO).
      loss_type: one of ``DPO_LOSS_TYPES`` or a sequence of them.
      loss_weights: one weight per loss type; default all 1.
      label_smoothing: ε of cDPO (sigmoid), rDPO (robust), EXO (exo_pair) and the aot losses.
      reference_free: treat the reference log-probs as 0 (TRL <= 0.28 / OpenRLHF ``reference_free``); the
        reference arguments may then be ``None`` and the rewards become ``β * logps``.
      chosen_lengths: ``[B]`` number of completion tokens of each chosen completion (``ipo``, ``sigmoid_norm``,
        ``sft``).
      rejected_lengths: ``[B]`` same for the rejected completions (``ipo``, ``sigmoid_norm``).
      discopop_tau: τ of ``discopop``.
      f_divergence_type: ``reverse_kl`` (standard DPO), ``forward_kl``, ``js_divergence`` or ``alpha_divergence``;
        only valid with sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop and sft.
      f_alpha_divergence_coef: α of ``alpha_divergence``.
      bco_delta: scalar (or ``[B]``) reward baseline δ of ``bco_pair``.
      num_chosen_tokens: ``sft``'s token count (float scalar): that of the whole (accumulated) batch; default
        ``sum(chosen_lengths)``.
      num_pairs: ``sft``'s example count (scalar) whose mean the caller takes; default ``B``.

    Returns:
      ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]`` float32. Rewards are ``β * c`` and ``β * r``
      (gradient stopped), as TRL logs them (``rewards/chosen``, ``rewards/rejected``; margins and accuracies follow).
    """
    loss_types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not loss_types:
        raise ValueError("dpo_loss: loss_type must name at least one loss type.")
    for name in loss_types:
        if name not in DPO_LOSS_TYPES:
            raise ValueError(f"dpo_loss: unknown loss_type {name!r}; choose from {DPO_LOSS_TYPES}.")
    weights = (1.0,) * len(loss_types) if loss_weights is None else tuple(float(w) for w in loss_weights)
    if len(weights) != len(loss_types):
        raise ValueError(
            f"dpo_loss: loss_weights has {len(weights)} entries for {len(loss_types)} loss types; give one weight each."
        )
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"dpo_loss: f_divergence_type must be one of {F_DIVERGENCE_TYPES}, got {f_divergence_type!r}.")
    if f_divergence_type != "reverse_kl" and not set(loss_types) <= _F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"dpo_loss: f_divergence_type={f_divergence_type!r} only applies to {sorted(_F_DIVERGENCE_LOSS_TYPES)}; "
            f"got {loss_types}. Use f_divergence_type='reverse_kl' with these losses."
        )
    if "exo_pair" in loss_types and not label_smoothing > 0.0:
        raise ValueError("dpo_loss: 'exo_pair' needs label_smoothing > 0 (the EXO paper uses 1e-3).")
    if "robust" in loss_types and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: 'robust' needs 0 <= label_smoothing < 0.5, got {label_smoothing}.")
    if set(loss_types) & _LENGTH_LOSS_TYPES and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(
            "dpo_loss: 'ipo' and 'sigmoid_norm' divide by completion lengths; pass chosen_lengths and rejected_lengths "
            "(number of completion tokens per example)."
        )
    if "sft" in loss_types and chosen_lengths is None and num_chosen_tokens is None:
        raise ValueError("dpo_loss: 'sft' averages over chosen tokens; pass chosen_lengths or num_chosen_tokens.")

    chosen_logps, rejected_logps = _f32(chosen_logps), _f32(rejected_logps)
    chex.assert_rank(
        chosen_logps, 1,
        custom_message="dpo_loss: chosen_logps must be [B] (log-probs summed over completion tokens)",
    )
    chex.assert_equal_shape(
        [chosen_logps, rejected_logps],
        custom_message="dpo_loss: chosen_logps and rejected_logps must both be [B]",
    )
    if reference_free:
        ref_chosen_logps = jnp.zeros_like(chosen_logps)
        ref_rejected_logps = jnp.zeros_like(rejected_logps)
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError("dpo_loss: pass ref_chosen_logps and ref_rejected_logps, or set reference_free=True.")
        ref_chosen_logps, ref_rejected_logps = _f32(ref_chosen_logps), _f32(ref_rejected_logps)
        chex.assert_equal_shape(
            [chosen_logps, ref_chosen_logps, ref_rejected_logps],
            custom_message="dpo_loss: ref_chosen_logps and ref_rejected_logps must be [B] like chosen_logps",
        )
    if chosen_lengths is not None:
        chex.assert_equal_shape(
            [chosen_logps, jnp.asarray(chosen_lengths)],
            custom_message="dpo_loss: chosen_lengths must be [B] like chosen_logps",
        )
    if rejected_lengths is not None:
        chex.assert_equal_shape(
            [chosen_logps, jnp.asarray(rejected_lengths)],
            custom_message="dpo_loss: rejected_lengths must be [B] like chosen_logps",
        )

    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    chosen_scores = _f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = _f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    delta = chosen_scores - rejected_scores
    eps = label_smoothing

    def smoothed_sigmoid(x):
        return -_log_sigmoid(beta * x) * (1.0 - eps) - _log_sigmoid(-beta * x) * eps

    total = jnp.zeros_like(chosen_logps)
    for name, weight in zip(loss_types, weights):
        if name == "sigmoid":
            loss = smoothed_sigmoid(delta) if eps > 0 else -_log_sigmoid(beta * delta)
        elif name == "hinge":
            loss = jax.nn.relu(1.0 - beta * delta)
        elif name == "ipo":
            ipo_delta = _per_length(chosen_scores, chosen_lengths) - _per_length(rejected_scores, rejected_lengths)
            loss = jnp.square(ipo_delta - 1.0 / (2.0 * beta))
        elif name == "exo_pair":
            z = beta * delta
            loss = jax.nn.sigmoid(z) * (_log_sigmoid(z) - math.log1p(-eps)) + jax.nn.sigmoid(-z) * (
                _log_sigmoid(-z) - math.log(eps)
            )
        elif name == "nca_pair":
            bc, br = beta * chosen_logratios, beta * rejected_logratios
            loss = -_log_sigmoid(bc) - 0.5 * _log_sigmoid(-bc) - 0.5 * _log_sigmoid(-br)
        elif name == "robust":
            z = beta * delta
            loss = (-(1.0 - eps) * _log_sigmoid(z) + eps * _log_sigmoid(-z)) / (1.0 - 2.0 * eps)
        elif name == "bco_pair":
            bco = _f32(bco_delta)
            loss = -_log_sigmoid(beta * chosen_logratios - bco) - _log_sigmoid(-(beta * rejected_logratios - bco))
        elif name == "sppo_hard":
            loss = jnp.square(chosen_logratios - 0.5 / beta) + jnp.square(rejected_logratios + 0.5 / beta)
        elif name == "aot":
            sorted_policy = jnp.sort(chosen_logps - rejected_logps)
            sorted_ref = jnp.sort(ref_chosen_logps - ref_rejected_logps)
            loss = smoothed_sigmoid(sorted_policy - sorted_ref)
        elif name in ("aot_unpaired", "aot_pair"):
            loss = smoothed_sigmoid(jnp.sort(chosen_logratios) - jnp.sort(rejected_logratios))
        elif name == "apo_zero":
            loss = 1.0 - jax.nn.sigmoid(beta * chosen_logratios) + jax.nn.sigmoid(beta * rejected_logratios)
        elif name == "apo_down":
            loss = jax.nn.sigmoid(beta * chosen_logratios) + 1.0 - jax.nn.sigmoid(
                beta * (chosen_logratios - rejected_logratios)
            )
        elif name == "discopop":
            z = beta * delta
            modulation = jax.nn.sigmoid(z / discopop_tau)
            loss = -_log_sigmoid(z) * (1.0 - modulation) + jnp.exp(-z) * modulation
        elif name == "sigmoid_norm":
            norm_delta = _per_length(chosen_scores, chosen_lengths) - _per_length(rejected_scores, rejected_lengths)
            loss = -_log_sigmoid(beta * norm_delta)
        else:  # sft
            tokens = jnp.sum(_f32(chosen_lengths)) if num_chosen_tokens is None else _f32(num_chosen_tokens)
            pairs = chosen_logps.shape[0] if num_pairs is None else _f32(num_pairs)
            loss = -chosen_logps * pairs / jnp.maximum(tokens, 1.0)
        total = total + weight * loss

    chosen_rewards = jax.lax.stop_gradient(beta * chosen_logratios)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_logratios)
    return total, chosen_rewards, rejected_rewards


def bco_running_mean_update(running_mean, running_count, chosen_rewards, rejected_rewards) -> tuple[Array, Array]:
    """One update of the BCO reward baseline δ used by TRL <= 0.28's ``bco_pair`` (pass the result as ``bco_delta``).

    The baseline is the running average of the batch means of the (chosen and rejected) rewards: with
    ``x = mean(concat(chosen_rewards, rejected_rewards))`` (gradient stopped), ``count' = count + 1`` and
    ``mean' = mean + (x - mean) / count'``. Start from ``(0.0, 0.0)``; TRL updates before computing the loss, so
    the current batch is included in the δ it uses. Needs the whole batch: update once per global batch.

    Args:
      running_mean: float32 scalar, the current baseline.
      running_count: float32 scalar, the number of batches seen.
      chosen_rewards: ``[B]`` ``β * (chosen_logps - ref_chosen_logps)``.
      rejected_rewards: ``[B]`` same for rejected.

    Returns:
      ``(new_mean, new_count)`` float32 scalars.
    """
    batch_mean = jax.lax.stop_gradient(
        jnp.mean(jnp.concatenate([_f32(chosen_rewards).reshape(-1), _f32(rejected_rewards).reshape(-1)]))
    )
    count = _f32(running_count) + 1.0
    mean = _f32(running_mean) + (batch_mean - _f32(running_mean)) / count
    return mean, count


def ld_dpo_logps(token_logps, mask, shared_lengths, *, ld_alpha: float) -> Array:
    """Length-desensitised sequence log-probs of LD-DPO (TRL 1.16 ``ld_alpha``).

    The first ``shared_lengths`` completion tokens count fully, the tokens after them are weighted by ``ld_alpha``:
    ``sum_shared(logp) + ld_alpha * sum_tail(logp)``. Call it for the chosen and the rejected completions (policy and
    reference alike) with ``shared_lengths = min(chosen_lengths, rejected_lengths)``.

    Args:
      token_logps: ``[B, T]`` per-token log-probs, any float dtype.
      mask: ``[B, T]`` completion mask (1 = completion token).
      shared_lengths: ``[B]`` number of leading completion tokens counted fully.
      ld_alpha: weight of the tail tokens in ``[0, 1]`` (1 = plain DPO sums).

    Returns:
      ``[B]`` float32 sequence log-probs.
    """
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_dpo_logps: ld_alpha must lie in [0, 1], got {ld_alpha}.")
    token_logps = _f32(token_logps)
    chex.assert_rank(token_logps, 2, custom_message="ld_dpo_logps: token_logps must be [B, T]")
    mask = jnp.broadcast_to(_bool_mask(mask), token_logps.shape)
    position = jnp.cumsum(mask.astype(jnp.int32), axis=-1)
    shared = mask & (position <= jnp.asarray(shared_lengths)[:, None])
    tail = mask & ~shared
    clean = jnp.where(mask, token_logps, 0.0)
    return jnp.sum(jnp.where(shared, clean, 0.0), axis=-1) + ld_alpha * jnp.sum(jnp.where(tail, clean, 0.0), axis=-1)


def simpo_loss(
    chosen_logps,
    rejected_logps,
    *,
    chosen_lengths=None,
    rejected_lengths=None,
    beta: float = 0.1,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[Array, Array, Array]:
    """SimPO: reference-free, length-normalised sigmoid loss with a target margin γ (TRL 1.16 CPO ``loss_type="simpo"``).

    With average log-probs ``a_c = chosen_logps / n_c``, ``a_r = rejected_logps / n_r``:
    ``-(1-ε) log σ(β(a_c - a_r) - γ) - ε log σ(-(β(a_c - a_r) - γ))``. Defaults are TRL's ``CPOConfig``
    (β = 0.1, γ = 0.5); the SimPO paper uses β = 2.0-2.5 and γ/β ≈ 0.5. Add TRL's ``cpo_alpha`` NLL term with
    :func:`jrlhf.losses.sft_loss`.

    Args:
      chosen_logps: ``[B]`` policy log-probs of the chosen completions, summed over tokens (or already averaged when
        ``chosen_lengths`` is ``None``).
      rejected_logps: ``[B]`` same for rejected.
      chosen_lengths: ``[B]`` completion token counts for the average; ``None`` if the log-probs are averages.
      rejected_lengths: ``[B]`` same for rejected.
      beta: β, the reward scale.
      gamma: γ, the target reward margin.
      label_smoothing: ε (conservative smoothing, TRL's ``label_smoothing``).

    Returns:
      ``(losses, chosen_rewards, rejected_rewards)``, ``[B]`` float32; rewards are ``β * a`` (gradient stopped).
    """
    chosen, rejected = _f32(chosen_logps), _f32(rejected_logps)
    chex.assert_rank(chosen, 1, custom_message="simpo_loss: chosen_logps must be [B]")
    chex.assert_equal_shape(
        [chosen, rejected],
        custom_message="simpo_loss: chosen_logps and rejected_logps must both be [B]",
    )
    if chosen_lengths is not None:
        chosen = _per_length(chosen, chosen_lengths)
    if rejected_lengths is not None:
        rejected = _per_length(rejected, rejected_lengths)
    logits = (chosen - rejected) - gamma / beta
    losses = -_log_sigmoid(beta * logits) * (1.0 - label_smoothing) - _log_sigmoid(-beta * logits) * label_smoothing
    return losses, jax.lax.stop_gradient(beta * chosen), jax.lax.stop_gradient(beta * rejected)


def _log1mexp(x: Array) -> Array:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2, NaN-free in both branches' gradients."""
    x = jnp.minimum(x, -1e-7)
    small = x < -math.log(2.0)
    x_small = jnp.where(small, x, -1.0)
    x_large = jnp.where(small, -0.5, x)
    return jnp.where(small, jnp.log1p(-jnp.exp(x_small)), jnp.log(-jnp.expm1(x_large)))


def orpo_loss(
    chosen_logps,
    rejected_logps,
    *,
    chosen_lengths=None,
    rejected_lengths=None,
    beta: float = 0.1,
) -> tuple[Array, Array, Array, Array, Array]:
    """ORPO's odds-ratio term (TRL 1.16 ``ORPOTrainer.odds_ratio_loss``), per example and signed as a loss.

    With average log-probs ``a = logps / n`` (ORPO uses length-averaged log-likelihoods) and
    ``log_odds = (a_c - a_r) - (log(1 - exp(a_c)) - log(1 - exp(a_r)))``, the term is ``-β log σ(log_odds)``.
    The full ORPO loss is ``NLL(chosen) + mean(losses)`` (TRL writes ``nll - mean(β log σ(log_odds))``); compose it
    with :func:`jrlhf.losses.sft_loss`. Average log-probs are clamped to ``<= -1e-7`` so a certain completion
    (probability 1) stays finite.

    Args:
      chosen_logps: ``[B]`` chosen log-probs summed over tokens (or already averaged when ``chosen_lengths`` is None).
      rejected_logps: ``[B]`` same for rejected.
      chosen_lengths: ``[B]`` completion token counts; ``None`` if the inputs are averages.
      rejected_lengths: ``[B]`` same for rejected.
      beta: λ of the ORPO paper (TRL's ``beta``).

    Returns:
      ``(losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen)``, each ``[B]`` float32:
      the per-example loss; ``β * a_c`` and ``β * a_r``; ``log σ(log_odds)`` and ``log_odds`` (gradient stopped), whose
      means are TRL's ``log_odds_ratio`` and ``log_odds_chosen`` metrics.
    """
    chosen, rejected = _f32(chosen_logps), _f32(rejected_logps)
    chex.assert_rank(chosen, 1, custom_message="orpo_loss: chosen_logps must be [B]")
    chex.assert_equal_shape(
        [chosen, rejected],
        custom_message="orpo_loss: chosen_logps and rejected_logps must both be [B]",
    )
    if chosen_lengths is not None:
        chosen = _per_length(chosen, chosen_lengths)
    if rejected_lengths is not None:
        rejected = _per_length(rejected, rejected_lengths)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = _log_sigmoid(log_odds)
    losses = -beta * ratio
    stop = jax.lax.stop_gradient
    return losses, stop(beta * chosen), stop(beta * rejected), stop(ratio), stop(log_odds)


def kto_kl_estimate(kl_logps, ref_kl_logps) -> Array:
    """KTO's reference point: ``max(mean(kl_logps - ref_kl_logps), 0)`` with the gradient stopped (TRL 1.16).

    ``kl_logps`` are the policy log-probs of *mismatched* (prompt, completion) pairs (TRL shifts completions by one
    within the batch). Needs the whole batch: compute it on the global batch and pass it to every micro-batch.

    Args:
      kl_logps: ``[B]`` policy log-probs of the mismatched completions (summed over tokens).
      ref_kl_logps: ``[B]`` reference log-probs of the same.

    Returns:
      float32 scalar.
    """
    kl_logps, ref_kl_logps = _f32(kl_logps), _f32(ref_kl_logps)
    chex.assert_equal_shape(
        [kl_logps, ref_kl_logps],
        custom_message="kto_kl_estimate: kl_logps and ref_kl_logps must both be [B]",
    )
    return jax.lax.stop_gradient(jnp.maximum(jnp.mean(kl_logps - ref_kl_logps), 0.0))


def kto_loss(
    logps,
    ref_logps,
    labels,
    kl=None,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> tuple[Array, Array]:
    """KTO's per-example loss with the KL reference point passed in (TRL 1.16 ``KTOTrainer``).

    With ``x = logps - ref_logps`` and reference point ``z = kl`` (gradient stopped):
    desirable examples ``λ_D (1 - σ(β(x - z)))``, undesirable ones ``λ_U (1 - σ(β(z - x)))``. TRL's loss is the
    mean over all examples. ``loss_type="apo_zero_unpaired"`` gives ``1 - σ(βx)`` / ``σ(βx)`` and ignores ``kl``.

    Args:
      logps: ``[B]`` policy log-probs of the completions, summed over tokens.
      ref_logps: ``[B]`` reference log-probs.
      labels: ``[B]`` bool/int, 1 = desirable, 0 = undesirable.
      kl: scalar reference point, usually :func:`kto_kl_estimate` of the global batch; ``None`` means 0.
      beta: β.
      desirable_weight: λ_D.
      undesirable_weight: λ_U.
      loss_type: ``"kto"`` or ``"apo_zero_unpaired"``.

    Returns:
      ``(losses, rewards)``, ``[B]`` float32; rewards are ``β x`` (gradient stopped), logged by TRL as
      ``rewards/chosen`` (desirable) and ``rewards/rejected`` (undesirable).
    """
    if loss_type not in ("kto", "apo_zero_unpaired"):
        raise ValueError(f"kto_loss: loss_type must be 'kto' or 'apo_zero_unpaired', got {loss_type!r}.")
    logps, ref_logps = _f32(logps), _f32(ref_logps)
    chex.assert_rank(logps, 1, custom_message="kto_loss: logps must be [B]")
    chex.assert_equal_shape(
        [logps, ref_logps, jnp.asarray(labels)],
        custom_message="kto_loss: logps, ref_logps and labels must all be [B]",
    )
    desirable = _bool_mask(labels)
    logratios = logps - ref_logps
    if loss_type == "kto":
        z = jnp.zeros((), jnp.float32) if kl is None else jax.lax.stop_gradient(_f32(kl))
        chosen = 1.0 - jax.nn.sigmoid(beta * (logratios - z))
        rejected = 1.0 - jax.nn.sigmoid(beta * (z - logratios))
    else:
        chosen = 1.0 - jax.nn.sigmoid(beta * logratios)
        rejected = jax.nn.sigmoid(beta * logratios)
    losses = jnp.where(desirable, desirable_weight * chosen, undesirable_weight * rejected)
    return losses, jax.lax.stop_gradient(beta * logratios)


def bradley_terry_loss(
    chosen_rewards,
    rejected_rewards,
    *,
    margin=None,
    center_rewards_coefficient: float | None = None,
) -> Array:
    """Pairwise reward-model loss (TRL 1.16 ``RewardTrainer``, OpenRLHF ``PairWiseLoss``), per example.

    ``-log σ(r_c - r_r - margin) + coef * (r_c + r_r)**2``; the mean over examples equals TRL's loss including its
    ``center_rewards_coefficient`` term (Eisenstein et al., 2023).

    Args:
      chosen_rewards: ``[B]`` reward-model scores of the chosen completions (any float dtype).
      rejected_rewards: ``[B]`` scores of the rejected completions.
      margin: optional scalar or ``[B]`` required margin (Llama-2 style).
      center_rewards_coefficient: optional coefficient of the centring penalty (TRL recommends 0.01).

    Returns:
      ``[B]`` float32 losses.
    """
    chosen, rejected = _f32(chosen_rewards), _f32(rejected_rewards)
    chex.assert_rank(chosen, 1, custom_message="bradley_terry_loss: chosen_rewards must be [B]")
    chex.assert_equal_shape(
        [chosen, rejected],
        custom_message="bradley_terry_loss: chosen_rewards and rejected_rewards must both be [B]",
    )
    diff = chosen - rejected
    if margin is not None:
        diff = diff - _f32(margin)
    losses = -_log_sigmoid(diff)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * jnp.square(chosen + rejected)
    return losses
