"""What the sampler draws is exactly the distribution ``jrlhf.sampling.filter_logits`` documents, in every case
(temperature, top-k, top-p, both; ties at either boundary), checked statistically over many draws of the sampler's
own token-selection step on small hand-made distributions; and ``filter_logits`` agrees with ``transformers``'
Temperature / TopK / TopP logits warpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf import sampling

DRAWS = 40000


def _draws(logits, temperature, top_k, top_p, seed=0):
    """``DRAWS`` tokens from the sampler's selection step (one uniform per row, as in ``generate``)."""
    rows = jnp.tile(jnp.asarray(logits, jnp.float32)[None], (DRAWS, 1))
    tokens, _ = jax.jit(sampling._select_tokens, static_argnames="top_k")(
        rows, jax.random.key(seed), jnp.float32(temperature), jnp.float32(top_p), top_k=top_k)
    return np.bincount(np.asarray(tokens), minlength=len(logits))


def _documented(logits, temperature, top_k, top_p):
    filtered = sampling.filter_logits(jnp.asarray(logits, jnp.float32)[None] / temperature, top_k=top_k, top_p=top_p)
    return np.asarray(jax.nn.softmax(filtered, -1), np.float64)[0]


def _chi2(counts, probs):
    support = probs > 0
    expected = counts.sum() * probs[support]
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum() - 1)


def _bound(dof):
    return dof + 6 * np.sqrt(2 * max(dof, 1)) + 6  # mean dof, std sqrt(2 dof): a 6-sigma bound


LOG = np.log
HAND_MADE = {
    # name: (logits, temperature, top_k, top_p, the documented probabilities written out by hand)
    "plain": (LOG([0.5, 0.3, 0.15, 0.05]), 1.0, 0, 1.0, [0.5, 0.3, 0.15, 0.05]),
    "temperature 0.5": (LOG([0.5, 0.3, 0.15, 0.05]), 0.5, 0, 1.0,
                        np.array([0.25, 0.09, 0.0225, 0.0025]) / 0.365),
    "temperature 2": (LOG([0.64, 0.16, 0.16, 0.04]), 2.0, 0, 1.0, np.array([0.8, 0.4, 0.4, 0.2]) / 1.8),
    "top-k 2": (LOG([0.1, 0.4, 0.2, 0.3]), 1.0, 2, 1.0, [0.0, 4 / 7, 0.0, 3 / 7]),
    "top-k tie": (LOG([0.4, 0.2, 0.2, 0.2]), 1.0, 2, 1.0, [0.4, 0.2, 0.2, 0.2]),  # ties with the 2nd all kept
    "top-p 0.6": (LOG([0.05, 0.5, 0.3, 0.15]), 1.0, 0, 0.6, [0.0, 0.625, 0.375, 0.0]),
    "top-p 0.9": (LOG([0.05, 0.5, 0.3, 0.15]), 1.0, 0, 0.9, [0.0, 0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95]),
    "top-p tie": (LOG([0.4, 0.3, 0.3]), 1.0, 0, 0.5, [0.4, 0.3, 0.3]),  # the nucleus ends on a tie: both kept
    "top-p tiny": (LOG([0.2, 0.5, 0.3]), 1.0, 0, 1e-6, [0.0, 1.0, 0.0]),
    "top-k then top-p": (LOG([0.35, 0.3, 0.2, 0.1, 0.05]), 1.0, 3, 0.5, [0.35 / 0.65, 0.3 / 0.65, 0, 0, 0]),
    "top-k, top-p, temperature": (LOG([0.35, 0.3, 0.2, 0.1, 0.05]), 0.5, 4, 0.8,
                                  np.array([0.35**2, 0.3**2, 0, 0, 0]) / (0.35**2 + 0.3**2)),
}


@pytest.mark.parametrize("name", list(HAND_MADE))
def test_sampler_draws_follow_filter_logits(name):
    logits, temperature, top_k, top_p, by_hand = HAND_MADE[name]
    documented = _documented(logits, temperature, top_k, top_p)
    np.testing.assert_allclose(documented, by_hand, atol=1e-6)
    counts = _draws(logits, temperature, top_k, top_p)
    assert counts[documented == 0].sum() == 0, "drew a token that filter_logits drops"
    chi2, dof = _chi2(counts, documented)
    assert chi2 < _bound(dof), (chi2, dof)
    assert 0.5 * np.abs(counts / DRAWS - documented).sum() < 0.015  # sampling noise alone is ~0.004 here


def test_the_statistical_check_can_fail():
    """The draws of the tie cases reject the distributions a tie broken by token order would give."""
    logits, temperature, top_k, top_p, _ = HAND_MADE["top-k tie"]
    counts = _draws(logits, temperature, top_k, top_p)
    chi2, dof = _chi2(counts, np.array([2 / 3, 1 / 3, 0, 0]) + 1e-12)
    assert chi2 > 100 * _bound(dof)
    logits, temperature, top_k, top_p, _ = HAND_MADE["top-p tie"]
    counts = _draws(logits, temperature, top_k, top_p)
    chi2, dof = _chi2(counts, np.array([4 / 7, 3 / 7, 1e-12]))
    assert chi2 > 100 * _bound(dof)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (40, 0.8), (7, 1.0)])
def test_large_vocabulary_draws_follow_filter_logits(top_k, top_p):
    """A vocabulary of 700 (the blocked inverse CDF and the bisection for the nucleus) with some tied logits."""
    logits = np.random.default_rng(5).normal(0.0, 2.0, 700).astype(np.float32)
    logits[np.argsort(-logits)[3:9]] = np.sort(logits)[-4]  # ties around the boundaries
    documented = _documented(logits, 1.0, top_k, top_p)
    counts = _draws(logits, 1.0, top_k, top_p, seed=3)
    assert counts[documented == 0].sum() == 0
    chi2, dof = _chi2(counts, documented)
    assert dof > 5 and chi2 < _bound(dof), (chi2, dof)


def _transformers_probs(logits, temperature, top_k, top_p):
    import torch
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    scores = warpers(torch.zeros((len(logits), 1), dtype=torch.long), torch.tensor(logits, dtype=torch.float64))
    return torch.softmax(scores, -1).numpy()


@pytest.mark.torch
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.5), (0, 0.93), (6, 0.7), (2, 0.3), (1, 1.0)])
def test_filter_logits_equals_transformers_warpers(temperature, top_k, top_p):
    logits = np.random.default_rng(11).normal(0.0, 1.5, (6, 13))
    want = _transformers_probs(logits, temperature, top_k, top_p)
    got = np.stack([_documented(row, temperature, top_k, top_p) for row in logits])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_filter_logits_keeps_top_k_ties_as_transformers_does():
    logits = np.array([[2.0, 1.0, 1.0, 1.0, 0.0, -1.0]])
    # by hand: top-2 keeps 2.0 and every logit tied with the second (three 1.0s), softmax over those four
    kept = np.exp([2.0, 1.0, 1.0, 1.0])
    by_hand = np.concatenate([kept / kept.sum(), [0.0, 0.0]])[None]
    np.testing.assert_allclose(_documented(logits[0], 1.0, 2, 1.0)[None], by_hand, atol=1e-6)
    pytest.importorskip("torch", reason="the transformers warper half needs PyTorch: install the `test` extra")
    want = _transformers_probs(logits, 1.0, 2, 1.0)
    assert (want > 0).sum() == 4
    np.testing.assert_allclose(by_hand, want, atol=1e-6)
