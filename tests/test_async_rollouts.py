"""Asynchronous (off-policy) rollouts, ``algo.max_staleness`` (:class:`jrlhf.algorithms.onpolicy.AsyncRollouts`).

* ``jrlhf train`` with ``max_staleness: 1`` gives the numbers of a loop written out by hand in which the rollout
  trained at step ``k`` is made with the params of step ``k - 1`` (losses, rewards, final params);
* the clipped ratio's denominator is the behaviour policy's log-probs: the loss of a stale rollout equals the PPO-clip
  formula written out in numpy with the behaviour log-probs, and the ratio is not 1;
* a run resumed from a checkpoint taken with a rollout pending ends with the params of the uninterrupted run, bit for
  bit (the pending rollout is regenerated from the behaviour params saved with the checkpoint);
* ``max_staleness: 0`` is the synchronous loop, bit for bit; bad settings are one-line errors.

Runs on the 8 simulated CPU devices of tests/conftest.py (one mesh).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import jrlhf
from jrlhf.algorithms import grpo, onpolicy
from jrlhf.checkpoint import CheckpointError
from jrlhf.config import ConfigError
from jrlhf.data import load_records, load_tokenizer, make_batch_iterator, tokenize, write_jsonl
from jrlhf.models import init_model, logical_axes, tiny_config
from jrlhf.sharding import make_mesh
from jrlhf.step import OptimizerConfig, init_train_state, make_optimizer

TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
              "head_dim": 16, "max_position_embeddings": 32}
BATCH, SEED, PROMPT_LEN, N = 4, 5, 12, 6
LR = 3e-2  # large, so that one update moves the policy visibly


def digit_share(prompts, completions, completion_ids, **record_fields):
    """A reward with signal on a random model: the share of digits in the completion."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


ALGO = {"num_generations": 2, "max_completion_length": N, "temperature": 1.0, "beta": 0.0, "loss_type": "dapo",
        "epsilon": 0.05}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("async_data") / "prompts.jsonl")
    write_jsonl(path, load_records("builtin:addition/rl_prompts.jsonl")[:32])
    return path


def run_config(prompts_file, out, steps, **algo):
    return {"algorithm": "grpo", "model": {"family": "llama", "overrides": dict(TINY_MODEL)},
            "data": {"train": prompts_file, "batch_size": BATCH, "max_prompt_length": PROMPT_LEN, "shuffle": False},
            "optim": {"learning_rate": LR},
            "train": {"output_dir": str(out), "steps": steps, "seed": SEED, "log_every": 1, "progress_bar": False,
                      "tensorboard": False, "save_every": 0},
            "algo": {**ALGO, "reward_funcs": [f"{__name__}:digit_share"], **algo}}


def logged(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r for r in rows if r["split"] == "train"]


def exported(run_dir):
    return load_file(os.path.join(run_dir, "hf_model", "model.safetensors"))


def by_hand(config=None):
    """Model, GRPO parts, state, update and the rollout rng, seeded as ``jrlhf train`` seeds them."""
    tokenizer = load_tokenizer("char")
    model_rng, state_rng, _, collect_rng = jax.random.split(jax.random.PRNGKey(SEED), 4)
    model, params = init_model(tiny_config("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                           eos_token_id=tokenizer.eos_token_id, **TINY_MODEL), model_rng)
    algo = grpo.make(model, grpo.Config(**{**ALGO, "reward_funcs": (digit_share,), **(config or {})}))
    mesh = make_mesh()
    optimizer = make_optimizer(OptimizerConfig(learning_rate=LR), params)
    state, shardings = init_train_state(params, optimizer, state_rng, mesh=mesh, param_specs=logical_axes(model))
    return tokenizer, model, algo, state, algo.update(optimizer, mesh, state_shardings=shardings), collect_rng


def prompt_batches(tokenizer, prompts_file):
    data = tokenize(load_records(prompts_file), tokenizer, "prompt", max_prompt_length=PROMPT_LEN)
    return make_batch_iterator(data, BATCH, pad_id=tokenizer.pad_token_id, max_length=PROMPT_LEN, shuffle=False,
                               drop_remainder=True)


def test_one_step_off_policy_train_equals_a_loop_written_out_by_hand(tmp_path, prompts_file):
    steps = 3
    sync_dir, async_dir = tmp_path / "sync", tmp_path / "async"
    jrlhf.train(run_config(prompts_file, sync_dir, steps))
    jrlhf.train(run_config(prompts_file, async_dir, steps, max_staleness=1))
    sync, stale = logged(sync_dir), logged(async_dir)
    assert [r["rollout/staleness"] for r in stale] == [0.0, 1.0, 1.0]
    assert "rollout/staleness" not in sync[0]

    # by hand: rollout k is made with the params after k - 1 updates (the first with the initial params)
    tokenizer, model, algo, state, update, rng = by_hand()
    batches = prompt_batches(tokenizer, prompts_file)
    behaviour = state.params
    for step in range(steps):
        previous = onpolicy.snapshot_params(state.params)  # the params of this step, before the update
        out = algo.rollout(behaviour, next(batches), jax.random.fold_in(rng, step), tokenizer=tokenizer)
        state, metrics = update(state, out.batch, None)
        behaviour = previous
        assert float(metrics["loss"]) == pytest.approx(stale[step]["loss"], abs=1e-6), step
        assert out.metrics["reward"] == pytest.approx(stale[step]["reward"], abs=1e-6), step
    mine = np.asarray(state.params["params"]["embed"]["embedding"])
    np.testing.assert_allclose(mine, exported(async_dir)["model.embed_tokens.weight"], atol=1e-6)
    # the stale run is a different run: a policy that moved gives ratios != 1, so a non-zero on-policy-free loss
    assert stale[0]["loss"] == sync[0]["loss"]
    assert any(abs(a["loss"] - b["loss"]) > 1e-4 for a, b in zip(stale[1:], sync[1:]))


def test_the_ratio_uses_the_behaviour_log_probs_numpy(prompts_file):
    tokenizer, model, algo, state, update, rng = by_hand()
    batches = prompt_batches(tokenizer, prompts_file)
    behaviour = onpolicy.snapshot_params(state.params)
    out0 = algo.rollout(state.params, next(batches), jax.random.fold_in(rng, 0), tokenizer=tokenizer)
    state, _ = update(state, out0.batch, None)
    # one-step-off-policy: the rollout of step 1 made with the step-0 params, trained with the step-1 params
    with onpolicy.AsyncRollouts(lambda params, prompts, key: algo.rollout(params, prompts, key, tokenizer=tokenizer),
                                max_staleness=1) as pipe:
        pipe.submit(1, behaviour, next(batches), jax.random.fold_in(rng, 1), behaviour_step=0)
        out, behaviour_step = pipe.take(1)
    assert behaviour_step == 0
    batch = out.batch
    mask = np.asarray(batch.loss_mask)[:, -N:] > 0
    old = np.asarray(batch.old_logps)
    behaviour_logps, _, _ = onpolicy.completion_forward(model, behaviour, batch.input_ids, batch.attention_mask, N,
                                                        temperature=1.0)
    current_logps, _, _ = onpolicy.completion_forward(model, state.params, batch.input_ids, batch.attention_mask,
                                                      N, temperature=1.0)
    current_logps = np.asarray(current_logps, np.float64)
    # old_logps are the behaviour policy's (the sampler's, equal to its full forward), not the current policy's
    np.testing.assert_allclose(old[mask], np.asarray(behaviour_logps)[mask], atol=1e-4)
    assert np.max(np.abs(current_logps - old)[mask]) > 1e-2

    # PPO-clip with the behaviour log-probs, written out (dapo: token sum over the rollout's token count)
    _, metrics = update(state, batch, None)
    scores = np.asarray(batch.scores, np.float64).reshape(-1, 2)
    adv = ((scores - scores.mean(1, keepdims=True)) / (scores.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
    ratio = np.exp(current_logps - old)
    eps = ALGO["epsilon"]
    per_token = -np.minimum(ratio * adv[:, None], np.clip(ratio, 1 - eps, 1 + eps) * adv[:, None])
    expected = np.sum(per_token * mask) / np.sum(mask)
    assert float(metrics["loss"]) == pytest.approx(expected, abs=2e-6)
    clipped = (ratio < 1 - eps) | (ratio > 1 + eps)
    assert np.any(clipped & mask & (adv[:, None] != 0))  # the clip binds: the check covers it
    unclipped = -np.sum(ratio * adv[:, None] * mask) / np.sum(mask)
    assert abs(unclipped - expected) > 1e-4


def test_resume_with_a_pending_rollout_equals_the_uninterrupted_run(tmp_path, prompts_file):
    steps = 6
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    config = run_config(prompts_file, whole, steps, max_staleness=1)
    config["train"].update(save_every=2, keep_checkpoints=5)
    jrlhf.train(config)
    # the checkpoint of step 4 (its rollout for step 5 pending, made with the step-3 params) in a fresh run dir
    os.makedirs(cut / "checkpoints")
    shutil.copytree(whole / "checkpoints" / "4", cut / "checkpoints" / "4")
    config["train"]["output_dir"] = str(cut)
    summary = jrlhf.train(config)
    assert summary["step"] == steps
    a, b = exported(whole), exported(cut)
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    whole_log = {r["step"]: r for r in logged(whole)}
    for row in logged(cut):
        assert row["step"] > 4
        assert row["loss"] == whole_log[row["step"]]["loss"] and row["reward"] == whole_log[row["step"]]["reward"]

    # the checkpoint holds a pending rollout: resuming it with another max_staleness is refused
    other = run_config(prompts_file, cut, steps + 2, max_staleness=0)
    with pytest.raises(CheckpointError, match="max_staleness=1"):
        jrlhf.train(other)


def test_staleness_zero_is_the_synchronous_loop(tmp_path, prompts_file):
    jrlhf.train(run_config(prompts_file, tmp_path / "default", 2))
    jrlhf.train(run_config(prompts_file, tmp_path / "zero", 2, max_staleness=0))
    assert [r["loss"] for r in logged(tmp_path / "default")] == [r["loss"] for r in logged(tmp_path / "zero")]
    a, b = exported(tmp_path / "default"), exported(tmp_path / "zero")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # the pipeline with max_staleness 0 runs each rollout in the caller's thread with the current params
    calls = []
    pipe = onpolicy.AsyncRollouts(lambda params, j: calls.append((params, j)) or j, max_staleness=0, num_steps=3)
    for step in range(3):
        pipe.fill(step, f"params{step}", lambda j: (j,))
        assert pipe.take(step) == (step, step)
    assert calls == [("params0", 0), ("params1", 1), ("params2", 2)]


def test_async_rollouts_schedule():
    """Which params each step's rollout is made with, for max_staleness 2 (PipelineRL's max lag)."""
    made = []
    with onpolicy.AsyncRollouts(lambda params, j: made.append((j, float(params))) or j, max_staleness=2,
                                num_steps=5) as pipe:
        for step in range(5):
            pipe.fill(step, jax.numpy.float32(step), lambda j: (j,))
            result, behaviour = pipe.take(step)
            assert result == step and behaviour == max(0, step - 2)
            assert [j for j, _, _ in pipe.pending()] == list(range(step + 1, min(step + 3, 5)))
    assert made == [(0, 0.0), (1, 0.0), (2, 0.0), (3, 1.0), (4, 2.0)]


@pytest.mark.parametrize("bad, message", [
    ({"max_staleness": -1}, "max_staleness=-1"),
    ({"max_staleness": True}, "max_staleness=True"),
    ({"max_staleness": 1, "dynamic_sampling": True}, "dynamic_sampling"),
])
def test_bad_staleness_settings_are_one_line_errors(bad, message):
    tokenizer = load_tokenizer("char")
    model, _ = init_model(tiny_config("llama", vocab_size=len(tokenizer), **TINY_MODEL), jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match=message) as error:
        grpo.make(model, {**ALGO, "reward_funcs": (digit_share,), **bad})
    assert "\n" not in str(error.value)


def test_a_failing_rollout_raises_in_the_loop_thread():
    def boom(params, j):
        raise ValueError(f"reward failed at {j}")

    with onpolicy.AsyncRollouts(boom, max_staleness=1, num_steps=3) as pipe:
        pipe.fill(0, jax.numpy.zeros(()), lambda j: (j,))
        with pytest.raises(ValueError, match="reward failed at 0"):
            pipe.take(0)


def test_rloo_and_ppo_train_one_step_off_policy(tmp_path, prompts_file):
    for algorithm, extra in (("rloo", {}), ("ppo", {"num_generations": 2})):
        config = run_config(prompts_file, tmp_path / algorithm, 2, max_staleness=1, **extra)
        config["algorithm"] = algorithm
        for key in ("loss_type", "epsilon", "beta") if algorithm == "ppo" else ("loss_type",):
            config["algo"].pop(key)
        jrlhf.train(config)
        rows = logged(tmp_path / algorithm)
        assert [r["rollout/staleness"] for r in rows] == [0.0, 1.0]
        assert all(np.isfinite(r["loss"]) for r in rows)
