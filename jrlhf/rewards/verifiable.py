"""Shipped verifiable rewards: exact match for the addition task, a math answer checker, a regex format reward.

Each follows the reward calling convention of :mod:`jrlhf.rewards.core` and returns ``1.0`` / ``0.0`` per
completion, or ``None`` where the record has no reference answer.
"""

from __future__ import annotations

import re
from fractions import Fraction

from jrlhf.data.addition import exact_match
from jrlhf.rewards.core import register_reward_fn


def completion_text(completion) -> str:
    """The text of a completion: the string itself, or the joined ``content`` of a message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


def _per_sample(completions, answer):
    if answer is None:
        answer = [None] * len(completions)
    if len(answer) != len(completions):
        raise ValueError(f"{len(answer)} answers for {len(completions)} completions")
    return zip((completion_text(c) for c in completions), answer)


# ------------------------------------------------------------------------------------------------ addition


def addition_exact_match(prompts, completions, completion_ids=None, answer=None, **kwargs) -> list:
    """1.0 when the completion is exactly the record's ``answer`` (surrounding whitespace ignored), else 0.0;
    ``None`` for records without ``answer``."""
    return [None if a is None else float(exact_match(text, str(a))) for text, a in _per_sample(completions, answer)]


# ---------------------------------------------------------------------------------------------------- math

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, nested braces included; ``None`` if
    absent or unbalanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    position = text.index("{", start) + 1
    depth = 1
    for end in range(position, len(text)):
        if text[end] == "{":
            depth += 1
        elif text[end] == "}":
            depth -= 1
            if depth == 0:
                return text[position:end]
    return None


def extract_final_answer(text: str) -> str | None:
    """The answer a solution states: the last ``\\boxed{}``, else what follows ``####`` (GSM8K style), else the
    last number in the text; ``None`` when there is none."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(answer: str) -> str:
    """Canonical text of an answer: no ``$``, spaces, ``\\left``/``\\right``, ``\\!``, ``\\text{}`` wrappers,
    thousands separators or trailing period; ``\\frac{a}{b}`` / ``\\dfrac`` written ``a/b``."""
    text = answer.strip()
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", text)
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "$", " "):
        text = text.replace(token, "")
    text = text.rstrip(".")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    text = re.sub(r"\((-?[\d.]+)\)", r"\1", text)
    return text


def _as_number(text: str) -> Fraction | None:
    text = text.rstrip("%")
    try:
        if "/" in text:
            numerator, denominator = text.split("/", 1)
            return Fraction(numerator) / Fraction(denominator)
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def answers_equal(predicted: str | None, reference: str | None, rel_tol: float = 1e-6) -> bool:
    """True when two answers agree: numerically (``rel_tol``) when both parse as numbers or fractions, else as
    normalised text."""
    if predicted is None or reference is None:
        return False
    a, b = normalize_answer(predicted), normalize_answer(reference)
    x, y = _as_number(a), _as_number(b)
    if x is not None and y is not None:
        return abs(x - y) <= rel_tol * max(1, abs(y))
    return a == b


def math_answer(prompts, completions, completion_ids=None, answer=None, **kwargs) -> list:
    """1.0 when the completion's final answer (last ``\\boxed{}``, else last number) equals the record's
    ``answer`` (itself read the same way, so ``"... #### 42"`` or ``"\\boxed{42}"`` work), else 0.0; ``None``
    for records without ``answer``."""
    rewards = []
    for text, reference in _per_sample(completions, answer):
        if reference is None:
            rewards.append(None)
            continue
        reference = str(reference)
        gold = extract_final_answer(reference) if ("\\boxed" in reference or "####" in reference) else reference
        rewards.append(float(answers_equal(extract_final_answer(text), gold)))
    return rewards


# -------------------------------------------------------------------------------------------------- format

THINK_ANSWER_PATTERN = r"<think>.*?</think>\s*<answer>.*?</answer>"


def make_format_reward(pattern: str = THINK_ANSWER_PATTERN, *, mode: str = "fullmatch", flags: int = re.DOTALL):
    """A reward function giving 1.0 to completions that match ``pattern`` and 0.0 to the others.

    Args:
      pattern: regular expression; default ``<think>...</think><answer>...</answer>``.
      mode: ``"fullmatch"`` (the whole stripped completion), ``"match"`` (at the start) or ``"search"``
        (anywhere).
      flags: ``re`` flags (default ``re.DOTALL``).
    """
    if mode not in ("fullmatch", "match", "search"):
        raise ValueError(f"mode must be 'fullmatch', 'match' or 'search', got {mode!r}")
    compiled = re.compile(pattern, flags)
    check = getattr(compiled, mode)

    def format_reward(prompts, completions, completion_ids=None, **kwargs) -> list:
        return [float(check(completion_text(c).strip()) is not None) for c in completions]

    format_reward.__name__ = "format_reward"
    return format_reward


class _SoftOverlongPunishment:
    """The reward function of :func:`get_soft_overlong_punishment` (a class, so that it pickles)."""

    __name__ = "soft_overlong_punishment"

    def __init__(self, max_completion_len: int, soft_punish_cache: int):
        self.max_completion_len = int(max_completion_len)
        self.soft_punish_cache = int(soft_punish_cache)

    def __call__(self, prompts=None, completions=None, completion_ids=None, **record_fields):
        if completion_ids is None:
            raise TypeError("soft_overlong_punishment reads completion_ids (the completions' token ids)")
        free = self.max_completion_len - self.soft_punish_cache
        out = []
        for ids in completion_ids:
            length = len(ids)
            if length <= free:
                out.append(0.0)
            elif length <= self.max_completion_len:
                out.append((free - length) / self.soft_punish_cache)
            else:
                out.append(-1.0)
        return out


def get_soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int):
    """DAPO's soft overlong punishment (arXiv 2503.14476, Eq. 13) as a reward function; TRL 1.16's
    ``trl.rewards.get_soft_overlong_punishment`` name and arguments.

    With ``L_max = max_completion_len`` and ``L_cache = soft_punish_cache``, a completion of ``|y|`` tokens gets
    ``0`` if ``|y| <= L_max - L_cache``, ``((L_max - L_cache) - |y|) / L_cache`` (from 0 down to -1) if
    ``L_max - L_cache < |y| <= L_max``, and ``-1`` beyond ``L_max``. Add it to the task reward
    (``reward_funcs: [my_reward, {name: soft_overlong_punishment, max_completion_len: 512, soft_punish_cache:
    64}]``); set ``max_completion_len`` to ``algo.max_completion_length`` (completions end there, so the ``-1``
    branch is only reached with a larger budget).

    Raises:
      ValueError: ``max_completion_len < 1`` or ``soft_punish_cache`` not in ``[1, max_completion_len]``.
    """
    if not isinstance(max_completion_len, int) or max_completion_len < 1:
        raise ValueError(f"soft_overlong_punishment: max_completion_len={max_completion_len!r} must be an int >= 1")
    if not isinstance(soft_punish_cache, int) or not 1 <= soft_punish_cache <= max_completion_len:
        raise ValueError(f"soft_overlong_punishment: soft_punish_cache={soft_punish_cache!r} must be an int in "
                         f"[1, max_completion_len={max_completion_len}]")
    return _SoftOverlongPunishment(max_completion_len, soft_punish_cache)


register_reward_fn("addition_exact_match", addition_exact_match)
register_reward_fn("math_answer", math_answer)
register_reward_fn("format", make_format_reward, factory=True)
register_reward_fn("addition_format", make_format_reward(r"\d+"))
register_reward_fn("soft_overlong_punishment", get_soft_overlong_punishment, factory=True)
