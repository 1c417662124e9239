"""GRPO, PPO, RLOO and REINFORCE++ end to end on a tiny random Llama and the shipped addition prompts.

* every algorithm runs a few iterations through ``jrlhf.train`` (finite metrics under their TRL / verl names,
  checkpoint and HF export written), reproducibly;
* a rollout's sequences line up with the sampler (its log-probs equal a full forward pass under the same
  temperature) and its scores with the reward function;
* GRPO's compiled update equals a hand-written one-step reference (TRL 1.16's formulas in plain JAX);
* empty (EOS-first) and fully masked completions keep every algorithm's loss finite;
* a reward function that raises or returns NaN stops the run with the sample shown.

Runs on the 8 simulated CPU devices of tests/conftest.py.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from safetensors.numpy import load_file

import jrlhf
from jrlhf.algorithms import get_algorithm, onpolicy
from jrlhf.algorithms.base import RunContext
from jrlhf.config import ConfigError, build_config, load_config
from jrlhf.data import collate_prompts, load_records, load_tokenizer, tokenize, write_jsonl
from jrlhf.models import logical_axes
from jrlhf.rewards import RewardError, register_reward_fn, reward_fn_names
from jrlhf.sharding import MeshConfig, logical_to_shardings, make_mesh, put_global
from jrlhf.step import OptimizerConfig, init_train_state, make_onpolicy_update, make_optimizer
from jrlhf.train_loop import build_model

TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
              "head_dim": 16, "max_position_embeddings": 32}
BATCH = 4          # prompts per iteration
GENERATIONS = 2    # completions per prompt -> 8 rollout rows, one per simulated device
COMPLETION = 6     # max_completion_length

ALGO_SETTINGS = {
    "grpo": {"num_generations": GENERATIONS, "beta": 0.04, "num_iterations": 2, "steps_per_generation": 1},
    "ppo": {"num_generations": GENERATIONS, "ppo_epochs": 2, "adaptive_kl": True, "target_kl": 0.01,
            "kl_horizon": 100.0, "critic": "separate", "missing_eos_penalty": 1.0},
    "rloo": {"num_generations": GENERATIONS},
    "reinforce_pp": {"num_generations": GENERATIONS, "baseline": "group", "ppo_epochs": 2},
}
EXPECTED_METRICS = {
    "grpo": ("reward", "reward_std", "rewards/addition_exact_match/mean", "frac_reward_zero_std", "kl", "entropy",
             "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/mean_length",
             "completions/clipped_ratio", "loss", "grad_norm", "learning_rate"),
    "ppo": ("actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "critic/vf_loss", "critic/vf_clipfrac",
            "critic/advantages/mean", "critic/returns/mean", "reward", "kl", "kl_coef", "completions/mean_length"),
    "rloo": ("reward", "reward_std", "rewards/addition_exact_match/mean", "kl", "entropy", "clip_ratio/region_mean",
             "completions/clipped_ratio"),
    "reinforce_pp": ("reward", "actor/pg_loss", "actor/pg_clipfrac", "critic/advantages/mean", "critic/returns/mean",
                     "kl", "entropy"),
}


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("onpolicy_data")
    train, evals = str(root / "prompts.jsonl"), str(root / "eval.jsonl")
    write_jsonl(train, load_records("builtin:addition/rl_prompts.jsonl")[:64])
    write_jsonl(evals, load_records("builtin:addition/eval.jsonl")[:8])
    return train, evals


def run_config(algorithm, out_dir, data_files, algo=None, **train):
    train_file, eval_file = data_files
    return {
        "algorithm": algorithm,
        "model": {"family": "llama", "overrides": dict(TINY_MODEL)},
        "data": {"train": train_file, "eval_prompts": eval_file, "batch_size": BATCH, "max_prompt_length": 12,
                 "eval_batch_size": 8},
        "optim": {"learning_rate": 1e-3},
        "train": {"output_dir": str(out_dir), "steps": 2, "log_every": 1, "progress_bar": False, "tensorboard": False,
                  **train},
        "algo": {"max_completion_length": COMPLETION, "reward_funcs": ["addition_exact_match"],
                 **ALGO_SETTINGS[algorithm], **(algo or {})},
    }


def register_once(name, fn):
    if name not in reward_fn_names():
        register_reward_fn(name, fn)


def train_records(run_dir):
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r for r in lines if r["split"] == "train"], [r for r in lines if r["split"] == "eval"]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, data_files):
    return jrlhf.train(run_config("grpo", tmp_path_factory.mktemp("grpo_a"), data_files))


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("algorithm", ["grpo", "ppo", "rloo", "reinforce_pp"])
def test_algorithm_trains_through_the_loop(algorithm, tmp_path, data_files, grpo_run, require):
    summary = grpo_run if algorithm == "grpo" else jrlhf.train(run_config(algorithm, tmp_path / "run", data_files))
    run_dir = summary["run_dir"]
    train, evals = train_records(run_dir)
    assert [r["step"] for r in train] == [1, 2]
    for record in train:
        for key in EXPECTED_METRICS[algorithm]:
            assert key in record, (algorithm, key, sorted(record))
        for key, value in record.items():
            if isinstance(value, float):
                assert np.isfinite(value), (algorithm, key, value)
        assert record["nonfinite"] == 0
    assert evals and 0.0 <= evals[-1]["exact_match"] <= 1.0 and evals[-1]["num_examples"] == 8
    assert os.listdir(os.path.join(run_dir, "checkpoints")) == ["2"]
    assert os.path.exists(os.path.join(summary["hf_dir"], "model.safetensors"))
    samples = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl"))]
    assert samples and "reward=" in samples[0]["text"]
    if algorithm == "ppo":  # the adaptive controller moved the coefficient in-graph (KL above a tiny target)
        assert train[0]["kl_coef"] == pytest.approx(0.05)
        assert train[1]["kl_coef"] != pytest.approx(0.05)
        require("torch")
        import transformers  # the separate critic stays out of the export: the policy loads as a causal LM

        hf = transformers.AutoModelForCausalLM.from_pretrained(summary["hf_dir"])
        assert hf.config.hidden_size == TINY_MODEL["hidden_size"]


def test_same_seed_same_params(tmp_path, data_files, grpo_run):
    again = jrlhf.train(run_config("grpo", tmp_path / "b", data_files))
    a = load_file(os.path.join(grpo_run["hf_dir"], "model.safetensors"))
    b = load_file(os.path.join(again["hf_dir"], "model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    first, _ = train_records(grpo_run["run_dir"])
    second, _ = train_records(again["run_dir"])
    assert [r["loss"] for r in first] == [r["loss"] for r in second]


def test_reward_function_error_stops_the_run_with_the_sample(tmp_path, data_files):
    def exploding_reward(prompts, completions, **kwargs):
        raise ZeroDivisionError("boom")

    register_once("test_onpolicy_exploding", exploding_reward)
    cfg = run_config("grpo", tmp_path / "run", data_files, algo={"reward_funcs": ["test_onpolicy_exploding"]})
    with pytest.raises(RewardError, match=r"test_onpolicy_exploding.*ZeroDivisionError: boom.*prompt='\d+\+\d+='"):
        jrlhf.train(cfg)


def test_shipped_configs_load():
    for name in ("grpo", "ppo", "rloo", "reinforce_pp"):
        cfg = load_config(f"builtin:{name}", algorithm=name)
        assert cfg.algorithm == name and cfg.train.init_from == "runs/sft/hf_model"
        assert cfg.algo.reward_funcs == ("addition_exact_match",) and cfg.algo.max_completion_length == 8


def test_bad_settings_are_config_errors(tmp_path, data_files):
    with pytest.raises(ConfigError, match="num_generations"):
        jrlhf.train(run_config("grpo", tmp_path / "a", data_files, algo={"num_generations": 1}))
    with pytest.raises(ConfigError, match="reward_funcs"):
        jrlhf.train(run_config("rloo", tmp_path / "b", data_files, algo={"reward_funcs": []}))
    with pytest.raises(ConfigError, match="loss_type"):
        jrlhf.train(run_config("grpo", tmp_path / "c", data_files, algo={"loss_type": "ppo"}))


# ------------------------------------------------------------------------------------------------ rollouts


def make_parts(algorithm, data_files, algo=None, optimizer=None, mesh_config=None):
    """The loop's wiring, by hand: ``(run, setup, state, frozen, update, prompt_batch)``."""
    cfg = build_config(run_config(algorithm, "/nonexistent", data_files, algo=algo))
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    mesh = make_mesh(mesh_config or MeshConfig())
    mod = get_algorithm(algorithm)
    model, params = build_model(cfg, tokenizer, mod.head(cfg), jax.random.PRNGKey(0))
    run = RunContext(cfg=cfg, model=model, params=params, tokenizer=tokenizer, mesh=mesh, rng=jax.random.PRNGKey(1),
                     load_model=lambda path, head: build_model(cfg, tokenizer, head, jax.random.PRNGKey(2), path))
    setup = mod.setup(run)
    train_params = params if setup.params is None else setup.params
    specs = logical_axes(model) if setup.params is None else setup.param_specs
    optimizer = optimizer or make_optimizer(OptimizerConfig(learning_rate=1e-3), train_params)
    state, state_sh = init_train_state(train_params, optimizer, jax.random.PRNGKey(3), mesh=mesh, param_specs=specs,
                                       algo_state=setup.algo_state)
    frozen = None
    if setup.frozen is not None:
        frozen = put_global(setup.frozen, logical_to_shardings(setup.frozen_specs, mesh, shapes=setup.frozen),
                            copy=True)
    update = make_onpolicy_update(setup.loss_fn, optimizer, mesh, state_shardings=state_sh,
                                  num_epochs=setup.onpolicy.num_epochs,
                                  num_minibatches=setup.onpolicy.num_minibatches, prepare_batch=setup.prepare_batch,
                                  update_algo_state=setup.update_algo_state)
    records = load_records(data_files[0])[:BATCH]
    data = tokenize(records, tokenizer, "prompt", max_prompt_length=12)
    prompt_batch = collate_prompts(data.examples, pad_id=tokenizer.pad_token_id, length=12)
    return run, setup, state, frozen, update, prompt_batch


def test_rollout_lines_up_with_the_sampler_and_the_reward(data_files):
    # data x fsdp x tensor = 2 x 2 x 2: the params stay sharded (embed over fsdp, vocab over tensor) for the rollout
    run, setup, state, frozen, _, prompt_batch = make_parts("grpo", data_files, algo={"temperature": 0.7},
                                                           mesh_config=MeshConfig(data=2, fsdp=2, tensor=2))
    assert state.params["params"]["embed"]["embedding"].sharding.spec == PartitionSpec("tensor", "fsdp")
    batch, metrics, samples = setup.onpolicy.collect(state, prompt_batch, frozen, jax.random.PRNGKey(7))
    rows = BATCH * GENERATIONS
    assert batch["input_ids"].shape == (rows, 12 + COMPLETION)
    assert batch["old_logps"].shape == batch["ref_logps"].shape == (rows, COMPLETION)
    for key in ("input_ids", "old_logps", "ref_logps", "scores"):  # rows stay sharded over the batch axes
        assert batch[key].sharding.spec[0] == ("data", "fsdp"), key
    # the sampler's log-probs (KV-cache decode) equal a full forward pass of the same sequences at temperature 0.7
    logps, _, _ = onpolicy.completion_forward(run.model, state.params, batch["input_ids"], batch["attention_mask"],
                                              COMPLETION, temperature=0.7)
    mask = np.asarray(batch["loss_mask"])[:, -COMPLETION:] > 0
    np.testing.assert_allclose(np.asarray(logps)[mask], np.asarray(batch["old_logps"])[mask], atol=2e-5)
    # the reference is the initial policy: same log-probs at the first rollout
    np.testing.assert_allclose(np.asarray(batch["ref_logps"])[mask], np.asarray(batch["old_logps"])[mask],
                               atol=2e-5)
    # prompts are repeated per sample (row b * n + i) and the scores are the reward of the decoded completions
    ids = np.asarray(batch["input_ids"])
    np.testing.assert_array_equal(ids[0, :12], ids[1, :12])
    texts = [run.tokenizer.decode([int(t) for t, m in zip(row[12:], mrow) if m], skip_special_tokens=True)
             for row, mrow in zip(ids, np.asarray(batch["attention_mask"])[:, 12:])]
    answers = [r["answer"] for r in prompt_batch.records for _ in range(GENERATIONS)]
    expected = [float(t.strip() == a) for t, a in zip(texts, answers)]
    np.testing.assert_array_equal(np.asarray(batch["scores"]), expected)
    lengths = np.asarray(batch["attention_mask"])[:, 12:].sum(-1)
    assert metrics["completions/mean_length"] == pytest.approx(lengths.mean())
    assert metrics["_num_tokens"] == int(np.asarray(batch["attention_mask"]).sum())
    assert samples.count("\n") == 3


def test_reward_nan_stops_collect_with_the_sample(data_files):
    def nan_reward(prompts, completions, **kwargs):
        return [float("nan")] * len(completions)

    register_once("test_onpolicy_nan", nan_reward)
    _, setup, state, frozen, _, prompt_batch = make_parts("rloo", data_files,
                                                          algo={"reward_funcs": ["test_onpolicy_nan"], "beta": 0.0})
    with pytest.raises(RewardError, match=r"test_onpolicy_nan.*returned nan for sample 0.*prompt="):
        setup.onpolicy.collect(state, prompt_batch, frozen, jax.random.PRNGKey(0))


# ------------------------------------------------------------------------------------------------ GRPO reference


def reference_grpo_step(model, params, batch, *, beta, epsilon, temperature, lr, num_generations, loss_type):
    """One SGD step of TRL 1.16's GRPO on a rollout, written out: group advantages, per-token clipped ratio loss,
    k3 KL with the ratio correction, ``dapo`` (token sum / token count) or ``grpo`` (mean of sequence means)."""
    ids, attention = batch["input_ids"], batch["attention_mask"]
    n = batch["old_logps"].shape[1]
    mask = (np.asarray(batch["loss_mask"])[:, -n:] > 0).astype(np.float32)
    scores = np.asarray(batch["scores"], np.float64).reshape(-1, num_generations)
    std = scores.std(axis=1, ddof=1, keepdims=True)
    adv = ((scores - scores.mean(axis=1, keepdims=True)) / (std + 1e-4)).reshape(-1, 1).astype(np.float32)
    old, ref = np.asarray(batch["old_logps"]), np.asarray(batch["ref_logps"])

    def loss_fn(p):
        logits = model.apply(p, ids, attention)[:, -n - 1:-1] / temperature
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), ids[:, -n:, None], -1)[..., 0]
        logp = jnp.where(mask > 0, logp, 0.0)
        ratio = jnp.exp(logp - old)
        per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - epsilon, 1 + epsilon) * adv)
        diff = jnp.where(mask > 0, ref - logp, 0.0)
        per_token = per_token + beta * (jnp.exp(diff) - diff - 1) * ratio
        if loss_type == "dapo":
            return jnp.sum(per_token * mask) / mask.sum()
        return jnp.mean(jnp.sum(per_token * mask, -1) / jnp.maximum(mask.sum(-1), 1.0))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return loss, jax.tree.map(lambda p, g: p - lr * g, params, grads)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_grpo_update_equals_a_hand_written_step(loss_type, data_files):
    lr = 0.5
    sgd = make_optimizer(OptimizerConfig(name="sgd", learning_rate=lr, max_grad_norm=None))
    algo = {"beta": 0.1, "num_iterations": 1, "loss_type": loss_type, "temperature": 0.9}
    run, setup, state, frozen, update, prompt_batch = make_parts("grpo", data_files, algo=algo, optimizer=sgd)
    batch, _, _ = setup.onpolicy.collect(state, prompt_batch, frozen, jax.random.PRNGKey(11))
    # plant rewards with spread inside each group, one constant group, and a one-token (EOS-first) completion
    scores = np.array([1.0, 0.0, 0.5, 0.5, 2.0, -1.0, 0.25, 1.0], np.float32)
    batch = dict(batch, scores=put_global(scores, batch["scores"].sharding))
    loss_mask = np.asarray(batch["loss_mask"]).copy()
    loss_mask[2, -COMPLETION + 1:] = 0
    batch["loss_mask"] = put_global(loss_mask, batch["loss_mask"].sharding)
    host = jax.tree.map(np.asarray, batch)
    params0 = jax.tree.map(np.asarray, state.params)
    ref_loss, ref_params = reference_grpo_step(run.model, params0, host, beta=0.1, epsilon=0.2, temperature=0.9,
                                               lr=lr, num_generations=GENERATIONS, loss_type=loss_type)
    state, metrics = update(state, batch, frozen)
    assert float(metrics["loss"]) == pytest.approx(float(ref_loss), rel=1e-5, abs=1e-7)
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-6)
    assert float(metrics["kl"]) >= 0.0 and np.isfinite(float(metrics["entropy"]))


# ------------------------------------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("algorithm", ["grpo", "ppo", "rloo", "reinforce_pp"])
def test_empty_and_fully_masked_completions_keep_the_loss_finite(algorithm, data_files):
    algo = {"mask_truncated_completions": True}
    if algorithm == "grpo":
        algo["loss_type"] = "grpo"
    _, setup, state, frozen, update, prompt_batch = make_parts(algorithm, data_files, algo=algo)
    batch, _, _ = setup.onpolicy.collect(state, prompt_batch, frozen, jax.random.PRNGKey(5))
    host = {key: np.array(value) for key, value in batch.items()}
    # row 0: EOS first (one masked-in token); row 1: nothing trained (truncated and masked); row 2: unscorable
    host["loss_mask"][0, -COMPLETION + 1:] = 0
    host["attention_mask"][0, -COMPLETION + 1:] = 0
    host["loss_mask"][1, -COMPLETION:] = 0
    host["scores"][2] = np.nan
    batch = {k: put_global(v, batch[k].sharding) for k, v in host.items()}
    state, metrics = update(state, batch, frozen)
    assert int(metrics["nonfinite"]) == 0
    for key, value in metrics.items():
        assert np.all(np.isfinite(np.asarray(value))), (algorithm, key)


def test_reward_sources_are_weighted_and_none_is_left_out():
    def first(prompts, completions, **kwargs):
        return [1.0, None, 0.5, None]

    def second(prompts, completions, **kwargs):
        return [2.0, 4.0, None, None]

    sources = onpolicy.RewardSources(funcs=[first, second], names=["first", "second"],
                                     weights=np.array([0.5, 2.0], np.float32))
    total, per_source = onpolicy._score(sources, sources.weights, 0.0, ["p"] * 4, ["c"] * 4, [[1]] * 4,
                                        [{"prompt": "p"}] * 4, None)
    np.testing.assert_allclose(total, [4.5, 8.0, 0.25, np.nan])
    np.testing.assert_allclose(per_source["first"], [1.0, np.nan, 0.5, np.nan])
    metrics = onpolicy._rollout_metrics(total, per_source, np.ones((4, 3)), np.zeros(4), 2,
                                        collate_prompts([{"prompt_ids": [1, 2], "record": {}}] * 2, pad_id=0))
    assert metrics["reward"] == pytest.approx(np.mean([4.5, 8.0, 0.25]))
    assert metrics["rewards/first/mean"] == pytest.approx(0.75) and metrics["rewards/second/mean"] == 3.0
    assert metrics["frac_reward_zero_std"] == 0.0 and metrics["_num_tokens"] == 2 * 2 * 2 + 12


def test_frac_reward_zero_std_counts_constant_groups():
    values = np.array([1.0, 1.0, 0.0, 1.0, np.nan, 2.0, 0.5, 0.5], np.float32)
    np.testing.assert_array_equal(onpolicy.group_std_is_zero(values, 2), [True, False, False, True])


@pytest.mark.parametrize("head", ["lm", "lm+value"])
def test_completion_forward_matches_full_logits_in_numpy(head):
    """The LM head runs on the completion positions only: same log-probs, entropies and values as the full logits."""
    from jrlhf.models import init_model, tiny_config

    config = tiny_config("llama", vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                         initializer_range=0.3)
    model, params = init_model(config, jax.random.PRNGKey(3), head=head)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 48, (3, 9)), jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1, 0], [1] * 9, [0, 0, 0, 0, 1, 1, 1, 0, 0]], jnp.int32)
    n, temperature = 4, 0.7
    logps, entropies, values = onpolicy.completion_forward(model, params, ids, mask, n, temperature=temperature)
    out = model.apply(params, ids, mask)
    full, full_values = (out if head == "lm+value" else (out, None))
    logits = np.asarray(full, np.float64)[:, -n - 1:-1] / temperature
    logp_all = logits - logits.max(-1, keepdims=True)
    logp_all = logp_all - np.log(np.exp(logp_all).sum(-1, keepdims=True))
    expected = np.take_along_axis(logp_all, np.asarray(ids)[:, -n:, None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(logps), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropies), -(np.exp(logp_all) * logp_all).sum(-1), atol=1e-5)
    if head == "lm+value":
        np.testing.assert_allclose(np.asarray(values), np.asarray(full_values)[:, -n - 1:-1], atol=1e-6)
    else:
        assert values is None
