"""Scoring passes bounded in memory: with ``logprob_chunk_size="auto"`` no training loss, gradient, reference or
evaluation pass builds a ``[B, T, V]`` float array once the logits would exceed the budget, and the numbers equal
the full-softmax path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf.algorithms import base, dpo, reward, sft
from jrlhf.config import ConfigError
from jrlhf.models import init_model, tiny_config
from jrlhf.step import StepContext

VOCAB = 1000
B, T = 2, 16


def model_of(head="lm"):
    return init_model(tiny_config("llama", vocab_size=VOCAB), jax.random.PRNGKey(0), head=head)


def preference_batch():
    rng = np.random.default_rng(0)
    batch = {}
    for side, length in (("chosen", 14), ("rejected", 11)):
        ids = rng.integers(3, VOCAB, size=(B, T)).astype(np.int32)
        attention = (np.arange(T) < length).astype(np.int32)[None].repeat(B, 0)
        loss = attention * (np.arange(T) >= 5)
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attention, f"{side}_loss_mask": loss})
    return {k: jnp.asarray(v) for k, v in batch.items()}


def sft_batch():
    b = preference_batch()
    return {"input_ids": b["chosen_input_ids"], "attention_mask": b["chosen_attention_mask"],
            "loss_mask": b["chosen_loss_mask"]}


def ctx_for(batch, prepare=None):
    globals_ = {"num_sequences": jnp.float32(B)}
    if "loss_mask" in batch:
        globals_["num_tokens"] = jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32))
    if prepare is not None:
        globals_.update(prepare(batch, None, {})[1])
    return StepContext(rng=jax.random.PRNGKey(0), step=jnp.int32(0), algo_state={}, globals=globals_)


def _subjaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _subjaxprs(item)


def vocab_blocks(jaxpr, found=None):
    """Shapes of every float value with ``ndim >= 3`` and last axis ``VOCAB`` anywhere in ``jaxpr`` (scans,
    checkpoints, custom derivatives and nested jits included)."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            aval = getattr(var, "aval", None)
            shape = getattr(aval, "shape", ())
            if len(shape) >= 3 and shape[-1] == VOCAB and jnp.issubdtype(aval.dtype, jnp.floating):
                found.append(tuple(shape))
        for value in eqn.params.values():
            for sub in _subjaxprs(value):
                vocab_blocks(sub, found)
    return found


def passes():
    """``name -> (fn(params) -> scalar, params)`` for every offline scoring pass, with the chunk setting given."""
    lm_model, lm_params = model_of("lm")
    rm_model, rm_params = model_of("lm+value")
    pref, plain = preference_batch(), sft_batch()

    def make(chunk):
        dpo_cfg = dpo.Config(logprob_chunk_size=chunk)
        dpo_loss = dpo.make_loss_fn(lm_model, dpo_cfg)
        rpo_loss = dpo.make_loss_fn(lm_model, dpo.Config(logprob_chunk_size=chunk, rpo_alpha=0.5))
        orpo_loss = dpo.make_loss_fn(lm_model, dpo.Config(logprob_chunk_size=chunk, loss_type="orpo"))
        sft_loss = sft.make_loss_fn(lm_model, sft.Config(logprob_chunk_size=chunk))
        rm_loss = reward.make_loss_fn(rm_model, reward.Config(lm_loss_coefficient=1.0, logprob_chunk_size=chunk))
        pctx = ctx_for(pref, base.preference_globals)
        frozen = dpo.Frozen(ref_params=jax.tree.map(lambda x: x * 0.9, lm_params))
        return {
            "dpo loss (policy + reference)": (lambda p: dpo_loss(p, pref, frozen, pctx)[0], lm_params),
            "dpo held-out policy log-probs": (lambda p: jnp.sum(jnp.stack(dpo._split_pairs(
                dpo._policy_logps(lm_model, p, pref, dpo_cfg)[0]))), lm_params),
            "dpo reference log-probs": (lambda p: jnp.sum(jnp.stack(dpo.reference_logps(
                lm_model, p, pref, dpo_cfg))), lm_params),
            "dpo loss with the RPO NLL term": (lambda p: rpo_loss(p, pref, frozen, pctx)[0], lm_params),
            "orpo loss (NLL over the whole chosen sequence)": (lambda p: orpo_loss(p, pref, None, pctx)[0],
                                                               lm_params),
            "sft loss": (lambda p: sft_loss(p, plain, None, ctx_for(plain))[0], lm_params),
            "reward model LM regulariser": (lambda p: rm_loss(p, pref, None, pctx)[0], rm_params),
        }

    return make


def test_auto_chunk_size_by_hand():
    # 16 rows x 511 positions of a 49,152 vocabulary: 1.6 GB of float32 logits > 256 MiB -> chunks of
    # 268,435,456 / (8,176 x 4) = 8,208 columns, rounded down to a multiple of 128
    assert base.resolve_chunk_size("auto", 16 * 511, 49152) == 8192
    assert base.resolve_chunk_size("auto", 8 * 128, 104) is None  # 0.4 MB: full logits
    assert base.resolve_chunk_size("auto", 4096 * 4096, 151936) == 128  # never below 128 columns
    assert base.resolve_chunk_size("auto", 100, 1000, budget_bytes=100 * 1000 * 4) is None
    assert base.resolve_chunk_size("auto", 100, 1000, budget_bytes=100 * 1000 * 4 - 1) == 896
    assert base.resolve_chunk_size(None, 10**9, 10**6) is None and base.resolve_chunk_size(64, 1, 10) == 64
    for bad in ("full", 0, -8, 2.5):
        with pytest.raises(ConfigError, match="logprob_chunk_size"):
            base.resolve_chunk_size(bad, 1, 10)
    with pytest.raises(ConfigError, match=r"^algo.logprob_chunk_size='big'"):
        reward.Config(logprob_chunk_size="big")


def test_no_scoring_pass_builds_vocabulary_sized_logits_over_the_budget(monkeypatch):
    make = passes()
    full = make(None)
    monkeypatch.setattr(base, "LOGITS_BUDGET_BYTES", 32 * 1024)  # [2B, T-1, 1000] f32 is 240 KB: over it
    auto = make("auto")
    for name, (fn, params) in auto.items():
        for label, traced in (("value", fn), ("gradient", jax.grad(fn))):
            assert vocab_blocks(jax.make_jaxpr(traced)(params).jaxpr) == [], f"{name} {label}"
        # the check can fail: the full-softmax path has such blocks
        assert vocab_blocks(jax.make_jaxpr(full[name][0])(params).jaxpr), name
        full_fn = full[name][0]
        (value, got), (expected, want) = (jax.jit(jax.value_and_grad(f))(params) for f in (fn, full_fn))
        np.testing.assert_allclose(float(value), float(expected), rtol=1e-5, atol=1e-5, err_msg=name)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=2e-6, err_msg=name)


def test_default_budget_keeps_full_logits_for_small_vocabularies():
    make = passes()
    fn, params = make("auto")["dpo loss (policy + reference)"]
    assert vocab_blocks(jax.make_jaxpr(fn)(params).jaxpr)  # [4, 15, 1000] f32 = 240 KB < 256 MiB: fused path


def _numpy_log_softmax_at(hidden, weight, targets, temperature):
    logits = np.einsum("bth,vh->btv", hidden.astype(np.float64), weight.astype(np.float64)) / temperature
    top = logits.max(-1, keepdims=True)
    log_norm = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
    return np.take_along_axis(logits, targets[..., None], -1)[..., 0] - log_norm


@pytest.mark.parametrize("tile", [1, 3, 8, 64])
def test_selected_token_logprobs_against_numpy(tile):
    """Values against the log-softmax written out in numpy (0 off the mask); gradients against autodiff of the
    full-logits formula; tiles that do not divide the marked count, a temperature, and an empty mask."""
    from jrlhf.models import selected_token_logprobs

    rng = np.random.default_rng(1)
    b, t, h, v = 3, 9, 6, 41
    hidden = rng.normal(size=(b, t, h)).astype(np.float32)
    weight = rng.normal(size=(v, h)).astype(np.float32)
    targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
    where = rng.random((b, t)) < 0.45
    cot = rng.normal(size=(b, t)).astype(np.float32)

    got = selected_token_logprobs(jnp.asarray(hidden), jnp.asarray(weight), jnp.asarray(targets),
                                  jnp.asarray(where), tile=tile, temperature=0.7)
    want = np.where(where, _numpy_log_softmax_at(hidden, weight, targets, 0.7), 0.0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)

    def full(hd, w):
        logits = jnp.einsum("bth,vh->btv", hd, w) / 0.7
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), jnp.asarray(targets)[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(jnp.asarray(where), picked, 0.0) * cot)

    def tiled(hd, w):
        return jnp.sum(selected_token_logprobs(hd, w, jnp.asarray(targets), jnp.asarray(where), tile=tile,
                                               temperature=0.7) * cot)

    args = (jnp.asarray(hidden), jnp.asarray(weight))
    for g, w in zip(jax.jit(jax.grad(tiled, argnums=(0, 1)))(*args), jax.jit(jax.grad(full, argnums=(0, 1)))(*args)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
    none = np.zeros((b, t), bool)
    value, grads = jax.value_and_grad(
        lambda hd: jnp.sum(selected_token_logprobs(hd, args[1], jnp.asarray(targets), jnp.asarray(none), tile)))(
        args[0])
    assert float(value) == 0.0 and not np.any(np.asarray(grads))


def test_selection_tile_fits_the_budget():
    # 256 MiB / (49,152 x 4 bytes) = 1,365 positions fit; capped at SELECTION_TILE (256) so the part-empty last
    # tile wastes little; a 1 MiB budget gives 1,048,576 / 196,608 = 5 -> the floor of 8
    assert base.selection_tile(49152) == base.SELECTION_TILE == 256
    assert base.selection_tile(49152, budget_bytes=2**20) == 8
    assert base.selection_tile(1000, budget_bytes=32 * 1024) == 8
    assert base.selection_tile(151936, budget_bytes=100 * 151936 * 4) == 100
