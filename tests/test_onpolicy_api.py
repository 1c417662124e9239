"""The on-policy algorithms used as plain functions (``make``, ``rollout``, ``update``), without the config system.

* a GRPO run composed by hand through ``grpo.make`` gives the numbers of ``jrlhf train grpo`` on the same data and
  seed (losses, rewards, KL per step and the final params);
* reference log-probs computed inside the update equal those computed by the rollout;
* one epoch of one mini-batch compiles no permutation; ``min_new_tokens`` reaches the sampler;
* wrong inputs are one-line errors naming the field.

Runs on the 8 simulated CPU devices of tests/conftest.py.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from jrlhf import cli
from jrlhf.algorithms import grpo, onpolicy, ppo
from jrlhf.algorithms.base import AlgorithmInputError
from jrlhf.config import ConfigError
from jrlhf.data import load_records, load_tokenizer, make_batch_iterator, tokenize, write_jsonl
from jrlhf.models import init_model, logical_axes, tiny_config
from jrlhf.sharding import make_mesh
from jrlhf.step import OptimizerConfig, init_train_state, make_onpolicy_update, make_optimizer

TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
              "head_dim": 16, "max_position_embeddings": 32}
ALGO = {"num_generations": 2, "max_completion_length": 6, "beta": 0.04, "num_iterations": 2, "temperature": 1.0}


def digit_share(prompts, completions, completion_ids, **record_fields):
    """A reward with signal on a random model: the share of digits in the completion."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


ALGO["reward_funcs"] = (digit_share,)
BATCH, STEPS, SEED, PROMPT_LEN = 4, 2, 5, 12


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("api_data") / "prompts.jsonl")
    write_jsonl(path, load_records("builtin:addition/rl_prompts.jsonl")[:16])
    return path


def tiny_policy(tokenizer, rng):
    config = tiny_config("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **TINY_MODEL)
    return init_model(config, rng)


def setup_by_hand(config, seed=SEED):
    """The parts a researcher writes: model, optimizer, state, frozen, update (seeds split as ``jrlhf train``)."""
    tokenizer = load_tokenizer("char")
    model_rng, state_rng, _, collect_rng = jax.random.split(jax.random.PRNGKey(seed), 4)
    model, params = tiny_policy(tokenizer, model_rng)
    algo = grpo.make(model, config)
    mesh = make_mesh()
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3), params)
    state, shardings = init_train_state(params, optimizer, state_rng, mesh=mesh, param_specs=logical_axes(model))
    frozen = algo.init_frozen(state.params)
    return tokenizer, model, algo, state, frozen, algo.update(optimizer, mesh, state_shardings=shardings), collect_rng


def test_hand_composed_grpo_equals_jrlhf_train(tmp_path, prompts_file):
    run_dir = tmp_path / "run"
    config = {"algorithm": "grpo", "model": {"family": "llama", "overrides": dict(TINY_MODEL)},
              "data": {"train": prompts_file, "batch_size": BATCH, "max_prompt_length": PROMPT_LEN,
                       "shuffle": False},
              "optim": {"learning_rate": 1e-3},
              "train": {"output_dir": str(run_dir), "steps": STEPS, "seed": SEED, "log_every": 1,
                        "progress_bar": False, "tensorboard": False, "save_every": 0},
              "algo": {**ALGO, "reward_funcs": [f"{__name__}:digit_share"]}}  # YAML: a module:function path
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["train", "grpo", "--config", str(path)]) == 0
    logged = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    logged = [r for r in logged if r["split"] == "train"]

    tokenizer, model, algo, state, frozen, update, collect_rng = setup_by_hand(grpo.Config(**ALGO))
    data = tokenize(load_records(prompts_file), tokenizer, "prompt", max_prompt_length=PROMPT_LEN)
    batches = make_batch_iterator(data, BATCH, pad_id=tokenizer.pad_token_id, max_length=PROMPT_LEN, shuffle=False,
                                  drop_remainder=True)
    for step in range(STEPS):
        out = algo.rollout(state.params, next(batches), jax.random.fold_in(collect_rng, step), tokenizer=tokenizer,
                           frozen=frozen)
        state, metrics = update(state, out.batch, frozen)
        for key, value in (("loss", metrics["loss"]), ("kl", metrics["kl"]), ("reward", out.metrics["reward"]),
                           ("rewards/digit_share/mean", out.metrics["rewards/digit_share/mean"]),
                           ("grad_norm", metrics["grad_norm"]),
                           ("completions/mean_length", out.metrics["completions/mean_length"])):
            assert float(value) == pytest.approx(logged[step][key], abs=1e-6), (step, key)
    assert logged[0]["grad_norm"] > 1e-3 and logged[1]["kl"] > 0  # the numbers compared are not trivial
    exported = load_file(os.path.join(run_dir, "hf_model", "model.safetensors"))
    mine = np.asarray(state.params["params"]["embed"]["embedding"])
    np.testing.assert_allclose(mine, exported["model.embed_tokens.weight"], atol=1e-6)
    assert float(np.max(np.abs(mine - np.asarray(frozen.ref_params["params"]["embed"]["embedding"])))) > 1e-5


def test_reference_logps_inside_the_update_equal_the_rollout_ones():
    records = load_records("builtin:addition/rl_prompts.jsonl")[:BATCH]
    results = []
    for where in ("rollout", "update"):
        tokenizer, model, algo, state, frozen, update, rng = setup_by_hand(
            grpo.Config(**{**ALGO, "reference_logps": where, "min_new_tokens": 6}))
        out = algo.rollout(state.params, records, rng, tokenizer=tokenizer, frozen=frozen,
                           max_prompt_length=PROMPT_LEN)
        assert (out.batch.ref_logps is None) == (where == "update")
        # min_new_tokens = max_completion_length: every completion runs the full budget
        assert (np.asarray(out.batch.attention_mask)[:, -6:] == 1).all() and np.asarray(out.batch.truncated).all()
        prepared, _ = jax.jit(algo.prepare_batch)(out.batch, frozen, {})
        state, metrics = update(state, out.batch, frozen)
        results.append((np.asarray(prepared["ref_logps"]), float(metrics["loss"]), float(metrics["kl"]),
                        jax.tree.map(np.asarray, state.params)))
    (ref_a, loss_a, kl_a, params_a), (ref_b, loss_b, kl_b, params_b) = results
    np.testing.assert_allclose(ref_a, ref_b, atol=1e-6)
    assert loss_a == pytest.approx(loss_b, abs=1e-6) and kl_a == pytest.approx(kl_b, abs=1e-7)
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # and the rollout's reference log-probs are a full forward of the reference (the initial policy) at T=1
    tokenizer, model, algo, state, frozen, update, rng = setup_by_hand(grpo.Config(**ALGO))
    out = algo.rollout(state.params, records, rng, tokenizer=tokenizer, frozen=frozen)
    logps, _, _ = onpolicy.completion_forward(model, frozen.ref_params, out.batch.input_ids,
                                              out.batch.attention_mask, 6, temperature=1.0)
    mask = np.asarray(out.batch.loss_mask)[:, -6:] > 0
    np.testing.assert_allclose(np.asarray(out.batch.ref_logps)[mask], np.asarray(logps)[mask], atol=2e-5)


def test_one_epoch_of_one_minibatch_compiles_no_permutation():
    tokenizer, model, algo, state, frozen, _, rng = setup_by_hand(grpo.Config(**{**ALGO, "num_iterations": 1}))
    out = algo.rollout(state.params, load_records("builtin:addition/rl_prompts.jsonl")[:BATCH], rng,
                       tokenizer=tokenizer, frozen=frozen)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3))
    _, shardings = init_train_state(state.params, optimizer, rng, mesh=make_mesh(), param_specs=logical_axes(model))

    def hlo(**kw):
        update = make_onpolicy_update(algo.loss_fn, optimizer, make_mesh(), state_shardings=shardings,
                                      prepare_batch=algo.prepare_batch, num_minibatches=1, **kw)
        return update.lower(state, out.batch, frozen).as_text()

    sort = "stablehlo.sort"  # jax.random.permutation sorts random keys
    assert sort not in hlo(num_epochs=1)          # the default: nothing to shuffle
    assert sort in hlo(num_epochs=1, shuffle=True)
    assert sort in hlo(num_epochs=2)              # several epochs still reshuffle by default


def test_wrong_inputs_name_the_field():
    tokenizer = load_tokenizer("char")
    model, params = tiny_policy(tokenizer, jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match=r"grpo.Config has no field\(s\) bta"):
        grpo.make(model, {"bta": 0.1})
    with pytest.raises(ConfigError, match="config must be a grpo.Config"):
        grpo.make(model, ppo.Config())
    with pytest.raises(ConfigError, match="num_generations"):
        grpo.make(model, grpo.Config(num_generations=1))
    with pytest.raises(ConfigError, match="min_new_tokens"):
        grpo.make(model, grpo.Config(max_completion_length=4, min_new_tokens=5))
    with pytest.raises(ConfigError, match="reference_logps"):
        grpo.make(model, grpo.Config(reference_logps="never"))
    with pytest.raises(ConfigError, match="rollout_rows"):
        ppo.make(init_model(model.config, jax.random.PRNGKey(0), head="lm+value")[0], ppo.Config(adaptive_kl=True))
    algo = grpo.make(model, grpo.Config(**ALGO))
    records = load_records("builtin:addition/rl_prompts.jsonl")[:2]
    with pytest.raises(AlgorithmInputError, match="no reward source"):
        onpolicy.rollout(model, params, records, jax.random.PRNGKey(0), grpo.Config(), tokenizer=tokenizer)
    with pytest.raises(AlgorithmInputError, match="pass tokenizer="):
        algo.rollout(params, records, jax.random.PRNGKey(0), frozen=algo.init_frozen(params))
    with pytest.raises(AlgorithmInputError, match="record 0 has no 'prompt' field"):
        algo.rollout(params, [{"question": "1+1="}], jax.random.PRNGKey(0), tokenizer=tokenizer,
                     frozen=algo.init_frozen(params))
    with pytest.raises(AlgorithmInputError, match="pass frozen=algorithm.init_frozen"):
        algo.rollout(params, records, jax.random.PRNGKey(0), tokenizer=tokenizer)
    batch = {"input_ids": np.zeros((4, 8), np.int32), "attention_mask": np.ones((4, 8), np.int32),
             "loss_mask": np.ones((4, 8), np.int32), "old_logps": np.zeros((4, 2), np.float32),
             "scores": np.zeros(4, np.float32)}
    with pytest.raises(AlgorithmInputError, match="no 'ref_logps'.*frozen has no ref_params"):
        algo.prepare_batch(batch, None, {})
    with pytest.raises(AlgorithmInputError, match="grpo: the batch has no field 'scores'"):
        algo.prepare_batch({k: v for k, v in batch.items() if k != "scores"}, None, {})


def test_ppo_through_make_with_the_reference_inside_the_update():
    tokenizer = load_tokenizer("char")
    config = tiny_config("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **TINY_MODEL)
    model, params = init_model(config, jax.random.PRNGKey(0), head="lm+value")
    algo = ppo.make(model, ppo.Config(num_generations=2, max_completion_length=6, reward_funcs=(digit_share,),
                                      reference_logps="update", ppo_epochs=1, missing_eos_penalty=1.0,
                                      adaptive_kl=True, target_kl=1e-3), rollout_rows=2 * BATCH)
    mesh = make_mesh()
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3), params)
    state, shardings = init_train_state(params, optimizer, jax.random.PRNGKey(1), mesh=mesh,
                                        param_specs=logical_axes(model), algo_state=algo.init_algo_state())
    frozen = algo.init_frozen(state.params)
    out = algo.rollout(state.params, load_records("builtin:addition/rl_prompts.jsonl")[:BATCH], jax.random.PRNGKey(2),
                       tokenizer=tokenizer, frozen=frozen)
    assert out.batch.ref_logps is None and out.batch.old_values.shape == (2 * BATCH, 6)
    # missing_eos_penalty: the batch's scores are the logged ones minus 1 where the completion was truncated
    np.testing.assert_allclose(np.asarray(out.batch.scores),
                               out.scores - np.asarray(out.batch.truncated, np.float32), atol=1e-6)
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = algo.update(optimizer, mesh, state_shardings=shardings)(state, out.batch, frozen)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["kl"]) == pytest.approx(0.0, abs=1e-4)
    assert float(state.algo_state["kl_coef"]) < algo.config.kl_coef  # KL 0 < target: the controller lowered it
    assert max(float(np.max(np.abs(a - np.asarray(b)))) for a, b in zip(jax.tree.leaves(before),
                                                                        jax.tree.leaves(state.params))) > 1e-6
