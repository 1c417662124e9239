"""Tests of PPO pieces: GAE, clipped policy and value losses, KL-penalised rewards, adaptive KL controller. References
are the loops of TRL's former PPO trainer / OpenRLHF / verl written out in numpy, plus hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jrlhf.losses as L

RNG = np.random.default_rng(7)
B, T = 5, 8


def _bf16_round(x):
    return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)


def _right_padded_mask(rng=RNG):
    lengths = rng.integers(1, T + 1, size=B)
    lengths[0], lengths[-1] = 0, T
    return (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)


# ---------------------------------------------------------------- GAE


def np_gae_right_padded(rewards, values, m, gamma, lam):
    """TRL's former PPO trainer / OpenRLHF: zero padded values and rewards, then the plain backward recursion."""
    values, rewards = values * m, rewards * m
    adv = np.zeros_like(rewards)
    last = np.zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t < rewards.shape[1] - 1 else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    return adv * m, (adv + values) * m


def np_gae_verl(rewards, values, m, gamma, lam):
    """verl's current compute_gae_advantage_return (skips masked tokens)."""
    next_value = np.zeros(rewards.shape[0])
    last = np.zeros(rewards.shape[0])
    adv = np.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        new_last = delta + gamma * lam * last
        next_value = values[:, t] * m[:, t] + (1 - m[:, t]) * next_value
        last = new_last * m[:, t] + (1 - m[:, t]) * last
        adv[:, t] = last
    return adv * m, (adv + values) * m


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.8)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gae_matches_trl_openrlhf_and_verl_loops(gamma, lam, dtype):
    rewards, values = RNG.normal(size=(B, T)), RNG.normal(size=(B, T))
    m = _right_padded_mask()
    rr, vr = (_bf16_round(rewards), _bf16_round(values)) if dtype == jnp.bfloat16 else (rewards, values)
    adv, ret = L.gae(jnp.asarray(rewards, dtype), jnp.asarray(values, dtype), m, gamma=gamma, lam=lam)
    assert adv.dtype == jnp.float32 and adv.shape == (B, T)
    for ref in (np_gae_right_padded, np_gae_verl):
        ea, er = ref(rr, vr, m, gamma, lam)
        np.testing.assert_allclose(adv, ea, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret, er, rtol=1e-5, atol=1e-5)
    # Interior holes (observation tokens): verl's skipping semantics.
    holes = (RNG.uniform(size=(B, T)) > 0.3).astype(np.int32)
    adv, ret = L.gae(rewards, values, holes, gamma=gamma, lam=lam)
    ea, er = np_gae_verl(rewards, values, holes, gamma, lam)
    np.testing.assert_allclose(adv, ea, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, er, rtol=1e-5, atol=1e-5)


def test_gae_hand_computed():
    # Two real tokens then padding; reward 1 at the last real token, values 0.5 and 0.25, γ = 0.9, λ = 0.5.
    rewards = jnp.array([[0.0, 1.0, 7.0]])
    values = jnp.array([[0.5, 0.25, 99.0]])
    m = jnp.array([[1, 1, 0]])
    adv, ret = L.gae(rewards, values, m, gamma=0.9, lam=0.5)
    a1 = 1.0 - 0.25  # last real token: next value 0
    a0 = (0.0 + 0.9 * 0.25 - 0.5) + 0.9 * 0.5 * a1
    np.testing.assert_allclose(adv, [[a0, a1, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[a0 + 0.5, a1 + 0.25, 0.0]], rtol=1e-6)


# ---------------------------------------------------------------- policy and value losses


def np_policy_loss(lp, old, adv, m, eps_low, eps_high, dual_clip=None, log_ratio_clip=None):
    """verl compute_policy_loss (with clip_ratio_c = dual_clip) / OpenRLHF PolicyLoss (dual_clip None)."""
    neg_kl = lp - old
    if log_ratio_clip is not None:
        neg_kl = np.clip(neg_kl, -log_ratio_clip, log_ratio_clip)
    ratio = np.exp(neg_kl)
    l1 = -adv * ratio
    l2 = -adv * np.clip(ratio, 1 - eps_low, 1 + eps_high)
    clip1 = np.maximum(l1, l2)
    clipfrac = ((l2 > l1) * m).sum() / m.sum()
    per_token, lower = clip1, np.zeros_like(clip1)
    if dual_clip is not None:
        l3 = -adv * dual_clip
        per_token = np.where(adv < 0, np.minimum(l3, clip1), clip1)
        lower = (clip1 > l3) * (adv < 0)
    return ((per_token * m).sum() / m.sum(), clipfrac, (-neg_kl * m).sum() / m.sum(), (lower * m).sum() / m.sum())


@pytest.mark.parametrize("cfg", [dict(), dict(eps_high=0.28), dict(dual_clip=3.0, log_ratio_clip=20.0),
                                 dict(dual_clip=1.5)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ppo_policy_loss_matches_numpy(cfg, dtype):
    m = _right_padded_mask()
    m[0, :2] = 1
    lp = -RNG.uniform(0.1, 3, size=(B, T))
    old = lp + RNG.normal(size=(B, T)) * 0.6
    adv = RNG.normal(size=(B, T)) * 2
    lpr, oldr, advr = (_bf16_round(x) for x in (lp, old, adv)) if dtype == jnp.bfloat16 else (lp, old, adv)
    loss, metrics = L.ppo_policy_loss(jnp.asarray(lp, dtype), jnp.asarray(old, dtype), jnp.asarray(adv, dtype), m,
                                      clip_eps=0.2, clip_eps_high=cfg.get("eps_high"), dual_clip=cfg.get("dual_clip"),
                                      log_ratio_clip=cfg.get("log_ratio_clip"))
    e_loss, e_clipfrac, e_kl, e_lower = np_policy_loss(lpr, oldr, advr, m, 0.2, cfg.get("eps_high", 0.2),
                                                       cfg.get("dual_clip"), cfg.get("log_ratio_clip"))
    np.testing.assert_allclose(loss, e_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["actor/pg_loss"], e_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["actor/pg_clipfrac"], e_clipfrac, rtol=1e-6)
    np.testing.assert_allclose(metrics["actor/ppo_kl"], e_kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["actor/pg_clipfrac_lower"], e_lower, rtol=1e-6)
    if cfg.get("dual_clip") == 1.5:  # the dual clip binds somewhere, so the comparison covers it
        assert float(metrics["actor/pg_clipfrac_lower"]) > 0


def test_ppo_policy_loss_aggregations_normalizer_and_hand_computed():
    m = _right_padded_mask()
    lp = -RNG.uniform(0.1, 3, size=(B, T))
    old = lp + RNG.normal(size=(B, T)) * 0.3
    adv = RNG.normal(size=B)
    ratio = np.exp(lp - old)
    per_token = np.maximum(-adv[:, None] * ratio, -adv[:, None] * np.clip(ratio, 0.8, 1.2))
    seq_mean = ((per_token * m).sum(-1) / np.maximum(m.sum(-1), 1)).mean()
    loss, _ = L.ppo_policy_loss(lp, old, adv, m, aggregation="seq_mean_token_mean")  # OpenRLHF token_level_loss=False
    np.testing.assert_allclose(loss, seq_mean, rtol=1e-5)
    full, _ = L.ppo_policy_loss(lp, old, adv, m)
    parts = [L.ppo_policy_loss(lp[i:i + 2], old[i:i + 2], adv[i:i + 2], m[i:i + 2], normalizer=m.sum())[0]
             for i in range(0, B, 2)]
    np.testing.assert_allclose(sum(parts), full, rtol=1e-5)
    # Hand-computed: ratio e^1 with A = -1 → unclipped e, dual clip 2 caps it at 2.
    one = jnp.array([[1]])
    loss, metrics = L.ppo_policy_loss(jnp.array([[0.0]]), jnp.array([[-1.0]]), jnp.array([[-1.0]]), one, dual_clip=2.0)
    np.testing.assert_allclose(loss, 2.0, rtol=1e-6)
    assert float(metrics["actor/pg_clipfrac_lower"]) == 1.0
    loss, _ = L.ppo_policy_loss(jnp.array([[0.0]]), jnp.array([[-1.0]]), jnp.array([[-1.0]]), one)
    np.testing.assert_allclose(loss, np.e, rtol=1e-6)
    with pytest.raises(ValueError, match="dual_clip"):
        L.ppo_policy_loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.zeros((1, 1)), one, dual_clip=0.5)


def np_value_loss(v, old_v, ret, m, clip):
    v1 = (v - ret) ** 2
    if clip is None:
        return 0.5 * (v1 * m).sum() / m.sum(), 0.0
    vclip = np.clip(v, old_v - clip, old_v + clip)  # verl clip_by_value == OpenRLHF old + clamp(v - old)
    v2 = (vclip - ret) ** 2
    return 0.5 * (np.maximum(v1, v2) * m).sum() / m.sum(), ((v2 > v1) * m).sum() / m.sum()


@pytest.mark.parametrize("clip", [0.2, 0.5, None])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ppo_value_loss_matches_numpy(clip, dtype):
    m = _right_padded_mask()
    v, old_v, ret = RNG.normal(size=(B, T)), RNG.normal(size=(B, T)), RNG.normal(size=(B, T))
    vr, oldr, retr = (_bf16_round(x) for x in (v, old_v, ret)) if dtype == jnp.bfloat16 else (v, old_v, ret)
    loss, metrics = L.ppo_value_loss(jnp.asarray(v, dtype), jnp.asarray(old_v, dtype), jnp.asarray(ret, dtype), m,
                                     cliprange_value=clip)
    e_loss, e_frac = np_value_loss(vr, oldr, retr, m, clip)
    np.testing.assert_allclose(loss, e_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["critic/vf_loss"], e_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["critic/vf_clipfrac"], e_frac, rtol=1e-6)
    # Hand-computed: V = 2, V_old = 0, R = 0, c = 0.5: max(4, 0.25) / 2 = 2.
    loss, _ = L.ppo_value_loss(jnp.array([[2.0]]), jnp.array([[0.0]]), jnp.array([[0.0]]), jnp.array([[1]]),
                               cliprange_value=0.5)
    np.testing.assert_allclose(loss, 2.0)


# ---------------------------------------------------------------- rewards and KL controller


def test_kl_penalized_rewards_match_openrlhf_compute_reward():
    m = _right_padded_mask()
    scores = RNG.normal(size=B)
    lp, ref = -RNG.uniform(0.1, 3, size=(B, T)), -RNG.uniform(0.1, 3, size=(B, T))
    for kind, kl_clip in [("k1", None), ("k3", 10.0), ("k2", None)]:
        rewards, kl = L.kl_penalized_rewards(scores, lp, ref, m, kl_coef=0.1, kl_kind=kind, kl_clip=kl_clip,
                                             score_clip=(-0.5, 0.5))
        d = lp - ref
        kl_np = {"k1": d, "k2": 0.5 * d * d, "k3": np.clip(np.exp(-d) - 1 + d, -10, 10)}[kind] * m
        expected = -0.1 * kl_np
        for i in range(B):  # OpenRLHF: score at the last True of the action mask
            real = np.nonzero(m[i])[0]
            if len(real):
                expected[i, real[-1]] += np.clip(scores[i], -0.5, 0.5)
        np.testing.assert_allclose(rewards, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(kl, kl_np, rtol=1e-5, atol=1e-6)
    # Hand-computed: score 3 at position 1, k1 KL 0.5 per token, β = 0.2.
    rewards, _ = L.kl_penalized_rewards(jnp.array([3.0]), jnp.array([[-1.0, -1.0, 5.0]]),
                                        jnp.array([[-1.5, -1.5, 0.0]]), jnp.array([[1, 1, 0]]), kl_coef=0.2)
    np.testing.assert_allclose(rewards, [[-0.1, 2.9, 0.0]], rtol=1e-6)


def test_adaptive_kl_update_matches_controller_and_hand_computed():
    def np_controller(value, kl, n, target, horizon):
        err = np.clip(kl / target - 1, -0.2, 0.2)
        return value * (1 + err * n / horizon)

    for kl in (0.0, 0.05, 0.1, 0.5):
        np.testing.assert_allclose(L.adaptive_kl_update(0.2, kl, 256, target=0.1, horizon=10000),
                                   np_controller(0.2, kl, 256, 0.1, 10000), rtol=1e-6)
    # KL at 3x the target: error clipped to 0.2; n_steps = horizon → × 1.2.
    np.testing.assert_allclose(L.adaptive_kl_update(0.5, 0.3, 100, target=0.1, horizon=100), 0.6, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda c, k: L.adaptive_kl_update(c, k, 100, target=0.1, horizon=100))(0.5, 0.0),
                               0.4, rtol=1e-6)
    with pytest.raises(ValueError, match="target"):
        L.adaptive_kl_update(0.1, 0.1, 1, target=0.0, horizon=1)


# ---------------------------------------------------------------- masking, jit, grad, vmap


def test_ppo_losses_mask_invariance_and_all_masked_rows():
    m = _right_padded_mask()  # row 0 is all masked
    mb = m.astype(bool)
    args = {k: jnp.asarray(v) for k, v in dict(lp=-RNG.uniform(0.1, 3, size=(B, T)), old=-RNG.uniform(0.1, 3, (B, T)),
                                                 adv=RNG.normal(size=(B, T)), v=RNG.normal(size=(B, T)),
                                                 ov=RNG.normal(size=(B, T)), r=RNG.normal(size=(B, T))).items()}

    def loss_fn(a):
        pg, _ = L.ppo_policy_loss(a["lp"], a["old"], a["adv"], m, dual_clip=3.0)
        vf, _ = L.ppo_value_loss(a["v"], a["ov"], a["r"], m)
        adv, ret = L.gae(a["r"], a["v"], m)
        rew, _ = L.kl_penalized_rewards(a["adv"][:, 0], a["lp"], a["old"], m, kl_kind="k3")
        return pg + vf + jnp.sum(adv * ret) + jnp.sum(rew ** 2) + jnp.sum(L.masked_whiten(adv, m))

    value, grads = jax.value_and_grad(loss_fn)(args)
    assert np.isfinite(float(value))
    for fill in (1e6, -1e6):
        bad = {k: jnp.where(m, v, fill) if k != "adv" else v.at[:, 1:].set(jnp.where(m, v, fill)[:, 1:])
               for k, v in args.items()}
        value2, grads2 = jax.value_and_grad(loss_fn)(bad)
        np.testing.assert_allclose(value2, value, rtol=1e-6)
        for k in args:
            g2 = np.asarray(grads2[k])
            assert np.all(np.isfinite(g2)), k
            np.testing.assert_allclose(g2, grads[k], rtol=1e-6, atol=1e-7)
            if k != "adv":
                assert np.all(g2[~mb] == 0), k


def test_ppo_jit_and_vmap():
    m = jnp.asarray(np.stack([_right_padded_mask(), _right_padded_mask()]))
    r, v = jnp.asarray(RNG.normal(size=(2, B, T))), jnp.asarray(RNG.normal(size=(2, B, T)))

    def f(r, v, m):
        adv, ret = L.gae(r, v, m, gamma=0.99, lam=0.9)
        pg, metrics = L.ppo_policy_loss(v, r, adv, m, dual_clip=3.0)
        vf, _ = L.ppo_value_loss(v, r, ret, m)
        return pg + vf + metrics["actor/pg_clipfrac"]

    eager = [f(r[i], v[i], m[i]) for i in range(2)]
    np.testing.assert_allclose(jax.jit(f)(r[0], v[0], m[0]), eager[0], rtol=1e-5)
    np.testing.assert_allclose(jax.vmap(f)(r, v, m), eager, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(jax.grad(f, argnums=1)(r[0], v[0], m[0]))))
