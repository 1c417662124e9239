"""LoRA: adapters on the decoder's projections, trained alone, with the base model (adapters off) as the reference.

Checked against independent references: the adapted forward against kernels merged in numpy (``W + s A B`` written
out here), PEFT's ``PeftModel`` over the ``transformers`` model (the exported adapters, 1e-4 in fp32) and
``transformers`` on the merged export; the reference log-probs of DPO and GRPO against the plain base model on its
own params; base weights bit-identical after training; a resumed ``jrlhf train dpo`` run step for step equal to a
straight one.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

import jrlhf.models as M
from jrlhf import cli, data
from jrlhf.algorithms import dpo, grpo, onpolicy
from jrlhf.config import ConfigError
from jrlhf.models import lora as LO
from jrlhf.sharding import MeshConfig, make_mesh
from jrlhf.step import OptimizerConfig, init_train_state, make_optimizer

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
            vocab_size=96, initializer_range=0.2)


def _models(lora: LO.LoraConfig, family: str = "llama", seed: int = 0, **overrides):
    """``(lora_model, lora_params, plain_model, plain_params)`` from one key: the plain model is the LoRA model's
    base drawn without adapters."""
    config = M.tiny_config(family, **{**TINY, **overrides})
    plain, plain_params = M.init_model(config, jax.random.PRNGKey(seed))
    model, params = M.init_model(config.replace(lora=lora), jax.random.PRNGKey(seed))
    return model, params, plain, plain_params


def _random_b(params, seed=1, scale=0.3):
    """The adapters' B leaves drawn at random (a trained adapter), the rest unchanged."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        if path[-1].key.endswith(LO.SUFFIX_B):
            return jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(draw, params)


def _batch(seed=0, rows=3, length=10, vocab=96):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (rows, length)).astype(np.int32)
    mask = np.ones((rows, length), np.int32)
    mask[1, :4] = 0  # a left-padded row
    return ids, mask


def _np_merged(params, lora: LO.LoraConfig, targets):
    """The adapted kernels merged in numpy, written out here: ``W [L, *in, *out] + s * A [L, in, r] @ B [L, r, out]``
    with the in / out axes flattened; the adapter leaves dropped."""
    host = jax.tree.map(np.asarray, jax.device_get(params))
    layers = host["params"]["layers"]
    scale = lora.alpha / (math.sqrt(lora.r) if lora.use_rslora else lora.r)
    for name in targets:
        sub, kernel, _ = LO.MODULES[name]
        w = layers[sub][kernel].astype(np.float64)
        a = layers[sub].pop(kernel + "_lora_a").astype(np.float64)
        b = layers[sub].pop(kernel + "_lora_b").astype(np.float64)
        n_layers, r = a.shape[0], a.shape[-1]
        delta = np.einsum("lir,lro->lio", a.reshape(n_layers, -1, r), b.reshape(n_layers, r, -1))
        layers[sub][kernel] = (w + scale * delta.reshape(w.shape)).astype(np.float32)
    for sub in ("attn", "mlp"):
        for key in [k for k in layers[sub] if k.endswith(("_lora_a", "_lora_b"))]:
            layers[sub].pop(key)
    return host


# ------------------------------------------------------------------------------------------------ the model


def test_fresh_adapters_change_nothing_and_the_base_model_ignores_them():
    lora = LO.LoraConfig(r=4, alpha=8)
    model, params, plain, plain_params = _models(lora)
    ids, mask = _batch()
    # the base leaves are the plain model's (same key), adapters A uniform in +-1/sqrt(fan_in) and B zero
    flat = dict((jax.tree_util.keystr(p), np.asarray(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0])
    plain_flat = {jax.tree_util.keystr(p): np.asarray(x)
                  for p, x in jax.tree_util.tree_flatten_with_path(plain_params)[0]}
    assert set(plain_flat) < set(flat)
    assert all(np.array_equal(flat[k], v) for k, v in plain_flat.items())
    wq_a = flat["['params']['layers']['attn']['wq_lora_a']"]
    wo_a = flat["['params']['layers']['attn']['wo_lora_a']"]
    assert wq_a.shape == (2, 32, 4) and wo_a.shape == (2, 4, 8, 4)
    for a, fan_in in ((wq_a, 32), (wo_a, 32), (flat["['params']['layers']['mlp']['w_down_lora_a']"], 64)):
        bound = 1 / math.sqrt(fan_in)
        assert np.abs(a).max() <= bound and a.std() == pytest.approx(bound / math.sqrt(3), rel=0.15)
    assert all(not v.any() for k, v in flat.items() if k.endswith("_lora_b']"))
    logits = np.asarray(jax.jit(model.apply)(params, ids, mask))
    assert np.array_equal(logits, np.asarray(jax.jit(plain.apply)(plain_params, ids, mask)))  # B = 0: exactly the base
    trained = _random_b(params)
    assert np.abs(np.asarray(jax.jit(model.apply)(trained, ids, mask)) - logits).max() > 1e-2
    base = LO.base_model(model)
    assert base.config.lora is None and LO.base_model(plain) is plain
    assert np.array_equal(np.asarray(jax.jit(base.apply)(trained, ids, mask)), logits)  # adapters off: the base, bit for bit
    gaussian = M.init_model(model.config.replace(lora=LO.LoraConfig(r=4, init="gaussian")), jax.random.PRNGKey(0))[1]
    assert float(np.asarray(gaussian["params"]["layers"]["attn"]["wq_lora_a"]).std()) == pytest.approx(0.25, rel=0.15)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
@pytest.mark.parametrize("rslora", [False, True])
def test_adapted_forward_equals_kernels_merged_in_numpy(family, rslora):
    lora = LO.LoraConfig(r=4, alpha=16, use_rslora=rslora, target_modules=("q_proj", "v_proj", "o_proj", "*up*",
                                                                          "down_proj", "gate_proj"))
    model, params, plain, _ = _models(lora, family=family)
    targets = LO.targeted(lora, model.config)
    assert ("gate_proj" in targets) == (family != "gpt2")  # GPT-2's plain MLP has no gate: skipped
    assert "k_proj" not in targets and "k_proj" in LO.DEFAULT_TARGETS
    params = _random_b(params)
    ids, mask = _batch()
    expected = np.asarray(jax.jit(plain.apply)(_np_merged(params, lora, targets), ids, mask))
    got = np.asarray(jax.jit(model.apply)(params, ids, mask))
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
    merged_model, merged = LO.merge_params(model, params)
    assert merged_model.config.lora is None
    assert np.abs(np.asarray(jax.jit(merged_model.apply)(merged, ids, mask)) - expected).max() <= 1e-4


def test_bad_lora_settings_are_one_line_errors():
    for kwargs, needle in ((dict(r=0), "lora.r"), (dict(target_modules=("qproj",)), "'qproj' matches no module"),
                           (dict(dropout=1.0), "lora.dropout"), (dict(init="pissa"), "lora.init")):
        with pytest.raises(ValueError, match=needle):
            LO.LoraConfig(**kwargs)
    from jrlhf.config import load_config

    with pytest.raises(ConfigError, match="model.lora.target_modules entry 'q'"):
        load_config("builtin:dpo", ["model.lora.target_modules=[q]"], "dpo")
    cfg = load_config("builtin:dpo", ["model.lora.r=8", "model.lora.target_modules=all-linear"], "dpo")
    assert cfg.model.lora.to_model().target_modules == ("all-linear",)
    model = M.init_model(M.tiny_config("llama", lora=LO.LoraConfig()), jax.random.PRNGKey(0))[0]
    with pytest.raises(ConfigError, match="sync_ref_model"):
        dpo.make(model, dpo.Config(sync_ref_model=True))
    with pytest.raises(ConfigError, match="reference_logps=update with model.lora"):
        grpo.make(model, grpo.Config(beta=0.04, reference_logps="update", reward_funcs=(lambda *a, **k: [0.0],)))


# ------------------------------------------------------------------------------------------------ transformers, PEFT


@pytest.mark.torch
@pytest.mark.parametrize("family,rslora,targets", [("llama", False, LO.DEFAULT_TARGETS),
                                                   ("qwen3", True, ("q_proj", "v_proj", "down_proj"))])
def test_peft_adapter_and_merged_export_give_the_jrlhf_logits(tmp_path, family, rslora, targets):
    peft = pytest.importorskip("peft", reason="needs peft: install the `test` extra, pip install -e '.[test]'")
    import torch
    import transformers

    lora = LO.LoraConfig(r=4, alpha=8, use_rslora=rslora, target_modules=targets)
    model, params, plain, _ = _models(lora, family=family, tie_word_embeddings=False)
    params = _random_b(params)
    ids, mask = _batch(rows=2)
    expected = np.asarray(jax.jit(model.apply)(params, ids, mask))
    base_dir, adapter_dir, merged_dir = (str(tmp_path / n) for n in ("base", "adapter", "merged"))
    M.save_pretrained(plain, LO.strip_adapters(jax.device_get(params)), base_dir)
    LO.save_peft_adapter(model, params, adapter_dir, base_model_name_or_path=base_dir)
    M.save_pretrained(model, params, merged_dir)  # a LoRA model exports merged
    names = load_file(os.path.join(adapter_dir, LO.PEFT_WEIGHTS))
    assert f"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in names
    assert names["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (32, 4)
    with open(os.path.join(adapter_dir, LO.PEFT_CONFIG)) as f:
        assert json.load(f)["use_rslora"] is rslora

    positions = torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0))
    inputs = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                  position_ids=positions)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = hf(**inputs).logits.numpy()
    peft_model = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    assert peft_model.peft_config["default"].r == 4
    with torch.no_grad():
        peft_logits = peft_model(**inputs).logits.numpy()
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        merged_logits = merged(**inputs).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(base_logits[real] - expected[real]).max() > 1e-2  # the adapters matter
    assert np.abs(peft_logits[real] - expected[real]).max() <= 1e-4
    assert np.abs(merged_logits[real] - expected[real]).max() <= 1e-4
    with pytest.raises(ValueError, match="gpt2"):
        gpt2, gpt2_params, _, _ = _models(lora, family="gpt2")
        LO.save_peft_adapter(gpt2, gpt2_params, str(tmp_path / "gpt2"))


# ------------------------------------------------------------------------------------------------ training


def _dpo_batch(seed=0, rows=8, length=12, vocab=96):
    rng = np.random.default_rng(seed)
    batch = {}
    for side in ("chosen", "rejected"):
        lengths = rng.integers(6, length + 1, rows)
        ids = rng.integers(3, vocab, (rows, length)).astype(np.int32)
        attention = (np.arange(length) < lengths[:, None]).astype(np.int32)
        loss = attention * (np.arange(length) >= 4)
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attention,
                      f"{side}_loss_mask": loss.astype(np.int32)})
    return batch


def _lora_dpo_steps(model, params, mesh, batches, lr=0.05, optimizer="adamw"):
    """LoRA DPO steps through ``dpo.make`` and the step builder: ``(states' host params per step, metrics)``."""
    algo = dpo.make(model, dpo.Config(beta=0.1))
    specs = M.logical_axes(model)
    opt = make_optimizer(OptimizerConfig(name=optimizer, learning_rate=lr, max_grad_norm=1.0), params,
                         trainable=LO.trainable_mask, param_specs=specs)
    state, shardings = init_train_state(params, opt, jax.random.PRNGKey(0), mesh=mesh, param_specs=specs)
    step = algo.train_step(opt, mesh, state_shardings=shardings, trainable=LO.trainable_mask)
    history, metrics = [], []
    for batch in batches:
        state, m = step(state, batch, None)
        history.append(jax.tree.map(np.asarray, jax.device_get(state.params)))
        metrics.append({k: float(v) for k, v in m.items()})
    return history, metrics, state


def _np_seq_logps(model, params, batch, side):
    ids, attn = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
    logits = np.asarray(jax.jit(model.apply)(params, ids, attn), np.float64)[:, :-1]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    token = np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    return (token * batch[f"{side}_loss_mask"][:, 1:]).sum(-1)


def test_lora_dpo_trains_only_the_adapters_against_the_base_model():
    lora = LO.LoraConfig(r=4, alpha=8)
    model, params, plain, plain_params = _models(lora)
    algo = dpo.make(model, dpo.Config(beta=0.1))
    assert algo.frozen_type is None and algo.init_frozen(params) is None  # no reference copy
    opt = make_optimizer(OptimizerConfig(learning_rate=0.05), params, trainable=LO.trainable_mask,
                         param_specs=M.logical_axes(model))
    adapters = sum(x.size for x in jax.tree.leaves(LO.adapter_params(params)))
    moments = [x.size for x in jax.tree.leaves(jax.eval_shape(opt.init, params)) if x.size > 1]
    assert sum(moments) == 2 * adapters  # Adam's moments of the adapters only
    batches = [_dpo_batch(seed) for seed in range(3)]
    initial = jax.tree.map(np.asarray, jax.device_get(params))
    history, metrics, _ = _lora_dpo_steps(model, params, make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1]),
                                          batches)
    # step 1: the policy is the base (B = 0), so every implicit reward is 0 and the loss log 2 (to rounding: XLA
    # orders the policy pass, x W + 0, and the reference pass, x W, differently inside one program)
    assert abs(metrics[0]["rewards/chosen"]) <= 1e-6 and abs(metrics[0]["rewards/margins"]) <= 1e-6
    assert metrics[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    final = history[-1]
    for path, before in jax.tree_util.tree_flatten_with_path(initial)[0]:
        after = final
        for k in path:
            after = after[k.key]
        if LO.is_adapter_path(path) and path[-1].key.endswith(LO.SUFFIX_B):
            assert np.abs(after - before).max() > 1e-4, jax.tree_util.keystr(path)
        elif not LO.is_adapter_path(path):
            assert np.array_equal(after, before), jax.tree_util.keystr(path)  # the base, bit for bit
    # step 3's reference is the base model: rewards/chosen = beta * (policy - base) with both written out in numpy
    policy = _np_seq_logps(model, history[1], batches[2], "chosen")
    base = _np_seq_logps(plain, plain_params, batches[2], "chosen")
    assert np.abs(policy - base).max() > 1e-3
    assert metrics[2]["rewards/chosen"] == pytest.approx(0.1 * float(np.mean(policy - base)), abs=1e-5)
    # and the reference pass of the LoRA model on the trained params is the plain base model on its own, bit for bit
    c, r = dpo.reference_logps(LO.base_model(model), jax.tree.map(jnp.asarray, final), batches[0], dpo.Config())
    c0, r0 = dpo.reference_logps(plain, plain_params, batches[0], dpo.Config())
    assert np.array_equal(np.asarray(c), np.asarray(c0)) and np.array_equal(np.asarray(r), np.asarray(r0))


def test_lora_dpo_step_is_the_same_on_1_and_8_devices():
    model, params, _, _ = _models(LO.LoraConfig(r=4, alpha=8))
    params = _random_b(params, scale=0.05)
    batches = [_dpo_batch(seed) for seed in range(2)]
    # SGD: Adam's first steps divide tiny gradients by their own size, which turns summation-order rounding into
    # visible differences; SGD keeps the comparison one of gradients
    one, m_one, _ = _lora_dpo_steps(model, params, make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1]),
                                    batches, lr=0.5, optimizer="sgd")
    for shape in ((8, 1, 1), (2, 2, 2)):
        many, m_many, state = _lora_dpo_steps(model, params, make_mesh(MeshConfig(*shape)), batches, lr=0.5,
                                              optimizer="sgd")
        for a, b in zip(m_one, m_many):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["grad_norm"] == pytest.approx(
                b["grad_norm"], rel=1e-4)
        for x, y in zip(jax.tree.leaves(one[-1]), jax.tree.leaves(many[-1])):
            assert np.abs(x - y).max() <= 1e-5, shape
        adapter = state.params["params"]["layers"]["attn"]["wq_lora_b"]  # [L, r, N, D]: heads over tensor
        if shape == (2, 2, 2):
            assert adapter.sharding.spec[2] == "tensor" and len(adapter.sharding.device_set) == 8


def test_lora_grpo_rollout_takes_reference_logps_from_the_base_model():
    tokenizer = data.load_tokenizer("char")
    lora = LO.LoraConfig(r=4, alpha=8)
    model, params, plain, plain_params = _models(lora, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                                 eos_token_id=tokenizer.eos_token_id)
    params = _random_b(params, scale=0.5)
    config = grpo.Config(num_generations=2, max_completion_length=4, beta=0.04,
                         reward_funcs=(lambda prompts, completions, **kw: [float(len(c)) for c in completions],))
    algo = grpo.make(model, config)
    assert algo.init_frozen(params) is None  # the reference is the base of the policy params: no copy
    out = algo.rollout(params, ["12+3=", "4+56="], jax.random.PRNGKey(0), tokenizer=tokenizer)
    batch = dict(out.batch)
    base = onpolicy.reference_logps(plain, plain_params, batch, config)
    mask = np.asarray(batch["loss_mask"])[:, -4:] > 0
    assert np.abs(np.asarray(batch["ref_logps"]) - np.asarray(base))[mask].max() <= 1e-6
    assert np.abs(np.asarray(batch["ref_logps"]) - np.asarray(batch["old_logps"]))[mask].max() > 1e-3


# ------------------------------------------------------------------------------------------------ jrlhf train


def _saved_base(folder):
    tokenizer = data.load_tokenizer("char")
    config = M.tiny_config("llama", **{**TINY, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                                       "eos_token_id": tokenizer.eos_token_id})
    model, params = M.init_model(config, jax.random.PRNGKey(3))
    M.save_pretrained(model, jax.tree.map(np.asarray, params), str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def _dpo_run(tmp_path, name, init_from, steps):
    records = tmp_path / "pref.jsonl"
    if not records.exists():
        data.write_jsonl(str(records), data.load_records("builtin:addition/preference_train.jsonl")[:32])
    config = {"algorithm": "dpo",
              "data": {"train": str(records), "batch_size": 8, "max_length": 24},
              "algo": {"beta": 0.1},
              "optim": {"learning_rate": 1e-2},
              "train": {"output_dir": str(tmp_path / name), "steps": steps, "init_from": init_from, "log_every": 1,
                        "save_every": 2, "progress_bar": False, "tensorboard": False}}
    path = tmp_path / f"{name}_{steps}.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["train", "dpo", "--config", str(path), "--set", "model.lora.r=8",
                     "--set", "model.lora.alpha=16"]) == 0
    run = tmp_path / name
    with open(run / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f if '"train"' in line]
    return run, logged


def test_jrlhf_train_dpo_with_lora_resumes_exactly_and_exports(tmp_path):
    init_from = _saved_base(tmp_path / "base")
    straight, logged = _dpo_run(tmp_path, "straight", init_from, steps=4)
    _dpo_run(tmp_path, "resumed", init_from, steps=2)
    resumed, logged_resumed = _dpo_run(tmp_path, "resumed", init_from, steps=4)  # resumes from step 2
    assert [m["step"] for m in logged_resumed] == [1, 2, 3, 4]
    for a, b in zip(logged, logged_resumed):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], a["step"]
    assert abs(logged[0]["rewards/margins"]) <= 1e-6 and logged[-1]["loss"] != logged[0]["loss"]
    exported = load_file(str(straight / "hf_model" / "model.safetensors"))
    again = load_file(str(resumed / "hf_model" / "model.safetensors"))
    assert all(np.array_equal(exported[k], again[k]) for k in exported)
    # the merged export: adapted kernels moved, every other tensor is the base's, bit for bit
    base = load_file(os.path.join(init_from, "model.safetensors"))
    for name, value in base.items():
        if name.endswith("_proj.weight"):
            assert np.abs(exported[name] - value).max() > 1e-5, name
        else:
            assert np.array_equal(exported[name], value), name
    adapter = straight / "hf_adapter"
    with open(adapter / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == init_from
    assert np.array_equal(load_file(str(adapter / "adapter_model.safetensors"))[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
        load_file(str(resumed / "hf_adapter" / "adapter_model.safetensors"))[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
    # the checkpoints hold the adapters and their optimizer state plus a fingerprint of the base they were trained on
    with open(straight / "checkpoints" / "4" / "meta" / "metadata") as f:
        meta = json.load(f)
    # one entry per frozen leaf: embedding, final norm, LM head, 2 norms and 7 kernels (stacked over layers)
    assert len(meta["lora_base_fingerprint"]) == 12


@pytest.mark.slow
def test_jrlhf_train_grpo_with_lora(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    data.write_jsonl(str(prompts), data.load_records("builtin:addition/rl_prompts.jsonl")[:8])
    config = {"algorithm": "grpo",
              "model": {"family": "llama", "overrides": {k: v for k, v in TINY.items() if k != "vocab_size"}},
              "data": {"train": str(prompts), "batch_size": 4, "max_prompt_length": 12},
              "algo": {"num_generations": 2, "max_completion_length": 4, "beta": 0.04,
                       "reward_funcs": ["addition_exact_match"]},
              "optim": {"learning_rate": 1e-2},
              "train": {"output_dir": str(tmp_path / "run"), "steps": 2, "log_every": 1, "progress_bar": False,
                        "tensorboard": False}}
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["train", "grpo", "--config", str(path), "--set", "model.lora.r=8"]) == 0
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f if '"train"' in line]
    assert logged[0]["kl"] <= 1e-6  # the policy starts as the base model, which is the reference
    assert os.path.isfile(tmp_path / "run" / "hf_adapter" / "adapter_model.safetensors")
