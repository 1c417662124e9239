"""Gradient accumulation is exact for every loss of every algorithm: 1, 2 and 4 micro-batches of a batch whose rows
have uneven lengths give the same loss, the same metrics and the same update; losses that cannot be exact are
refused with a ConfigError. Plus the DPO ``[sigmoid, sft]`` case written out in numpy.

Every case runs the algorithm's own ``make_loss_fn`` and ``prepare_batch`` through ``jrlhf.step`` on one device.
"""

import jax
import numpy as np
import pytest

from accumulation_cases import (CASES, DPO_CASES, DPO_TYPES, GRPO_CASES, VOCAB, _case_id, _max_abs, _mesh, _model,
                                check_case)
from jrlhf import step as ST
from jrlhf.algorithms import base, dpo, grpo, reinforce_pp
from jrlhf.config import ConfigError

OFFLINE = [c for c in CASES if c[0] in ("dpo", "reward", "sft")]


def test_the_cases_cover_every_loss_type():
    dpo_types = {t for c in DPO_CASES for t in ([c["loss_type"]] if isinstance(c["loss_type"], str)
                                                else c["loss_type"])}
    assert dpo_types >= set(DPO_TYPES) | {"simpo", "orpo"}
    assert {c["loss_type"] for c in GRPO_CASES} == set(grpo.losses.GRPO_LOSS_TYPES)
    assert {c.get("scale_rewards", "group") for c in GRPO_CASES} == set(grpo.SCALE_REWARDS)
    assert {c.get("baseline") for n, c in CASES if n == "reinforce_pp"} == set(reinforce_pp.BASELINES)


@pytest.mark.parametrize("case", OFFLINE, ids=[_case_id(c) for c in OFFLINE])
def test_one_two_and_four_microbatches_give_the_same_loss_metrics_and_update(case):
    check_case(case)


@pytest.mark.parametrize("loss_type", [["aot"], ["aot_unpaired"], ["aot_pair"], ["sigmoid", "aot"]])
def test_whole_batch_dpo_types_refuse_microbatches(loss_type):
    dpo.check_config(dpo.Config(loss_type=loss_type), num_microbatches=1)
    with pytest.raises(ConfigError, match="num_microbatches"):
        dpo.check_config(dpo.Config(loss_type=loss_type), num_microbatches=2)


# --------------------------------------------------------------------------------------------- the case


def _np_token_logps(model, params, ids, attention):
    logits = np.asarray(jax.jit(model.apply)(params, ids, attention), np.float64)[:, :-1]
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]


def test_dpo_sigmoid_plus_sft_with_two_lengths_split_over_two_microbatches():
    """4 pairs whose chosen answers have 2, 30, 2 and 30 target tokens: with 2 micro-batches (rows 0, 2 and rows
    1, 3) each holds one length. At the reference (policy = reference) the loss is log 2 + total chosen NLL / total
    chosen tokens, with either split, and the update is the same."""
    model, params, specs = _model("lm")
    rng = np.random.default_rng(7)
    seq_len, prompt = 36, 3
    lengths = np.array([2, 30, 2, 30])
    batch = {}
    for side in ("chosen", "rejected"):
        pos = np.arange(seq_len)[None]
        attention = (pos < (prompt + lengths)[:, None]).astype(np.int32)
        batch[f"{side}_input_ids"] = rng.integers(1, VOCAB, size=(4, seq_len)).astype(np.int32) * attention
        batch[f"{side}_attention_mask"] = attention
        batch[f"{side}_loss_mask"] = ((pos >= prompt) & (pos < (prompt + lengths)[:, None])).astype(np.int32)
    lp = _np_token_logps(model, params, batch["chosen_input_ids"], batch["chosen_attention_mask"])
    mask = batch["chosen_loss_mask"][:, 1:]
    expected = np.log(2.0) + float(-(lp * mask).sum() / mask.sum())
    assert mask.sum() == 64

    algo = dpo.Config(loss_type=["sigmoid", "sft"])
    mesh = _mesh()
    updates = []
    for m in (1, 2):
        opt = ST.make_optimizer(ST.OptimizerConfig(name="sgd", learning_rate=1.0, max_grad_norm=None))
        state, shardings = ST.init_train_state(params, opt, jax.random.PRNGKey(0), mesh=mesh, param_specs=specs)
        step = ST.make_train_step(dpo.make_loss_fn(model, algo), opt, mesh, state_shardings=shardings,
                                  num_microbatches=m, prepare_batch=base.preference_globals)
        state, metrics = step(state, batch, dpo.Frozen(ref_params=params))
        assert float(metrics["loss"]) == pytest.approx(expected, abs=1e-5), m
        updates.append(jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, state.params, params))
    assert _max_abs(jax.tree.map(lambda a, b: a - b, *updates)) <= 1e-6 * (1.0 + _max_abs(updates[0]))
