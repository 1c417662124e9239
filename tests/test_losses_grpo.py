"""Tests of the GRPO family: advantages and every loss type, against a numpy reference written out here, hand-computed
values, and TRL 1.16's ``GRPOTrainer._compute_loss`` run on a stand-in ``self`` (loss, gradient and metrics)."""

from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jrlhf.losses as L

RNG = np.random.default_rng(2)
B, T = 6, 7


def _bf16_round(x):
    return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)


def _mask(rng=RNG, batch=B, length=T):
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = 0  # a completion that ended at once
    lengths[-1] = length
    return (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)


def _batch(rng=RNG, spread=0.3):
    logps = -rng.uniform(0.05, 3.0, size=(B, T))
    old = logps + rng.normal(size=(B, T)) * spread
    ref = logps + rng.normal(size=(B, T)) * spread
    adv = rng.normal(size=B)
    return logps, old, ref, adv, _mask(rng)


# ---------------------------------------------------------------- advantages


def np_grpo_advantages(r, g, scale, eps=1e-4):
    grouped = r.reshape(-1, g)
    mean = grouped.mean(1, keepdims=True)
    if scale == "group":
        std = grouped.std(1, ddof=1, keepdims=True)
    elif scale == "batch":
        std = r.std(ddof=1)
    else:
        return (grouped - mean).reshape(-1)
    return ((grouped - mean) / (std + eps)).reshape(-1)


@pytest.mark.trl
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grpo_advantages_match_numpy_and_trl(scale, dtype):
    import torch
    from trl.trainer.utils import nanstd

    r = RNG.normal(size=12) * 2
    rr = _bf16_round(r) if dtype == jnp.bfloat16 else r
    got = L.grpo_advantages(jnp.asarray(r, dtype), 4, scale=scale)
    assert got.shape == (12,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_grpo_advantages(rr, 4, scale), rtol=1e-5, atol=1e-6)
    # TRL 1.16's sum_then_normalize branch, on torch with its nanstd.
    t = torch.tensor(rr)
    mean = torch.nanmean(t.view(-1, 4), dim=1).repeat_interleave(4)
    std = nanstd(t.view(-1, 4), dim=1).repeat_interleave(4) if scale != "batch" else nanstd(t).expand_as(t)
    adv = t - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    np.testing.assert_allclose(got, adv.numpy(), rtol=1e-5, atol=1e-6)


def test_grpo_advantages_openrlhf_verl_settings_and_hand_computed():
    r = RNG.normal(size=8)
    g = r.reshape(-1, 4)
    openrlhf = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-9)).reshape(-1)
    np.testing.assert_allclose(L.grpo_advantages(r, 4, epsilon=1e-9), openrlhf, rtol=1e-5)
    verl = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)
    np.testing.assert_allclose(L.grpo_advantages(r, 4, epsilon=1e-6), verl, rtol=1e-5)
    # Hand-computed: group [0, 1]: mean 0.5, unbiased std sqrt(0.5).
    a = L.grpo_advantages(jnp.array([0.0, 1.0, 3.0, 3.0]), 2)
    s = np.sqrt(0.5)
    np.testing.assert_allclose(a, [-0.5 / (s + 1e-4), 0.5 / (s + 1e-4), 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(L.grpo_advantages(jnp.array([0.0, 1.0, 3.0, 3.0]), 2, scale="none"),
                               [-0.5, 0.5, 0.0, 0.0])
    # Unscorable (NaN) rewards: excluded from the group statistics, advantage 0 (TRL).
    a = L.grpo_advantages(jnp.array([0.0, jnp.nan, 1.0, 5.0, jnp.nan, jnp.nan]), 3)
    np.testing.assert_allclose(a, [-0.5 / (s + 1e-4), 0.0, 0.5 / (s + 1e-4), 0.0, 0.0, 0.0], rtol=1e-6)
    with pytest.raises(ValueError, match="groups of 4"):
        L.grpo_advantages(jnp.zeros(6), 4)


# ---------------------------------------------------------------- loss: numpy reference


def np_grpo_loss(lp, old, ref, adv, m, loss_type, beta=0.0, eps_low=0.2, eps_high=None, level="token", delta=None,
                 tau_pos=1.0, tau_neg=1.05, kl_correction=True, max_len=None):
    eps_high = eps_low if eps_high is None else eps_high
    adv = adv[:, None]
    log_ratio = lp - old
    if level == "sequence":
        log_ratio = ((log_ratio * m).sum(-1) / np.maximum(m.sum(-1), 1))[:, None]
    rho = np.exp(log_ratio)
    if loss_type == "cispo":
        per_token = -np.minimum(rho, eps_high) * adv * lp
    elif loss_type == "sapo":
        tau = np.where(adv > 0, tau_pos, tau_neg)
        per_token = -(1 / (1 + np.exp(-tau * (rho - 1)))) * 4 / tau * adv
    else:
        rho_1 = np.minimum(rho, delta) if delta is not None else rho
        per_token = -np.minimum(rho_1 * adv, np.clip(rho, 1 - eps_low, 1 + eps_high) * adv)
    per_token = np.broadcast_to(per_token, m.shape)
    if beta:
        kl = np.exp(ref - lp) - (ref - lp) - 1
        if kl_correction:
            kl = kl * rho
        per_token = per_token + beta * kl
    s = (per_token * m)
    if loss_type in ("grpo", "sapo"):
        return (s.sum(-1) / np.maximum(m.sum(-1), 1)).mean()
    if loss_type in ("bnpo", "dapo", "cispo"):
        return s.sum() / max(m.sum(), 1)
    if loss_type == "dr_grpo":
        return s.sum() / (m.shape[0] * (max_len or m.shape[1]))
    return s.sum(-1).mean()  # luspo


CONFIGS = [
    dict(),
    dict(beta=0.04),
    dict(beta=0.04, kl_correction=False),
    dict(eps_low=0.2, eps_high=0.28),
    dict(delta=1.3),
    dict(level="sequence"),
    dict(level="sequence", beta=0.1),
]


@pytest.mark.parametrize("loss_type", L.GRPO_LOSS_TYPES)
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_grpo_loss_matches_numpy(loss_type, config):
    cfg = CONFIGS[config]
    lp, old, ref, adv, m = _batch(np.random.default_rng(config))
    kw = dict(beta=cfg.get("beta", 0.0), epsilon_low=cfg.get("eps_low", 0.2), epsilon_high=cfg.get("eps_high"),
              loss_type=loss_type, importance_sampling_level=cfg.get("level", "token"), delta=cfg.get("delta"),
              kl_importance_correction=cfg.get("kl_correction", True))
    if loss_type == "cispo":
        kw["epsilon_high"] = 1.1
        cfg = dict(cfg, eps_high=1.1)
    loss, _ = L.grpo_loss(lp, old, ref, adv, m, **kw)
    np.testing.assert_allclose(loss, np_grpo_loss(lp, old, ref, adv, m, loss_type, **cfg), rtol=2e-5, atol=1e-6)


def test_grpo_loss_bf16_normalizer_and_max_len():
    lp, old, ref, adv, m = _batch()
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (lp, old, ref, adv)]
    lpr, oldr, refr, advr = (_bf16_round(x) for x in (lp, old, ref, adv))
    loss, _ = L.grpo_loss(*bf, m, beta=0.05, loss_type="grpo")
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, np_grpo_loss(lpr, oldr, refr, advr, m, "grpo", beta=0.05), rtol=2e-5)
    loss, _ = L.grpo_loss(lp, old, ref, adv, m, loss_type="dr_grpo", max_completion_length=20)
    np.testing.assert_allclose(loss, np_grpo_loss(lp, old, ref, adv, m, "dr_grpo", max_len=20), rtol=1e-5)
    # Micro-batches with the global normalizer sum to the full-batch loss, for every loss type.
    for loss_type, global_norm in [("grpo", B), ("sapo", B), ("dapo", m.sum()), ("cispo", m.sum()),
                                   ("dr_grpo", B * T), ("luspo", B)]:
        full, _ = L.grpo_loss(lp, old, ref, adv, m, beta=0.04, loss_type=loss_type)
        parts = [L.grpo_loss(lp[i:i + 3], old[i:i + 3], ref[i:i + 3], adv[i:i + 3], m[i:i + 3], beta=0.04,
                             loss_type=loss_type, max_completion_length=T, normalizer=global_norm)[0]
                 for i in (0, 3)]
        np.testing.assert_allclose(sum(parts), full, rtol=1e-5, atol=1e-7)


def test_grpo_loss_hand_computed():
    m = jnp.array([[1, 1, 0]])
    lp = jnp.array([[-1.0, -2.0, -9.0]])
    # On-policy (ratio 1), A = 2: per-token loss -2; grpo = dapo = -2, dr_grpo = -4 / 3.
    for loss_type, expected in [("grpo", -2.0), ("dapo", -2.0), ("dr_grpo", -4.0 / 3.0), ("luspo", -4.0)]:
        loss, metrics = L.grpo_loss(lp, None, None, jnp.array([2.0]), m, loss_type=loss_type)
        np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert float(metrics["clip_ratio/region_mean"]) == 0.0
    # Ratio e^0.5 > 1.2 with A = 1: clipped to 1.2, high-clip fraction 1.
    loss, metrics = L.grpo_loss(lp + 0.5, lp, None, jnp.array([1.0]), m)
    np.testing.assert_allclose(loss, -1.2, rtol=1e-6)
    assert float(metrics["clip_ratio/high_mean"]) == 1.0 and float(metrics["clip_ratio/low_mean"]) == 0.0
    # k3 KL with ref = logp + 1: e - 2 per token, β = 0.5.
    loss, metrics = L.grpo_loss(lp, None, lp + 1.0, jnp.array([0.0]), m, beta=0.5, loss_type="bnpo")
    np.testing.assert_allclose(loss, 0.5 * (np.e - 2), rtol=1e-6)
    np.testing.assert_allclose(metrics["kl"], np.e - 2, rtol=1e-6)
    # cispo on-policy: loss -A * mean(logp) = 1.5 for A = 1.
    np.testing.assert_allclose(L.grpo_loss(lp, None, None, jnp.array([1.0]), m, loss_type="cispo",
                                           epsilon_high=5.0)[0], 1.5, rtol=1e-6)
    # sapo on-policy: σ(0) * 4 / τ = 2 / τ, τ = 1 for A > 0.
    np.testing.assert_allclose(L.grpo_loss(lp, None, None, jnp.array([1.0]), m, loss_type="sapo")[0], -2.0)
    with pytest.raises(ValueError, match="ref_logps"):
        L.grpo_loss(lp, None, None, jnp.array([1.0]), m, beta=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        L.grpo_loss(lp, None, None, jnp.array([1.0]), m, loss_type="ppo")


# ---------------------------------------------------------------- loss: TRL 1.16 parity (value, gradient, metrics)


class _Accelerator:
    device = "cpu"
    num_processes = 1

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def _trl_grpo(torch, lp, old, ref, adv, m, entropies, loss_type, beta, eps_low, eps_high, level, delta, correction,
              max_len):
    from trl.trainer.grpo_trainer import GRPOTrainer

    logps = torch.tensor(lp, dtype=torch.float32, requires_grad=True)
    ent = torch.tensor(entropies, dtype=torch.float32)
    mask = torch.tensor(m, dtype=torch.long)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, ent, None), top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta, loss_type=loss_type,
        epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, accelerator=_Accelerator(), max_completion_length=max_len,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(use_bias_correction_kl=correction, delta=delta, sapo_temperature_pos=1.0,
                             sapo_temperature_neg=1.05, steps_per_generation=1))
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": torch.tensor(adv, dtype=torch.float32), "num_items_in_batch": mask.sum()}
    if old is not None:
        inputs["old_per_token_logps"] = torch.tensor(old, dtype=torch.float32)
    if beta:
        inputs["ref_per_token_logps"] = torch.tensor(ref, dtype=torch.float32)
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    return float(loss.detach()), logps.grad.numpy(), {k: v[0] for k, v in trainer._metrics["train"].items()}


TRL_CASES = [
    ("dapo", 0.0, 0.2, None, "token", None, True, False),
    ("grpo", 0.04, 0.2, 0.28, "token", None, True, False),
    ("bnpo", 0.04, 0.2, None, "token", 1.5, False, False),
    ("dr_grpo", 0.1, 0.2, 0.28, "token", None, True, False),
    ("cispo", 0.04, 0.2, 2.0, "token", None, True, False),
    ("sapo", 0.04, 0.2, None, "token", None, True, False),
    ("luspo", 0.0, 0.2, None, "sequence", None, True, False),
    ("grpo", 0.04, 3e-4, 4e-4, "sequence", None, True, False),  # GSPO
    ("dapo", 0.02, 0.2, None, "token", None, True, True),  # on-policy shortcut (old logps omitted)
]


@pytest.mark.trl
@pytest.mark.parametrize("case", TRL_CASES, ids=[f"{c[0]}-{c[4]}-{i}" for i, c in enumerate(TRL_CASES)])
def test_grpo_loss_matches_trl_trainer(case):
    import torch
    loss_type, beta, eps_low, eps_high, level, delta, correction, on_policy = case
    rng = np.random.default_rng(len(loss_type) + int(beta * 100))
    lp, old, ref, adv, m = _batch(rng, spread=0.3)
    lp, old, ref, adv = (x.astype(np.float32) for x in (lp, old, ref, adv))
    entropies = rng.uniform(0, 3, size=(B, T)).astype(np.float32)
    trl_loss, trl_grad, trl_metrics = _trl_grpo(torch, lp, None if on_policy else old, ref, adv, m, entropies,
                                                loss_type, beta, eps_low, eps_high or eps_low, level, delta,
                                                correction, T + 3)

    def ours(x):
        return L.grpo_loss(x, None if on_policy else old, ref if beta else None, adv, m, beta=beta,
                           epsilon_low=eps_low, epsilon_high=eps_high, loss_type=loss_type,
                           max_completion_length=T + 3, importance_sampling_level=level, delta=delta,
                           kl_importance_correction=correction, entropies=entropies)

    (loss, metrics), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(lp))
    np.testing.assert_allclose(loss, trl_loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(grad, trl_grad, rtol=2e-4, atol=1e-6)
    assert set(trl_metrics) == set(metrics), (sorted(trl_metrics), sorted(metrics))
    for name, value in trl_metrics.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=2e-5, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------- masking, jit, grad, vmap


@pytest.mark.parametrize("loss_type", L.GRPO_LOSS_TYPES)
def test_grpo_loss_mask_invariance(loss_type):
    lp, old, ref, adv, m = _batch()
    args = {"lp": jnp.asarray(lp), "old": jnp.asarray(old), "ref": jnp.asarray(ref)}
    advt = jnp.asarray(np.broadcast_to(adv[:, None], (B, T)))
    mb = np.asarray(m, bool)

    def loss_fn(a, level):
        return L.grpo_loss(a["lp"], a["old"], a["ref"], advt, m, beta=0.1, loss_type=loss_type, epsilon_high=2.0,
                           importance_sampling_level=level, entropies=a["lp"])[0]

    for level in ("token", "sequence"):
        value, grads = jax.value_and_grad(loss_fn)(args, level)
        assert np.isfinite(float(value))
        for fill in (1e6, -1e6):
            bad = {k: jnp.where(m, v, fill) for k, v in args.items()}
            value2, grads2 = jax.value_and_grad(loss_fn)(bad, level)
            np.testing.assert_allclose(value2, value, rtol=1e-6, atol=1e-7)
            for k in args:
                g2 = np.asarray(grads2[k])
                assert np.all(np.isfinite(g2)) and np.all(g2[~mb] == 0), k
                np.testing.assert_allclose(g2, grads[k], rtol=1e-6, atol=1e-7)
    # Every row masked: finite loss, zero gradient.
    empty = np.zeros_like(m)
    value, grads = jax.value_and_grad(lambda a: L.grpo_loss(a["lp"], a["old"], a["ref"], advt, empty, beta=0.1,
                                                            loss_type=loss_type)[0])(args)
    assert float(value) == 0.0 and all(np.all(np.asarray(g) == 0) for g in grads.values())


def test_grpo_jit_vmap_and_grad():
    lp, old, ref, adv, m = _batch()

    def f(lp, old, ref, adv, m):
        loss, metrics = L.grpo_loss(lp, old, ref, adv, m, beta=0.04, loss_type="grpo", epsilon_high=0.28)
        return loss + metrics["clip_ratio/region_mean"] + jnp.sum(L.grpo_advantages(adv, 3))

    eager = f(lp, old, ref, adv, m)
    np.testing.assert_allclose(jax.jit(f)(lp, old, ref, adv, m), eager, rtol=1e-6)
    stack = lambda x: jnp.stack([jnp.asarray(x), jnp.asarray(x)])  # noqa: E731
    np.testing.assert_allclose(jax.vmap(f)(stack(lp), stack(old), stack(ref), stack(adv), stack(m)), [eager, eager],
                               rtol=1e-6)
    grad = jax.grad(lambda x: f(x, old, ref, adv, m))(jnp.asarray(lp))
    assert np.all(np.isfinite(np.asarray(grad)))
