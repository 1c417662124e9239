"""Tests of jrlhf.losses.common: masked statistics, token log-probs, entropy, KL estimators, aggregation, SFT loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jrlhf.losses as L

RNG = np.random.default_rng(0)


def _bf16_round(x):
    """The float64 values a bf16 array holds, for numpy references of bf16 inputs."""
    return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)


def _random_mask(batch, length, rng=RNG):
    """Right-padded mask with lengths in [0, length], always including an empty and a full row."""
    lengths = rng.integers(0, length + 1, size=batch)
    lengths[0], lengths[-1] = 0, length
    return (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)


# ---------------------------------------------------------------- masked statistics


def np_masked_mean(x, m, axis=None):
    return (x * m).sum(axis=axis) / np.maximum(m.sum(axis=axis), 1)


def np_whiten(x, m, unbiased, eps, mode, shift_mean=True):
    n = m.sum()
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / n
    if unbiased:
        var = var * n / (n - 1)
    rstd = 1 / np.sqrt(var + eps) if mode == "add" else 1 / np.sqrt(max(var, eps))
    out = (x - mean) * rstd
    if not shift_mean:
        out = out + mean
    return out * m


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_masked_stats_match_numpy(dtype):
    x = RNG.normal(size=(5, 7)) * 3
    m = _random_mask(5, 7)
    xr = _bf16_round(x) if dtype == jnp.bfloat16 else x
    xj = jnp.asarray(x, dtype)
    np.testing.assert_allclose(L.masked_sum(xj, m), (xr * m).sum(), rtol=1e-5)
    np.testing.assert_allclose(L.masked_mean(xj, m), np_masked_mean(xr, m), rtol=1e-5)
    np.testing.assert_allclose(L.masked_mean(xj, m, axis=-1), np_masked_mean(xr, m, axis=-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(L.masked_mean(xj, m, normalizer=100.0), (xr * m).sum() / 100.0, rtol=1e-5)
    assert L.masked_mean(xj, m).dtype == jnp.float32
    n = m.sum()
    mean = (xr * m).sum() / n
    biased = (((xr - mean) ** 2) * m).sum() / n
    np.testing.assert_allclose(L.masked_var(xj, m, unbiased=False), biased, rtol=1e-5)
    np.testing.assert_allclose(L.masked_var(xj, m), biased * n / (n - 1), rtol=1e-5)
    for unbiased, mode in [(True, "add"), (False, "clamp")]:
        for shift in (True, False):
            got = L.masked_whiten(xj, m, unbiased=unbiased, eps_mode=mode, shift_mean=shift)
            np.testing.assert_allclose(got, np_whiten(xr, m, unbiased, 1e-8, mode, shift), rtol=1e-4, atol=1e-5)


def test_masked_stats_hand_computed():
    x = jnp.array([[1.0, 2.0, 3.0], [4.0, 100.0, -7.0]])
    m = jnp.array([[1, 1, 0], [1, 0, 0]])
    assert float(L.masked_sum(x, m)) == 7.0
    np.testing.assert_allclose(L.masked_mean(x, m), 7.0 / 3.0, rtol=1e-6)
    np.testing.assert_allclose(L.masked_mean(x, m, axis=-1), [1.5, 4.0])
    # values 1, 2, 4: mean 7/3, biased var = (16/9 + 1/9 + 25/9) / 3 = 14/9, unbiased 14/6.
    np.testing.assert_allclose(L.masked_var(x, m, unbiased=False), 14.0 / 9.0, rtol=1e-6)
    np.testing.assert_allclose(L.masked_var(x, m), 14.0 / 6.0, rtol=1e-6)
    np.testing.assert_allclose(
        L.masked_whiten(x, m), [[(1 - 7 / 3) / np.sqrt(14 / 6 + 1e-8), (2 - 7 / 3) / np.sqrt(14 / 6 + 1e-8), 0],
                                [(4 - 7 / 3) / np.sqrt(14 / 6 + 1e-8), 0, 0]], rtol=1e-5)
    # Empty masks: zero results, no NaN.
    empty = jnp.zeros((2, 3))
    assert float(L.masked_mean(x, empty)) == 0.0
    assert np.all(np.isfinite(np.asarray(L.masked_whiten(x, empty))))
    with pytest.raises(ValueError, match="eps_mode"):
        L.masked_whiten(x, m, eps_mode="bogus")


@pytest.mark.torch
def test_masked_whiten_matches_verl_formula_on_torch():
    import torch
    x = RNG.normal(size=(4, 6))
    m = _random_mask(4, 6)
    tx, tm = torch.tensor(x), torch.tensor(m, dtype=torch.float64)
    # verl / TRL <= 0.x masked_whiten written out on torch tensors.
    mean = (tx * tm).sum() / tm.sum()
    var = (((tx - mean) ** 2) * tm).sum() / tm.sum() * tm.sum() / (tm.sum() - 1)
    expected = ((tx - mean) * torch.rsqrt(var + 1e-8)) * tm
    np.testing.assert_allclose(L.masked_whiten(x, m), expected.numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- log-probs and entropy


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_logprobs_and_entropy_match_numpy(dtype):
    logits = RNG.normal(size=(3, 5, 11)) * 4
    tokens = RNG.integers(0, 11, size=(3, 5))
    lr = _bf16_round(logits) if dtype == jnp.bfloat16 else logits
    logp = np_log_softmax(lr)
    expected = np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    got = L.logprobs_from_logits(jnp.asarray(logits, dtype), tokens)
    assert got.dtype == jnp.float32 and got.shape == (3, 5)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        L.entropy_from_logits(jnp.asarray(logits, dtype)), -(np.exp(logp) * logp).sum(-1), rtol=1e-5, atol=1e-5
    )
    hot = np.take_along_axis(np_log_softmax(lr / 0.7), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(L.logprobs_from_logits(jnp.asarray(logits, dtype), tokens, temperature=0.7), hot,
                               rtol=1e-5, atol=1e-5)


def test_logprobs_and_entropy_hand_computed():
    # Uniform over 4 tokens: log-prob -log 4, entropy log 4.
    logits = jnp.zeros((1, 4))
    np.testing.assert_allclose(L.logprobs_from_logits(logits, jnp.array([2])), [-np.log(4)], rtol=1e-6)
    np.testing.assert_allclose(L.entropy_from_logits(logits), [np.log(4)], rtol=1e-6)
    # A banned (-inf) token contributes nothing: entropy of uniform over 2.
    banned = jnp.array([[0.0, 0.0, -jnp.inf]])
    np.testing.assert_allclose(L.entropy_from_logits(banned), [np.log(2)], rtol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        L.logprobs_from_logits(logits, jnp.array([0]), temperature=0.0)


@pytest.mark.trl
def test_logprobs_and_entropy_match_trl():
    import torch
    import trl.trainer.utils as trl_utils
    logits = RNG.normal(size=(2, 6, 13)).astype(np.float32) * 3
    tokens = RNG.integers(0, 13, size=(2, 6))
    expected = trl_utils.selective_log_softmax(torch.tensor(logits), torch.tensor(tokens)).numpy()
    np.testing.assert_allclose(L.logprobs_from_logits(logits, tokens), expected, rtol=1e-5, atol=1e-5)
    expected_t = trl_utils.selective_log_softmax(torch.tensor(logits), torch.tensor(tokens), temperature=1.3).numpy()
    np.testing.assert_allclose(L.logprobs_from_logits(logits, tokens, temperature=1.3), expected_t, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(L.entropy_from_logits(logits),
                               trl_utils.entropy_from_logits(torch.tensor(logits)).numpy(), rtol=1e-5, atol=1e-5)


def test_logprobs_gradient_is_softmax_difference():
    logits = jnp.asarray(RNG.normal(size=(2, 7)))
    tokens = jnp.array([1, 4])
    grad = jax.grad(lambda z: jnp.sum(L.logprobs_from_logits(z, tokens)))(logits)
    expected = np.eye(7)[np.asarray(tokens)] - np.exp(np_log_softmax(np.asarray(logits, np.float64)))
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- KL estimators


def np_kl(lp, ref, kind, log_ratio_clip=None, kl_clip=None):
    d = lp - ref
    if kind == "k1":
        out = d
    elif kind in ("k2", "mse"):
        out = 0.5 * d * d
    elif kind == "abs":
        out = np.abs(d)
    else:
        r = ref - lp
        if log_ratio_clip is not None:
            r = np.clip(r, -log_ratio_clip, log_ratio_clip)
        out = np.exp(r) - r - 1
    if kl_clip is not None:
        out = np.clip(out, -kl_clip, kl_clip)
    return out


@pytest.mark.parametrize("kind", L.KL_KINDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kl_penalty_matches_numpy(kind, dtype):
    lp = RNG.normal(size=(3, 6)) - 2
    ref = lp + RNG.normal(size=(3, 6)) * 0.5
    lpr, refr = (_bf16_round(lp), _bf16_round(ref)) if dtype == jnp.bfloat16 else (lp, ref)
    got = L.kl_penalty(jnp.asarray(lp, dtype), jnp.asarray(ref, dtype), kind)
    np.testing.assert_allclose(got, np_kl(lpr, refr, kind), rtol=1e-5, atol=1e-6)
    m = _random_mask(3, 6)
    masked = L.kl_penalty(jnp.asarray(lp, dtype), jnp.asarray(ref, dtype), kind, mask=m)
    np.testing.assert_allclose(masked, np_kl(lpr, refr, kind) * m, rtol=1e-5, atol=1e-6)


def test_kl_penalty_hand_computed_and_clamps():
    lp, ref = jnp.array([-1.0]), jnp.array([-2.0])  # d = 1
    np.testing.assert_allclose(L.kl_penalty(lp, ref, "k1"), [1.0])
    np.testing.assert_allclose(L.kl_penalty(lp, ref, "k2"), [0.5])
    np.testing.assert_allclose(L.kl_penalty(lp, ref, "abs"), [1.0])
    np.testing.assert_allclose(L.kl_penalty(lp, ref, "k3"), [np.exp(-1.0) + 1.0 - 1.0], rtol=1e-6)
    # verl's low_var_kl clamps ref - logp to [-20, 20] and the estimate to [-10, 10].
    far = L.kl_penalty(jnp.array([-50.0]), jnp.array([0.0]), "k3", log_ratio_clip=20.0, kl_clip=10.0)
    np.testing.assert_allclose(far, [10.0])
    np.testing.assert_allclose(L.kl_penalty(jnp.array([-50.0]), jnp.array([0.0]), "k1", kl_clip=10.0), [-10.0])
    with pytest.raises(ValueError, match="kind"):
        L.kl_penalty(lp, ref, "k4")


@pytest.mark.torch
def test_kl_penalty_matches_trl_grpo_and_openrlhf_formulas_on_torch():
    import torch
    lp = RNG.normal(size=(2, 5)).astype(np.float32) - 1
    ref = (lp + RNG.normal(size=(2, 5)) * 2).astype(np.float32)
    tlp, tref = torch.tensor(lp), torch.tensor(ref)
    trl_k3 = torch.exp(tref - tlp) - (tref - tlp) - 1  # GRPOTrainer's per_token_kl
    np.testing.assert_allclose(L.kl_penalty(lp, ref, "k3"), trl_k3.numpy(), rtol=1e-5, atol=1e-6)
    log_ratio = -(tlp - tref)  # OpenRLHF compute_approx_kl k3 with its ±10 clamp
    openrlhf_k3 = (log_ratio.exp() - 1 - log_ratio).clamp(min=-10, max=10)
    np.testing.assert_allclose(L.kl_penalty(lp, ref, "k3", kl_clip=10.0), openrlhf_k3.numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- aggregation and SFT


def np_aggregate(loss, m, mode, normalizer=None, max_len=None):
    if mode == "token_mean":
        return (loss * m).sum() / (normalizer if normalizer is not None else max(m.sum(), 1))
    if mode == "token_sum_norm":
        return (loss * m).sum() / (normalizer if normalizer is not None else m.shape[0] * (max_len or m.shape[1]))
    seq = (loss * m).sum(-1)
    if mode == "seq_mean_token_mean":
        seq = seq / np.maximum(m.sum(-1), 1)
    return seq.sum() / (normalizer if normalizer is not None else m.shape[0])


@pytest.mark.parametrize("mode", L.AGGREGATIONS)
def test_aggregate_loss_matches_numpy_and_microbatches_sum(mode):
    loss = RNG.normal(size=(6, 5))
    m = _random_mask(6, 5)
    np.testing.assert_allclose(L.aggregate_loss(loss, m, mode=mode), np_aggregate(loss, m, mode), rtol=1e-5)
    np.testing.assert_allclose(L.aggregate_loss(loss, m, mode=mode, max_completion_length=9),
                               np_aggregate(loss, m, mode, max_len=9), rtol=1e-5)
    # Micro-batching with the global normalizer sums to the full-batch loss.
    full = L.aggregate_loss(loss, m, mode=mode)
    global_norm = {"token_mean": m.sum(), "token_sum_norm": 6 * 5}.get(mode, 6)
    parts = [L.aggregate_loss(loss[i:i + 2], m[i:i + 2], mode=mode, normalizer=global_norm) for i in (0, 2, 4)]
    np.testing.assert_allclose(sum(parts), full, rtol=1e-5)


def test_aggregate_loss_hand_computed():
    loss = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = jnp.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(L.aggregate_loss(loss, m, mode="token_mean"), 7.0 / 3.0, rtol=1e-6)
    np.testing.assert_allclose(L.aggregate_loss(loss, m, mode="seq_mean_token_mean"), (1.5 + 4.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(L.aggregate_loss(loss, m, mode="seq_mean_token_sum"), (3.0 + 4.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(L.aggregate_loss(loss, m, mode="token_sum_norm"), 7.0 / 6.0, rtol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        L.aggregate_loss(loss, m, mode="mean")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sft_loss_matches_numpy(dtype):
    lp = RNG.normal(size=(4, 6)) - 3
    m = _random_mask(4, 6)
    lpr = _bf16_round(lp) if dtype == jnp.bfloat16 else lp
    loss, metrics = L.sft_loss(jnp.asarray(lp, dtype), m)
    np.testing.assert_allclose(loss, -(lpr * m).sum() / m.sum(), rtol=1e-5)
    np.testing.assert_allclose(metrics["nll"], loss, rtol=1e-6)
    assert float(metrics["num_tokens"]) == m.sum()
    loss_n, _ = L.sft_loss(jnp.asarray(lp, dtype), m, normalizer=50.0)
    np.testing.assert_allclose(loss_n, -(lpr * m).sum() / 50.0, rtol=1e-5)


# ---------------------------------------------------------------- masking, jit, grad, vmap


def _check_mask_invariance(loss_fn, float_args, mask):
    """Loss and gradients are unchanged by any value at masked positions; gradients there are 0 and finite."""
    mask = np.asarray(mask, bool)
    value, grads = jax.value_and_grad(loss_fn)(float_args)
    for fill in (1e6, -1e6, 3.0e4):
        bad = {k: jnp.where(mask, v, fill) for k, v in float_args.items()}
        value2, grads2 = jax.value_and_grad(loss_fn)(bad)
        np.testing.assert_allclose(value2, value, rtol=1e-6, atol=1e-7)
        for k in float_args:
            g, g2 = np.asarray(grads[k]), np.asarray(grads2[k])
            assert np.all(np.isfinite(g2)), k
            np.testing.assert_allclose(g2, g, rtol=1e-6, atol=1e-7)
            assert np.all(g2[~mask] == 0), k
    assert np.isfinite(float(value))


def test_common_losses_mask_invariance_and_all_masked_rows():
    lp = jnp.asarray(RNG.normal(size=(3, 5)) - 2)
    ref = jnp.asarray(RNG.normal(size=(3, 5)) - 2)
    m = _random_mask(3, 5)  # row 0 is all-masked
    _check_mask_invariance(lambda a: L.sft_loss(a["lp"], m)[0], {"lp": lp}, m)
    for kind in L.KL_KINDS:
        _check_mask_invariance(lambda a: L.masked_mean(L.kl_penalty(a["lp"], a["ref"], kind, mask=m), m),
                               {"lp": lp, "ref": ref}, m)
    _check_mask_invariance(lambda a: jnp.sum(L.masked_whiten(a["lp"], m) ** 3), {"lp": lp}, m)
    for mode in L.AGGREGATIONS:
        _check_mask_invariance(lambda a: L.aggregate_loss(a["lp"] ** 2, m, mode=mode), {"lp": lp}, m)


def test_jit_equals_eager_and_vmap():
    lp = jnp.asarray(RNG.normal(size=(2, 3, 5)) - 2)
    ref = jnp.asarray(RNG.normal(size=(2, 3, 5)) - 2)
    m = jnp.asarray(np.stack([_random_mask(3, 5), _random_mask(3, 5)]))

    def f(lp, ref, m):
        loss, _ = L.sft_loss(lp, m)
        kl = L.masked_mean(L.kl_penalty(lp, ref, "k3", mask=m), m)
        return loss + kl + jnp.sum(L.masked_whiten(lp, m, shift_mean=False))

    eager = [f(lp[i], ref[i], m[i]) for i in range(2)]
    np.testing.assert_allclose(jax.jit(f)(lp[0], ref[0], m[0]), eager[0], rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(f)(lp, ref, m), eager, rtol=1e-6)
    logits = jnp.asarray(RNG.normal(size=(2, 4, 9)))
    tokens = jnp.asarray(RNG.integers(0, 9, size=(2, 4)))
    np.testing.assert_allclose(jax.vmap(L.logprobs_from_logits)(logits, tokens),
                               L.logprobs_from_logits(logits, tokens), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(L.entropy_from_logits)(logits), L.entropy_from_logits(logits), rtol=1e-6)
    grads = jax.grad(lambda z: jnp.sum(L.entropy_from_logits(z)))(logits)
    assert np.all(np.isfinite(np.asarray(grads)))
