"""Shared by tests/test_accumulation*.py: a tiny model, batches with uneven lengths, the cases and the runner."""

import functools

import jax
import numpy as np
import pytest

import jrlhf.models as M
from jrlhf import sharding as S
from jrlhf import step as ST
from jrlhf.algorithms import base, dpo, grpo, onpolicy, ppo, reinforce_pp, reward, rloo, sft

SMALL = dict(hidden_size=16, intermediate_size=32, head_dim=8, vocab_size=48, num_layers=1)
VOCAB = SMALL["vocab_size"]
ROWS = 8
# completion lengths by row: micro-batch k of M holds rows k, k + M, ..., so every split sees uneven token counts
LENGTHS = np.array([2, 18, 5, 11, 3, 20, 7, 14])
ROLLOUT_LENGTHS = np.array([1, 9, 3, 10, 2, 7, 10, 4])
PROMPT, COMPLETION = 4, 10
LR = 0.1  # SGD: the update is -LR x the gradient
SCORES = np.array([1.0, 1.0, np.nan, 1.0, 0.0, 1.0, 0.0, 1.0], np.float32)  # one unscorable completion


@functools.lru_cache(maxsize=None)
def _model(head):
    config = M.tiny_config("llama", **SMALL)
    model, params = M.init_model(config, jax.random.PRNGKey(0), head=head)
    return model, jax.tree.map(np.asarray, params), M.logical_axes(model)


def _perturbed(params, seed, scale=0.05):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(x + scale * rng.standard_normal(x.shape), np.float32), params)


def _mesh():
    return S.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def _preference_batch(seed=0, seq_len=26):
    rng = np.random.default_rng(seed)
    batch = {}
    for side, lengths in (("chosen", LENGTHS), ("rejected", LENGTHS[::-1])):
        prompt = rng.integers(2, 5, size=ROWS)
        total = prompt + lengths
        pos = np.arange(seq_len)[None]
        attention = (pos < total[:, None]).astype(np.int32)
        batch[f"{side}_input_ids"] = rng.integers(1, VOCAB, size=(ROWS, seq_len)).astype(np.int32) * attention
        batch[f"{side}_attention_mask"] = attention
        batch[f"{side}_loss_mask"] = ((pos >= prompt[:, None]) & (pos < total[:, None])).astype(np.int32)
    return batch


def _sft_batch(seed=1, seq_len=26):
    pref = _preference_batch(seed, seq_len)
    return {k[len("chosen_"):]: v for k, v in pref.items() if k.startswith("chosen_")}


def _rollout_batch(model, params, seed=2):
    """A rollout batch as onpolicy.make_collect builds it (2 prompts x 4 samples, left-padded prompts, right-padded
    completions of uneven lengths); old log-probs near the policy's own, so that clipping is active."""
    rng = np.random.default_rng(seed)
    prompt_len = np.array([4, 4, 4, 4, 3, 3, 3, 3])
    pos = np.arange(PROMPT)[None]
    prompt_mask = (pos >= PROMPT - prompt_len[:, None]).astype(np.int32)
    comp_mask = (np.arange(COMPLETION)[None] < ROLLOUT_LENGTHS[:, None]).astype(np.int32)
    ids = rng.integers(1, VOCAB, size=(ROWS, PROMPT + COMPLETION)).astype(np.int32)
    attention = np.concatenate([prompt_mask, comp_mask], axis=1)
    ids = ids * attention
    lm = onpolicy.lm_view(model)
    logps, _, _ = onpolicy.completion_forward(lm, params, ids, attention, COMPLETION, temperature=1.0)
    logps = np.asarray(logps) * comp_mask
    noise = lambda: 0.3 * rng.standard_normal((ROWS, COMPLETION)).astype(np.float32)  # noqa: E731
    return {
        "input_ids": ids, "attention_mask": attention,
        "loss_mask": np.concatenate([np.zeros_like(prompt_mask), comp_mask], axis=1),
        "old_logps": (logps + noise()) * comp_mask, "ref_logps": (logps + noise()) * comp_mask,
        "old_values": rng.standard_normal((ROWS, COMPLETION)).astype(np.float32) * comp_mask,
        "scores": SCORES.copy(), "truncated": (ROLLOUT_LENGTHS == COMPLETION).astype(np.int32),
        # the sampler's log-probs for the rollout correction: far enough from old_logps that the caps bite
        "sampler_logps": (logps + 3.0 * noise()) * comp_mask,
    }


# ------------------------------------------------------------------------------------------------------ the cases

DPO_TYPES = [t for t in dpo.losses.DPO_LOSS_TYPES if t not in dpo.WHOLE_BATCH_TYPES]
# Every DPO type, grouped into weighted combinations (a type that is not exact makes its combination inexact), plus
# the combination alone and every option that adds a term or changes a count.
DPO_GROUPS = [["sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard"],
              ["apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft"]]
DPO_CASES = (
    [dict(loss_type=g, loss_weights=[1.0 + 0.25 * i for i in range(len(g))]) for g in DPO_GROUPS]
    + [dict(loss_type=["exo_pair", "robust"], label_smoothing=0.1), dict(loss_type=["sigmoid", "sft"]),
       dict(loss_type="sft", f_divergence_type="js_divergence"), dict(loss_type="sigmoid", rpo_alpha=1.0),
       dict(loss_type=["sigmoid", "sft"], ld_alpha=0.5), dict(loss_type=["sigmoid", "sft"], reference_free=True),
       dict(loss_type="bco_pair", bco_running_mean=True),
       dict(loss_type="simpo", rpo_alpha=0.5), dict(loss_type="orpo")]
)
GRPO_CASES = [
    dict(loss_type="grpo", scale_rewards="batch", beta=0.1), dict(loss_type="bnpo", beta=0.1),
    dict(loss_type="dr_grpo", scale_rewards="none", delta=1.5), dict(loss_type="dapo", epsilon_high=0.28),
    dict(loss_type="dapo", importance_sampling_level="sequence"), dict(loss_type="cispo", epsilon_high=5.0),
    dict(loss_type="sapo"), dict(loss_type="luspo"),
    # the rollout correction: weights, and drops that change every count
    dict(loss_type="dapo", vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="token_truncate"),
    dict(loss_type="grpo", vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="token_mask"),
    dict(loss_type="bnpo", vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="sequence_mask",
         vllm_importance_sampling_clip_min=0.2),  # drops rows 0, 2, 5 and 7 of the batch below
    dict(loss_type="dr_grpo", vllm_importance_sampling_correction=True,
         vllm_importance_sampling_mode="sequence_truncate"),
]
CASES = (
    [("dpo", c) for c in DPO_CASES]
    + [("reward", dict(center_rewards_coefficient=0.01, margin=True)), ("reward", dict(lm_loss_coefficient=0.5))]
    + [("sft", dict())]
    + [("grpo", c) for c in GRPO_CASES]
    + [("rloo", dict()), ("rloo", dict(beta=0.0, normalize_advantages=True, reward_clip_range=(0.0, 0.5)))]
    + [("reinforce_pp", dict(baseline="group", kl_coef=0.05)),
       ("reinforce_pp", dict(baseline="none", kl_coef=0.05, kl_estimator="k3", kl_clip=1.0, gamma=0.9))]
    + [("ppo", dict()), ("ppo", dict(whiten_rewards=True, cliprange_value=None, kl_estimator="k2"))]
)


def _case_id(case):
    name, options = case
    return name + "-" + "-".join(f"{k}={v}" for k, v in options.items()).replace(" ", "")


def _build(name, options):
    """``(model, params, specs, loss_fn, prepare_batch, batch, frozen, algo_state, onpolicy)`` of one case."""
    options = dict(options)
    if name == "dpo":
        model, params, specs = _model("lm")
        algo = dpo.Config(**options)
        frozen = dpo.Frozen(ref_params=_perturbed(params, 3))
        algo_state = {"bco_mean": np.float32(0.1), "bco_count": np.float32(2.0)} if algo.bco_running_mean else {}
        return (model, _perturbed(params, 4), specs, dpo.make_loss_fn(model, algo), base.preference_globals,
                _preference_batch(), frozen, algo_state, False)
    if name == "reward":
        margin = options.pop("margin", False)
        algo = reward.Config(**options)
        model, params, specs = _model("lm+value" if algo.lm_loss_coefficient > 0 else "score")
        batch = _preference_batch()
        if margin:
            batch["margin"] = np.linspace(-1.0, 2.0, ROWS).astype(np.float32)
        return (model, _perturbed(params, 4), specs, reward.make_loss_fn(model, algo), base.preference_globals,
                batch, None, {}, False)
    if name == "sft":
        model, params, specs = _model("lm")
        return model, params, specs, sft.make_loss_fn(model, sft.Config()), None, _sft_batch(), None, {}, False
    module = {"grpo": grpo, "rloo": rloo, "reinforce_pp": reinforce_pp, "ppo": ppo}[name]
    defaults = {"grpo": dict(num_generations=4), "rloo": dict(num_generations=4),
                "reinforce_pp": dict(num_generations=4), "ppo": dict(temperature=1.0)}[name]
    algo = module.Config(**{**defaults, **options})
    model, params, specs = _model("lm+value" if name == "ppo" else "lm")
    params = _perturbed(params, 5)
    batch = _rollout_batch(model, params)
    algo_state = {"kl_coef": np.float32(algo.kl_coef)} if name == "ppo" else {}
    return (model, params, specs, module.make_loss_fn(model, algo), module.make_prepare_batch(algo), batch, None,
            algo_state, True)


def _run(case, num_microbatches):
    model, params, specs, loss_fn, prepare, batch, frozen, algo_state, is_onpolicy = _build(*case)
    mesh = _mesh()
    opt = ST.make_optimizer(ST.OptimizerConfig(name="sgd", learning_rate=LR, max_grad_norm=None))
    state, shardings = ST.init_train_state(params, opt, jax.random.PRNGKey(0), mesh=mesh, param_specs=specs,
                                           algo_state=algo_state)
    common = dict(state_shardings=shardings, num_microbatches=num_microbatches, prepare_batch=prepare)
    if is_onpolicy:
        step = ST.make_onpolicy_update(loss_fn, opt, mesh, num_epochs=1, num_minibatches=1, shuffle=False, **common)
    else:
        step = ST.make_train_step(loss_fn, opt, mesh, **common)
    state, metrics = step(state, batch, frozen)
    update = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), state.params, params)
    return {k: float(v) for k, v in metrics.items()}, update


def _max_abs(tree):
    return max(float(np.max(np.abs(x))) for x in jax.tree.leaves(tree))


def check_case(case):
    """Runs ``case`` with 1, 2 and 4 micro-batches; asserts the same loss, update and metrics."""
    metrics1, update1 = _run(case, 1)
    assert np.isfinite(metrics1["loss"]) and _max_abs(update1) > 1e-6  # the step does something
    for m in (2, 4):
        metrics, update = _run(case, m)
        assert metrics["loss"] == pytest.approx(metrics1["loss"], abs=1e-6, rel=1e-6), m
        diff = _max_abs(jax.tree.map(lambda a, b: a - b, update, update1))
        assert diff <= 1e-6 * (1.0 + _max_abs(update1)), (m, diff)  # fp32 rounding of the summation order
        for key, value in metrics1.items():
            if key in ("step", "nonfinite", "nonfinite_count"):
                continue
            assert metrics[key] == pytest.approx(value, abs=2e-6, rel=2e-5), (m, key)


