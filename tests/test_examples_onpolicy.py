"""The on-policy examples run (tiny random Llama, a few iterations) and compute what they say they compute."""

from __future__ import annotations

import importlib.util
import math
import os

import jax
import numpy as np
import pytest

from jrlhf.data import load_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name):
    path = os.path.join(ROOT, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


def changed(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a),
                                                                                     jax.tree.leaves(b)))


def test_grpo_loop_example(capsys):
    example, path = load_example("grpo_loop")
    assert sum(1 for _ in open(path)) < 60
    state, history, out = example.main(steps=2)
    assert len(history) == 2 and all(math.isfinite(v) for h in history for v in h.values())
    assert capsys.readouterr().out.count("step ") == 2
    assert history[-1]["kl"] >= 0.0  # k3 estimator after one update
    # the rollout's scores are the hand-written reward of its decoded completions (prompts 4..7, 4 samples each)
    answers = [r["answer"] for r in load_records("builtin:addition/rl_prompts.jsonl")[4:8] for _ in range(4)]
    want = [1.0 if c.strip() == a else sum(ch.isdigit() for ch in c) / max(len(c), 1)
            for c, a in zip(out.completions, answers)]
    np.testing.assert_allclose(np.asarray(out.batch.scores), want, rtol=1e-6)
    assert out.batch.ref_logps is not None and out.batch.ref_logps.shape == out.batch.old_logps.shape == (16, 6)
    assert (np.asarray(out.batch.attention_mask)[:, -6:].sum(-1) >= 1).all()  # min_new_tokens=1


def np_rank_advantages(scores, group_size):
    out = np.zeros_like(scores)
    for g in range(len(scores) // group_size):
        row = scores[g * group_size:(g + 1) * group_size]
        ok = ~np.isnan(row)
        vals = row[ok]
        if vals.size < 2:
            continue
        ranks = np.array([np.sum(vals < v) + (np.sum(vals == v) - 1) / 2 for v in vals])  # mean rank of ties
        adv = np.zeros(group_size)
        adv[ok] = 2 * ranks / (vals.size - 1) - 1
        out[g * group_size:(g + 1) * group_size] = adv
    return out


def test_custom_advantage_example():
    example, _ = load_example("custom_advantage")
    scores = np.array([3.0, 1.0, 2.0, 0.0, 5.0, 5.0, 1.0, np.nan, 2.0, np.nan, np.nan, np.nan], np.float32)
    np.testing.assert_allclose(np.asarray(example.rank_advantages(scores, 4)), np_rank_advantages(scores, 4),
                               atol=1e-6)
    state, out, metrics = example.main(steps=1)
    assert math.isfinite(float(metrics["loss"]))
    # the wrapped prepare_batch put the rank advantages of the rollout's scores into the batch the loss reads
    from jrlhf.algorithms import grpo

    algo = example.with_rank_advantages(grpo.make(state_model(example), grpo.Config(
        num_generations=4, max_completion_length=6, reward_funcs=(example.digits_reward,))))
    prepared, _ = jax.jit(algo.prepare_batch)(out.batch, None, {})
    np.testing.assert_allclose(np.asarray(prepared["advantages"]),
                               np_rank_advantages(np.asarray(out.batch.scores), 4), atol=1e-6)


def state_model(example):
    from jrlhf.models import init_model, tiny_config

    return init_model(tiny_config("llama", num_layers=1), jax.random.key(0))[0]
