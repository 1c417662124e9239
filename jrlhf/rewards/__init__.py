"""Reward functions for on-policy training (host-side Python, TRL's calling convention).

``fn(prompts, completions, completion_ids, **record_fields) -> list[float | None]``; combine several with
:func:`combine_rewards`; look shipped ones up by name with :func:`get_reward_fn` (``"addition_exact_match"``,
``"addition_format"``, ``"math_answer"``, ``"format"`` (options: ``pattern``, ``mode``), and the GSM8K recipe's
``"gsm8k_answer"``, ``"gsm8k_format"``, ``"gsm8k_shaped"``; DAPO's
``"soft_overlong_punishment"`` (options: ``max_completion_len``, ``soft_punish_cache``)), or by ``module:function`` import path;
:func:`resolve_reward_funcs` turns a mixed list of callables, names and paths into callables.
"""

from jrlhf.rewards.core import (
    RewardError,
    combine_rewards,
    get_reward_fn,
    register_reward_fn,
    resolve_reward_funcs,
    reward_fn_name,
    reward_fn_names,
    reward_metrics,
)
from jrlhf.rewards.gsm8k import ANSWER_INSTRUCTION, gsm8k_answer, gsm8k_format, gsm8k_shaped, stated_answer
from jrlhf.rewards.verifiable import (
    addition_exact_match,
    answers_equal,
    completion_text,
    extract_boxed,
    extract_final_answer,
    get_soft_overlong_punishment,
    make_format_reward,
    math_answer,
    normalize_answer,
)

__all__ = [
    "ANSWER_INSTRUCTION",
    "RewardError",
    "addition_exact_match",
    "answers_equal",
    "combine_rewards",
    "completion_text",
    "extract_boxed",
    "extract_final_answer",
    "get_reward_fn",
    "get_soft_overlong_punishment",
    "gsm8k_answer",
    "gsm8k_format",
    "gsm8k_shaped",
    "make_format_reward",
    "math_answer",
    "normalize_answer",
    "register_reward_fn",
    "resolve_reward_funcs",
    "reward_fn_name",
    "reward_fn_names",
    "reward_metrics",
    "stated_answer",
]
