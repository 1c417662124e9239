"""Unscorable completions (a reward function returned None: score NaN) never shift a baseline or a statistic and
get no gradient, in every advantage estimator and every on-policy algorithm. References are numpy written out with
the unscorable rows removed."""

import functools

import jax
import numpy as np
import pytest

import jrlhf.losses as L
import jrlhf.models as M
from jrlhf import sharding as S
from jrlhf import step as ST
from jrlhf.algorithms import grpo, onpolicy, ppo, reinforce_pp, rloo

NAN = np.nan
ISSUE_SCORES = np.array([1.0, 1.0, NAN, 1.0, 0.0, 1.0, 0.0, 1.0], np.float32)  # 2 prompts x 4 samples
G = 4


# ----------------------------------------------------------------------------------------- numpy references


def np_group_centred(scores):
    out = np.zeros_like(scores, dtype=np.float64)
    for g in range(0, len(scores), G):
        s = scores[g:g + G].astype(np.float64)
        ok = ~np.isnan(s)
        out[g:g + G][ok] = s[ok] - s[ok].mean()
    return out


def np_grpo(scores, scale):
    ok = ~np.isnan(scores)
    adv = np_group_centred(scores)
    if scale == "group":
        for g in range(0, len(scores), G):
            sel = ok[g:g + G]
            std = np.std(scores[g:g + G][sel], ddof=1)
            adv[g:g + G] = adv[g:g + G] / (std + 1e-4)
    elif scale == "batch":
        adv = adv / (np.std(scores[ok], ddof=1) + 1e-4)
    return np.where(ok, adv, 0.0)


def np_rloo(rewards, normalize):
    ok = ~np.isnan(rewards)
    adv = np.zeros(len(rewards))
    for g in range(0, len(rewards), G):
        r, sel = rewards[g:g + G], ok[g:g + G]
        total, n = r[sel].sum(), sel.sum()
        for i in np.flatnonzero(sel):
            adv[g + i] = r[i] - (total - r[i]) / (n - 1)
    if normalize:
        adv[ok] = (adv[ok] - adv[ok].mean()) / (np.std(adv[ok], ddof=1) + 1e-4)
    return np.where(ok, adv, 0.0)


def np_whiten(x, mask, unbiased, mode, shift_mean=True):
    v = x[mask]
    var = np.var(v, ddof=1 if unbiased else 0)
    scale = 1 / np.sqrt(max(var, 1e-8)) if mode == "clamp" else 1 / np.sqrt(var + 1e-8)
    out = (x - v.mean()) * scale + (0 if shift_mean else v.mean())
    return np.where(mask, out, 0.0)


def np_token_rewards(scores, mask, kl, kl_coef):
    rewards = -kl_coef * kl
    for b in range(len(scores)):
        if mask[b].any():
            rewards[b, np.flatnonzero(mask[b])[-1]] += scores[b]
    return np.where(mask, rewards, 0.0)


# ------------------------------------------------------------------------------------------ the issue's case


def test_reinforce_pp_group_baseline_leaves_the_unscorable_row_out():
    """[1, 1, NaN, 1 | 0, 1, 0, 1], two tokens per completion, no KL: the all-correct group gets advantage 0 (not
    +0.37 from a NaN counted as 0), the second group ±0.5 / sqrt(2/13) = ±1.2748 (unbiased whitening over the 14
    scorable tokens)."""
    mask = np.ones((8, 2), bool)
    adv, returns = L.reinforce_pp_advantages(ISSUE_SCORES, mask, group_size=G, unbiased=True)
    adv = np.asarray(adv)
    assert np.all(adv[[0, 1, 2, 3]] == 0.0) and np.all(np.asarray(returns)[2] == 0.0)
    assert adv[4:, 0] == pytest.approx([-1.2748, 1.2748, -1.2748, 1.2748], abs=1e-4)
    keep = np.repeat(~np.isnan(ISSUE_SCORES)[:, None], 2, 1)
    ret = np.repeat(np_group_centred(ISSUE_SCORES)[:, None], 2, 1)
    assert np.allclose(adv, np_whiten(ret, keep, True, "clamp"), atol=1e-5)
    # every baseline mode, OpenRLHF's default whitening
    for group in (None, G):
        centred = np_group_centred(ISSUE_SCORES) if group else np.nan_to_num(ISSUE_SCORES)
        got, _ = L.reinforce_pp_advantages(ISSUE_SCORES, mask, group_size=group)
        want = np_whiten(np.repeat(centred[:, None], 2, 1), keep, False, "clamp")
        assert np.allclose(np.asarray(got), want, atol=1e-5), group


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_every_scaling(scale):
    got = np.asarray(L.grpo_advantages(ISSUE_SCORES, G, scale=scale))
    assert np.allclose(got, np_grpo(ISSUE_SCORES, scale), atol=1e-5)
    assert np.all(got[:4] == 0.0)


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages(normalize):
    got = np.asarray(L.rloo_advantages(ISSUE_SCORES, G, normalize=normalize))
    assert np.allclose(got, np_rloo(ISSUE_SCORES, normalize), atol=1e-5)


def test_remax_unscorable_samples_or_baselines_get_nothing():
    mask = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], bool)
    scores = np.array([1.0, NAN, 2.0, 0.5], np.float32)
    baseline = np.array([0.5, 0.5, NAN, 1.0], np.float32)
    adv, returns = (np.asarray(x) for x in L.remax_advantages(scores, baseline, mask))
    assert np.all(adv[1:3] == 0.0) and np.all(returns[1:3] == 0.0) and np.all(np.isfinite(adv))
    assert np.allclose(adv[0], [0.5, 0.5, 0.0]) and np.allclose(adv[3], [-0.5, -0.5, -0.5])


# ------------------------------------------------------------------------------------ every on-policy algorithm

SMALL = dict(hidden_size=16, intermediate_size=32, head_dim=8, vocab_size=48, num_layers=1)
PROMPT, COMPLETION = 3, 6
LENGTHS = np.array([3, 6, 4, 2, 5, 6, 1, 4])
UNSCORABLE = 2


@functools.lru_cache(maxsize=None)
def _model(head):
    model, params = M.init_model(M.tiny_config("llama", **SMALL), jax.random.PRNGKey(0), head=head)
    return model, jax.tree.map(np.asarray, params), M.logical_axes(model)


def _rollout(seed, noise_seed=None):
    """A rollout batch; with ``noise_seed`` the unscorable row's tokens, log-probs and values are redrawn."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(COMPLETION)[None] < LENGTHS[:, None]).astype(np.int32)
    ids = rng.integers(1, SMALL["vocab_size"], size=(8, PROMPT + COMPLETION)).astype(np.int32)
    attention = np.concatenate([np.ones((8, PROMPT), np.int32), mask], axis=1)
    old = -rng.uniform(0.5, 4.0, size=(8, COMPLETION)).astype(np.float32)
    ref = old + 0.3 * rng.standard_normal((8, COMPLETION)).astype(np.float32)
    values = rng.standard_normal((8, COMPLETION)).astype(np.float32)
    if noise_seed is not None:
        other = np.random.default_rng(noise_seed)
        ids[UNSCORABLE] = other.integers(1, SMALL["vocab_size"], size=PROMPT + COMPLETION)
        old[UNSCORABLE] = -other.uniform(0.5, 4.0, size=COMPLETION)
        ref[UNSCORABLE] = old[UNSCORABLE] + other.standard_normal(COMPLETION)
        values[UNSCORABLE] = 10 * other.standard_normal(COMPLETION)
    return {"input_ids": ids * attention, "attention_mask": attention,
            "loss_mask": np.concatenate([np.zeros((8, PROMPT), np.int32), mask], axis=1),
            "old_logps": old * mask, "ref_logps": ref * mask, "old_values": values * mask,
            "scores": ISSUE_SCORES.copy(), "truncated": np.zeros(8, np.int32)}


def _expected(name, algo, batch):
    """numpy advantages [R] or [R, N] and the KL metric of a rollout, the unscorable rows left out."""
    mask = batch["loss_mask"][:, PROMPT:] > 0
    ok = ~np.isnan(batch["scores"])
    keep = mask & ok[:, None]
    log_ratio = (batch["old_logps"] - batch["ref_logps"]).astype(np.float64)
    if name == "grpo":
        return np_grpo(batch["scores"], algo.scale_rewards), None
    if name == "rloo":
        seq_kl = (log_ratio * mask).sum(-1)
        rewards = batch["scores"] - algo.beta * seq_kl
        kl = (log_ratio * keep).sum() / keep.sum()
        return np_rloo(rewards, algo.normalize_advantages), kl
    if name == "reinforce_pp":
        centred = np_group_centred(batch["scores"]) if algo.baseline == "group" else np.nan_to_num(batch["scores"])
        rewards = np_token_rewards(centred, keep, log_ratio, algo.kl_coef)
        returns = np.where(keep, np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1], 0.0)
        kl = (log_ratio * keep).sum(-1)[ok].mean()
        return np_whiten(returns, keep, False, "clamp"), kl
    rewards = np_token_rewards(np.nan_to_num(batch["scores"]), keep, log_ratio, algo.kl_coef)
    if algo.whiten_rewards:
        rewards = np_whiten(rewards, keep, True, "add", shift_mean=False)
    values = batch["old_values"].astype(np.float64)
    adv = np.zeros_like(rewards)
    for b in range(8):
        next_value = next_adv = 0.0
        for t in reversed(np.flatnonzero(keep[b])):
            delta = rewards[b, t] + algo.gamma * next_value - values[b, t]
            next_adv = adv[b, t] = delta + algo.gamma * algo.lam * next_adv
            next_value = values[b, t]
    kl = (log_ratio * keep).sum(-1)[ok].mean()
    return np_whiten(adv, keep, True, "add"), kl


ALGOS = [
    ("grpo", dict(scale_rewards="group", beta=0.1)), ("grpo", dict(scale_rewards="batch", loss_type="grpo")),
    ("grpo", dict(scale_rewards="none", loss_type="dr_grpo")),
    ("rloo", dict(beta=0.05)), ("rloo", dict(beta=0.05, normalize_advantages=True)),
    ("reinforce_pp", dict(baseline="group", kl_coef=0.05)), ("reinforce_pp", dict(baseline="none", kl_coef=0.05)),
    ("ppo", dict()), ("ppo", dict(whiten_rewards=True)),
]


@pytest.mark.parametrize("name,options", ALGOS, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}"
                                                     for n, o in ALGOS])
def test_unscorable_rows_shift_no_statistic_and_get_no_gradient(name, options):
    module = {"grpo": grpo, "rloo": rloo, "reinforce_pp": reinforce_pp, "ppo": ppo}[name]
    algo = module.Config(**{"num_generations": G, "temperature": 1.0, **options})
    model, params, specs = _model("lm+value" if name == "ppo" else "lm")
    algo_state = {"kl_coef": np.float32(algo.kl_coef)} if name == "ppo" else {}
    prepare = module.make_prepare_batch(algo)
    batch = _rollout(0)

    prepared, globals_ = jax.jit(prepare)(batch, None, algo_state)
    expected_adv, expected_kl = _expected(name, algo, batch)
    adv = np.asarray(prepared["advantages"])
    assert np.allclose(adv, expected_adv, atol=2e-5), name
    assert np.all(adv[UNSCORABLE] == 0.0)
    assert np.all(np.asarray(prepared["loss_mask"])[UNSCORABLE] == 0)
    if expected_kl is not None:
        assert float(globals_["kl"]) == pytest.approx(expected_kl, rel=1e-5)

    # the unscorable row's tokens, log-probs and values change nothing: no gradient, no count, no statistic
    mesh = S.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    opt = ST.make_optimizer(ST.OptimizerConfig(name="sgd", learning_rate=0.1, max_grad_norm=None))
    runs = []
    for noise in (None, 1, 2):
        state, shardings = ST.init_train_state(params, opt, jax.random.PRNGKey(0), mesh=mesh, param_specs=specs,
                                               algo_state=algo_state)
        if not runs:
            update = ST.make_onpolicy_update(module.make_loss_fn(model, algo), opt, mesh, state_shardings=shardings,
                                             num_epochs=1, num_minibatches=1, shuffle=False, prepare_batch=prepare,
                                             num_microbatches=2)
        state, metrics = update(state, _rollout(0, noise))
        runs.append((jax.tree.map(np.asarray, state.params), {k: float(v) for k, v in metrics.items()}))
    base_params, base_metrics = runs[0]
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(base_params),
                                                            jax.tree.leaves(params))) > 1e-6
    for other_params, other_metrics in runs[1:]:
        for a, b in zip(jax.tree.leaves(base_params), jax.tree.leaves(other_params)):
            np.testing.assert_allclose(a, b, atol=1e-6)
        for key, value in base_metrics.items():
            assert other_metrics[key] == pytest.approx(value, abs=1e-6, rel=1e-5), key


def test_rollout_reward_metrics_leave_unscorable_rows_out():
    metrics = onpolicy._rollout_metrics(ISSUE_SCORES, {"f": ISSUE_SCORES}, np.ones((8, 2), np.int32),
                                        np.zeros(8, bool), G,
                                        type("P", (), {"prompt_mask": np.ones((2, 3), np.int32)})())
    assert metrics["reward"] == pytest.approx(np.nanmean(ISSUE_SCORES))
    assert metrics["reward_std"] == pytest.approx(np.nanstd(ISSUE_SCORES, ddof=1))
    assert metrics["frac_reward_zero_std"] == pytest.approx(0.5)  # the first group's scorable rewards are all 1
