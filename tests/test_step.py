"""The sharded train-step builder: meshes, logical-axis rules, accumulation, guards, on-policy updates, optimizer.

Runs on the 8 simulated CPU devices of tests/conftest.py with the tiny Llama of jrlhf.models.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jrlhf.losses as L
import jrlhf.models as M
from jrlhf import sharding as S
from jrlhf import step as ST

BETA = 0.1


# ------------------------------------------------------------------------------------------------ fixtures / helpers


SMALL = dict(hidden_size=32, intermediate_size=64, head_dim=8, vocab_size=64)  # 4 heads, 2 kv heads, 2 layers
VOCAB = SMALL["vocab_size"]


@pytest.fixture(scope="module")
def tiny():
    config = M.tiny_config("llama", **SMALL)
    model, params = M.init_model(config, jax.random.PRNGKey(0))
    specs = M.logical_axes(model)
    params = jax.tree.map(np.asarray, params)
    return model, params, specs


def _right_padded(rng, batch_size, seq_len, vocab):
    """input_ids, attention_mask, loss_mask [B, T]: a prompt of 2-4 tokens then a completion, right-padded."""
    ids = rng.integers(1, vocab, size=(batch_size, seq_len)).astype(np.int32)
    lengths = rng.integers(seq_len // 2, seq_len + 1, size=batch_size)
    prompt = rng.integers(2, 5, size=batch_size)
    pos = np.arange(seq_len)[None]
    attention = (pos < lengths[:, None]).astype(np.int32)
    loss_mask = ((pos >= prompt[:, None]) & (pos < lengths[:, None])).astype(np.int32)
    return ids * attention, attention, loss_mask


def _dpo_batch(seed, batch_size=8, seq_len=12, vocab=VOCAB):
    rng = np.random.default_rng(seed)
    batch = {}
    for side in ("chosen", "rejected"):
        ids, attention, loss_mask = _right_padded(rng, batch_size, seq_len, vocab)
        batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_loss_mask"] = (
            ids,
            attention,
            loss_mask,
        )
    return batch


def _sft_batch(seed, batch_size=16, seq_len=12, vocab=VOCAB):
    ids, attention, loss_mask = _right_padded(np.random.default_rng(seed), batch_size, seq_len, vocab)
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}


def _perturbed(params, seed, scale=0.02):
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        treedef, [np.asarray(x + scale * rng.standard_normal(x.shape), np.float32) for x in leaves]
    )


def make_dpo_loss(model, traces=None):
    """Sigmoid DPO through jrlhf.losses.dpo_loss, averaged with the global ``num_sequences``; appends to ``traces``
    each time it is traced."""

    def loss_fn(params, batch, frozen, ctx):
        if traces is not None:
            traces.append(1)
        ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        attention = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        mask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])[:, 1:]
        seq = jnp.sum(M.model_token_logprobs(model, params, ids, attention) * mask, axis=-1)
        ref = jnp.sum(M.model_token_logprobs(model, frozen["ref_params"], ids, attention) * mask, axis=-1)
        ref = jax.lax.stop_gradient(ref)
        half = batch["chosen_input_ids"].shape[0]
        losses, chosen_rewards, rejected_rewards = L.dpo_loss(
            seq[:half], seq[half:], ref[:half], ref[half:], beta=BETA, loss_type="sigmoid"
        )
        loss = jnp.sum(losses) / ctx.globals["num_sequences"]
        return loss, {"reward_margin": jnp.mean(chosen_rewards - rejected_rewards)}

    return loss_fn


def make_sft_loss(model, weight_key=None):
    """Token-mean NLL through jrlhf.losses.sft_loss with the global ``num_tokens`` normaliser; optional per-row
    weights ``batch[weight_key] [B]``."""

    def loss_fn(params, batch, frozen, ctx):
        logps = M.model_token_logprobs(model, params, batch["input_ids"], batch["attention_mask"])
        if weight_key is not None:
            logps = logps * batch[weight_key][:, None]
        loss, metrics = L.sft_loss(logps, batch["loss_mask"][:, 1:], normalizer=ctx.globals["num_tokens"])
        return loss, {"nll": metrics["nll"]}

    return loss_fn


_LOGITS_FNS = {}


def _logits(model, params, ids, attention):
    """model.apply under jit, compiled once per model; inputs on the default device."""
    if id(model) not in _LOGITS_FNS:
        _LOGITS_FNS[id(model)] = jax.jit(lambda p, i, a: model.apply(p, i, attention_mask=a))
    return _LOGITS_FNS[id(model)](params, ids, attention)


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_token_logps(model, params, ids, attention):
    """Log-probs of the targets from the model's logits, the softmax written out in float64 numpy."""
    logits = np.asarray(_logits(model, params, ids, attention), np.float64)
    logp = _np_log_softmax(logits[:, :-1])
    return np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]


def _np_dpo_loss(model, params, ref_params, batch):
    """DPO sigmoid loss written out in numpy from the model's logits."""
    def seq(p, side):
        lp = _np_token_logps(model, p, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"])
        return (lp * batch[f"{side}_loss_mask"][:, 1:]).sum(-1)

    logits = BETA * ((seq(params, "chosen") - seq(ref_params, "chosen"))
                     - (seq(params, "rejected") - seq(ref_params, "rejected")))
    return float(np.mean(np.log1p(np.exp(-logits))))


def _np_sft_loss(model, params, batch):
    lp = _np_token_logps(model, params, batch["input_ids"], batch["attention_mask"])
    mask = batch["loss_mask"][:, 1:]
    return float(-(lp * mask).sum() / mask.sum())


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(x), tree)


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _mesh(shape):
    devices = jax.devices()[: math.prod(shape)]
    return S.make_mesh(shape, devices=devices)


# -------------------------------------------------------------------------------------------------- mesh and rules


def test_mesh_config_resolves_the_rest_and_rejects_bad_sizes():
    assert S.MeshConfig().resolve(8) == (8, 1, 1)
    assert S.MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2)
    mesh = S.make_mesh({"fsdp": 4, "tensor": 2})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
    assert dict(S.make_mesh((1, 1, 1), devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="needs 12 devices"):
        S.make_mesh((3, 2, 2))
    with pytest.raises(ValueError, match="only one of"):
        S.MeshConfig(-1, -1, 1).resolve(8)
    with pytest.raises(ValueError, match="does not divide"):
        S.MeshConfig(3, -1, 1).resolve(8)
    with pytest.raises(ValueError, match="unknown axes"):
        S.make_mesh({"model": 2})


def test_logical_rules_map_names_and_fall_back_on_indivisible_dims():
    mesh = _mesh((2, 2, 2))
    spec = S.logical_to_mesh_spec(P("layers", "embed", "kv_heads", "head_dim"), mesh, shape=(2, 64, 2, 16))
    assert spec == P(None, "fsdp", "tensor")
    # kv_heads = 3 is not divisible by tensor = 2: replicated along that dim, or an error on request.
    assert S.logical_to_mesh_spec(P("embed", "kv_heads"), mesh, shape=(64, 3)) == P("fsdp")
    with pytest.raises(ValueError, match="not divisible"):
        S.logical_to_mesh_spec(P("embed", "kv_heads"), mesh, shape=(64, 3), on_indivisible="error")
    # One mesh axis splits one dim only.
    assert S.logical_to_mesh_spec(P("heads", "mlp"), mesh, shape=(4, 8)) == P("tensor")
    with pytest.raises(ValueError, match="no sharding rule"):
        S.logical_to_mesh_spec(P("experts"), mesh, shape=(4,))
    with pytest.raises(ValueError, match="lacks"):
        S.logical_to_mesh_spec(P("embed"), mesh, rules=(("embed", "expert"),), shape=(4,))
    assert S.logical_to_mesh_spec(P("embed"), mesh, rules=(("embed", ("fsdp", "tensor")),), shape=(8,)) == P(
        ("fsdp", "tensor")
    )


# Written out by hand from DEFAULT_RULES for the tiny Llama on a (2, 2, 2) mesh.
EXPECTED_SPECS = {
    "['params']['embed']['embedding']": P("tensor", "fsdp"),
    "['params']['final_norm']['scale']": P(),
    "['params']['layers']['attn']['wq']": P(None, "fsdp", "tensor"),
    "['params']['layers']['attn']['wk']": P(None, "fsdp", "tensor"),
    "['params']['layers']['attn']['wv']": P(None, "fsdp", "tensor"),
    "['params']['layers']['attn']['wo']": P(None, "tensor", None, "fsdp"),
    "['params']['layers']['attn_norm']['scale']": P(),
    "['params']['layers']['mlp_norm']['scale']": P(),
    "['params']['layers']['mlp']['w_gate']": P(None, "fsdp", "tensor"),
    "['params']['layers']['mlp']['w_up']": P(None, "fsdp", "tensor"),
    "['params']['layers']['mlp']['w_down']": P(None, "tensor", "fsdp"),
    "['params']['lm_head']": P("tensor", "fsdp"),
}


def _adam_state(opt_state):
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    assert len(found) == 1
    return found[0]


def _specs_by_path(tree):
    return {jax.tree_util.keystr(p): x.sharding.spec for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_params_and_optimizer_state_are_sharded_by_the_rules(tiny):
    model, params, specs = tiny
    mesh = _mesh((2, 2, 2))
    opt = ST.make_optimizer(ST.OptimizerConfig(name="adamw", learning_rate=1e-3), param_specs=specs)
    state, shardings = ST.init_train_state(params, opt, jax.random.PRNGKey(1), mesh=mesh, param_specs=specs)
    assert _specs_by_path(state.params) == EXPECTED_SPECS
    # Really split: a device holds 1/8 of a (fsdp, tensor)-sharded kernel, all of a norm scale.
    wq = state.params["params"]["layers"]["attn"]["wq"]
    assert wq.addressable_shards[0].data.shape == (2, 16, 2, 8)
    assert state.params["params"]["final_norm"]["scale"].addressable_shards[0].data.shape == (32,)
    # Adam moments mirror the params; counts are replicated.
    adam = _adam_state(state.opt_state)
    assert _specs_by_path(adam.mu) == EXPECTED_SPECS and _specs_by_path(adam.nu) == EXPECTED_SPECS
    assert adam.count.sharding.spec == P()


# ------------------------------------------------------------------------------------ same numbers on every mesh


def _run_dpo(model, params, specs, mesh, batches, ref_params, lr, num_microbatches=1):
    """3 SGD steps; returns per-step losses and per-step gradients (recovered as (p_before - p_after) / lr)."""
    opt = ST.make_optimizer(ST.OptimizerConfig(name="sgd", learning_rate=lr, max_grad_norm=None))
    state, shardings = ST.init_train_state(params, opt, jax.random.PRNGKey(0), mesh=mesh, param_specs=specs)
    frozen_shardings = {"ref_params": shardings.params}
    frozen = {"ref_params": S.put_global(ref_params, shardings.params)}
    traces = []
    step = ST.make_train_step(make_dpo_loss(model, traces), opt, mesh, state_shardings=shardings,
                              frozen_shardings=frozen_shardings, num_microbatches=num_microbatches)
    losses, grads = [], []
    for batch in batches:
        before = _host(state.params)
        state, metrics = step(state, batch, frozen)
        losses.append(float(metrics["loss"]))
        grads.append(jax.tree.map(lambda b, a: (b - a) / lr, before, _host(state.params)))
    assert len(traces) == 1  # one trace for the 3 steps
    return losses, grads, step, state, frozen, traces


def test_same_loss_and_gradients_on_every_mesh(tiny):
    model, params, specs = tiny
    ref_params = _perturbed(params, seed=1)
    batches = [_dpo_batch(seed) for seed in range(3)]
    lr = 0.5
    ref_losses, ref_grads, *_ = _run_dpo(model, params, specs, _mesh((1, 1, 1)), batches, ref_params, lr)
    # The loss is DPO's, written out independently in numpy.
    assert ref_losses[0] == pytest.approx(_np_dpo_loss(model, params, ref_params, batches[0]), abs=1e-5)
    assert ref_losses[0] != pytest.approx(math.log(2.0), abs=1e-3)
    assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads[0])) > 1e-3

    for shape, micro in (((8, 1, 1), 1), ((2, 4, 1), 1), ((2, 2, 2), 1)):
        losses, grads, step, state, frozen, traces = _run_dpo(
            model, params, specs, _mesh(shape), batches, ref_params, lr, num_microbatches=micro
        )
        np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5, err_msg=f"mesh {shape} x{micro}")
        for k in range(3):
            assert _max_diff(grads[k], ref_grads[k]) <= 1e-5, (shape, micro, k)

    # frozen is an argument, not a compiled constant: other reference params change the loss, without recompiling.
    lowered = step.lower(state, batches[0], frozen).as_text()
    big_constants = [
        m for m in re.findall(r"constant dense<[^>]*>\s*:\s*tensor<([0-9x]+)x", lowered)
        if math.prod(int(d) for d in m.split("x")) >= 256
    ]
    assert not big_constants, big_constants
    other = {"ref_params": S.put_global(_perturbed(params, seed=7), _shardings_of(frozen["ref_params"]))}
    num_traces = len(traces)
    state, metrics_a = step(state, batches[0], frozen)
    state, metrics_b = step(state, batches[0], other)
    assert abs(float(metrics_a["loss"]) - float(metrics_b["loss"])) > 1e-4
    assert len(traces) == num_traces  # neither call traced (so compiled) anew


def _shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


# ------------------------------------------------------------------------------------------------- accumulation


def _whiten_weights(batch, frozen, algo_state):
    """A batch-global transform (whitening over the whole batch), as advantage whitening is."""
    w = batch["weights"]
    return dict(batch, weights=(w - w.mean()) / (w.std() + 1e-6) + 1.0), {"weight_mean": w.mean()}


def test_four_microbatches_equal_one_big_batch_token_mean(tiny):
    """Token-mean loss with a batch-global prepare_batch: 4 micro-batches give one big batch's loss and gradients;
    update_algo_state runs after each step."""
    model, params, specs = tiny
    mesh = _mesh((2, 2, 2))
    rng = np.random.default_rng(12)
    batches = [dict(_sft_batch(seed), weights=rng.uniform(0.5, 2.0, 16).astype(np.float32)) for seed in (10, 11)]
    # Uneven token counts per row, so a per-micro-batch mean would differ from the global token mean.
    assert len({int(r.sum()) for r in batches[0]["loss_mask"]}) > 3
    seen = {}

    def loss_fn(p, b, frozen, ctx):
        seen["globals"] = sorted(ctx.globals)
        loss, metrics = make_sft_loss(model, "weights")(p, b, frozen, ctx)
        return loss, dict(metrics, weight_mean=ctx.globals["weight_mean"])

    def update(algo_state, metrics):
        return {"calls": algo_state["calls"] + 1, "last_loss": metrics["loss"]}

    lr = 0.5
    results = {}
    for micro in (1, 4):
        opt = ST.make_optimizer(ST.OptimizerConfig(name="sgd", learning_rate=lr, max_grad_norm=None))
        state, shardings = ST.init_train_state(params, opt, jax.random.PRNGKey(0), mesh=mesh, param_specs=specs,
                                               algo_state={"calls": np.int32(0), "last_loss": np.float32(0)})
        step = ST.make_train_step(loss_fn, opt, mesh, state_shardings=shardings, num_microbatches=micro,
                                  prepare_batch=_whiten_weights, update_algo_state=update)
        losses, grads = [], []
        for batch in batches:
            before = _host(state.params)
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
            grads.append(jax.tree.map(lambda b, a: (b - a) / lr, before, _host(state.params)))
        results[micro] = (losses, grads)
        assert int(state.algo_state["calls"]) == 2 and int(state.step) == 2 and int(metrics["step"]) == 1
        assert float(state.algo_state["last_loss"]) == losses[-1]
        assert float(metrics["weight_mean"]) == pytest.approx(float(batches[1]["weights"].mean()), abs=1e-6)
    assert seen["globals"] == ["num_microbatches", "num_sequences", "num_tokens", "weight_mean"]

    # Loss of the first step against numpy: whitened weights over the whole batch, token mean over the whole batch.
    first = batches[0]
    weights = _whiten_weights(first, None, None)[0]["weights"]
    lp = _np_token_logps(model, params, first["input_ids"], first["attention_mask"]) * weights[:, None]
    mask = first["loss_mask"][:, 1:]
    assert results[1][0][0] == pytest.approx(float(-(lp * mask).sum() / mask.sum()), abs=1e-5)

    np.testing.assert_allclose(results[4][0], results[1][0], rtol=0, atol=1e-5)
    for k in range(2):
        assert _max_diff(results[4][1][k], results[1][1][k]) <= 1e-5


# --------------------------------------------------------------------------------------------- non-finite guard


def test_nonfinite_loss_skips_the_update_and_is_counted(tiny):
    model, params, specs = tiny
    mesh = _mesh((2, 2, 2))
    opt = ST.make_optimizer(ST.OptimizerConfig(name="adamw", learning_rate=1e-2), param_specs=specs)
    device_params = jax.device_put(params, jax.devices()[0])
    state, shardings = ST.init_train_state(device_params, opt, 0, mesh=mesh, param_specs=specs)
    step = ST.make_train_step(make_sft_loss(model, "scale"), opt, mesh, state_shardings=shardings,
                              num_microbatches=2)
    good = dict(_sft_batch(4), scale=np.ones(16, np.float32))
    bad = dict(good, scale=np.where(np.arange(16) == 5, np.inf, 1.0).astype(np.float32))
    monitor = ST.NonFiniteMonitor()

    state, m0 = step(state, good)
    monitor(m0)
    before_params, before_opt = _host(state.params), _host(state.opt_state)
    state, m1 = step(state, bad)
    monitor(m1)  # checks step 0: fine
    assert int(m1["nonfinite"]) == 1 and int(state.nonfinite_count) == 1 and int(state.step) == 2
    assert _max_diff(_host(state.params), before_params) == 0.0
    assert _max_diff(_host(state.opt_state), before_opt) == 0.0
    state, m2 = step(state, good)
    assert int(m2["nonfinite"]) == 0 and int(m2["nonfinite_count"]) == 1
    assert _max_diff(_host(state.params), before_params) > 0.0
    with pytest.raises(ST.NonFiniteError, match="step 1"):
        monitor(m2)  # reads step 1's counter one step late
    tolerant = ST.NonFiniteMonitor(max_nonfinite=1)
    tolerant(m1)
    tolerant(m2)
    tolerant.flush()

    # The step keeps the rule layout (out_shardings) for params and Adam moments ...
    assert _specs_by_path(state.params) == EXPECTED_SPECS
    assert _specs_by_path(_adam_state(state.opt_state).mu) == EXPECTED_SPECS
    # ... and the state owned its buffers: the params it was built from survive the donated steps.
    assert _max_diff(_host(device_params), params) == 0.0


# ------------------------------------------------------------------------------------------------- on-policy update


def test_onpolicy_update_equals_the_same_updates_step_by_step(tiny):
    model, params, specs = tiny
    mesh = _mesh((2, 1, 2))
    batch = dict(_sft_batch(5), advantages=np.random.default_rng(5).standard_normal(16).astype(np.float32))
    num_epochs, num_minibatches = 2, 2

    def whiten(b, frozen, algo_state):
        a = b["advantages"]
        return dict(b, advantages=(a - a.mean()) / (a.std() + 1e-8)), {}

    loss_fn = make_sft_loss(model, "advantages")
    cfg = ST.OptimizerConfig(name="sgd", learning_rate=0.3, momentum=0.9, max_grad_norm=1.0)
    opt = ST.make_optimizer(cfg)
    rng = jax.random.PRNGKey(42)

    state, shardings = ST.init_train_state(params, opt, rng, mesh=mesh, param_specs=specs)
    update = ST.make_onpolicy_update(loss_fn, opt, mesh, state_shardings=shardings, num_epochs=num_epochs,
                                     num_minibatches=num_minibatches, shuffle=True, num_microbatches=2,
                                     prepare_batch=whiten)
    state, metrics = update(state, batch)
    assert int(state.step) == num_epochs * num_minibatches and int(metrics["step"]) == 0

    # The same updates by hand: whiten once on the whole batch, permute per epoch as documented, strided mini-batches.
    whitened, _ = whiten(batch, None, None)
    _, update_rng = jax.random.split(rng)
    perm_rng, _ = jax.random.split(update_rng)
    epoch_keys = jax.random.split(perm_rng, num_epochs)
    ref_state, ref_shardings = ST.init_train_state(params, opt, rng, mesh=mesh, param_specs=specs)
    step = ST.make_train_step(loss_fn, opt, mesh, state_shardings=ref_shardings, num_microbatches=2)
    losses = []
    for e in range(num_epochs):
        perm = np.asarray(jax.random.permutation(epoch_keys[e], 16))
        shuffled = {k: v[perm] for k, v in whitened.items()}
        for k in range(num_minibatches):
            ref_state, m = step(ref_state, {key: v[k::num_minibatches] for key, v in shuffled.items()})
            losses.append(float(m["loss"]))
    assert _max_diff(_host(state.params), _host(ref_state.params)) <= 1e-5
    assert _max_diff(_host(state.opt_state), _host(ref_state.opt_state)) <= 1e-5
    assert float(metrics["loss"]) == pytest.approx(np.mean(losses), abs=1e-5)
    assert _max_diff(_host(state.params), params) > 1e-3


# ---------------------------------------------------------------------------------------------- mixed precision


def test_bf16_compute_keeps_fp32_master_params(tiny):
    model, params, specs = tiny
    mesh = _mesh((4, 2, 1))
    seen = []

    def loss_fn(p, b, frozen, ctx):
        seen.append(p["params"]["lm_head"].dtype)
        return make_sft_loss(model)(p, b, frozen, ctx)

    opt = ST.make_optimizer(ST.OptimizerConfig(name="sgd", learning_rate=0.5, max_grad_norm=None))
    state, shardings = ST.init_train_state(params, opt, 0, mesh=mesh, param_specs=specs)
    step = ST.make_train_step(loss_fn, opt, mesh, state_shardings=shardings, compute_dtype=jnp.bfloat16)
    batch = _sft_batch(6, batch_size=8)
    state, metrics = step(state, batch)
    assert seen == [jnp.bfloat16]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert float(metrics["loss"]) == pytest.approx(_np_sft_loss(model, params, batch), rel=2e-2)
    assert _max_diff(_host(state.params), params) > 0


# ------------------------------------------------------------------------------------------------------- optimizer


def test_schedules_follow_the_formulas():
    lr = 2e-3
    warm = ST.make_schedule(ST.OptimizerConfig(learning_rate=lr, warmup_steps=4))
    assert [float(warm(s)) for s in (0, 1, 4, 100)] == pytest.approx([0.0, lr / 4, lr, lr])
    lin = ST.make_schedule(ST.OptimizerConfig(learning_rate=lr, schedule="linear", warmup_steps=2, total_steps=10))
    assert [float(lin(s)) for s in (1, 2, 6, 10, 12)] == pytest.approx([lr / 2, lr, lr / 2, 0.0, 0.0])
    cos = ST.make_schedule(ST.OptimizerConfig(learning_rate=lr, schedule="cosine", total_steps=8,
                                              final_lr_ratio=0.1))
    for s in (0, 3, 8):
        expected = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 8)))
        assert float(cos(s)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="total_steps"):
        ST.make_schedule(ST.OptimizerConfig(schedule="cosine"))


def test_weight_decay_skips_norms_and_biases_even_when_layers_are_stacked(tiny):
    _, params, specs = tiny
    lr, wd = 0.1, 0.5
    opt = ST.make_optimizer(ST.OptimizerConfig(name="adamw", learning_rate=lr, weight_decay=wd, max_grad_norm=None),
                            param_specs=specs)
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = jax.jit(opt.update)(zeros, opt.init(params), params)  # one program, not one per op and leaf
    flat_updates = dict(jax.tree_util.tree_flatten_with_path(updates)[0])
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        expected = np.zeros_like(p) if "norm" in name else -lr * wd * p
        np.testing.assert_allclose(np.asarray(flat_updates[path]), expected, rtol=1e-6, atol=1e-9, err_msg=name)
    # Stacked norm scales are [L, H]: an ndim rule alone would decay them.
    assert params["params"]["layers"]["attn_norm"]["scale"].ndim == 2
    # Query bias [L, N, D] of a Qwen2-style model counts as a bias.
    assert not ST._matrix_rank(P("layers", "heads", "head_dim"), 3) >= 2


def test_global_norm_clipping():
    g = {"w": np.array([[3.0, 4.0]], np.float32), "b": np.array([12.0], np.float32)}  # norm 13
    p = jax.tree.map(np.zeros_like, g)
    opt = ST.make_optimizer(ST.OptimizerConfig(name="sgd", learning_rate=1.0, max_grad_norm=1.3))
    updates, _ = opt.update(g, opt.init(p), p)
    np.testing.assert_allclose(updates["w"], -np.array([[0.3, 0.4]]), rtol=1e-6)
    np.testing.assert_allclose(updates["b"], -np.array([1.2]), rtol=1e-6)


def test_value_head_trained_beside_a_frozen_trunk():
    model, params = M.init_model(M.tiny_config("llama", num_layers=1), jax.random.PRNGKey(3), head="value")
    specs = M.logical_axes(model)
    trainable = jax.tree_util.tree_map_with_path(lambda path, _: "score" in jax.tree_util.keystr(path), params)
    opt = ST.make_optimizer(ST.OptimizerConfig(name="adamw", learning_rate=1e-2), params, trainable,
                            param_specs=specs)
    mesh = _mesh((2, 2, 2))
    state, shardings = ST.init_train_state(params, opt, 0, mesh=mesh, param_specs=specs)

    def value_loss(p, b, frozen, ctx):
        values = model.apply(p, b["input_ids"], attention_mask=b["attention_mask"])
        mask = b["loss_mask"].astype(jnp.float32)
        return jnp.sum(mask * (values - b["returns"]) ** 2) / ctx.globals["num_sequences"], {}

    step = ST.make_train_step(value_loss, opt, mesh, state_shardings=shardings, trainable=trainable)
    batch = dict(_sft_batch(8, batch_size=8), returns=np.ones((8, 12), np.float32))
    state, metrics = step(state, batch)
    after = _host(state.params)
    assert np.abs(after["params"]["score"] - params["params"]["score"]).max() > 1e-4
    trunk_after = {k: v for k, v in after["params"].items() if k != "score"}
    trunk_before = {k: v for k, v in jax.tree.map(np.asarray, params)["params"].items() if k != "score"}
    assert _max_diff(trunk_after, trunk_before) == 0.0
    # No Adam moments are kept for the frozen trunk.
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sorted(x.shape for x in moments) == [(64, 1), (64, 1)]


# ----------------------------------------------------------------------------------------------------- bad input


def test_bad_batches_get_clear_errors(tiny):
    model, params, specs = tiny
    mesh = _mesh((2, 2, 2))
    opt = ST.make_optimizer(ST.OptimizerConfig(name="sgd", learning_rate=0.1))
    state, shardings = ST.init_train_state(params, opt, 0, mesh=mesh, param_specs=specs)
    step = ST.make_train_step(make_sft_loss(model), opt, mesh, state_shardings=shardings, num_microbatches=2)
    with pytest.raises(ValueError, match="not divisible by num_microbatches x data x fsdp = 8"):
        step(state, _sft_batch(0, batch_size=12))
    with pytest.raises(ValueError, match="disagree"):
        step(state, dict(_sft_batch(0, batch_size=8), extra=np.zeros(16)))
    with pytest.raises(ValueError, match="scalar"):
        step(state, dict(_sft_batch(0, batch_size=8), temperature=np.float32(1.0)))
    with pytest.raises(ValueError, match="num_epochs"):
        ST.make_onpolicy_update(make_sft_loss(model), opt, mesh, state_shardings=shardings, num_epochs=0,
                                num_minibatches=1)


def test_microbatch_metrics_are_combined_by_name():
    assert [ST.metric_reduction(n) for n in ("min_reward", "clip_ratio/low_min", "max_reward", "clip_ratio/high_max",
                                             "loss", "rewards/margins", "maximum_length")] == \
        ["min", "min", "max", "max", "mean", "mean", "mean"]
    stacked = {"min_reward": np.array([1.0, -2.0]), "max_reward": np.array([3.0, 5.0]), "nll": np.array([1.0, 2.0])}
    out = ST.reduce_microbatch_metrics(stacked)
    assert (float(out["min_reward"]), float(out["max_reward"]), float(out["nll"])) == (-2.0, 5.0, 1.5)
    # micro-batches of 3 and 7 tokens: means 2 and 4 scaled by their shares average to the token mean (6 + 28) / 10
    ctx = ST.StepContext(rng=None, step=0, algo_state={}, globals={"num_tokens": 10.0, "num_microbatches": 2.0})
    shares = [float(ST.microbatch_share(n, ctx)) for n in (3, 7)]
    assert np.mean([2.0 * shares[0], 4.0 * shares[1]]) == pytest.approx(3.4)
