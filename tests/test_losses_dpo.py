"""Tests of the offline preference losses: DPO family (+ f-divergences, MPO combinations), SimPO, ORPO, KTO,
Bradley-Terry. Each is checked against a numpy reference written out here, hand-computed values, and TRL 1.16's own
loss code (its trainer methods called on a stand-in ``self`` and model that return fixed log-probs)."""

import math
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jrlhf.losses as L

RNG = np.random.default_rng(1)
B = 6


def _bf16_round(x):
    return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)


def _logsig(x):
    return -np.logaddexp(0.0, -x)


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------- numpy reference of every DPO loss type


def np_fdiv(x, kind, alpha):
    if kind == "reverse_kl":
        return x
    if kind == "forward_kl":
        return 1 - np.exp(-x)
    if kind == "js_divergence":
        return np.log(2) + _logsig(x)
    if abs(alpha - 1) < 1e-6:
        return x
    return (np.exp(np.minimum((alpha - 1) * x, 80.0)) - 1) / (alpha - 1)


def np_dpo(name, c_lp, r_lp, c_ref, r_ref, c_len, r_len, beta=0.1, ls=0.0, tau=0.05, fdiv="reverse_kl", alpha=0.5,
           bco_delta=0.0):
    c, r = c_lp - c_ref, r_lp - r_ref
    sc, sr = np_fdiv(c, fdiv, alpha), np_fdiv(r, fdiv, alpha)
    d = sc - sr
    if name == "sigmoid":
        return -(1 - ls) * _logsig(beta * d) - ls * _logsig(-beta * d)
    if name == "hinge":
        return np.maximum(0.0, 1 - beta * d)
    if name == "ipo":
        return (sc / np.maximum(c_len, 1) - sr / np.maximum(r_len, 1) - 1 / (2 * beta)) ** 2
    if name == "exo_pair":
        z = beta * d
        return _sig(z) * (_logsig(z) - np.log(1 - ls)) + _sig(-z) * (_logsig(-z) - np.log(ls))
    if name == "nca_pair":
        return -_logsig(beta * c) - 0.5 * _logsig(-beta * c) - 0.5 * _logsig(-beta * r)
    if name == "robust":
        return ((1 - ls) * -_logsig(beta * d) - ls * -_logsig(-beta * d)) / (1 - 2 * ls)
    if name == "bco_pair":
        return -_logsig(beta * c - bco_delta) - _logsig(-(beta * r - bco_delta))
    if name == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if name == "aot":
        delta = np.sort(c_lp - r_lp) - np.sort(c_ref - r_ref)
        return -(1 - ls) * _logsig(beta * delta) - ls * _logsig(-beta * delta)
    if name in ("aot_unpaired", "aot_pair"):
        delta = np.sort(c) - np.sort(r)
        return -(1 - ls) * _logsig(beta * delta) - ls * _logsig(-beta * delta)
    if name == "apo_zero":
        return 1 - _sig(beta * c) + _sig(beta * r)
    if name == "apo_down":
        return _sig(beta * c) + 1 - _sig(beta * (c - r))
    if name == "discopop":
        z = beta * d
        m = _sig(z / tau)
        return -_logsig(z) * (1 - m) + np.exp(-z) * m
    if name == "sigmoid_norm":
        return -_logsig(beta * (sc / np.maximum(c_len, 1) - sr / np.maximum(r_len, 1)))
    if name == "sft":
        return -c_lp * len(c_lp) / c_len.sum()
    raise AssertionError(name)


def _inputs(scale=8.0, rng=RNG):
    c_len = rng.integers(1, 9, size=B).astype(np.float64)
    r_len = rng.integers(1, 9, size=B).astype(np.float64)
    c_lp = -rng.uniform(0.5, 3.0, size=B) * c_len
    r_lp = -rng.uniform(0.5, 3.0, size=B) * r_len
    c_ref = c_lp + rng.normal(size=B) * scale / 4
    r_ref = r_lp + rng.normal(size=B) * scale / 4
    return c_lp, r_lp, c_ref, r_ref, c_len, r_len


def _kwargs(name):
    return {"label_smoothing": 0.1} if name in ("exo_pair", "robust") else {}


@pytest.mark.parametrize("name", L.DPO_LOSS_TYPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dpo_loss_types_match_numpy(name, dtype):
    c_lp, r_lp, c_ref, r_ref, c_len, r_len = _inputs()
    arrays = [jnp.asarray(a, dtype) for a in (c_lp, r_lp, c_ref, r_ref)]
    if dtype == jnp.bfloat16:
        c_lp, r_lp, c_ref, r_ref = (_bf16_round(a) for a in (c_lp, r_lp, c_ref, r_ref))
    kw = _kwargs(name)
    losses, cr, rr = L.dpo_loss(*arrays, beta=0.2, loss_type=name, chosen_lengths=c_len, rejected_lengths=r_len, **kw)
    expected = np_dpo(name, c_lp, r_lp, c_ref, r_ref, c_len, r_len, beta=0.2, ls=kw.get("label_smoothing", 0.0))
    assert losses.shape == (B,) and losses.dtype == jnp.float32
    np.testing.assert_allclose(losses, expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(cr, 0.2 * (c_lp - c_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rr, 0.2 * (r_lp - r_ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fdiv", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("name", ["sigmoid", "hinge", "ipo", "robust", "discopop", "sigmoid_norm"])
def test_dpo_f_divergences_match_numpy(fdiv, name):
    c_lp, r_lp, c_ref, r_ref, c_len, r_len = _inputs(scale=2.0)
    kw = _kwargs(name)
    losses, _, _ = L.dpo_loss(c_lp, r_lp, c_ref, r_ref, beta=0.3, loss_type=name, chosen_lengths=c_len,
                              rejected_lengths=r_len, f_divergence_type=fdiv, f_alpha_divergence_coef=0.3, **kw)
    expected = np_dpo(name, c_lp, r_lp, c_ref, r_ref, c_len, r_len, beta=0.3, ls=kw.get("label_smoothing", 0.0),
                      fdiv=fdiv, alpha=0.3)
    np.testing.assert_allclose(losses, expected, rtol=2e-5, atol=2e-5)


def test_dpo_opt_ins_match_trl_0_28_and_openrlhf_formulas():
    c_lp, r_lp, c_ref, r_ref, c_len, r_len = _inputs()
    beta, ls = 0.1, 0.2
    # cDPO (TRL <= 0.28 / OpenRLHF DPOLoss): -(1-ε) logσ(βz) - ε logσ(-βz), z = (c - r) - (c_ref - r_ref).
    z = (c_lp - r_lp) - (c_ref - r_ref)
    cdpo = -(1 - ls) * _logsig(beta * z) - ls * _logsig(-beta * z)
    got, _, _ = L.dpo_loss(c_lp, r_lp, c_ref, r_ref, beta=beta, label_smoothing=ls)
    np.testing.assert_allclose(got, cdpo, rtol=1e-5)
    # reference_free: z = c - r, rewards β·logps.
    got, cr, _ = L.dpo_loss(c_lp, r_lp, beta=beta, reference_free=True)
    np.testing.assert_allclose(got, -_logsig(beta * (c_lp - r_lp)), rtol=1e-5)
    np.testing.assert_allclose(cr, beta * c_lp, rtol=1e-5)
    # OpenRLHF's IPO uses unnormalised sums: lengths of 1.
    ones = np.ones(B)
    got, _, _ = L.dpo_loss(c_lp, r_lp, c_ref, r_ref, beta=beta, loss_type="ipo", chosen_lengths=ones,
                           rejected_lengths=ones)
    np.testing.assert_allclose(got, (z - 1 / (2 * beta)) ** 2, rtol=1e-5)
    # TRL <= 0.28 bco_pair with its running mean δ.
    got, _, _ = L.dpo_loss(c_lp, r_lp, c_ref, r_ref, beta=beta, loss_type="bco_pair", bco_delta=0.37)
    np.testing.assert_allclose(got, np_dpo("bco_pair", c_lp, r_lp, c_ref, r_ref, c_len, r_len, bco_delta=0.37),
                               rtol=1e-5)


def test_dpo_hand_computed():
    zero = jnp.zeros((1,))
    one = jnp.ones((1,))
    # Policy equals reference: sigmoid loss log 2, hinge 1, IPO (1/(2β))², rewards 0.
    losses, cr, rr = L.dpo_loss(zero - 5, zero - 7, zero - 5, zero - 7, beta=0.5)
    np.testing.assert_allclose(losses, [math.log(2)], rtol=1e-6)
    assert float(cr[0]) == 0.0 and float(rr[0]) == 0.0
    np.testing.assert_allclose(L.dpo_loss(zero, zero, zero, zero, loss_type="hinge")[0], [1.0])
    np.testing.assert_allclose(
        L.dpo_loss(zero, zero, zero, zero, beta=0.5, loss_type="ipo", chosen_lengths=one, rejected_lengths=one)[0],
        [1.0])
    # Chosen log-ratio +2, rejected -2, β = 0.5: margin 2 → -log σ(2).
    np.testing.assert_allclose(L.dpo_loss(zero + 2, zero - 2, zero, zero, beta=0.5)[0],
                               [math.log1p(math.exp(-2))], rtol=1e-6)
    # sppo_hard at c = 1/(2β), r = -1/(2β) is 0.
    np.testing.assert_allclose(L.dpo_loss(zero + 1, zero - 1, zero, zero, beta=0.5, loss_type="sppo_hard")[0], [0.0])
    # MPO combination: weights add the per-example losses.
    combo, _, _ = L.dpo_loss(zero + 2, zero - 2, zero, zero, beta=0.5, loss_type=("sigmoid", "hinge"),
                             loss_weights=(0.8, 0.2))
    np.testing.assert_allclose(combo, [0.8 * math.log1p(math.exp(-2)) + 0.2 * 0.0], rtol=1e-6)


def test_dpo_errors_name_the_field():
    x = jnp.zeros((2,))
    with pytest.raises(ValueError, match="unknown loss_type"):
        L.dpo_loss(x, x, x, x, loss_type="dpo")
    with pytest.raises(ValueError, match="chosen_lengths"):
        L.dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="label_smoothing"):
        L.dpo_loss(x, x, x, x, loss_type="exo_pair")
    with pytest.raises(ValueError, match="f_divergence_type"):
        L.dpo_loss(x, x, x, x, loss_type="nca_pair", f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="loss_weights"):
        L.dpo_loss(x, x, x, x, loss_type=("sigmoid", "hinge"), loss_weights=(1.0,))
    with pytest.raises(ValueError, match="reference_free"):
        L.dpo_loss(x, x)


# ---------------------------------------------------------------- TRL 1.16 parity through its trainer code


class _Accelerator:
    device = "cpu"
    num_processes = 1

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def _metrics_store():
    return defaultdict(lambda: defaultdict(list))


def _trl_dpo(torch, chosen_tok, rejected_tok, c_ref, r_ref, c_mask, r_mask, loss_types, weights, beta, ls, fdiv,
             alpha, tau):
    from trl.trainer.dpo_trainer import DPOTrainer

    completion_mask = torch.tensor(np.concatenate([c_mask, r_mask]), dtype=torch.long)
    shift = completion_mask[:, 1:].float()
    per_token = torch.tensor(np.concatenate([chosen_tok, rejected_tok]), dtype=torch.float32) * shift
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(per_token).bool())
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type=fdiv, f_alpha_divergence_coef=alpha, loss_types=list(loss_types),
        loss_weights=list(weights), beta=beta, label_smoothing=ls, use_weighting=False,
        args=SimpleNamespace(discopop_tau=tau), _metrics=_metrics_store(), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": torch.tensor(c_ref, dtype=torch.float32),
              "ref_rejected_logps": torch.tensor(r_ref, dtype=torch.float32)}
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)
    return float(loss), trainer._metrics["train"]


def _token_batch(rng, length=7):
    """Per-token log-probs [B, T-1] and unshifted completion masks [B, T] (first column is the prompt)."""
    def one():
        lengths = rng.integers(1, length, size=B)
        mask = np.zeros((B, length), np.int64)
        for i, n in enumerate(lengths):
            mask[i, length - n:] = 1
        return -rng.uniform(0.1, 3.0, size=(B, length - 1)), mask
    (ct, cm), (rt, rm) = one(), one()
    return ct, rt, cm, rm


TRL_DPO_CASES = [((name,), (1.0,), "reverse_kl") for name in L.DPO_LOSS_TYPES if name != "aot_pair"] + [
    (("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0), "reverse_kl"),  # MPO
    (("sigmoid", "sft"), (1.0, 0.5), "reverse_kl"),  # RPO
    (("sigmoid", "ipo", "hinge"), (1.0, 0.3, 0.2), "js_divergence"),
    (("sigmoid_norm", "discopop", "robust"), (1.0, 1.0, 1.0), "forward_kl"),
    (("sigmoid", "exo_pair", "sft"), (1.0, 1.0, 1.0), "alpha_divergence"),
]


@pytest.mark.trl
@pytest.mark.parametrize("loss_types,weights,fdiv", TRL_DPO_CASES)
def test_dpo_loss_matches_trl_trainer(loss_types, weights, fdiv):
    import torch
    rng = np.random.default_rng(abs(hash((loss_types, fdiv))) % 2**32)
    ct, rt, cm, rm = _token_batch(rng)
    ct, rt = ct.astype(np.float32), rt.astype(np.float32)
    c_ref = ((ct * cm[:, 1:]).sum(-1) + rng.normal(size=B)).astype(np.float32)
    r_ref = ((rt * rm[:, 1:]).sum(-1) + rng.normal(size=B)).astype(np.float32)
    ls = 0.1 if {"robust", "exo_pair", "aot", "aot_unpaired"} & set(loss_types) else 0.0
    beta, alpha, tau = 0.3, 0.4, 0.05
    trl_loss, trl_metrics = _trl_dpo(torch, ct, rt, c_ref, r_ref, cm, rm, loss_types, weights, beta, ls, fdiv,
                                     alpha, tau)
    c_lp = L.masked_sum(ct, cm[:, 1:], axis=-1)
    r_lp = L.masked_sum(rt, rm[:, 1:], axis=-1)
    common = dict(beta=beta, chosen_lengths=cm.sum(-1), rejected_lengths=rm.sum(-1), discopop_tau=tau,
                  f_divergence_type=fdiv, f_alpha_divergence_coef=alpha)
    if ls and "sigmoid" in loss_types:
        # TRL 1.16's sigmoid ignores label_smoothing (ours makes it cDPO): add a plain sigmoid term separately.
        others = [(t, w) for t, w in zip(loss_types, weights) if t != "sigmoid"]
        losses, cr, rr = L.dpo_loss(c_lp, r_lp, c_ref, r_ref, loss_type=[t for t, _ in others],
                                    loss_weights=[w for _, w in others], label_smoothing=ls, **common)
        sigmoid_weight = weights[loss_types.index("sigmoid")]
        losses = losses + sigmoid_weight * L.dpo_loss(c_lp, r_lp, c_ref, r_ref, **common)[0]
    else:
        losses, cr, rr = L.dpo_loss(c_lp, r_lp, c_ref, r_ref, loss_type=loss_types, loss_weights=weights,
                                    label_smoothing=ls, **common)
    np.testing.assert_allclose(float(jnp.mean(losses)), trl_loss, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(float(jnp.mean(cr)), trl_metrics["rewards/chosen"][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(jnp.mean(rr)), trl_metrics["rewards/rejected"][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(jnp.mean(cr > rr)), trl_metrics["rewards/accuracies"][0])


@pytest.mark.trl
def test_simpo_and_orpo_match_trl_and_numpy():
    import torch
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    c_lp, r_lp, _, _, c_len, r_len = _inputs()
    c_avg, r_avg = c_lp / c_len, r_lp / r_len
    for ls in (0.0, 0.1):
        cpo = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.7, beta=2.0, label_smoothing=ls,
                              accelerator=_Accelerator())
        trl_losses, trl_c, trl_r = CPOTrainer.cpo_loss(cpo, torch.tensor(c_avg), torch.tensor(r_avg))
        losses, cr, rr = L.simpo_loss(c_lp, r_lp, chosen_lengths=c_len, rejected_lengths=r_len, beta=2.0, gamma=0.7,
                                      label_smoothing=ls)
        np.testing.assert_allclose(losses, trl_losses.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cr, trl_c.numpy(), rtol=1e-5)
        np.testing.assert_allclose(rr, trl_r.numpy(), rtol=1e-5)
        logits = 2.0 * (c_avg - r_avg) - 0.7
        np.testing.assert_allclose(losses, -(1 - ls) * _logsig(logits) - ls * _logsig(-logits), rtol=1e-5)
    # Already-averaged inputs (no lengths) give the same.
    np.testing.assert_allclose(L.simpo_loss(c_avg, r_avg, beta=2.0, gamma=0.7)[0],
                               L.simpo_loss(c_lp, r_lp, chosen_lengths=c_len, rejected_lengths=r_len, beta=2.0,
                                            gamma=0.7)[0], rtol=1e-6)

    orpo = SimpleNamespace(beta=0.25, accelerator=_Accelerator())
    trl_losses, trl_c, trl_r, trl_ratio, trl_log_odds = ORPOTrainer.odds_ratio_loss(
        orpo, torch.tensor(c_avg, dtype=torch.float32), torch.tensor(r_avg, dtype=torch.float32))
    losses, cr, rr, ratio, log_odds = L.orpo_loss(c_lp, r_lp, chosen_lengths=c_len, rejected_lengths=r_len, beta=0.25)
    np.testing.assert_allclose(losses, -trl_losses.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cr, trl_c.numpy(), rtol=1e-5)
    np.testing.assert_allclose(rr, trl_r.numpy(), rtol=1e-5)
    np.testing.assert_allclose(float(jnp.mean(ratio)), float(trl_ratio), rtol=1e-5)
    np.testing.assert_allclose(float(jnp.mean(log_odds)), float(trl_log_odds), rtol=1e-5)
    expected_log_odds = (c_avg - r_avg) - (np.log1p(-np.exp(c_avg)) - np.log1p(-np.exp(r_avg)))
    np.testing.assert_allclose(log_odds, expected_log_odds, rtol=1e-5)
    np.testing.assert_allclose(losses, -0.25 * _logsig(expected_log_odds), rtol=1e-5)


def test_reference_free_losses_bf16_with_numpy():
    c_lp, r_lp, _, _, c_len, r_len = _inputs()
    c16, r16 = jnp.asarray(c_lp, jnp.bfloat16), jnp.asarray(r_lp, jnp.bfloat16)
    ca, ra = _bf16_round(c_lp) / c_len, _bf16_round(r_lp) / r_len
    got, cr, _ = L.simpo_loss(c16, r16, chosen_lengths=c_len, rejected_lengths=r_len, beta=2.0, gamma=1.0)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, -_logsig(2.0 * (ca - ra) - 1.0), rtol=1e-5)
    np.testing.assert_allclose(cr, 2.0 * ca, rtol=1e-5)
    got, _, _, _, log_odds = L.orpo_loss(c16, r16, chosen_lengths=c_len, rejected_lengths=r_len, beta=0.1)
    expected_log_odds = (ca - ra) - (np.log1p(-np.exp(ca)) - np.log1p(-np.exp(ra)))
    np.testing.assert_allclose(log_odds, expected_log_odds, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, -0.1 * _logsig(expected_log_odds), rtol=1e-5)
    got = L.bradley_terry_loss(c16, r16, margin=0.5, center_rewards_coefficient=0.01)
    cb, rb = _bf16_round(c_lp), _bf16_round(r_lp)
    np.testing.assert_allclose(got, -_logsig(cb - rb - 0.5) + 0.01 * (cb + rb) ** 2, rtol=1e-5)


def test_simpo_orpo_hand_computed():
    # SimPO with equal averages: -log σ(-γ).
    np.testing.assert_allclose(L.simpo_loss(jnp.array([-2.0]), jnp.array([-2.0]), beta=1.0, gamma=0.5)[0],
                               [math.log1p(math.exp(0.5))], rtol=1e-6)
    # ORPO with equal probabilities: log-odds 0, loss β log 2.
    losses, _, _, ratio, log_odds = L.orpo_loss(jnp.array([-0.3]), jnp.array([-0.3]), beta=0.5)
    np.testing.assert_allclose(log_odds, [0.0], atol=1e-6)
    np.testing.assert_allclose(losses, [0.5 * math.log(2)], rtol=1e-6)
    # p_c = 0.5, p_r = 0.25: odds 1 and 1/3, log-odds log 3.
    _, _, _, _, log_odds = L.orpo_loss(jnp.array([math.log(0.5)]), jnp.array([math.log(0.25)]))
    np.testing.assert_allclose(log_odds, [math.log(3)], rtol=1e-6)
    # Probability-one completion stays finite, with a finite gradient.
    grad = jax.grad(lambda c: jnp.sum(L.orpo_loss(c, jnp.array([-1.0]))[0]))(jnp.array([0.0]))
    assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.trl
def test_kto_matches_trl_trainer_and_numpy():
    import torch
    from trl.trainer.kto_trainer import KTOTrainer

    rng = np.random.default_rng(3)
    length = 6
    labels = np.array([True, False, True, True, False, False])
    mask = np.zeros((B, length), np.int64)
    for i, n in enumerate(rng.integers(1, length, size=B)):
        mask[i, length - n:] = 1
    per_token = torch.tensor(-rng.uniform(0.1, 2.0, size=(B, length - 1))) * torch.tensor(mask[:, 1:])
    logps = per_token.sum(-1).numpy()
    ref_logps = logps + rng.normal(size=B) * 2
    kl_logps, ref_kl_logps = rng.normal(size=B) - 5, rng.normal(size=B) - 6
    for loss_type in ("kto", "apo_zero_unpaired"):
        outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                                  mean_logits=torch.zeros_like(per_token))
        trainer = SimpleNamespace(
            model=SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False,
            precompute_ref_logps=True, calculate_KL=loss_type == "kto", loss_type=loss_type, beta=0.2,
            desirable_weight=1.3, undesirable_weight=0.7, _metrics=_metrics_store(), _total_train_tokens=0,
            _tp_size=1, _compute_kl_logps=lambda model, batch: torch.tensor(kl_logps))
        batch = {"label": torch.tensor(labels), "input_ids": torch.zeros_like(torch.tensor(mask)),
                 "attention_mask": torch.ones_like(torch.tensor(mask)), "completion_mask": torch.tensor(mask),
                 "ref_logps": torch.tensor(ref_logps), "ref_KL_logps": torch.tensor(ref_kl_logps)}
        trl_loss = float(KTOTrainer._compute_loss(trainer, lambda **kw: outputs, batch, False))
        kl = L.kto_kl_estimate(kl_logps, ref_kl_logps) if loss_type == "kto" else None
        losses, rewards = L.kto_loss(logps, ref_logps, labels, kl, beta=0.2, desirable_weight=1.3,
                                     undesirable_weight=0.7, loss_type=loss_type)
        np.testing.assert_allclose(float(jnp.mean(losses)), trl_loss, rtol=1e-5)
        if loss_type == "kto":
            np.testing.assert_allclose(float(kl), trainer._metrics["train"]["kl"][0], rtol=1e-5)
            np.testing.assert_allclose(float(jnp.sum(jnp.where(labels, rewards, 0)) / labels.sum()),
                                       trainer._metrics["train"]["rewards/chosen"][0], rtol=1e-5)
    # numpy reference
    z = max(np.mean(kl_logps - ref_kl_logps), 0.0)
    x = logps - ref_logps
    expected = np.where(labels, 1.3 * (1 - _sig(0.2 * (x - z))), 0.7 * (1 - _sig(0.2 * (z - x))))
    got, _ = L.kto_loss(jnp.asarray(logps, jnp.bfloat16), jnp.asarray(ref_logps, jnp.bfloat16), labels,
                        L.kto_kl_estimate(kl_logps, ref_kl_logps), beta=0.2, desirable_weight=1.3,
                        undesirable_weight=0.7)
    xb = _bf16_round(logps) - _bf16_round(ref_logps)
    expected_b = np.where(labels, 1.3 * (1 - _sig(0.2 * (xb - z))), 0.7 * (1 - _sig(0.2 * (z - xb))))
    np.testing.assert_allclose(got, expected_b, rtol=1e-5)
    assert not np.allclose(expected, 0)
    # Hand-computed: x = z gives 1 - σ(0) = 0.5 for both labels.
    np.testing.assert_allclose(L.kto_loss(jnp.array([1.0, 1.0]), jnp.array([0.0, 0.0]), jnp.array([1, 0]), 1.0)[0],
                               [0.5, 0.5])
    # The reference point is clamped at 0 and carries no gradient.
    assert float(L.kto_kl_estimate(jnp.array([-3.0]), jnp.array([-1.0]))) == 0.0


@pytest.mark.trl
def test_bradley_terry_matches_trl_reward_trainer_and_numpy():
    import torch
    from trl.trainer.reward_trainer import RewardTrainer

    rng = np.random.default_rng(4)
    chosen, rejected, margin = rng.normal(size=B), rng.normal(size=B), rng.uniform(0, 1, size=B)
    for coef in (None, 0.01):
        for use_margin in (False, True):
            outputs = SimpleNamespace(logits=torch.tensor(np.concatenate([chosen, rejected]))[:, None])
            trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_Accelerator(),
                                      args=SimpleNamespace(center_rewards_coefficient=coef), _metrics=_metrics_store(),
                                      _total_train_tokens=0, _tp_size=1)
            inputs = {"attention_mask": torch.ones(2 * B, 3, dtype=torch.long)}
            if use_margin:
                inputs["margin"] = torch.tensor(margin)
            trl_loss = float(RewardTrainer.compute_loss(trainer, lambda **kw: outputs, inputs))
            losses = L.bradley_terry_loss(chosen, rejected, margin=margin if use_margin else None,
                                          center_rewards_coefficient=coef)
            np.testing.assert_allclose(float(jnp.mean(losses)), trl_loss, rtol=1e-5)
            m = margin if use_margin else 0.0
            expected = -_logsig(chosen - rejected - m) + (coef or 0.0) * (chosen + rejected) ** 2
            np.testing.assert_allclose(losses, expected, rtol=1e-5)
    np.testing.assert_allclose(L.bradley_terry_loss(jnp.array([1.0]), jnp.array([1.0]))[0], math.log(2), rtol=1e-6)


def test_bco_running_mean_and_ld_dpo_logps():
    # Running mean of batch-mean rewards, current batch included.
    mean, count = jnp.float32(0.0), jnp.float32(0.0)
    batches = [RNG.normal(size=(2, B)) for _ in range(3)]
    for i, (c, r) in enumerate(batches):
        mean, count = L.bco_running_mean_update(mean, count, c, r)
        np.testing.assert_allclose(mean, np.mean([np.concatenate(b).mean() for b in batches[: i + 1]]), rtol=1e-5)
    assert float(count) == 3.0
    # LD-DPO: TRL's shared/tail split by completion position.
    tok = RNG.normal(size=(3, 6))
    mask = np.array([[0, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    shared = np.array([2, 5, 1])
    pos = np.cumsum(mask, -1)
    expected = ((tok * mask * (pos <= shared[:, None])).sum(-1)
                + 0.4 * (tok * mask * (pos > shared[:, None])).sum(-1))
    np.testing.assert_allclose(L.ld_dpo_logps(tok, mask, shared, ld_alpha=0.4), expected, rtol=1e-5)
    np.testing.assert_allclose(L.ld_dpo_logps(tok, mask, shared, ld_alpha=1.0), (tok * mask).sum(-1), rtol=1e-5)


# ---------------------------------------------------------------- jit, grad, vmap, masking


def test_jit_grad_vmap_of_preference_losses():
    c_lp, r_lp, c_ref, r_ref, c_len, r_len = (jnp.asarray(a, jnp.float32) for a in _inputs())

    def total(c, r):
        out = 0.0
        for name in L.DPO_LOSS_TYPES:
            out = out + jnp.mean(L.dpo_loss(c, r, c_ref, r_ref, loss_type=name, chosen_lengths=c_len,
                                            rejected_lengths=r_len, **_kwargs(name))[0])
        out = out + jnp.mean(L.simpo_loss(c, r, chosen_lengths=c_len, rejected_lengths=r_len)[0])
        out = out + jnp.mean(L.orpo_loss(c, r, chosen_lengths=c_len, rejected_lengths=r_len)[0])
        out = out + jnp.mean(L.kto_loss(c, c_ref, jnp.arange(B) % 2, 0.5)[0])
        return out + jnp.mean(L.bradley_terry_loss(c, r, center_rewards_coefficient=0.01))

    eager = total(c_lp, r_lp)
    np.testing.assert_allclose(jax.jit(total)(c_lp, r_lp), eager, rtol=1e-5)
    helpers = (lambda c, r: L.kto_kl_estimate(c, r), lambda c, r: L.bco_running_mean_update(0.1, 2.0, c, r)[0],
               lambda c, r: jnp.sum(L.ld_dpo_logps(jnp.stack([c, r], -1), jnp.ones((B, 2)), c_len, ld_alpha=0.5)))
    for helper in helpers:
        np.testing.assert_allclose(jax.jit(helper)(c_lp, r_lp), helper(c_lp, r_lp), rtol=1e-6)
    grads = jax.grad(total, argnums=(0, 1))(c_lp, r_lp)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    stacked = jax.vmap(total)(jnp.stack([c_lp, c_lp + 1]), jnp.stack([r_lp, r_lp - 1]))
    np.testing.assert_allclose(stacked[0], eager, rtol=1e-5)
    np.testing.assert_allclose(stacked[1], total(c_lp + 1, r_lp - 1), rtol=1e-5)


def test_dpo_from_padded_tokens_ignores_padding():
    """Sequence log-probs built with masked_sum: padding values (even ±1e6) change neither loss nor gradient."""
    ct, rt, cm, rm = _token_batch(np.random.default_rng(5))
    cm, rm = cm[:, 1:], rm[:, 1:]
    cm[0] = 0  # an empty completion is legitimate: finite loss and gradient
    c_ref, r_ref = jnp.zeros(B) - 3, jnp.zeros(B) - 4

    def loss(ct, rt):
        c = L.masked_sum(ct, cm, axis=-1)
        r = L.masked_sum(rt, rm, axis=-1)
        return jnp.mean(L.dpo_loss(c, r, c_ref, r_ref, loss_type=("sigmoid", "ipo", "sft"), chosen_lengths=cm.sum(-1),
                                   rejected_lengths=rm.sum(-1))[0])

    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(ct), jnp.asarray(rt))
    for fill in (1e6, -1e6):
        value2, grads2 = jax.value_and_grad(loss, argnums=(0, 1))(jnp.where(cm, ct, fill), jnp.where(rm, rt, fill))
        np.testing.assert_allclose(value2, value, rtol=1e-6)
        for g, g2, m in zip(grads, grads2, (cm, rm)):
            np.testing.assert_allclose(g2, g, rtol=1e-6)
            assert np.all(np.asarray(g2)[m == 0] == 0) and np.all(np.isfinite(np.asarray(g2)))
    assert np.isfinite(float(value))
