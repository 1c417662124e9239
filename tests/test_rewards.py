"""Reward functions: combination with weights and None, errors that name the function, shipped rewards."""

import math

import numpy as np
import pytest

from jrlhf import rewards
from jrlhf.rewards import RewardError


def _batch():
    prompts = ["1+1=", "2+2=", "3+3=", "4+4="]
    completions = ["2", "4", "7", "8"]
    completion_ids = [[28, 2], [30, 2], [33, 2], [34, 2]]
    records = [
        {"prompt": p, "answer": a, "group": g}
        for p, a, g in zip(prompts, ["2", "4", "6", None], ["a", "b", "a", "b"])
    ]
    return prompts, completions, completion_ids, records


def length_reward(prompts, completions, completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


def only_group_a(prompts, completions, completion_ids, group, **kwargs):
    return [1.5 if g == "a" else None for g in group]


@pytest.mark.torch
def test_combine_rewards_matches_trl_formula():
    import torch
    prompts, completions, completion_ids, records = _batch()
    funcs = ["addition_exact_match", length_reward, only_group_a]
    weights = [2.0, 0.5, -1.0]
    total, per_func = rewards.combine_rewards(funcs, weights, prompts, completions, completion_ids, records)
    assert list(per_func) == ["addition_exact_match", "length_reward", "only_group_a"]
    np.testing.assert_array_equal(per_func["addition_exact_match"], [1, 1, 0, np.nan])  # answer None -> NaN
    np.testing.assert_array_equal(per_func["only_group_a"], [1.5, np.nan, 1.5, np.nan])
    # TRL's GRPOTrainer: (rewards_per_func * weights).nansum(dim=1).
    table = torch.tensor(np.stack(list(per_func.values()), axis=1))
    expected = (table * torch.tensor(weights)).nansum(dim=1).numpy()
    np.testing.assert_allclose(total, expected)
    np.testing.assert_allclose(total, [2 + 1 - 1.5, 2 + 1, 0 + 1 - 1.5, 1])  # by hand
    assert total.dtype == np.float32 and all(v.dtype == np.float32 for v in per_func.values())


def test_unscorable_rows_are_nan_and_warned(caplog):
    prompts, completions, completion_ids, records = _batch()
    with caplog.at_level("WARNING", logger="jrlhf.rewards"):
        total, per_func = rewards.combine_rewards([only_group_a], None, prompts, completions, completion_ids, records)
    np.testing.assert_array_equal(total, [1.5, np.nan, 1.5, np.nan])
    assert "every reward function returned None for 2 of 4 samples" in caplog.text and "2+2=" in caplog.text
    metrics = rewards.reward_metrics(total, per_func)
    assert metrics["reward"] == pytest.approx(1.5) and metrics["rewards/only_group_a/mean"] == pytest.approx(1.5)
    assert metrics["reward_std"] == pytest.approx(0.0)


def test_reward_metrics_match_numpy():
    total = np.array([1.0, 2.0, np.nan, 4.0], np.float32)
    metrics = rewards.reward_metrics(total, {"f": total})
    assert metrics["reward"] == pytest.approx(np.mean([1, 2, 4]))
    assert metrics["reward_std"] == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert metrics["rewards/f/std"] == pytest.approx(np.std([1, 2, 4], ddof=1))


def test_record_fields_reach_the_function_as_lists():
    prompts, completions, completion_ids, records = _batch()
    seen = {}

    def spy(prompts, completions, completion_ids, **kwargs):
        seen.update(kwargs)
        return [0.0] * len(prompts)

    rewards.combine_rewards([spy], [1.0], prompts, completions, completion_ids, records, extra_kwargs={"step": 3})
    assert seen == {"answer": ["2", "4", "6", None], "group": ["a", "b", "a", "b"], "step": 3}


def test_a_raising_function_is_named_with_the_sample():
    prompts, completions, completion_ids, records = _batch()

    def broken(prompts, completions, completion_ids, **kwargs):
        raise KeyError("solution")

    with pytest.raises(RewardError) as info:
        rewards.combine_rewards([length_reward, broken], None, prompts, completions, completion_ids, records)
    message = str(info.value)
    assert "reward function 'broken' raised KeyError" in message and "'1+1='" in message
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.parametrize(
    "values, pattern",
    [
        ([1.0, float("nan"), 0.0, 0.0], r"'bad' returned nan for sample 1 \(prompt='2\+2=', completion='4'"),
        ([1.0, 0.0, math.inf, 0.0], r"'bad' returned inf for sample 2"),
        ([1.0, "high", 0.0, 0.0], r"'bad' returned 'high' for sample 1"),
        ([1.0, 0.0], r"'bad' returned 2 rewards for 4 completions"),
        (None, r"'bad' returned None, not a list"),
    ],
)
def test_invalid_values_name_the_function_and_sample(values, pattern):
    prompts, completions, completion_ids, records = _batch()

    def bad(prompts, completions, completion_ids, **kwargs):
        return values

    with pytest.raises(RewardError, match=pattern):
        rewards.combine_rewards([bad], None, prompts, completions, completion_ids, records)


def test_mismatched_inputs_and_weights():
    prompts, completions, completion_ids, records = _batch()
    with pytest.raises(RewardError, match="2 reward weights for 1 reward functions"):
        rewards.combine_rewards([length_reward], [1.0, 2.0], prompts, completions, completion_ids, records)
    with pytest.raises(RewardError, match="same length"):
        rewards.combine_rewards([length_reward], None, prompts[:3], completions, completion_ids, records)
    with pytest.raises(RewardError, match="at least one"):
        rewards.combine_rewards([], None, prompts, completions, completion_ids, records)


def test_duplicate_names_get_suffixes():
    prompts, completions, completion_ids, records = _batch()
    _, per_func = rewards.combine_rewards([length_reward, length_reward], None, prompts, completions, completion_ids)
    assert list(per_func) == ["length_reward", "length_reward_2"]


def test_registry():
    names = rewards.reward_fn_names()
    assert {"addition_exact_match", "addition_format", "math_answer", "format"} <= set(names)
    assert rewards.get_reward_fn("addition_exact_match") is rewards.addition_exact_match
    digits_only = rewards.get_reward_fn("format", pattern=r"\d+")
    assert digits_only(["p", "p"], ["123", "12 3"], None) == [1.0, 0.0]
    with pytest.raises(RewardError, match="unknown reward function 'exact'; registered: addition_exact_match"):
        rewards.get_reward_fn("exact")
    with pytest.raises(RewardError, match="takes no options"):
        rewards.get_reward_fn("math_answer", pattern="x")
    with pytest.raises(RewardError, match=rf"'math_answer' is taken by jrlhf\.rewards\.verifiable:math_answer; cannot "
                                          rf"register {length_reward.__module__}:length_reward"):
        rewards.register_reward_fn("math_answer", length_reward)


def test_registering_the_same_function_again_is_not_an_error():
    rewards.register_reward_fn("test_rewards_length", length_reward)
    rewards.register_reward_fn("test_rewards_length", length_reward)  # a script or notebook cell run twice

    def length_reward_v2(prompts, completions, completion_ids, **kwargs):  # the cell re-run: a new object
        return [0.0] * len(completions)

    length_reward_v2.__qualname__, length_reward_v2.__module__ = length_reward.__qualname__, length_reward.__module__
    rewards.register_reward_fn("test_rewards_length", length_reward_v2)
    assert rewards.get_reward_fn("test_rewards_length") is length_reward_v2
    here = length_reward.__module__
    with pytest.raises(RewardError, match=f"taken by {here}:length_reward; cannot register {here}:only_group_a"):
        rewards.register_reward_fn("test_rewards_length", only_group_a)
    with pytest.raises(RewardError, match="without ':'"):
        rewards.register_reward_fn("a:b", length_reward)


def test_module_function_paths_and_callables_resolve():
    assert rewards.get_reward_fn("jrlhf.rewards.verifiable:math_answer") is rewards.math_answer
    digits = rewards.get_reward_fn("jrlhf.rewards:make_format_reward", pattern=r"\d+")  # options: a factory
    assert digits(["p", "p"], ["123", "x"], None) == [1.0, 0.0]
    funcs, names = rewards.resolve_reward_funcs(
        ["addition_exact_match", "jrlhf.rewards:math_answer", only_group_a, length_reward, length_reward])
    assert funcs == [rewards.addition_exact_match, rewards.math_answer, only_group_a, length_reward, length_reward]
    assert names == ["addition_exact_match", "math_answer", "only_group_a", "length_reward", "length_reward_2"]
    with pytest.raises(RewardError, match="cannot import module 'no_such_module_x'"):
        rewards.get_reward_fn("no_such_module_x:f")
    with pytest.raises(RewardError, match="module 'jrlhf.rewards' has no attribute 'missing'"):
        rewards.get_reward_fn("jrlhf.rewards:missing")
    with pytest.raises(RewardError, match="reward_funcs entry 3"):
        rewards.resolve_reward_funcs([3])


def test_addition_exact_match():
    got = rewards.addition_exact_match(
        ["1+1="] * 4, [" 2\n", "20", [{"role": "assistant", "content": "2"}], "2"], None, answer=["2", "2", "2", None]
    )
    assert got == [1.0, 0.0, 1.0, None]


def test_math_answer_checker():
    completions = [
        "so x = \\boxed{\\frac{1}{2}}.",
        "We get 1,234 apples in total.",
        "First 3, then \\boxed{x^{2}+1}",
        "the answer is 7",
        "I don't know",
        "3.50",
        "\\boxed{-4}",
    ]
    answers = ["0.5", "#### 1234", "x^2+1", "\\boxed{7}", "3", "7/2", None]
    assert rewards.math_answer(None, completions, None, answer=answers) == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, None]
    assert rewards.extract_boxed("a \\boxed{x^{2}+1} b \\boxed{\\frac{3}{4}}") == "\\frac{3}{4}"
    assert rewards.extract_boxed("\\boxed{unbalanced") is None
    assert rewards.extract_final_answer("1 then 2.5 then -3") == "-3"
    assert rewards.answers_equal("\\dfrac{6}{4}", "1.5") and not rewards.answers_equal("1.5001", "1.5")
    assert rewards.answers_equal("\\text{yes}", "yes") and not rewards.answers_equal(None, "1")


def test_format_reward_modes():
    think = rewards.make_format_reward()
    text = "<think>add\nthe digits</think>\n<answer>3</answer>"
    assert think(None, [text, "<answer>3</answer>", text + " extra"], None) == [1.0, 0.0, 0.0]
    search = rewards.make_format_reward(r"<answer>\d+</answer>", mode="search")
    assert search(None, [text + " extra", "none"], None) == [1.0, 0.0]
    with pytest.raises(ValueError, match="mode"):
        rewards.make_format_reward(mode="any")


# ---------------------------------------------------------------------------------------------------- GSM8K


GSM8K_COMPLETIONS = [
    "48 / 2 = 24 clips in May. 48 + 24 = 72. The answer is 72.",  # right, stated at the end
    "She earned 0.2 x 50 = 10. The answer is: $10 dollars",  # right; '$' and a unit word allowed
    "The answer is 72. Let me check: 48 + 24 = 70",  # stated, then more text; stated answer wins over 70
    "Natalia sold 48 + 24 = 72 clips.",  # right by its last number, not stated
    "So the total is \\boxed{1,208}",  # boxed; thousands separator
    "The answer is 71.",  # wrong, stated at the end
    "First, we need to find how many clips she sold in May. In May she sold",  # ran out: nothing stated
    "the ANSWER IS **-3.5**.",  # case-insensitive, markdown bold, negative decimal
]
GSM8K_ANSWERS = ["72", "10", "72", "72", "1208", "72", "72", "-3.5"]


def test_stated_answer_by_hand():
    expected = ["72", "10", "72", None, "1,208", "71", None, "-3.5"]
    assert [rewards.stated_answer(c) for c in GSM8K_COMPLETIONS] == expected


def test_gsm8k_answer_by_hand():
    got = rewards.gsm8k_answer(None, GSM8K_COMPLETIONS, None, answer=GSM8K_ANSWERS)
    assert got == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    # a GSM8K solution as the reference is read after '####'; no reference: None
    assert rewards.gsm8k_answer(None, ["The answer is 18."], None, answer=["... = 18\n#### 18"]) == [1.0]
    assert rewards.gsm8k_answer(None, ["The answer is 18."], None, answer=[None]) == [None]


def test_gsm8k_format_by_hand():
    got = rewards.gsm8k_format(None, GSM8K_COMPLETIONS, None)
    assert got == [1.0, 1.0, 0.5, 0.0, 0.0, 1.0, 0.0, 1.0]
    # a unit word or two may follow; another number or a new line after it is "elsewhere"
    assert rewards.gsm8k_format(None, ["The answer is 5 apples.", "The answer is 5.\nNext, 6", "answer is 5\nok"],
                                None) == [1.0, 0.5, 0.5]


def test_gsm8k_shaped_is_answer_plus_half_format_through_combine_rewards():
    prompts = ["q"] * len(GSM8K_COMPLETIONS)
    records = [{"prompt": "q", "answer": a} for a in GSM8K_ANSWERS]
    total, per_func = rewards.combine_rewards(["gsm8k_answer", "gsm8k_format"], [1.0, 0.5], prompts,
                                              GSM8K_COMPLETIONS, [[]] * len(prompts), records)
    by_hand = [1.5, 1.5, 1.25, 1.0, 1.0, 0.5, 0.0, 1.5]
    np.testing.assert_allclose(total, by_hand)
    np.testing.assert_allclose(rewards.gsm8k_shaped(prompts, GSM8K_COMPLETIONS, None, answer=GSM8K_ANSWERS), by_hand)
    assert {"gsm8k_answer", "gsm8k_format", "gsm8k_shaped"} <= set(rewards.reward_fn_names())
