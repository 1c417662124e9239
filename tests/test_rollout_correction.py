"""Rollout/train mismatch (metrics and the four correction modes), DAPO's tools (soft overlong punishment, dynamic
sampling, ``top_entropy_quantile``) and the chunked entropy, each against numpy written out here, a hand-computed
case or TRL's own function.

The mismatch is measured on a tiny Llama in bf16 compute, where the sampler's cached decode and the trainer's full
forward round differently, and in fp32, where they agree to float rounding.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf import losses
from jrlhf.algorithms import grpo, onpolicy
from jrlhf.config import ConfigError
from jrlhf.data import load_records, load_tokenizer
from jrlhf.models import init_model, logical_axes, tiny_config, token_entropy_from_hidden
from jrlhf.rewards import get_reward_fn, get_soft_overlong_punishment
from jrlhf.sharding import make_mesh
from jrlhf.step import OptimizerConfig, StepContext, init_train_state, make_optimizer

TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
              "head_dim": 16, "max_position_embeddings": 64}


def digit_share(prompts, completions, completion_ids, **record_fields):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def first_is_digit(prompts, completions, completion_ids, **record_fields):
    """A coarse 0/1 reward: many groups agree (zero std), the filter's case."""
    return [float(c[:1].isdigit()) for c in completions]


# ------------------------------------------------------------------------------------------------ numpy references

def np_weights(trainer, sampler, mask, mode, clip_max, clip_min):
    """The four modes written out: ``(weights, keep)``."""
    log_r = np.where(mask, trainer.astype(np.float64) - sampler, 0.0)
    if mode.startswith("sequence"):
        log_r = np.repeat(log_r.sum(-1, keepdims=True), mask.shape[1], axis=1)
    ratio = np.exp(log_r)
    lo = clip_min if clip_min else 0.0
    hi = np.inf if clip_max is None else clip_max
    if mode.endswith("truncate"):
        return np.where(mask, np.clip(ratio, lo, hi), 0.0), mask.copy()
    keep = mask & (ratio >= lo) & (ratio <= hi)
    return np.where(keep, ratio, 0.0), keep


def hand_arrays():
    # 3 rows x 4 tokens; row 2 has 2 tokens. log ratios chosen around log 3 = 1.0986
    trainer = np.array([[-1.0, -2.0, -0.5, -3.0], [-0.2, -0.1, -4.0, -1.0], [-1.5, -0.7, 0.0, 0.0]], np.float32)
    sampler = np.array([[-1.2, -0.5, -0.5, -4.5], [-0.2, -0.3, -2.0, -1.1], [-1.0, -0.7, 0.0, 0.0]], np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], bool)
    return trainer, sampler, mask


@pytest.mark.parametrize("mode", losses.IS_MODES)
@pytest.mark.parametrize("bounds", [(3.0, None), (2.0, 0.5)])
def test_importance_weights_match_numpy(mode, bounds):
    trainer, sampler, mask = hand_arrays()
    clip_max, clip_min = bounds
    weights, keep = losses.rollout_importance_weights(trainer, sampler, mask, mode=mode, clip_max=clip_max,
                                                      clip_min=clip_min)
    ref_w, ref_keep = np_weights(trainer, sampler, mask, mode, clip_max, clip_min)
    np.testing.assert_allclose(np.asarray(weights), ref_w, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(keep), ref_keep)


def test_importance_weights_hand_computed():
    trainer, sampler, mask = hand_arrays()
    # token log ratios: row 0: 0.2, -1.5, 0, 1.5 ; row 1: 0, 0.2, -2, 0.1 ; row 2: -0.5, 0
    w, keep = losses.rollout_importance_weights(trainer, sampler, mask, mode="token_truncate", clip_max=3.0)
    assert float(w[0, 3]) == pytest.approx(3.0)  # e^1.5 = 4.48 capped at 3
    assert float(w[0, 1]) == pytest.approx(np.exp(-1.5), rel=1e-6)  # no lower clip by default
    w, keep = losses.rollout_importance_weights(trainer, sampler, mask, mode="token_mask", clip_max=3.0,
                                                clip_min=1 / 3)
    assert np.asarray(keep).tolist() == [[True, False, True, False], [True, True, False, True],
                                         [True, True, False, False]]
    # sequence sums: row 0: 0.2 ; row 1: -1.7 ; row 2: -0.5
    w, keep = losses.rollout_importance_weights(trainer, sampler, mask, mode="sequence_mask", clip_max=3.0,
                                                clip_min=0.5)
    assert np.asarray(keep).any(-1).tolist() == [True, False, True]
    assert float(w[2, 0]) == pytest.approx(np.exp(-0.5), rel=1e-6) and float(w[2, 2]) == 0.0
    w, _ = losses.rollout_importance_weights(trainer, sampler, mask, mode="sequence_truncate", clip_max=1.1)
    assert float(w[0, 2]) == pytest.approx(1.1) and float(w[1, 0]) == pytest.approx(np.exp(-1.7), rel=1e-6)
    # a long sequence's sum does not overflow the truncated weight
    big = np.full((1, 200), 1.0, np.float32)
    w, _ = losses.rollout_importance_weights(big, 0 * big, big > 0, mode="sequence_truncate", clip_max=3.0)
    assert np.all(np.asarray(w) == pytest.approx(3.0))


def test_importance_weights_carry_no_gradient_and_bad_modes_raise():
    trainer, sampler, mask = hand_arrays()
    grad = jax.grad(lambda t: jnp.sum(losses.rollout_importance_weights(t, sampler, mask)[0]))(trainer)
    assert np.all(np.asarray(grad) == 0.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        losses.rollout_importance_weights(trainer, sampler, mask, mode="token")
    with pytest.raises(ValueError, match="needs clip_max"):
        losses.rollout_importance_weights(trainer, sampler, mask, mode="token_truncate", clip_max=None)


def test_mismatch_metrics_match_numpy():
    trainer, sampler, mask = hand_arrays()
    got = losses.rollout_mismatch_metrics(trainer, sampler, mask, clip_max=3.0)
    d = (trainer.astype(np.float64) - sampler)[mask]
    assert float(got["sampling/sampling_logp_difference/mean"]) == pytest.approx(np.abs(d).mean(), rel=1e-6)
    assert float(got["sampling/sampling_logp_difference/max"]) == pytest.approx(np.abs(d).max(), rel=1e-6)
    assert float(got["sampling/k3_kl"]) == pytest.approx(np.mean(np.exp(d) - 1 - d), rel=1e-5)
    outside = (np.exp(d) < 1 / 3) | (np.exp(d) > 3)
    assert float(got["sampling/importance_sampling_ratio/frac_outside"]) == pytest.approx(outside.mean())
    assert outside.sum() == 3  # -1.5, 1.5, -2.0 of the hand-made log ratios
    # float32 rounding-sized mismatches (|log r| ~ 1e-7..1e-3): k3 keeps its relative accuracy
    sampler = np.full((1, 4), -1.0, np.float32)
    trainer = sampler + np.array([[2e-7, -3e-5, 8e-4, -5e-3]], np.float32)
    d = trainer.astype(np.float64) - sampler
    got = losses.rollout_mismatch_metrics(trainer, sampler, np.ones((1, 4), bool), clip_max=3.0)
    assert float(got["sampling/k3_kl"]) == pytest.approx(np.mean(np.expm1(d) - d), rel=1e-4)


def test_importance_weight_metrics_count_tokens_or_sequences():
    trainer, sampler, mask = hand_arrays()
    w, keep = losses.rollout_importance_weights(trainer, sampler, mask, mode="sequence_mask", clip_max=3.0,
                                                clip_min=0.5)
    m = losses.importance_weight_metrics(w, keep, mask, "sequence_mask")
    assert float(m["sampling/importance_sampling_ratio/dropped_frac"]) == pytest.approx(1 / 3)
    assert float(m["sampling/importance_sampling_ratio/min"]) == pytest.approx(np.exp(-0.5), rel=1e-6)
    assert float(m["sampling/importance_sampling_ratio/max"]) == pytest.approx(np.exp(0.2), rel=1e-6)
    w, keep = losses.rollout_importance_weights(trainer, sampler, mask, mode="token_mask", clip_max=3.0,
                                                clip_min=1 / 3)
    m = losses.importance_weight_metrics(w, keep, mask, "token_mask")
    assert float(m["sampling/importance_sampling_ratio/dropped_frac"]) == pytest.approx(3 / 10)


def test_high_entropy_mask_matches_the_quantile_rule():
    rng = np.random.default_rng(0)
    entropies = rng.uniform(0, 5, (4, 7)).astype(np.float32)
    mask = rng.uniform(size=(4, 7)) < 0.7
    for rho in (0.0, 0.2, 0.5, 0.999, 1.0):
        got = np.asarray(losses.high_entropy_mask(entropies, mask, rho))
        threshold = np.quantile(entropies[mask].astype(np.float64), 1 - rho)  # linear, as torch.quantile
        np.testing.assert_array_equal(got, mask & (entropies >= np.float32(threshold)), err_msg=str(rho))
    # hand case: entropies 1, 2, 3, 4 (one masked out): rho 0.5 -> threshold = quantile([1,2,4], .5) = 2
    e = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    m = np.array([[1, 1, 0, 1]], bool)
    assert np.asarray(losses.high_entropy_mask(e, m, 0.5)).tolist() == [[False, True, False, True]]
    assert not np.asarray(losses.high_entropy_mask(e, np.zeros_like(m), 0.2)).any()


def test_high_entropy_mask_equals_trls(require_trl=None):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    entropies = rng.uniform(0, 5, (3, 9)).astype(np.float32)
    mask = rng.uniform(size=(3, 9)) < 0.6
    for rho in (0.1, 0.3):
        t_e, t_m = torch.tensor(entropies), torch.tensor(mask)
        threshold = torch.quantile(t_e[t_m].float(), 1 - rho)  # TRL's get_high_entropy_mask on one process
        expected = ((t_e * t_m.float()) >= threshold) & t_m
        np.testing.assert_array_equal(np.asarray(losses.high_entropy_mask(entropies, mask, rho)), expected.numpy())


def test_chunked_entropy_matches_numpy():
    rng = np.random.default_rng(2)
    hidden = rng.standard_normal((2, 3, 8)).astype(np.float32)
    unembed = rng.standard_normal((37, 8)).astype(np.float32)
    for temperature in (1.0, 0.7):
        z = hidden.astype(np.float64) @ unembed.T.astype(np.float64) / temperature
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        expected = -(p * np.log(p)).sum(-1)
        for chunk in (5, 16, 37, 100):  # uneven last chunk, one chunk, bigger than the vocabulary
            got = token_entropy_from_hidden(jnp.asarray(hidden), jnp.asarray(unembed), chunk, temperature)
            np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ soft overlong

def test_soft_overlong_punishment_hand_computed_and_equals_trls():
    fn = get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    lengths = [0, 80, 81, 90, 100, 101, 150]
    got = fn(completion_ids=[[1] * n for n in lengths])
    assert got == pytest.approx([0.0, 0.0, -1 / 20, -0.5, -1.0, -1.0, -1.0])
    trl_rewards = pytest.importorskip("trl.rewards")
    assert got == pytest.approx(trl_rewards.get_soft_overlong_punishment(100, 20)([[1] * n for n in lengths]))
    # by name from YAML, as a factory with TRL's argument names
    named = get_reward_fn("soft_overlong_punishment", max_completion_len=8, soft_punish_cache=4)
    assert named(["p"] * 3, ["a"] * 3, [[1] * 4, [1] * 6, [1] * 8]) == pytest.approx([0.0, -0.5, -1.0])
    with pytest.raises(ValueError, match="soft_punish_cache"):
        get_soft_overlong_punishment(10, 11)


# ------------------------------------------------------------------------------------------------ the rollout

def _setup(config, dtype="float32", seed=3):
    tokenizer = load_tokenizer("char")
    cfg = tiny_config("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, dtype=dtype, **TINY_MODEL)
    model, params = init_model(cfg, jax.random.PRNGKey(seed))
    algo = grpo.make(model, config)
    mesh = make_mesh()
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3), params)
    state, shardings = init_train_state(params, optimizer, jax.random.PRNGKey(1), mesh=mesh,
                                        param_specs=logical_axes(model))
    return tokenizer, model, algo, state, algo.update(optimizer, mesh, state_shardings=shardings)


RECORDS = load_records("builtin:addition/rl_prompts.jsonl")[:4]
BASE = dict(num_generations=4, max_completion_length=12, min_new_tokens=12, reward_funcs=(digit_share,))


def _np_metrics(out):
    n = out.batch.num_completion_tokens
    mask = np.asarray(out.batch.loss_mask)[:, -n:] > 0
    d = (np.asarray(out.trainer_logps, np.float64) - np.asarray(out.sampler_logps))[mask]
    return mask, d


def test_rollout_measures_the_sampler_trainer_mismatch():
    """fp32: the sampler and the trainer agree to float rounding; bf16 compute: they differ (by a little on this
    tiny model on a CPU, whose XLA computes bf16 ops in fp32 and rounds their outputs), and the metrics equal numpy's
    of the Rollout's two log-prob arrays."""
    largest = {}
    for dtype in ("float32", "bfloat16"):
        largest[dtype] = _check_mismatch(dtype)
    assert largest["float32"] < 1e-5
    assert largest["bfloat16"] > 5 * largest["float32"]


def _check_mismatch(dtype):
    tokenizer, model, algo, state, _ = _setup(grpo.Config(**BASE, log_rollout_mismatch=True), dtype)
    out = algo.rollout(state.params, RECORDS, jax.random.PRNGKey(7), tokenizer=tokenizer)
    mask, d = _np_metrics(out)
    assert mask.sum() == 16 * 12
    # the trainer's numbers are the loss's own forward at the rollout's params
    if dtype == "float32":
        logps, _, _ = onpolicy.completion_forward(model, state.params, out.batch.input_ids,
                                                  out.batch.attention_mask, 12, temperature=1.0)
        np.testing.assert_allclose(np.asarray(logps), np.asarray(out.trainer_logps), atol=1e-5)
    m = out.metrics
    assert m["sampling/sampling_logp_difference/mean"] == pytest.approx(np.abs(d).mean(), rel=1e-4, abs=1e-7)
    assert m["sampling/sampling_logp_difference/max"] == pytest.approx(np.abs(d).max(), rel=1e-4, abs=1e-7)
    assert m["sampling/k3_kl"] == pytest.approx(np.mean(np.exp(d) - 1 - d), rel=1e-3, abs=1e-9)
    assert m["sampling/importance_sampling_ratio/frac_outside"] == pytest.approx(
        np.mean((np.exp(d) > 3) | (np.exp(d) < 1 / 3)))
    # default: old_logps are the sampler's
    np.testing.assert_array_equal(np.asarray(out.batch.old_logps), np.asarray(out.sampler_logps))
    assert out.batch.sampler_logps is None
    return m["sampling/sampling_logp_difference/max"]


def _ctx(prepared, globals_):
    from jrlhf.step import default_globals
    return StepContext(rng=jax.random.PRNGKey(0), step=jnp.int32(0), algo_state={},
                       globals={**default_globals(prepared), **globals_, "num_microbatches": 1.0})


def test_mismatch_forward_is_opt_in():
    """Without ``log_rollout_mismatch`` and the correction, the rollout runs no trainer forward: no
    ``trainer_logps``, no ``sampling/*`` metrics, and ``old_logps`` are the sampler's."""
    tokenizer, _, algo, state, _ = _setup(grpo.Config(**BASE), "float32")
    out = algo.rollout(state.params, RECORDS, jax.random.PRNGKey(7), tokenizer=tokenizer)
    assert out.trainer_logps is None
    assert not [k for k in out.metrics if k.startswith("sampling/")]
    np.testing.assert_array_equal(np.asarray(out.batch.old_logps), np.asarray(out.sampler_logps))


def test_corrected_grpo_loss_equals_numpy():
    """bf16 compute, correction on, each mode with bounds set between the rollout's own log ratios (so that the
    mask modes drop some tokens / sequences and keep others): prepare_batch's weights and mask equal numpy's, and
    the GRPO (dapo) loss equals the loss written out with those weights and the kept-token count."""
    tokenizer, model, algo, state, update = _setup(grpo.Config(**BASE, log_rollout_mismatch=True), "bfloat16")
    rng = jax.random.PRNGKey(7)
    plain = algo.rollout(state.params, RECORDS, rng, tokenizer=tokenizer)
    mask, _ = _np_metrics(plain)
    log_r = np.where(mask, np.asarray(plain.trainer_logps, np.float64) - np.asarray(plain.sampler_logps), 0.0)
    assert np.abs(log_r).max() > 0
    for mode in losses.IS_MODES:
        scale = np.abs(log_r.sum(-1)) if mode.startswith("sequence") else np.abs(log_r[mask])
        values = np.unique(scale)
        assert values.size > 2, mode
        cap = float(np.exp(0.5 * (values[values.size // 2 - 1] + values[values.size // 2])))  # half in, half out
        config = grpo.Config(**BASE, vllm_importance_sampling_correction=True, vllm_importance_sampling_mode=mode,
                             vllm_importance_sampling_clip_max=cap, vllm_importance_sampling_clip_min=1 / cap)
        corrected = grpo.make(model, config)
        out = corrected.rollout(state.params, RECORDS, rng, tokenizer=tokenizer)
        batch = out.batch
        np.testing.assert_array_equal(np.asarray(batch.sampler_logps), np.asarray(plain.sampler_logps))
        np.testing.assert_array_equal(np.asarray(batch.old_logps), np.asarray(out.trainer_logps))
        prepared, globals_ = jax.jit(corrected.prepare_batch)(batch, None, {})
        trainer, sampler = np.asarray(batch.old_logps), np.asarray(batch.sampler_logps)
        ref_w, ref_keep = np_weights(trainer, sampler, mask, mode, cap, 1 / cap)
        np.testing.assert_allclose(np.asarray(prepared["is_weights"]), ref_w, rtol=1e-6, err_msg=mode)
        np.testing.assert_array_equal(np.asarray(prepared["loss_mask"])[:, -12:] > 0, ref_keep, err_msg=mode)
        if mode.endswith("mask"):
            assert 0 < ref_keep.sum() < mask.sum(), mode
        # the loss written out: weight x advantage summed over the kept tokens over their count (dapo); the ratio
        # of the loss's forward to the trainer's old log-probs is 1 up to bf16 rounding (the tolerance)
        adv = np.asarray(grpo.advantages(jnp.asarray(batch.scores), config), np.float64)[:, None]
        loss, metrics = jax.jit(corrected.loss_fn)(state.params, prepared, None, _ctx(prepared, globals_))
        # at the rollout's params the loss's forward is the trainer's: ratio 1 up to bf16 rounding of the program
        expected = -np.sum(ref_w * adv * ref_keep) / ref_keep.sum()
        assert float(loss) == pytest.approx(expected, abs=1e-2 * np.abs(ref_w * adv * ref_keep).sum()
                                            / ref_keep.sum() + 1e-6), mode
        assert "sampling/importance_sampling_ratio/mean" in out.metrics
        assert out.metrics["sampling/importance_sampling_ratio/dropped_frac"] == pytest.approx(
            0.0 if mode.endswith("truncate") else (
                1 - ref_keep.any(-1).mean() if mode.startswith("sequence") else 1 - ref_keep.sum() / mask.sum()),
            abs=1e-6), mode
    _, update_metrics = update(state, plain.batch, None)  # the uncorrected update still runs on the same shapes
    assert np.isfinite(float(update_metrics["loss"]))


def test_correction_needs_the_sampler_logps_and_is_grpo_only():
    config = grpo.Config(**BASE, vllm_importance_sampling_correction=True)
    tokenizer, model, algo, state, _ = _setup(config)
    out = algo.rollout(state.params, RECORDS, jax.random.PRNGKey(7), tokenizer=tokenizer)
    from jrlhf.algorithms.base import AlgorithmInputError
    batch = dict(out.batch)
    batch.pop("sampler_logps")
    with pytest.raises(AlgorithmInputError, match="sampler_logps"):
        algo.prepare_batch(batch, None, {})
    with pytest.raises(ConfigError, match="vllm_importance_sampling_mode='tok'"):
        grpo.make(model, {**BASE, "vllm_importance_sampling_mode": "tok"})
    with pytest.raises(ConfigError, match="clip_max=None"):
        grpo.make(model, {**BASE, "vllm_importance_sampling_mode": "token_truncate",
                          "vllm_importance_sampling_clip_max": None})
    from jrlhf.algorithms import rloo
    with pytest.raises(ConfigError, match="rloo does not apply the correction"):
        rloo.make(model, {"num_generations": 2, "vllm_importance_sampling_correction": True})
    with pytest.raises(ConfigError, match="top_entropy_quantile"):
        grpo.make(model, {**BASE, "top_entropy_quantile": 1.5})


def test_top_entropy_quantile_keeps_the_high_entropy_tokens_in_the_loss():
    config = grpo.Config(**{**BASE, "min_new_tokens": 0}, top_entropy_quantile=0.2, logprob_chunk_size=16)
    tokenizer, model, algo, state, _ = _setup(config)
    out = algo.rollout(state.params, RECORDS, jax.random.PRNGKey(7), tokenizer=tokenizer)
    prepared, globals_ = jax.jit(algo.prepare_batch)(out.batch, None, {})
    loss, metrics = jax.jit(algo.loss_fn)(state.params, prepared, None, _ctx(prepared, globals_))
    # numpy: full-logit entropies, the 0.8 quantile over the trained tokens (truncated rows are not trained)
    logits = np.asarray(model.apply(state.params, prepared["input_ids"], prepared["attention_mask"]),
                        np.float64)[:, -13:-1]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    entropy = -(p * np.log(np.maximum(p, 1e-300))).sum(-1)
    mask = np.asarray(prepared["loss_mask"])[:, -12:] > 0
    assert mask.sum() > 0
    keep = mask & (entropy >= np.quantile(entropy[mask], 0.8) - 1e-6)
    adv = np.asarray(prepared["advantages"])
    expected = -np.sum(keep * adv[:, None]) / mask.sum()  # ratio 1; dapo divides by all trained tokens (TRL)
    assert float(loss) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert float(metrics["entropy/threshold_kept_frac"]) == pytest.approx(keep.sum() / mask.sum(), abs=1e-6)
    assert float(metrics["entropy"]) == pytest.approx(entropy[mask].mean(), rel=1e-4)  # chunked entropy


# ------------------------------------------------------------------------------------------------ dynamic sampling

def test_dynamic_sampling_drops_zero_std_groups_and_refills():
    config = grpo.Config(num_generations=4, max_completion_length=4, reward_funcs=(first_is_digit,),
                         dynamic_sampling=True, max_num_gen_batches=6, temperature=1.0)
    tokenizer, model, algo, state, update = _setup(config, seed=0)
    records = load_records("builtin:addition/rl_prompts.jsonl")
    batches = iter([records[i:i + 4] for i in range(4, 400, 4)])
    calls = []

    def next_prompts():
        calls.append(1)
        return next(batches)

    rng = jax.random.PRNGKey(11)
    out = algo.rollout(state.params, records[:4], rng, tokenizer=tokenizer, next_prompts=next_prompts,
                       max_prompt_length=16)
    m = out.metrics
    rounds = int(m["dynamic_sampling/gen_rounds"])
    assert rounds == 1 + len(calls)
    # replay the rounds with the plain rollout: the same groups are kept, in order
    plain = [onpolicy.rollout(model, state.params, records[:4] if i == 0 else records[4 * i:4 * i + 4],
                              jax.random.fold_in(rng, i), config, tokenizer=tokenizer, max_prompt_length=16)
             for i in range(rounds)]
    kept, dropped = [], 0
    for p in plain:
        scores = p.scores.reshape(-1, 4)
        for g, row in enumerate(scores):
            if np.std(row, ddof=1) > 0:
                kept.append(row)
            else:
                dropped += 1
    assert m["dynamic_sampling/groups_dropped"] == dropped
    filled = max(0, 4 - len(kept))
    assert m["dynamic_sampling/groups_filled"] == filled
    expected_scores = np.concatenate(kept[:4]) if kept else np.zeros(0)
    got = np.asarray(out.batch.scores)
    np.testing.assert_array_equal(got[: len(expected_scores)], expected_scores)
    assert np.isnan(got[len(expected_scores):]).all() and got.shape == (16,)
    assert m["frac_reward_zero_std"] == plain[0].metrics["frac_reward_zero_std"]
    assert m["_num_tokens"] == sum(p.metrics["_num_tokens"] for p in plain)
    state, metrics = update(state, out.batch, None)
    assert np.isfinite(float(metrics["loss"]))
    with pytest.raises(Exception, match="next_prompts"):
        algo.rollout(state.params, records[:4], rng, tokenizer=tokenizer)


def test_dynamic_sampling_limit_fills_with_no_loss_groups():
    def constant(prompts, completions, completion_ids, **record_fields):
        return [1.0] * len(completions)

    config = grpo.Config(num_generations=4, max_completion_length=3, reward_funcs=(constant,),
                         dynamic_sampling=True, max_num_gen_batches=2)
    tokenizer, model, algo, state, update = _setup(config)
    records = load_records("builtin:addition/rl_prompts.jsonl")
    out = algo.rollout(state.params, records[:2], jax.random.PRNGKey(0), tokenizer=tokenizer,
                       next_prompts=lambda: records[2:4])
    assert out.metrics["dynamic_sampling/gen_rounds"] == 2 and out.metrics["dynamic_sampling/groups_dropped"] == 4
    assert out.metrics["dynamic_sampling/groups_filled"] == 2 and np.isnan(np.asarray(out.batch.scores)).all()
    _, metrics = update(state, out.batch, None)
    assert float(metrics["loss"]) == 0.0


def test_yaml_run_with_the_new_options(tmp_path):
    """``jrlhf train grpo`` with the correction, top_entropy_quantile, soft overlong punishment and dynamic sampling
    set in YAML: the run trains and logs every new metric."""
    from jrlhf import train

    run_dir = tmp_path / "run"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in load_records("builtin:addition/rl_prompts.jsonl")[:64]))
    config = {"algorithm": "grpo", "model": {"family": "llama", "dtype": "bfloat16", "overrides": dict(TINY_MODEL)},
              "data": {"train": str(prompts), "batch_size": 4, "max_prompt_length": 12, "shuffle": False},
              "optim": {"learning_rate": 1e-3},
              "train": {"output_dir": str(run_dir), "steps": 2, "seed": 0, "log_every": 1, "progress_bar": False,
                        "tensorboard": False, "save_every": 0},
              "algo": {"num_generations": 4, "max_completion_length": 6, "temperature": 1.0,
                       "reward_funcs": ["addition_exact_match", f"{__name__}:first_is_digit",
                                        {"name": "soft_overlong_punishment", "max_completion_len": 6,
                                         "soft_punish_cache": 3}],
                       "vllm_importance_sampling_correction": True,
                       "vllm_importance_sampling_mode": "token_truncate", "vllm_importance_sampling_clip_max": 2.0,
                       "top_entropy_quantile": 0.5, "mask_truncated_completions": True,
                       "dynamic_sampling": True, "max_num_gen_batches": 3}}
    train(config)
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    rows = [r for r in rows if "loss" in r]
    assert len(rows) == 2
    for key in ("sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
                "sampling/k3_kl", "sampling/importance_sampling_ratio/frac_outside",
                "sampling/importance_sampling_ratio/mean", "dynamic_sampling/gen_rounds",
                "dynamic_sampling/groups_dropped", "entropy/threshold_kept_frac", "entropy",
                "rewards/soft_overlong_punishment/mean"):
        assert key in rows[0], key
    assert rows[0]["sampling/sampling_logp_difference/max"] > 0  # bf16 compute
