"""jrlhf's loss library: pure functions of arrays (no model calls), composable in research code.

Per-example losses (the DPO family, SimPO, ORPO, KTO, Bradley-Terry) return ``[B]`` arrays and the caller
averages. Token-level losses that aggregate (:func:`sft_loss`, :func:`grpo_loss`, :func:`ppo_policy_loss`,
:func:`ppo_value_loss`, :func:`rloo_loss`) return ``(loss, metrics)`` and take ``normalizer``, the denominator of
their final aggregation, so a train step can pass the value of the whole accumulated batch. Masks are explicit
(1 = real token); math runs in float32 whatever the input dtype. See each docstring for shapes and for the
settings that reproduce TRL 1.16 (the defaults), OpenRLHF and verl.

Loss-type strings, aggregation modes and the arguments that switch a term on or off (``label_smoothing`` of
``dpo_loss``, ``beta`` of ``grpo_loss``, clip ranges given as ``None``) are static Python values; numeric
coefficients such as a KL coefficient fed from an adaptive controller may be traced arrays.
"""

from jrlhf.losses.common import (
    AGGREGATIONS,
    KL_KINDS,
    aggregate_loss,
    entropy_from_logits,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    sft_loss,
)
from jrlhf.losses.dpo import (
    DPO_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    bco_running_mean_update,
    bradley_terry_loss,
    dpo_loss,
    kto_kl_estimate,
    kto_loss,
    ld_dpo_logps,
    orpo_loss,
    simpo_loss,
)
from jrlhf.losses.grpo import GRPO_LOSS_TYPES, grpo_advantages, grpo_loss
from jrlhf.losses.ppo import (
    adaptive_kl_update,
    gae,
    kl_penalized_rewards,
    last_token_mask,
    ppo_policy_loss,
    ppo_value_loss,
    running_moments_update,
    scale_scores,
)
from jrlhf.losses.rollout_correction import (
    IS_MODES,
    high_entropy_mask,
    importance_weight_metrics,
    rollout_importance_weights,
    rollout_mismatch_metrics,
)
from jrlhf.losses.reinforce import (
    discounted_returns,
    reinforce_pp_advantages,
    remax_advantages,
    rloo_advantages,
    rloo_loss,
)

__all__ = [
    "AGGREGATIONS",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "GRPO_LOSS_TYPES",
    "IS_MODES",
    "KL_KINDS",
    "adaptive_kl_update",
    "running_moments_update",
    "scale_scores",
    "aggregate_loss",
    "bco_running_mean_update",
    "bradley_terry_loss",
    "discounted_returns",
    "dpo_loss",
    "entropy_from_logits",
    "gae",
    "grpo_advantages",
    "grpo_loss",
    "high_entropy_mask",
    "importance_weight_metrics",
    "kl_penalized_rewards",
    "kl_penalty",
    "kto_kl_estimate",
    "kto_loss",
    "last_token_mask",
    "ld_dpo_logps",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "orpo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reinforce_pp_advantages",
    "remax_advantages",
    "rloo_advantages",
    "rloo_loss",
    "rollout_importance_weights",
    "rollout_mismatch_metrics",
    "sft_loss",
    "simpo_loss",
]
