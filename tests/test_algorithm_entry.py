"""The offline algorithms as plain functions (``sft/reward/dpo.make``): a DPO step composed by hand gives the numbers
``jrlhf train dpo`` gives, the documented batch fields are the ones the data pipeline makes, and wrong inputs are
one-line errors naming the field."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

import jrlhf
import jrlhf.models as M
from jrlhf import cli, data
from jrlhf.algorithms import base, dpo, reward, sft
from jrlhf.checkpoint import Checkpointer
from jrlhf.config import build_config
from jrlhf.sharding import MeshConfig, make_mesh
from jrlhf.step import OptimizerConfig, StepContext, init_train_state, make_optimizer

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16)
RECORDS, BATCH, MAX_LENGTH = 16, 8, 24


def _saved_model(folder):
    """A tiny random Llama over the char tokenizer, saved as a Hugging Face folder (the run's ``train.init_from``)."""
    tokenizer = data.load_tokenizer("char")
    config = M.tiny_config("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, **TINY)
    model, params = M.init_model(config, jax.random.PRNGKey(3))
    M.save_pretrained(model, jax.tree.map(np.asarray, params), str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def _run_config(tmp_path, init_from, steps):
    records = tmp_path / "pref.jsonl"
    if not records.exists():
        data.write_jsonl(str(records), data.load_records("builtin:addition/preference_train.jsonl")[:RECORDS])
    return {
        "algorithm": "dpo",
        "data": {"train": str(records), "batch_size": BATCH, "max_length": MAX_LENGTH, "shuffle": False},
        # TR-DPO with a sync after every step: the reference (dpo.Frozen) changes, so step 2 also checks after_step
        # and the resumed step 3 the checkpointed Frozen
        "algo": {"beta": 0.1, "loss_type": "sigmoid", "sync_ref_model": True, "ref_model_sync_steps": 1,
                 "ref_model_mixup_alpha": 0.5},
        "optim": {"learning_rate": 1e-2, "max_grad_norm": 1.0},
        "train": {"output_dir": str(tmp_path / "run"), "steps": steps, "init_from": init_from, "log_every": 1,
                  "save_every": 1, "progress_bar": False, "tensorboard": False},
    }


def _cli_train(tmp_path, init_from, steps):
    path = tmp_path / f"dpo_{steps}.yaml"
    path.write_text(yaml.safe_dump(_run_config(tmp_path, init_from, steps)))
    assert cli.main(["train", "dpo", "--config", str(path)]) == 0
    run_dir = tmp_path / "run"
    logged = {r["step"]: r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["split"] == "train"}
    return logged, load_file(str(run_dir / "hf_model" / "model.safetensors"))


@pytest.mark.slow
def test_dpo_composed_by_hand_matches_jrlhf_train_dpo_and_its_resume(tmp_path):
    init_from = _saved_model(tmp_path / "init")
    logged, exported_2 = _cli_train(tmp_path, init_from, steps=2)
    resumed, exported_3 = _cli_train(tmp_path, init_from, steps=3)  # resumes from the step-2 checkpoint
    assert sorted(logged) == [1, 2] and sorted(resumed) == [1, 2, 3]

    # The same update from the public parts alone: the model, dpo.make, the data functions, the step builder.
    tokenizer = data.load_tokenizer(init_from)
    model, params = M.from_pretrained(init_from)
    cfg = build_config(_run_config(tmp_path, init_from, steps=3))
    examples = data.tokenize(data.load_records(cfg.data.train), tokenizer, "preference",
                             **base.length_limits(cfg.data)).examples
    batches = [data.collate_preference(examples[i:i + BATCH], pad_id=tokenizer.pad_token_id,
                                       buckets=data.length_buckets(MAX_LENGTH)) for i in (0, BATCH, 0)]
    algorithm = dpo.make(model, dpo.Config(beta=0.1, loss_type="sigmoid", sync_ref_model=True,
                                           ref_model_sync_steps=1, ref_model_mixup_alpha=0.5))
    mesh = make_mesh(MeshConfig())
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, max_grad_norm=1.0, total_steps=3))
    state, shardings = init_train_state(params, optimizer, 0, mesh=mesh, param_specs=M.logical_axes(model),
                                        algo_state=algorithm.init_algo_state())
    step = algorithm.train_step(optimizer, mesh, state_shardings=shardings)
    frozen = algorithm.init_frozen(params)
    assert isinstance(frozen, dpo.Frozen)
    by_hand = {}
    for number, batch in enumerate(batches, start=1):
        state, metrics = step(state, batch, frozen)
        frozen = algorithm.after_step(number, state, frozen)
        by_hand[number] = {k: float(v) for k, v in metrics.items()}
        if number == 2:
            hand_2 = M.hf_state_dict(model, state.params)
    hand_3 = M.hf_state_dict(model, state.params)

    for number, record in {**logged, 3: resumed[3]}.items():
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
            assert record[key] == pytest.approx(by_hand[number][key], rel=1e-6, abs=1e-6), (number, key)
    assert by_hand[1]["loss"] == pytest.approx(np.log(2.0), abs=1e-6)  # policy = reference at the first step
    assert by_hand[3]["loss"] != pytest.approx(by_hand[1]["loss"], abs=1e-4)  # step 3 sees batch 1 with a new policy
    for exported, hand in ((exported_2, hand_2), (exported_3, hand_3)):
        assert sorted(exported) == sorted(hand)
        for name in hand:
            np.testing.assert_allclose(exported[name], hand[name], rtol=0, atol=1e-6, err_msg=name)
    assert max(np.abs(hand_3[k] - hand_2[k]).max() for k in hand_3) > 1e-3  # the steps moved the params


def test_documented_batch_fields_are_the_ones_collation_makes():
    tokenizer = data.load_tokenizer("char")
    records = data.load_records("builtin:addition/preference_train.jsonl")[:4]
    pref = data.collate_preference(data.tokenize(records, tokenizer, "preference").examples, pad_id=0)
    sft_batch = data.collate_sft(data.tokenize([{"prompt": r["prompt"], "completion": r["chosen"]} for r in records],
                                               tokenizer, "sft").examples, pad_id=0)
    model, _ = M.init_model(M.tiny_config("llama", vocab_size=len(tokenizer), **TINY), jax.random.PRNGKey(0))
    score_model, _ = M.init_model(M.tiny_config("llama", vocab_size=len(tokenizer), **TINY), jax.random.PRNGKey(0),
                                  head="score")
    for algorithm, batch in ((sft.make(model, sft.Config()), sft_batch), (dpo.make(model, dpo.Config()), pref),
                             (reward.make(score_model, reward.Config()), pref)):
        assert set(algorithm.batch_fields) <= set(batch), algorithm.name
        for name in algorithm.batch_fields:
            shape = "[B]" if algorithm.batch_fields[name].startswith("[B]") else "[B, T]"
            assert np.ndim(batch[name]) == shape.count(",") + 1 and batch[name].dtype == np.int32, name
        algorithm.check_batch(batch)
    precomputed = dpo.make(model, dpo.Config(precompute_ref_log_probs=True))
    assert precomputed.frozen_type is None and precomputed.init_frozen({"params": {}}) is None
    assert set(precomputed.batch_fields) == set(base.PREFERENCE_FIELDS) | set(dpo.REFERENCE_FIELDS)
    assert dpo.make(model, dpo.Config(loss_type="simpo")).frozen_type is None


def _ctx(batch_size):
    return StepContext(rng=jax.random.key(0), step=jnp.int32(0), algo_state={},
                       globals={"num_sequences": jnp.float32(batch_size), "num_tokens": jnp.float32(1.0),
                                "num_chosen_tokens": jnp.float32(1.0), "num_chosen_sequence_tokens": jnp.float32(1.0)})


def test_wrong_batch_or_frozen_is_a_one_line_error_naming_the_field():
    model, params = M.init_model(M.tiny_config("llama", vocab_size=16, **TINY), jax.random.PRNGKey(0))
    ones = np.ones((2, 6), np.int32)
    pref = {f"{side}_{key}": ones for side in ("chosen", "rejected")
            for key in ("input_ids", "attention_mask", "loss_mask")}
    algorithm = dpo.make(model, dpo.Config())
    frozen = algorithm.init_frozen(params)

    def error(fn, *args):
        with pytest.raises(base.AlgorithmInputError) as info:
            fn(*args)
        message = str(info.value)
        assert "\n" not in message
        return message

    missing = {k: v for k, v in pref.items() if k != "rejected_loss_mask"}
    message = error(algorithm.loss_fn, params, missing, frozen, _ctx(2))
    assert message.startswith("dpo: the batch has no field 'rejected_loss_mask' ([B, T] int32"), message
    assert "rejected_loss_mask" in error(algorithm.prepare_batch, missing, frozen, {})
    message = error(algorithm.loss_fn, params, pref, {"ref_params": params}, _ctx(2))
    assert "frozen must be dpo.Frozen(ref_params=...)" in message and "got dict" in message, message
    assert "got NoneType" in error(algorithm.loss_fn, params, pref, None, _ctx(2))
    sft_algorithm = sft.make(model, sft.Config())
    message = error(sft_algorithm.loss_fn, params, {"input_ids": ones, "attention_mask": ones}, None, _ctx(2))
    assert message.startswith("sft: the batch has no field 'loss_mask'"), message
    # right inputs pass the checks and give DPO's loss at policy = reference: log 2
    loss, _ = algorithm.loss_fn(params, pref, frozen, _ctx(2))
    assert float(loss) == pytest.approx(np.log(2.0), abs=1e-6)
    # through the compiled step, whose jax.jit fixed frozen's pytree at the first call
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3))
    state, shardings = init_train_state(params, optimizer, 0, mesh=mesh, param_specs=M.logical_axes(model))
    step = algorithm.train_step(optimizer, mesh, state_shardings=shardings, donate=False)
    step(state, pref, frozen)
    assert "got dict" in error(step, state, pref, {"ref_params": params})


def test_a_checkpoint_with_the_reference_in_a_dict_restores_into_dpo_frozen(tmp_path):
    """TR-DPO checkpoints written when ``frozen`` was ``{"ref_params": ...}`` resume into :class:`dpo.Frozen`."""
    ref = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}}
    saver = Checkpointer(str(tmp_path / "checkpoints"), keep=1)
    saver.save(1, {"train_state": {"step": jnp.int32(1)}, "frozen": {"ref_params": ref}}, {"step": 1}, force=True)
    saver.close()
    like = {"train_state": {"step": jnp.int32(0)}, "frozen": dpo.Frozen(ref_params=jax.tree.map(jnp.zeros_like, ref))}
    restored, meta = Checkpointer(str(tmp_path / "checkpoints"), keep=1).restore(like)
    assert isinstance(restored["frozen"], dpo.Frozen) and meta["step"] == 1
    np.testing.assert_array_equal(restored["frozen"].ref_params["params"]["w"], np.arange(6.0).reshape(2, 3))


def _completion_logps_numpy(model, params, sequences) -> np.ndarray:
    """Summed log-probs of each sequence's completion tokens, log-softmax written out in numpy: ``sequences`` is a
    list of ``(ids, loss_mask)``. The sequences run in one call, right-padded to the longest; under causal attention
    a real position never sees the padding after it, so its logits are those of the sequence alone."""
    longest = max(len(ids) for ids, _ in sequences)
    batch = np.zeros((len(sequences), longest), np.int32)
    for row, (ids, _) in enumerate(sequences):
        batch[row, :len(ids)] = ids
    logits = np.asarray(jax.jit(model.apply)(params, jnp.asarray(batch), jnp.ones(batch.shape, jnp.int32)),
                        np.float64)
    out = []
    for row, (ids, loss_mask) in enumerate(sequences):
        logp = logits[row, :len(ids)]
        logp = logp - logp.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        targets = np.asarray(ids[1:])
        out.append(float(np.sum(logp[np.arange(len(ids) - 1), targets] * np.asarray(loss_mask[1:]))))
    return np.asarray(out)


@pytest.mark.slow
def test_dpo_held_out_rewards_equal_numpy_after_training(tmp_path):
    """The held-out accuracy and margin of ``jrlhf train dpo`` (pairs scored in length groups, the reference's
    scores computed at the first evaluation and reused at the last) equal β·(log π − log π_ref) of every pair
    computed one sequence at a time, with the trained policy and the initial model as the reference."""
    init_from = _saved_model(tmp_path / "init")
    records = data.load_records("builtin:addition/preference_eval.jsonl")[:13]
    records[0] = {**records[0], "chosen": records[0]["chosen"] + " and some more words here"}  # a longer group
    eval_path = tmp_path / "eval.jsonl"
    data.write_jsonl(str(eval_path), records)
    cfg = _run_config(tmp_path, init_from, steps=2)
    cfg["algo"] = {"beta": 0.1, "loss_type": "sigmoid"}
    cfg["data"].update(eval=str(eval_path), eval_batch_size=4, max_length=48)
    cfg["train"].update(eval_every=1, save_every=0)
    summary = jrlhf.train(cfg)
    logged = [r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if r["split"] == "eval"]
    assert [r["step"] for r in logged] == [1, 2]

    tokenizer = data.load_tokenizer(init_from)
    model, ref_params = M.from_pretrained(init_from)
    _, policy_params = M.from_pretrained(summary["hf_dir"])
    examples = data.tokenize(records, tokenizer, "preference", **base.length_limits(build_config(cfg).data)).examples
    lengths = {max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in examples}
    assert len({next(t for t in (8, 16, 24, 48) if n <= t) for n in lengths}) >= 2  # several length groups
    sequences = [(e[f"{s}_input_ids"], e[f"{s}_loss_mask"]) for e in examples for s in ("chosen", "rejected")]
    rewards = 0.1 * (_completion_logps_numpy(model, policy_params, sequences)
                     - _completion_logps_numpy(model, ref_params, sequences))
    rewards = rewards.reshape(len(examples), 2)  # [pair, (chosen, rejected)]
    final = logged[-1]
    assert final["num_examples"] == len(records)
    np.testing.assert_allclose(final["rewards/margins"], np.mean(rewards[:, 0] - rewards[:, 1]), rtol=1e-4, atol=1e-6)
    assert final["rewards/accuracies"] == pytest.approx(np.mean(rewards[:, 0] > rewards[:, 1]))
    assert abs(final["rewards/margins"]) > 1e-3  # the policy moved: the reference's cached scores matter
