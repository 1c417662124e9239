"""Tests of RLOO (advantages and TRL 1.16's loss), REINFORCE++ (OpenRLHF and verl settings), ReMax and discounted
returns, against numpy references written out here, TRL 1.16's code and hand-computed cases."""

from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jrlhf.losses as L

RNG = np.random.default_rng(11)
B, T = 8, 6


def _bf16_round(x):
    return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)


def _mask(rng=RNG):
    lengths = rng.integers(1, T + 1, size=B)
    lengths[0], lengths[-1] = 0, T
    return (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)


# ---------------------------------------------------------------- RLOO


def np_rloo(r, g, normalize=False, eps=1e-4):
    grouped = r.reshape(-1, g)
    baseline = (grouped.sum(1, keepdims=True) - grouped) / (g - 1)
    adv = (grouped - baseline).reshape(-1)
    if normalize:
        adv = (adv - adv.mean()) / (adv.std(ddof=1) + eps)
    return adv


@pytest.mark.trl
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rloo_advantages_match_numpy_trl_and_verl(normalize, dtype):
    import torch
    from trl.trainer.utils import nanstd

    r = RNG.normal(size=12)
    rr = _bf16_round(r) if dtype == jnp.bfloat16 else r
    got = L.rloo_advantages(jnp.asarray(r, dtype), 4, normalize=normalize)
    np.testing.assert_allclose(got, np_rloo(rr, 4, normalize), rtol=1e-5, atol=1e-6)
    # TRL 1.16 RLOOTrainer's formula on torch.
    grouped = torch.tensor(rr).view(-1, 4)
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    adv = torch.tensor(rr) - ((torch.nansum(grouped, 1, keepdim=True) - grouped) / (counts - 1)).view(-1)
    if normalize:
        adv = (adv - torch.nanmean(adv)) / (nanstd(adv) + 1e-4)
    np.testing.assert_allclose(got, adv.numpy(), rtol=1e-5, atol=1e-6)
    if not normalize:  # verl: G/(G-1) (r - mean)
        g = rr.reshape(-1, 4)
        np.testing.assert_allclose(got, (4 / 3 * (g - g.mean(1, keepdims=True))).reshape(-1), rtol=1e-5, atol=1e-6)


def test_rloo_advantages_hand_computed_and_unscorable():
    np.testing.assert_allclose(L.rloo_advantages(jnp.array([1.0, 0.0, 0.0, 3.0, 3.0, 0.0]), 3),
                               [1.0, -0.5, -0.5, 1.5, 1.5, -3.0])
    # A NaN reward is left out of its siblings' baselines and gets 0.
    np.testing.assert_allclose(L.rloo_advantages(jnp.array([1.0, jnp.nan, 0.0, 2.0]), 4),
                               [1 - 1, 0.0, 0 - 1.5, 2 - 0.5])
    np.testing.assert_allclose(L.rloo_advantages(jnp.array([1.0, jnp.nan]), 2), [0.0, 0.0])


class _Accelerator:
    device = "cpu"
    num_processes = 1

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


@pytest.mark.trl
def test_rloo_loss_matches_trl_trainer():
    import torch
    from trl.trainer.rloo_trainer import RLOOTrainer

    m = _mask()
    per_token = -RNG.uniform(0.05, 1.0, size=(B, T)).astype(np.float32)
    seq = (per_token * m).sum(-1)
    old = (seq + RNG.normal(size=B) * 0.4).astype(np.float32)
    adv = RNG.normal(size=B).astype(np.float32)
    logps = torch.tensor(per_token, requires_grad=True)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros(B, T), None), epsilon_low=0.2,
        epsilon_high=0.28, aux_loss_enabled=False, model=SimpleNamespace(training=True), accelerator=_Accelerator(),
        _metrics=defaultdict(lambda: defaultdict(list)))
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": torch.tensor(m),
              "old_logps": torch.tensor(old), "advantages": torch.tensor(adv)}
    trl_loss = RLOOTrainer._compute_loss(trainer, None, inputs)
    trl_loss.backward()

    def ours(tok):
        return L.rloo_loss(L.masked_sum(tok, m, axis=-1), old, adv, epsilon_low=0.2, epsilon_high=0.28)

    (loss, metrics), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(per_token))
    np.testing.assert_allclose(loss, float(trl_loss.detach()), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad, logps.grad.numpy(), rtol=1e-5, atol=1e-7)
    for name, values in trainer._metrics["train"].items():
        if name in metrics:
            np.testing.assert_allclose(float(metrics[name]), values[0], rtol=1e-6, err_msg=name)
    assert {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"} <= set(metrics)
    # numpy reference and hand-computed case
    ratio = np.exp(seq - old)
    expected = np.mean(-np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.28) * adv))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(L.rloo_loss(jnp.array([0.0]), jnp.array([-1.0]), jnp.array([1.0]))[0], -1.2, rtol=1e-6)
    half, _ = L.rloo_loss(seq[:4], old[:4], adv[:4], epsilon_high=0.28, normalizer=B)
    rest, _ = L.rloo_loss(seq[4:], old[4:], adv[4:], epsilon_high=0.28, normalizer=B)
    np.testing.assert_allclose(half + rest, loss, rtol=1e-5)


# ---------------------------------------------------------------- REINFORCE++ and ReMax


def np_openrlhf_reinforce(scores, lp, ref, m, kl_coef, gamma, group=None, unbiased=False, eps_mode="clamp"):
    """OpenRLHF: (group-mean baseline) → compute_reward (score at EOS, -β·KL) → cumulative returns → global whiten."""
    if group:
        g = scores.reshape(-1, group)
        scores = (g - g.mean(1, keepdims=True)).reshape(-1)
    reward = -kl_coef * (lp - ref) * m
    for i in range(len(scores)):
        real = np.nonzero(m[i])[0]
        if len(real):
            reward[i, real[-1]] += scores[i]
    reward = reward * m
    returns = np.zeros_like(reward)
    running = np.zeros(len(scores))
    for t in reversed(range(reward.shape[1])):
        running = reward[:, t] + gamma * running
        returns[:, t] = running
    n = m.sum()
    mean = (returns * m).sum() / n
    var = (((returns - mean) ** 2) * m).sum() / n
    if unbiased:
        var = var * n / (n - 1)
    rstd = 1 / np.sqrt(max(var, 1e-8)) if eps_mode == "clamp" else 1 / np.sqrt(var + 1e-8)
    return (returns - mean) * rstd * m, returns * m


@pytest.mark.parametrize("group,gamma", [(None, 1.0), (4, 1.0), (None, 0.9)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reinforce_pp_matches_openrlhf_and_verl(group, gamma, dtype):
    m = _mask()
    scores = RNG.normal(size=B)
    lp, ref = -RNG.uniform(0.1, 2, size=(B, T)), -RNG.uniform(0.1, 2, size=(B, T))
    sr, lpr, refr = (_bf16_round(x) for x in (scores, lp, ref)) if dtype == jnp.bfloat16 else (scores, lp, ref)
    args = [jnp.asarray(x, dtype) for x in (scores, lp, ref)]
    adv, ret = L.reinforce_pp_advantages(args[0], m, logps=args[1], ref_logps=args[2], kl_coef=0.05, gamma=gamma,
                                         group_size=group)
    e_adv, e_ret = np_openrlhf_reinforce(sr, lpr, refr, m, 0.05, gamma, group)
    np.testing.assert_allclose(adv, e_adv, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ret, e_ret, rtol=1e-5, atol=1e-6)
    # verl reinforce_plus_plus: Bessel-corrected variance, eps added.
    adv_v, _ = L.reinforce_pp_advantages(args[0], m, logps=args[1], ref_logps=args[2], kl_coef=0.05, gamma=gamma,
                                         group_size=group, unbiased=True, eps_mode="add")
    e_adv_v, _ = np_openrlhf_reinforce(sr, lpr, refr, m, 0.05, gamma, group, unbiased=True, eps_mode="add")
    np.testing.assert_allclose(adv_v, e_adv_v, rtol=1e-4, atol=1e-5)


def test_reinforce_pp_and_discounted_returns_hand_computed():
    m = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    np.testing.assert_allclose(L.discounted_returns(jnp.array([[1.0, 0.0, 2.0, 9.0], [0.0, 4.0, 9.0, 9.0]]), m,
                                                    gamma=0.5),
                               [[1.5, 1.0, 2.0, 0.0], [2.0, 4.0, 0.0, 0.0]])
    # Scores only (no KL): returns are the score at every real token; whitening over 5 tokens of 3,3,3,-1,-1.
    adv, ret = L.reinforce_pp_advantages(jnp.array([3.0, -1.0]), m)
    np.testing.assert_allclose(ret, [[3, 3, 3, 0], [-1, -1, 0, 0]])
    mean, std = 7 / 5, np.sqrt(((3 - 7 / 5) ** 2 * 3 + (-1 - 7 / 5) ** 2 * 2) / 5)
    np.testing.assert_allclose(adv, [[(3 - mean) / std] * 3 + [0], [(-1 - mean) / std] * 2 + [0, 0]], rtol=1e-5)
    with pytest.raises(ValueError, match="logps"):
        L.reinforce_pp_advantages(jnp.array([3.0, -1.0]), m, kl_coef=0.1)


def test_remax_matches_verl_formula():
    m = _mask()
    token_rewards = RNG.normal(size=(B, T))
    baseline = RNG.normal(size=B)
    adv, ret = L.remax_advantages(jnp.asarray(token_rewards, jnp.bfloat16), baseline, m)
    tr = _bf16_round(token_rewards)
    e_ret = np.flip(np.cumsum(np.flip(tr * m, -1), -1), -1)  # verl: flip-cumsum-flip
    np.testing.assert_allclose(ret, e_ret * m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adv, (e_ret - baseline[:, None]) * m, rtol=1e-5, atol=1e-5)
    # Sequence scores: score - greedy score at every real token.
    adv, _ = L.remax_advantages(jnp.array([2.0]), jnp.array([0.5]), jnp.array([[1, 1, 0]]))
    np.testing.assert_allclose(adv, [[1.5, 1.5, 0.0]])


# ---------------------------------------------------------------- masking, jit, grad, vmap


def test_reinforce_family_mask_invariance_jit_vmap():
    m = _mask()
    lp, ref = jnp.asarray(-RNG.uniform(0.1, 2, size=(B, T))), jnp.asarray(-RNG.uniform(0.1, 2, size=(B, T)))
    scores = jnp.asarray(RNG.normal(size=B))

    def f(lp, ref, scores, m):
        adv, ret = L.reinforce_pp_advantages(scores, m, logps=lp, ref_logps=ref, kl_coef=0.1, kl_kind="k3",
                                             group_size=4)
        radv, _ = L.remax_advantages(ret, scores, m)
        loss, _ = L.rloo_loss(L.masked_sum(lp, m, axis=-1), L.masked_sum(ref, m, axis=-1),
                              L.rloo_advantages(scores, 4))
        return loss + jnp.sum(adv ** 2) + jnp.sum(radv) + jnp.sum(L.discounted_returns(lp, m, gamma=0.9))

    base = f(lp, ref, scores, m)
    for fill in (1e6, -1e6):
        np.testing.assert_allclose(f(jnp.where(m, lp, fill), jnp.where(m, ref, fill), scores, m), base, rtol=1e-6)
    grad_f = jax.jit(jax.grad(f))  # one compiled program: eager autodiff is slow on the 8 simulated devices
    grad = grad_f(lp, ref, scores, m)
    grad_bad = grad_f(jnp.where(m, lp, 1e6), jnp.where(m, ref, -1e6), scores, m)
    assert np.all(np.isfinite(np.asarray(grad_bad))) and np.all(np.asarray(grad_bad)[m == 0] == 0)
    np.testing.assert_allclose(grad_bad, grad, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(f)(lp, ref, scores, m), base, rtol=1e-5)
    stack = lambda x: jnp.stack([x, x])  # noqa: E731
    np.testing.assert_allclose(jax.vmap(f)(stack(lp), stack(ref), stack(scores), stack(jnp.asarray(m))),
                               [base, base], rtol=1e-5)
