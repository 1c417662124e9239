"""GSM8K rewards that give a small model a learning signal: the stated answer, its format, and both together.

A 135M instruct model (SmolLM2-135M-Instruct) almost never gets a GSM8K answer right and never writes
``\\boxed{}``, so under :func:`jrlhf.rewards.math_answer` alone every completion of a group scores 0 and GRPO has no
advantage to learn from. These rewards pair the recipe's instruction (end with ``The answer is N.``, see
:data:`ANSWER_INSTRUCTION`) with a format reward the model already meets in some samples, so groups differ, and keep
the correctness reward for when it starts to get answers right. How they were chosen (the share of groups with a
nonzero reward variance, measured on the model's own samples) is in the README, "Real-data recipes", and
``benchmarks/gsm8k_reward_probe.py``.

Every function follows the calling convention of :mod:`jrlhf.rewards.core` and reads the record's ``answer`` field
(the GSM8K number; ``"... #### 42"`` or ``"\\boxed{42}"`` also work); ``None`` for records without one.
"""

from __future__ import annotations

import re

from jrlhf.rewards.core import register_reward_fn
from jrlhf.rewards.verifiable import _per_sample, answers_equal, extract_boxed, extract_final_answer

ANSWER_INSTRUCTION = "Answer in a few short steps, then end with 'The answer is N.' where N is a number."
"""The instruction the GSM8K recipe gives as its system prompt (``data.system_prompt``)."""

_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*\**\s*\$?\s*(" + _NUMBER + r")", re.IGNORECASE)
# what may follow the stated answer at the end: a unit word or two, closing markup and punctuation, no digits
_TAIL = re.compile(r"[^\d\n]{0,24}")


def stated_answer(text: str) -> str | None:
    """The answer a completion states: the number after the last ``answer is`` (case-insensitive; ``:``, ``**``
    and ``$`` allowed before it), else the last ``\\boxed{}``, else ``None`` (a bare last number does not count).

    >>> stated_answer("5 + 3 = 8. The answer is $1,208.")
    '1,208'
    """
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        return matches[-1].group(1)
    boxed = extract_boxed(text)
    return boxed.strip() if boxed is not None else None


def _gold(reference) -> str:
    reference = str(reference)
    return extract_final_answer(reference) if ("\\boxed" in reference or "####" in reference) else reference


def gsm8k_answer(prompts, completions, completion_ids=None, answer=None, **kwargs) -> list:
    """1.0 when the completion's answer equals the record's ``answer`` numerically (relative tolerance 1e-6), else
    0.0: the stated answer (:func:`stated_answer`), else the last number in the text, as
    :func:`jrlhf.rewards.math_answer` reads it; ``None`` for records without ``answer``."""
    rewards = []
    for text, reference in _per_sample(completions, answer):
        if reference is None:
            rewards.append(None)
            continue
        predicted = stated_answer(text)
        if predicted is None:
            predicted = extract_final_answer(text)
        rewards.append(float(answers_equal(predicted, _gold(reference))))
    return rewards


def gsm8k_format(prompts, completions, completion_ids=None, **kwargs) -> list:
    """1.0 when the completion ends by stating its answer as ``answer is N`` with a number ``N`` (followed by at most
    24 characters without digits or newlines: a unit, ``.``, ``**``), 0.5 when it states one that way elsewhere
    (more text follows), else 0.0. Rewards the instructed format (:data:`ANSWER_INSTRUCTION`) and, through "ends
    with", completions that finish instead of running to the length limit."""
    rewards = []
    for text, _ in _per_sample(completions, None):
        text = text.strip()
        matches = list(_ANSWER_IS.finditer(text))
        if not matches:
            rewards.append(0.0)
        elif _TAIL.fullmatch(text[matches[-1].end():]):
            rewards.append(1.0)
        else:
            rewards.append(0.5)
    return rewards


def gsm8k_shaped(prompts, completions, completion_ids=None, answer=None, **kwargs) -> list:
    """``gsm8k_answer + 0.5 * gsm8k_format`` in one number (0, 0.25, 0.5, 1, 1.25 or 1.5), the GSM8K recipe's
    training reward as one function, for its held-out evaluation (``data.eval_reward``); ``None`` for records
    without ``answer``."""
    correct = gsm8k_answer(prompts, completions, completion_ids, answer=answer)
    formatted = gsm8k_format(prompts, completions, completion_ids)
    return [None if c is None else c + 0.5 * f for c, f in zip(correct, formatted)]


register_reward_fn("gsm8k_answer", gsm8k_answer)
register_reward_fn("gsm8k_format", gsm8k_format)
register_reward_fn("gsm8k_shaped", gsm8k_shaped)
