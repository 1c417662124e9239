"""Gradient accumulation is exact for every on-policy loss (GRPO's types and scalings, RLOO, REINFORCE++, PPO):
1, 2 and 4 micro-batches of a rollout with uneven completion lengths and an unscorable row give the same loss,
metrics and update (the offline algorithms are in tests/test_accumulation.py)."""

import pytest

from accumulation_cases import CASES, _case_id, check_case

ONPOLICY = [c for c in CASES if c[0] not in ("dpo", "reward", "sft")]


@pytest.mark.parametrize("case", ONPOLICY, ids=[_case_id(c) for c in ONPOLICY])
def test_one_two_and_four_microbatches_give_the_same_loss_metrics_and_update(case):
    check_case(case)
