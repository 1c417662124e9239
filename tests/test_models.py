"""jrlhf.models without a PyTorch reference: KV cache, padding, packing, gradients, chunked log-probs, sharding
metadata, numerics options."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

import jrlhf.models
from jrlhf.models import (KVCache, ModelConfig, init_cache, init_model, logical_axes, model_token_logprobs,
                          sequence_scores, tiny_config, token_logprobs_from_hidden, unembedding_matrix)

FAMILIES = list(jrlhf.models.FAMILIES)  # every registered family (tests/test_model_families.py checks the list)


_JITTED = {}


def apply(model, *args, **kwargs):
    """``model.apply`` under a per-model ``jax.jit`` (compiled once per shape; much faster than eager here)."""
    key = id(model)
    if key not in _JITTED:
        _JITTED[key] = (model, jax.jit(model.apply, static_argnames=("return_hidden", "deterministic")))
    return _JITTED[key][1](*args, **kwargs)


def informative(config):
    """Larger init so that logits (and their differences) are far from uniform."""
    return config.replace(initializer_range=0.2)


@pytest.fixture(scope="module")
def models():
    out = {}
    for i, family in enumerate(FAMILIES):
        # windows shorter than the test sequences (gemma3_text's tiny config has one sliding layer of window 4)
        overrides = dict(sliding_window=3) if family == "mistral" else {}
        if family == "qwen3":
            overrides = dict(sliding_window=3, sliding_window_layers=(False, True))
        out[family] = init_model(informative(tiny_config(family, **overrides)), jax.random.key(i))
    for family, (model, params) in out.items():
        if model.config.norm_offset:  # norm weights start at 0 there (scale 1 + w): give them values
            out[family] = (model, jax.tree_util.tree_map_with_path(
                lambda path, x: x + 0.3 * jax.random.normal(jax.random.key(len(path)), x.shape)
                if path[-1].key == "scale" else x, params))
    return out


def left_padded(batch=3, length=8, vocab=128, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, vocab, (batch, length))
    mask = np.ones((batch, length), np.int32)
    for row in range(batch):
        mask[row, : row * 2] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_prefill_and_decode_match_full_forward(models, family):
    model, params = models[family]
    prompt_len, new_tokens = 7, 5
    ids, mask = left_padded(3, prompt_len + new_tokens, seed=1)
    mask = mask.at[:, prompt_len:].set(1)
    full = jax.jit(model.apply)(params, ids, mask)

    step = jax.jit(lambda p, i, m, c: apply(model, p, i, m, cache=c), donate_argnums=3)
    cache = init_cache(model.config, 3, 16)
    logits, cache = step(params, ids[:, :prompt_len], mask[:, :prompt_len], cache)
    pieces = [logits]
    for t in range(prompt_len, prompt_len + new_tokens):
        logits, cache = step(params, ids[:, t:t + 1], mask[:, t:t + 1], cache)
        pieces.append(logits)
    assert int(cache.index) == prompt_len + new_tokens
    np.testing.assert_array_equal(np.asarray(cache.mask[:, :prompt_len + new_tokens]), np.asarray(mask))
    assert int(cache.mask[:, prompt_len + new_tokens:].sum()) == 0
    decoded = jnp.concatenate(pieces, axis=1)
    real = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(decoded)[real], np.asarray(full)[real], atol=1e-5, rtol=0)


def test_cache_repeat_along_batch_and_multi_token_chunks(models):
    """The sampler repeats a prefilled cache for n samples per prompt; chunks of several tokens also work."""
    model, params = models["llama"]
    ids, mask = left_padded(2, 10, seed=2)
    mask = mask.at[:, 6:].set(1)
    cache = init_cache(model.config, 2, 12)
    _, cache = apply(model, params, ids[:, :6], mask[:, :6], cache=cache)
    n = 3
    repeated = KVCache(jnp.repeat(cache.k, n, axis=1), jnp.repeat(cache.v, n, axis=1),
                       jnp.repeat(cache.mask, n, axis=0), cache.index)
    rep_ids, rep_mask = jnp.repeat(ids, n, axis=0), jnp.repeat(mask, n, axis=0)
    logits, _ = apply(model, params, rep_ids[:, 6:], rep_mask[:, 6:], cache=repeated)
    full = apply(model, params, rep_ids, rep_mask)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, 6:]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_side_and_pad_ids_do_not_change_real_logits(models, family):
    model, params = models[family]
    rng = np.random.RandomState(3)
    tokens = rng.randint(1, 128, (5,))
    right = jnp.asarray(np.concatenate([tokens, [0, 0, 0]])[None])
    right_mask = jnp.asarray([[1] * 5 + [0] * 3])
    left = jnp.asarray(np.concatenate([[7, 8, 9], tokens])[None])
    left_mask = jnp.asarray([[0] * 3 + [1] * 5])
    a = apply(model, params, right, right_mask)[0, :5]
    b = apply(model, params, left, left_mask)[0, 3:]
    alone = apply(model, params, jnp.asarray(tokens[None]))[0]
    np.testing.assert_allclose(np.asarray(a), np.asarray(alone), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(b), np.asarray(alone), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3_text"])
def test_segment_ids_packing_equals_separate_sequences(models, family):
    model, params = models[family]
    rng = np.random.RandomState(4)
    first, second = rng.randint(1, 128, (4,)), rng.randint(1, 128, (5,))
    packed = jnp.asarray(np.concatenate([first, second, [0]])[None])
    segments = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0]])
    mask = jnp.asarray([[1] * 9 + [0]])
    out = apply(model, params, packed, mask, segment_ids=segments)[0]
    np.testing.assert_allclose(np.asarray(out[:4]), np.asarray(apply(model, params, jnp.asarray(first[None]))[0]),
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out[4:9]),
                               np.asarray(apply(model, params, jnp.asarray(second[None]))[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,head", [("gpt2", "lm"), ("llama", "lm+value"), ("qwen2", "lm"), ("qwen3", "lm"),
                                         ("gemma3_text", "lm+value")])
def test_every_parameter_gets_a_finite_nonzero_gradient(family, head):
    """Also covers a fully padded row: attention masking must stay NaN-free (mistral shares llama's parameters)."""
    config = tiny_config(family, tie_word_embeddings=family in ("gpt2", "qwen2"))
    model, params = init_model(config, jax.random.key(0), head=head)
    ids, mask = left_padded(3, 6)
    mask = mask.at[2].set(0)

    def loss(p):
        out = model.apply(p, ids, mask)
        logits, values = out if head == "lm+value" else (out, jnp.zeros(ids.shape))
        return jnp.sum(jnp.sin(logits) * mask[..., None]) + jnp.sum(values * mask)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(float(value))
    assert bool(jnp.all(jnp.isfinite(apply(model, params, ids, mask)[0] if head == "lm+value"
                                      else apply(model, params, ids, mask))))
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert all(bool(jnp.all(jnp.isfinite(g))) for _, g in flat)
    zero = [jax.tree_util.keystr(path) for path, g in flat if not bool(jnp.any(g != 0))]
    assert not zero, f"{family}/{head}: zero gradient for {zero}"
    if head == "lm+value":
        assert "lm_head" in grads["params"] and "score" in grads["params"]


def test_score_and_value_heads_and_sequence_scores():
    config = tiny_config("mistral")
    model, params = init_model(config, jax.random.key(0), head="score")
    ids, mask = left_padded(3, 6)
    values = apply(model, params, ids, mask)
    assert values.shape == (3, 6) and values.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(sequence_scores(values, mask)), np.asarray(values[:, -1]))
    right_mask = jnp.asarray([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    # pad id equal to a real token id changes nothing: the mask decides
    np.testing.assert_allclose(np.asarray(sequence_scores(values, right_mask)),
                               np.asarray(values[jnp.arange(3), jnp.asarray([2, 5, 0])]))
    value_model, value_params = init_model(config, jax.random.key(0), head="value")
    hidden = apply(value_model, value_params, ids, mask, return_hidden=True)
    assert hidden.shape == (3, 6, config.hidden_size)


def test_jit_compiles_once_per_shape(models):
    model, params = models["llama"]
    traces = []

    @jax.jit
    def forward(p, ids, mask):
        traces.append(ids.shape)
        return model.apply(p, ids, mask)

    for seed in range(3):
        forward(params, *left_padded(2, 6, seed=seed))
    assert len(traces) == 1
    forward(params, *left_padded(2, 9))
    forward(params, *left_padded(2, 9, seed=5))
    assert len(traces) == 2


def test_chunked_logprobs_match_full_softmax_values_and_gradients():
    rng = np.random.RandomState(5)
    hidden = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(37, 16)), jnp.float32)
    targets = jnp.asarray(rng.randint(0, 37, (2, 5)))
    cotangent = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)

    def reference(h, w):
        logits = np.asarray(h) @ np.asarray(w).T / 0.7
        logits = logits - logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]

    def full(h, w):
        logp = jax.nn.log_softmax(h @ w.T / 0.7, axis=-1)
        return jnp.sum(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * cotangent)

    for chunk in (8, 64):
        out = token_logprobs_from_hidden(hidden, weight, targets, chunk_size=chunk, temperature=0.7)
        np.testing.assert_allclose(np.asarray(out), reference(hidden, weight), atol=1e-5, rtol=0)
        chunked = lambda h, w: jnp.sum(  # noqa: E731
            token_logprobs_from_hidden(h, w, targets, chunk_size=chunk, temperature=0.7) * cotangent)
        got = jax.grad(chunked, argnums=(0, 1))(hidden, weight)
        want = jax.grad(full, argnums=(0, 1))(hidden, weight)
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)


def test_model_token_logprobs_chunked_equals_full(models):
    model, params = models["gpt2"]
    ids, mask = left_padded(2, 7)
    full = model_token_logprobs(model, params, ids, mask)
    chunked = model_token_logprobs(model, params, ids, mask, chunk_size=48)
    assert full.shape == (2, 6)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), atol=1e-5, rtol=0)
    logits = np.asarray(apply(model, params, ids, mask), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    expected = np.take_along_axis(logp[:, :-1], np.asarray(ids)[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(full), expected, atol=1e-5, rtol=0)
    assert unembedding_matrix(model, params).shape == (128, 64)


def test_logical_axes_cover_every_parameter(models):
    for family, (model, params) in models.items():
        specs = logical_axes(model)
        flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
        assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
            specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
        for spec, leaf in zip(flat_specs, jax.tree_util.tree_leaves(params)):
            assert isinstance(spec, PartitionSpec) and len(spec) == leaf.ndim
        layers = specs["params"]["layers"]
        assert layers["attn"]["wq"] == PartitionSpec("layers", "embed", "heads", "head_dim")
        assert layers["attn"]["wk"] == PartitionSpec("layers", "embed", "kv_heads", "head_dim")
        if model.config.qk_norm:
            assert layers["attn"]["q_norm"]["scale"] == PartitionSpec("layers", "norm")
        assert layers["mlp"]["w_down"] == PartitionSpec("layers", "mlp", "embed")
        assert specs["params"]["embed"]["embedding"] == PartitionSpec("vocab", "embed")


def test_bf16_compute_and_remat_options(models):
    model, params = models["llama"]
    ids, mask = left_padded(2, 6)

    def loss(m, p):
        return jnp.sum(jnp.sin(apply(m, p, ids, mask)))

    ref_value, ref_grads = jax.value_and_grad(lambda p: loss(model, p))(params)
    for policy in ("dots_no_batch",):
        remat = model.clone(config=model.config.replace(remat=policy))
        value, grads = jax.value_and_grad(lambda p: loss(remat, p))(params)
        np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
                               grads, ref_grads)
    bf16 = model.clone(config=model.config.replace(dtype="bfloat16"))
    logits = apply(bf16, params, ids, mask)
    assert logits.dtype == jnp.float32
    full = apply(model, params, ids, mask)
    assert float(jnp.abs(logits - full).max()) < 0.05 * float(jnp.abs(full).max())


def test_scan_unroll_changes_nothing_but_the_loop(models):
    """Unrolled layer scans (2 layers per iteration, fully unrolled) give the rolled scan's logits, gradients and
    cached decode; the parameters keep the stacked layout."""
    model, params = models["llama"]
    ids, mask = left_padded(2, 6)

    def loss(m, p):
        return jnp.sum(jnp.sin(apply(m, p, ids, mask)))

    ref_value, ref_grads = jax.value_and_grad(lambda p: loss(model, p))(params)
    for unroll in (2, model.config.num_layers, 99):
        unrolled = model.clone(config=model.config.replace(scan_unroll=unroll))
        _, fresh = init_model(unrolled.config, jax.random.key(0))
        shapes = lambda tree: jax.tree_util.tree_map(lambda a: a.shape, tree)  # noqa: E731
        assert shapes(fresh) == shapes(params)
        value, grads = jax.value_and_grad(lambda p: loss(unrolled, p))(params)
        np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
                               grads, ref_grads)
        cache = init_cache(unrolled.config, 2, 8)
        logits, cache = apply(unrolled, params, ids[:, :5], mask[:, :5], cache=cache)
        last, _ = apply(unrolled, params, ids[:, 5:], mask[:, 5:], cache=cache)
        np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(apply(model, params, ids, mask)[:, 5]),
                                   atol=1e-5)
    with pytest.raises(ValueError, match="scan_unroll"):
        model.config.replace(scan_unroll=0)


def test_dropout_is_off_by_default_and_on_when_asked(models):
    model, params = models["llama"]
    ids, mask = left_padded(2, 6)
    a = apply(model, params, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(0)})
    np.testing.assert_array_equal(np.asarray(a), np.asarray(apply(model, params, ids, mask)))
    noisy = model.clone(config=model.config.replace(dropout_rate=0.2, attention_dropout_rate=0.1))
    b = apply(noisy, params, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(0)})
    assert float(jnp.abs(a - b).max()) > 1e-3
    np.testing.assert_array_equal(np.asarray(apply(noisy, params, ids, mask)), np.asarray(a))


def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3, hidden_size=64)
    with pytest.raises(ValueError, match="remat"):
        tiny_config("llama", remat="sometimes")
    for family in FAMILIES:
        config = tiny_config(family)
        assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config
        assert hash(config) == hash(tiny_config(family))


def test_custom_vjp_kernels_match_autodiff_reference():
    """ops.attention / ops.dense backward passes against plain autodiff of the same formulas."""
    from jrlhf.models.ops import attention, dense, dense_transposed

    rng = np.random.RandomState(6)
    B, K, G, T, S, D = 2, 2, 3, 5, 5, 4
    q = jnp.asarray(rng.normal(size=(B, K, G, T, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, K, S, D)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, K, S, D)), jnp.float32)
    mask = jnp.asarray(rng.rand(B, T, S) > 0.3).at[1, 2].set(False)  # one row with no allowed key
    cot = jnp.asarray(rng.normal(size=(B, K, G, T, D)), jnp.float32)

    def reference(q, k, v):
        s = jnp.einsum("bkgtd,bksd->bkgts", q, k) * 0.5
        s = jnp.where(mask[:, None, None], s, -1e30)
        return jnp.einsum("bkgts,bksd->bkgtd", jax.nn.softmax(s, -1), v)

    np.testing.assert_allclose(np.asarray(attention(q, k, v, mask, 0.5)), np.asarray(reference(q, k, v)),
                               atol=1e-5)
    got = jax.grad(lambda *a: jnp.sum(attention(*a, mask, 0.5) * cot), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: jnp.sum(reference(*a) * cot), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)

    x = jnp.asarray(rng.normal(size=(2, 3, 4, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 5, 6)), jnp.float32)
    e = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
    got = jax.grad(lambda x, w: jnp.sum(jnp.sin(dense(x, w, in_dims=2))), argnums=(0, 1))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(jnp.sin(jnp.einsum("abij,ijk->abk", x, w))), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5)
    got = jax.grad(lambda x, e: jnp.sum(jnp.sin(dense_transposed(x[0, :, 0], e))), argnums=(0, 1))(x, e)
    want = jax.grad(lambda x, e: jnp.sum(jnp.sin(x[0, :, 0] @ e.T)), argnums=(0, 1))(x, e)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5)
