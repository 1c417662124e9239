"""Online DPO (``jrlhf.algorithms.online_dpo``) against TRL 1.16's ``OnlineDPOTrainer`` and hand-computed cases.

* **TRL parity**: the real ``OnlineDPOTrainer`` (``trl.experimental.online_dpo``), built offline in float32 on tiny
  random Llama checkpoints (policy and a different reference), with its ``_generate`` replaced by fixed completions
  (some ending in EOS, some truncated, ties, reversed pairs) and a reward function returning fixed rewards; one
  ``training_step`` gives TRL's loss, gradients and logged stats. jrlhf gets the same sequences as a rollout batch
  (row ``b * 2 + i`` = TRL's row ``i * B + b``), the same rewards through the missing-EOS penalty, and runs its own
  ``prepare_batch`` + ``loss_fn`` (sigmoid and ipo). Loss, metrics and gradients agree to 1e-4.
* **ties**: ``ties='drop'`` on the full batch equals TRL's step on the untied prompts alone (zero weight, global
  count), and splitting the pairs into two micro-batches sums to the same loss.
* **pairing** and **missing_eos_penalty** on hand-computed cases (``n = 2`` and ``n = 3``, NaN rewards), and the
  config's errors.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

_EXTRA = "install the `test` extra, pip install -e '.[test]'"
torch = pytest.importorskip("torch", reason=f"needs PyTorch (torch): {_EXTRA}")
trl = pytest.importorskip("trl", minversion="1.16", reason=f"needs TRL>=1.16: {_EXTRA}")
pytest.importorskip("datasets", reason=f"needs datasets: {_EXTRA}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jrlhf import data, models  # noqa: E402
from jrlhf.algorithms import onpolicy, online_dpo  # noqa: E402
from jrlhf.config import ConfigError  # noqa: E402
from jrlhf.step import StepContext, default_globals  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning:transformers.*")

TOL = 1e-4
PROMPTS = ["321+954=", "12+3=", "999+1=", "5+5=", "40+2=", "7+80="]
# Completion texts of sample 0 and sample 1 of each prompt; "|" marks EOS (a completion without it is truncated at
# N = 5 tokens). Rewards are fixed per completion (the function ignores the text).
COMPLETIONS = [("285|", "2851|"), ("51|", "51|"), ("00011", "0001|"), ("01|", "011|"), ("24|", "2444|"),
               ("78|", "78000")]
REWARDS = [(1.0, 0.0), (1.0, 1.0), (1.0, 0.5), (0.0, 0.0), (0.0, 1.0), (1.0, 0.2)]
# After the missing-EOS penalty of 1.0: prompt 2 reverses (0.0 vs 0.5), prompt 5 widens (1.0 vs -0.8); prompts 1
# and 3 tie (the first completion chosen in TRL).
PENALTY = 1.0
N = 5
TIED = (1, 3)


def _tokenizer():
    return data.load_tokenizer("char")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from test_trl_parity import _llama_config
    from transformers import LlamaForCausalLM

    tokenizer = _tokenizer()
    root = tmp_path_factory.mktemp("online_dpo")
    dirs = {}
    for seed, name in enumerate(("policy", "reference")):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(_llama_config(tokenizer)).to(torch.float32)
        dirs[name] = str(root / name)
        model.save_pretrained(dirs[name])
    dirs["output"] = str(root / "trainer_output")
    return dirs


def _sequences(prompt_indices):
    """TRL's layout of the chosen prompts: ``(prompt_ids [2B, P], prompt_mask, completion_ids [2B, N],
    completion_mask, rewards [2B])`` as numpy, first half sample 0, second half sample 1; prompts left-padded,
    completions right-padded after EOS."""
    tokenizer = _tokenizer()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompts = [tokenizer(PROMPTS[i], add_special_tokens=False)["input_ids"] for i in prompt_indices]
    width = max(len(p) for p in prompts)
    prompt_ids = np.array([[pad] * (width - len(p)) + p for p in prompts], np.int64)
    prompt_mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], np.int64)
    completion_ids, completion_mask, rewards = [], [], []
    for sample in (0, 1):
        for i in prompt_indices:
            text = COMPLETIONS[i][sample]
            ids = tokenizer(text.rstrip("|"), add_special_tokens=False)["input_ids"] + ([eos] if "|" in text else [])
            assert len(ids) <= N
            completion_ids.append(ids + [pad] * (N - len(ids)))
            completion_mask.append([1] * len(ids) + [0] * (N - len(ids)))
            rewards.append(REWARDS[i][sample])
    return (np.concatenate([prompt_ids, prompt_ids]), np.concatenate([prompt_mask, prompt_mask]),
            np.array(completion_ids, np.int64), np.array(completion_mask, np.int64), np.array(rewards, np.float32))


def _trl_step(checkpoints, prompt_indices, loss_type):
    """One ``OnlineDPOTrainer.training_step`` on the fixed completions: ``(loss, HF-named grads, last stats)``."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    tokenizer = _tokenizer()
    prompt_ids, prompt_mask, completion_ids, completion_mask, rewards = _sequences(prompt_indices)
    fixed = iter([rewards.tolist()])

    def fixed_reward(prompts, completions, completion_ids, **kwargs):
        return next(fixed)

    policy = AutoModelForCausalLM.from_pretrained(checkpoints["policy"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(checkpoints["reference"], dtype=torch.float32)
    args = OnlineDPOConfig(output_dir=checkpoints["output"], report_to=[], use_cpu=True, bf16=False, fp16=False,
                           seed=0, per_device_train_batch_size=len(prompt_indices), dataloader_num_workers=0,
                           save_strategy="no", beta=0.1, loss_type=loss_type, max_new_tokens=N,
                           missing_eos_penalty=PENALTY, max_length=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = OnlineDPOTrainer(model=policy, ref_model=reference, reward_funcs=[fixed_reward], args=args,
                                   processing_class=tokenizer,
                                   train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]))
    trainer._generate = lambda model, prompts, images=None: (
        torch.tensor(prompt_ids), torch.tensor(prompt_mask), torch.tensor(completion_ids),
        torch.tensor(completion_mask), None)
    model = trainer.model
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = trainer.training_step(model, {"prompt": [PROMPTS[i] for i in prompt_indices]})
    grads = {name: p.grad.detach().numpy().copy() for name, p in model.named_parameters() if p.grad is not None}
    stats = {key: float(values[-1]) for key, values in trainer.stats.items() if values}
    return float(loss), grads, stats


def _rollout_batch(prompt_indices):
    """The same sequences as a jrlhf rollout batch (row ``b * 2 + i`` = sample ``i`` of prompt ``b``), with the
    rewards after :func:`online_dpo.missing_eos_score_fn`."""
    prompt_ids, prompt_mask, completion_ids, completion_mask, rewards = _sequences(prompt_indices)
    b = len(prompt_indices)
    order = np.array([i * b + p for p in range(b) for i in (0, 1)])  # jrlhf row -> TRL row
    eos = _tokenizer().eos_token_id
    truncated = (~np.any(completion_ids == eos, axis=1)).astype(np.int32)
    scores = online_dpo.missing_eos_score_fn(PENALTY)(rewards, truncated)
    ids = np.concatenate([prompt_ids, completion_ids], axis=1)[order].astype(np.int32)
    attention = np.concatenate([prompt_mask, completion_mask], axis=1)[order].astype(np.int32)
    loss_mask = np.concatenate([np.zeros_like(prompt_mask), completion_mask], axis=1)[order].astype(np.int32)
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask,
            "old_logps": np.zeros((2 * b, N), np.float32), "scores": scores[order], "truncated": truncated[order]}


def _jrlhf_step(checkpoints, prompt_indices, num_microbatches=1, **config):
    """``(loss, metrics, HF-named grads)`` of jrlhf's ``prepare_batch`` + ``loss_fn`` on the rollout batch, the
    micro-batches strided as :func:`jrlhf.step.make_onpolicy_update` splits them."""
    lm, policy = models.from_pretrained(checkpoints["policy"])
    _, reference = models.from_pretrained(checkpoints["reference"])
    algo = online_dpo.make(lm, online_dpo.Config(max_new_tokens=N, missing_eos_penalty=PENALTY, **config))
    batch = {k: jnp.asarray(v) for k, v in _rollout_batch(prompt_indices).items()}

    def run(policy, reference, batch):
        pairs, user_globals = algo.prepare_batch(batch, onpolicy.Frozen(ref_params=reference), {})
        glob = {**default_globals(pairs), **user_globals, "num_microbatches": jnp.float32(num_microbatches)}
        ctx = StepContext(rng=jax.random.key(0), step=jnp.int32(0), algo_state={}, globals=glob)
        loss, grads, metrics = 0.0, None, []
        for m in range(num_microbatches):
            micro = jax.tree.map(lambda x: x[m::num_microbatches], pairs)
            (part, mets), g = jax.value_and_grad(algo.loss_fn, has_aux=True)(policy, micro, None, ctx)
            loss = loss + part
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
            metrics.append(mets)
        metrics = jax.tree.map(lambda *xs: sum(xs) / len(xs), *metrics)
        return loss, metrics, grads

    loss, metrics, grads = jax.device_get(jax.jit(run)(policy, reference, batch))
    return float(loss), {k: float(v) for k, v in metrics.items()}, models.hf_state_dict(lm, grads)


def _check_close(name, got, expected):
    assert abs(got - expected) <= TOL, f"{name}: jrlhf {got!r} vs TRL {expected!r} (diff {abs(got - expected):.3g})"


def _check_grads(got, expected):
    from test_trl_parity import _check_grads as check

    check(got, expected)


ALL = tuple(range(len(PROMPTS)))
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "objective/scores_margin", "val/contain_eos_token", "beta")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_metrics_and_gradients_match_trl_online_dpo_trainer(checkpoints, loss_type):
    trl_loss, trl_grads, trl_stats = _trl_step(checkpoints, ALL, loss_type)
    loss, metrics, grads = _jrlhf_step(checkpoints, ALL, loss_type=loss_type, ties="first")
    assert trl_loss > 0.01 and abs(trl_stats["rewards/margins"]) > 1e-3, "the TRL step is too trivial to compare"
    _check_close("loss", loss, trl_loss)
    for key in METRICS:
        assert key in trl_stats, f"TRL logged no {key!r}: {sorted(trl_stats)}"
        _check_close(key, metrics[key], trl_stats[key])
    # 4 of 6 pairs differ in reward, two tie; 2 of 12 completions end without EOS
    _check_close("frac_ties", metrics["frac_ties"], 2 / 6)
    _check_close("val/contain_eos_token", metrics["val/contain_eos_token"], 1 - 2 / 12)
    _check_grads(grads, trl_grads)


def test_drop_ties_equals_trl_on_the_untied_prompts_with_a_global_count(checkpoints):
    untied = tuple(i for i in ALL if i not in TIED)
    trl_loss, trl_grads, trl_stats = _trl_step(checkpoints, untied, "sigmoid")
    for micro in (1, 2):
        loss, metrics, grads = _jrlhf_step(checkpoints, ALL, num_microbatches=micro, ties="drop")
        _check_close(f"loss ({micro} micro-batches)", loss, trl_loss)
        for key in ("rewards/margins", "rewards/accuracies", "logps/chosen", "objective/scores_margin"):
            _check_close(key, metrics[key], trl_stats[key])
        _check_grads(grads, trl_grads)


# ------------------------------------------------------------------------------------------------ hand cases


def test_pairing_hand_computed():
    nan = float("nan")
    # n = 2: (chosen, rejected) rows; a tie takes the first as chosen; a NaN leaves the prompt without a pair
    scores = jnp.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, nan, 1.0])
    chosen, rejected, weights, tied = online_dpo.pair_indices(scores, 2, "first")
    np.testing.assert_array_equal(chosen, [0, 3, 4, 6 + 1])
    np.testing.assert_array_equal(rejected, [1, 2, 5, 7])
    np.testing.assert_array_equal(weights, [1, 1, 1, 0])
    np.testing.assert_array_equal(tied, [False, False, True, False])
    _, _, weights, _ = online_dpo.pair_indices(scores, 2, "drop")
    np.testing.assert_array_equal(weights, [1, 1, 0, 0])
    # n = 3: first of the best, last of the worst, NaN ignored
    scores = jnp.array([0.2, 0.9, 0.9, 0.1, 0.5, 0.1, nan, 0.3, 0.7, 2.0, 2.0, 2.0])
    chosen, rejected, weights, tied = online_dpo.pair_indices(scores, 3, "first")
    np.testing.assert_array_equal(chosen, [1, 4, 8, 9])
    np.testing.assert_array_equal(rejected, [0, 5, 7, 11])
    np.testing.assert_array_equal(weights, [1, 1, 1, 1])
    np.testing.assert_array_equal(tied, [False, False, False, True])


def test_missing_eos_penalty_hand_computed():
    penalty = online_dpo.missing_eos_score_fn(0.5)
    got = penalty(np.array([1.0, 1.0, 0.2, np.nan], np.float32), np.array([0, 1, 1, 1]))
    np.testing.assert_allclose(got, [1.0, 0.5, -0.3, np.nan])
    assert online_dpo.missing_eos_score_fn(None) is None
    # the penalty reorders a pair: the truncated completion with the higher raw reward becomes the rejected one
    chosen, rejected, _, _ = online_dpo.pair_indices(jnp.asarray(penalty(np.array([1.0, 0.6], np.float32),
                                                                         np.array([1, 0]))), 2)
    assert (int(chosen[0]), int(rejected[0])) == (1, 0)


def test_config_names_and_errors():
    assert online_dpo.Config(max_new_tokens=7).max_completion_length == 7
    with pytest.raises(ConfigError, match="max_new_tokens"):
        online_dpo.Config(max_new_tokens=7, max_completion_length=8)
    lm = models.init_model(models.ModelConfig(family="llama", vocab_size=16, hidden_size=16, intermediate_size=32,
                                              num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                                              max_position_embeddings=16), jax.random.key(0))[0]
    for bad, key in (({"loss_type": "hinge"}, "loss_type"), ({"ties": "random"}, "ties"),
                     ({"num_generations": 1}, "num_generations"), ({"missing_eos_penalty": -1.0}, "missing_eos"),
                     ({"mask_truncated_completions": True}, "mask_truncated")):
        with pytest.raises(ConfigError, match=key):
            online_dpo.make(lm, online_dpo.Config(**bad))
