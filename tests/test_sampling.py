"""Tests of jrlhf.sampling.generate.

Two kinds of model:
* ``BigramLM``, a stand-in whose next-token logits are a fixed table row of the current token. Its distributions
  are known in closed form, so the sampler's statistics (temperature, top-k, top-p), log-probs, EOS / stop handling,
  early stop and compilation behaviour are checked against numpy references.
* the real jrlhf GPT-2 / Llama models, checked token for token against ``transformers`` greedy generation on the
  same random weights, against a full forward pass for the log-probs, and sharded over 8 devices.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax import lax

import jrlhf.models
from jrlhf import sampling
from jrlhf.sampling import generate

# ----------------------------------------------------------------------------------------------------------------
# Stand-in model and numpy references
# ----------------------------------------------------------------------------------------------------------------

VOCAB = 8


class BigramLM:
    """Next-token logits = ``params["table"][token]``; follows the jrlhf cache contract (mask / index).

    ``traces`` counts how often ``apply`` is traced, ``prefill_batches`` the batch size of each traced call with more
    than one token, and (with ``count_calls``) ``calls`` how many times ``apply`` actually ran on device.
    """

    def __init__(self, count_calls: bool = False, vocab_size: int = VOCAB):
        # Only the cache is built from the config: the smallest one that makes a valid KVCache.
        self.config = jrlhf.models.tiny_config(
            "llama", vocab_size=vocab_size, hidden_size=8, num_heads=1, num_kv_heads=1, head_dim=8, num_layers=1
        )
        self.traces = 0
        self.prefill_batches: list[int] = []
        self.count_calls = count_calls
        self.calls = 0

    def _count(self):
        self.calls += 1

    def apply(self, params, ids, attention_mask=None, cache=None):
        self.traces += 1
        if ids.shape[1] > 1:
            self.prefill_batches.append(ids.shape[0])
        if attention_mask is None:
            attention_mask = jnp.ones(ids.shape, jnp.int32)
        logits = params["table"][ids]
        new_mask = lax.dynamic_update_slice(cache.mask, attention_mask.astype(cache.mask.dtype), (0, cache.index))
        cache = cache._replace(mask=new_mask, index=cache.index + ids.shape[1])
        if self.count_calls:
            jax.debug.callback(self._count, ordered=True)
        return logits, cache


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_filtered_probs(logits, temperature, top_k, top_p):
    """Reference: probabilities after temperature, top-k, then top-p (transformers' order), for ``[V]`` logits."""
    z = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(z.shape, bool)
    ranked = order[:top_k] if top_k else order
    p = np.exp(z[ranked] - z[ranked].max())
    p /= p.sum()
    mass_before = np.concatenate([[0.0], np.cumsum(p)[:-1]])
    keep[ranked[(mass_before < top_p) | (top_p >= 1)]] = True
    out = np.where(keep, np.exp(z - z.max()), 0.0)
    return out / out.sum()


def left_pad(seqs, pad=0):
    """``[B, P]`` ids and mask for a list of token lists, left-padded."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad, np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = s
        mask[i, width - len(s) :] = 1
    return ids, mask


@pytest.fixture(scope="module")
def random_table():
    return {"table": jnp.asarray(np.random.default_rng(0).normal(0.0, 1.5, (VOCAB, VOCAB)), jnp.float32)}


def chain_table(scale=10.0):
    """Deterministic bigram: token t is followed by (t + 1) % VOCAB (by a margin of ``scale``)."""
    return {"table": jnp.asarray(scale * np.roll(np.eye(VOCAB), 1, axis=1), jnp.float32)}


# ----------------------------------------------------------------------------------------------------------------
# Statistics, log-probs, determinism, compilation (stand-in model)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.7, 0, 0.75), (1.6, 3, 1.0), (1.0, 5, 0.6)],
)
def test_sampled_pairs_follow_the_filtered_distribution(random_table, temperature, top_k, top_p):
    model = BigramLM()
    prompts = [[3, 1], [5], [2, 6, 0]]
    ids, mask = left_pad(prompts)
    n = 3000
    out = generate(
        model, random_table, ids, mask, jax.random.key(1), max_new_tokens=2, num_samples=n,
        temperature=temperature, top_k=top_k, top_p=top_p,
    )
    tokens = np.asarray(out.tokens).reshape(len(prompts), n, 2)
    logps = np.asarray(out.logps).reshape(len(prompts), n, 2)
    table = np.asarray(random_table["table"])
    assert np.all(np.asarray(out.mask) == 1) and np.all(np.asarray(out.truncated))

    for b, prompt in enumerate(prompts):
        # Joint distribution of (first, second) token: p(t0 | last prompt token) * p(t1 | t0).
        p0 = np_filtered_probs(table[prompt[-1]], temperature, top_k, top_p)
        joint = np.stack([p0[t] * np_filtered_probs(table[t], temperature, top_k, top_p) for t in range(VOCAB)])
        counts = np.zeros((VOCAB, VOCAB))
        np.add.at(counts, (tokens[b, :, 0], tokens[b, :, 1]), 1)
        support = joint > 0
        assert counts[~support].sum() == 0, "sampled a token that top-k/top-p filtered out"
        expected = n * joint[support]
        chi2 = ((counts[support] - expected) ** 2 / expected).sum()
        dof = support.sum() - 1
        assert chi2 < dof + 6 * np.sqrt(2 * dof), (chi2, dof)  # mean dof, std sqrt(2 dof): a 6-sigma bound
        assert 0.5 * np.abs(counts / n - joint).sum() < 0.1  # sampling noise alone is ~0.04 here

        # Log-probs are under logits / temperature *before* filtering.
        ref0 = np_log_softmax(table[prompt[-1]] / temperature)[tokens[b, :, 0]]
        ref1 = np_log_softmax(table[tokens[b, :, 0]] / temperature)[np.arange(n), tokens[b, :, 1]]
        np.testing.assert_allclose(logps[b, :, 0], ref0, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(logps[b, :, 1], ref1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (40, 0.8)])
def test_large_vocabulary_sampling_follows_the_filtered_distribution(top_k, top_p):
    # A vocabulary of 700 takes the blocked inverse-CDF path (22 blocks of 32, the last one padded) and, without
    # top-k, the sort-free nucleus; with top-k, the nucleus over the sorted candidates.
    vocab, n = 700, 20000
    model = BigramLM(vocab_size=vocab)
    table = np.random.default_rng(5).normal(0.0, 2.0, (vocab, vocab)).astype(np.float32)
    ids, mask = left_pad([[11]])
    out = generate(model, {"table": jnp.asarray(table)}, ids, mask, jax.random.key(4), max_new_tokens=1,
                   num_samples=n, temperature=1.0, top_k=top_k, top_p=top_p)
    probs = np_filtered_probs(table[11], 1.0, top_k, top_p)
    counts = np.bincount(np.asarray(out.tokens)[:, 0], minlength=vocab)
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token that top-k/top-p filtered out"
    expected = n * probs[support]
    chi2 = ((counts[support] - expected) ** 2 / expected).sum()
    dof = support.sum() - 1
    assert 10 < dof < (top_k or vocab) - 1  # both filters bite, and many tokens remain
    assert chi2 < dof + 6 * np.sqrt(2 * dof), (chi2, dof)


def test_filter_logits_matches_numpy_reference():
    logits = np.random.default_rng(3).normal(size=(5, 11)).astype(np.float32)
    for top_k, top_p in [(0, 1.0), (4, 1.0), (0, 0.5), (6, 0.8), (1, 0.3), (0, 1e-6)]:
        got = np.asarray(jax.nn.softmax(sampling.filter_logits(logits, top_k=top_k, top_p=top_p), -1))
        want = np.stack([np_filtered_probs(row, 1.0, top_k, top_p) for row in logits])
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_greedy_is_argmax_with_raw_log_softmax(random_table):
    model = BigramLM()
    ids, mask = left_pad([[3, 1], [5], [2, 6, 0]])
    out = generate(model, random_table, ids, mask, jax.random.key(0), max_new_tokens=5, temperature=0.0)
    table = np.asarray(random_table["table"])
    for b, last in enumerate([1, 5, 0]):
        for t in range(5):
            nxt = int(np.argmax(table[last]))
            assert int(out.tokens[b, t]) == nxt
            np.testing.assert_allclose(float(out.logps[b, t]), np_log_softmax(table[last])[nxt], rtol=1e-5)
            last = nxt
    assert np.isfinite(np.asarray(out.logps)).all()


def test_same_rng_same_output_and_different_rng_differs(random_table):
    model = BigramLM()
    ids, mask = left_pad([[3, 1], [5]])
    kw = dict(max_new_tokens=12, num_samples=4, temperature=1.0, top_p=0.95)
    a = generate(model, random_table, ids, mask, jax.random.key(7), **kw)
    b = generate(model, random_table, ids, mask, jax.random.key(7), **kw)
    c = generate(model, random_table, ids, mask, jax.random.key(8), **kw)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_samples_share_one_prefill_and_are_laid_out_in_groups(random_table):
    model = BigramLM()
    prompts = [[3, 1], [5], [2, 6, 0]]
    ids, mask = left_pad(prompts)
    n = 4
    out = generate(model, random_table, ids, mask, jax.random.key(2), max_new_tokens=6, num_samples=n)
    assert model.prefill_batches == [len(prompts)]  # one prefill over B prompts, not B * n rows
    tokens = np.asarray(out.tokens)
    assert tokens.shape == (len(prompts) * n, 6)
    table = np.asarray(random_table["table"])
    for b, prompt in enumerate(prompts):
        group = tokens[b * n : (b + 1) * n]
        assert len({tuple(r) for r in group}) > 1  # samples of one prompt differ
        # Row b*n+i continues prompt b: its first token has positive probability after prompt b's last token.
        p0 = np_filtered_probs(table[prompt[-1]], 1.0, 0, 1.0)
        assert (p0[group[:, 0]] > 0).all()
    # Greedy: every sample of a group equals the single-sample completion of its prompt.
    greedy_n = generate(model, random_table, ids, mask, jax.random.key(2), max_new_tokens=6, num_samples=n,
                        temperature=0.0)
    greedy_1 = generate(model, random_table, ids, mask, jax.random.key(2), max_new_tokens=6, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(greedy_n.tokens), np.repeat(np.asarray(greedy_1.tokens), n, axis=0))


def test_changing_temperature_and_top_p_does_not_recompile(random_table):
    model = BigramLM()
    ids, mask = left_pad([[3, 1], [5]])
    kw = dict(max_new_tokens=4, num_samples=2, top_k=0)
    generate(model, random_table, ids, mask, jax.random.key(0), temperature=1.0, top_p=1.0, **kw)
    traces = model.traces
    assert traces == 2  # prefill + the decode step, traced once each
    for temperature, top_p in [(0.5, 1.0), (1.3, 0.9), (0.0, 0.5), (2.0, 0.2)]:
        generate(model, random_table, ids, mask, jax.random.key(1), temperature=temperature, top_p=top_p, **kw)
    generate(model, random_table, ids, mask, jax.random.key(1), temperature=jnp.float32(0.8), top_p=0.7, **kw)
    # int64 host prompts and int32 device prompts share the program too.
    generate(model, random_table, ids.astype(np.int64), mask.astype(np.int64), jax.random.key(1), **kw)
    generate(model, random_table, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(1), **kw)
    assert model.traces == traces
    # Static settings do compile a new program.
    generate(model, random_table, ids, mask, jax.random.key(1), max_new_tokens=4, num_samples=2, top_k=3)
    assert model.traces == traces + 2


# ----------------------------------------------------------------------------------------------------------------
# EOS, stop sequences, early stop (stand-in model with a deterministic chain t -> t + 1)
# ----------------------------------------------------------------------------------------------------------------


def test_eos_mask_truncation_and_padding():
    model = BigramLM()
    ids, mask = left_pad([[0, 1], [3], [4, 5], [7]])
    out = generate(model, chain_table(), ids, mask, jax.random.key(0), max_new_tokens=4, temperature=0.0,
                   eos_token_id=6, pad_token_id=7)
    pad = 7
    np.testing.assert_array_equal(
        np.asarray(out.tokens),
        [[2, 3, 4, 5], [4, 5, 6, pad], [6, pad, pad, pad], [0, 1, 2, 3]],
    )
    np.testing.assert_array_equal(np.asarray(out.mask), [[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(out.lengths), [4, 3, 1, 4])
    np.testing.assert_array_equal(np.asarray(out.truncated), [True, False, False, True])
    logps = np.asarray(out.logps)
    assert (logps[np.asarray(out.mask) == 0] == 0).all()
    assert (logps[np.asarray(out.mask) == 1] < 0).all()
    assert out.tokens.dtype == jnp.int32 and out.mask.dtype == jnp.int32 and out.logps.dtype == jnp.float32
    assert out.truncated.dtype == jnp.bool_ and out.lengths.dtype == jnp.int32

    # Several EOS ids: the first one reached ends the row.
    out = generate(model, chain_table(), ids, mask, jax.random.key(0), max_new_tokens=4, temperature=0.0,
                   eos_token_id=[6, 3], pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(out.lengths), [2, 3, 1, 4])
    # Row 3 reaches EOS 3 at the very last step: complete, not truncated.
    np.testing.assert_array_equal(np.asarray(out.truncated), [False, False, False, False])
    np.testing.assert_array_equal(np.asarray(out.tokens)[0], [2, 3, 0, 0])


def test_stop_sequences_match_generated_tokens_only():
    model = BigramLM()
    ids, mask = left_pad([[0, 1], [2, 3], [5]])
    out = generate(model, chain_table(), ids, mask, jax.random.key(0), max_new_tokens=10, temperature=0.0,
                   stop_sequences=[[3, 4], [7, 0, 1]], pad_token_id=0)
    # Row 0: 2 3 4 | row 1: the prompt ends in 3 so "3 4" does not match at the boundary: 4 5 6 7 0 1 |
    # row 2: 6 7 0 1.
    np.testing.assert_array_equal(np.asarray(out.lengths), [3, 6, 4])
    np.testing.assert_array_equal(np.asarray(out.tokens)[1, :7], [4, 5, 6, 7, 0, 1, 0])
    np.testing.assert_array_equal(np.asarray(out.truncated), [False, False, False])


def test_loop_stops_early_once_every_row_is_done():
    model = BigramLM(count_calls=True)
    ids, mask = left_pad([[0, 1], [3], [4, 5]])
    out = generate(model, chain_table(), ids, mask, jax.random.key(0), max_new_tokens=30, temperature=0.0,
                   eos_token_id=6)
    jax.block_until_ready(out)
    jax.effects_barrier()
    np.testing.assert_array_equal(np.asarray(out.lengths), [5, 3, 1])
    # 1 prefill + 4 decode steps (the longest row has 5 tokens; the first comes from the prefill logits).
    assert model.calls == 5
    model.calls = 0
    out = generate(model, chain_table(), ids, mask, jax.random.key(0), max_new_tokens=30, temperature=0.0)
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert model.calls == 30 and np.asarray(out.truncated).all()


def test_bad_arguments_raise_clear_errors(random_table):
    model = BigramLM()
    ids, mask = left_pad([[3, 1], [5]])
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, random_table, ids, mask, key, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, random_table, ids, mask, key, max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, random_table, ids, mask, key, max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="prompt_mask"):
        generate(model, random_table, ids, mask[:, :1], key, max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_mask: rows \\[1\\]"):
        generate(model, random_table, ids, np.array([[1, 1], [0, 0]]), key, max_new_tokens=2)
    with pytest.raises(ValueError, match="stop_sequences"):
        generate(model, random_table, ids, mask, key, max_new_tokens=2, stop_sequences=["</s>"])
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(model, random_table, ids, mask, key, max_new_tokens=2, eos_token_id=[-1])
    with pytest.raises(ValueError, match="eos_token_id.*vocabulary"):
        generate(model, random_table, ids, mask, key, max_new_tokens=2, eos_token_id=VOCAB)


# ----------------------------------------------------------------------------------------------------------------
# Real models: parity with transformers, log-probs against a full forward, sharding
# ----------------------------------------------------------------------------------------------------------------

HF_PROMPTS = [[5, 17, 9, 33, 2, 41], [8, 3], [60, 12, 7, 7], [21]]
HF_NEW_TOKENS = 12
GREEDY_KW = dict(max_new_tokens=HF_NEW_TOKENS, num_samples=2, temperature=0.0)  # shared: one compiled program


def _hf_model(family: str):
    import torch
    import transformers

    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=None,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(
            vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=1.0,
            bos_token_id=None, eos_token_id=None,
        )
        model = transformers.GPT2LMHeadModel(config)
    return model.eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_pair(request, tmp_path_factory):
    """(family, transformers model, jrlhf model, jrlhf params) with the same random weights."""
    hf = _hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    model, params = jrlhf.models.from_pretrained(str(path))
    return request.param, hf, model, params


def _hf_greedy(hf, ids, mask, new_tokens):
    """transformers greedy generation: (tokens [B, N], per-step logits [B, N, V])."""
    import torch
    import transformers

    gen_config = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
        bos_token_id=None, return_dict_in_generate=True, output_logits=True,
    )
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
            generation_config=gen_config,
        )
    tokens = out.sequences[:, ids.shape[1] :].numpy()
    logits = torch.stack(out.logits, dim=1).float().numpy()
    return tokens, logits


@pytest.mark.torch
def test_greedy_matches_transformers_generate(hf_pair):
    family, hf, model, params = hf_pair
    ids, mask = left_pad(HF_PROMPTS)
    want, hf_logits = _hf_greedy(hf, ids, mask, HF_NEW_TOKENS)
    out = generate(model, params, ids, mask, jax.random.key(0), **GREEDY_KW)
    # Both greedy samples of a prompt are the same completion.
    np.testing.assert_array_equal(np.asarray(out.tokens)[0::2], np.asarray(out.tokens)[1::2])
    out = jax.tree.map(lambda x: x[0::2], out)
    got = np.asarray(out.tokens)
    assert got.shape == want.shape == (len(HF_PROMPTS), HF_NEW_TOKENS)
    compared = 0
    for b in range(len(HF_PROMPTS)):
        for t in range(HF_NEW_TOKENS):
            if got[b, t] != want[b, t]:
                top2 = np.sort(hf_logits[b, t])[-2:]
                assert top2[1] - top2[0] < 1e-4, f"{family}: row {b} diverges at step {t} with a clear argmax"
                break  # after a legitimate near-tie the continuations differ
            compared += 1
    assert compared >= 0.9 * got.size
    # Greedy log-probs are log_softmax of the raw logits (transformers' per-step logits here).
    ref = np_log_softmax(hf_logits)
    for b in range(len(HF_PROMPTS)):
        for t in range(HF_NEW_TOKENS):
            if got[b, t] != want[b, t]:
                break
            np.testing.assert_allclose(float(out.logps[b, t]), ref[b, t, got[b, t]], rtol=1e-4, atol=1e-4)


def _full_forward_logps(model, params, ids, mask, out, temperature):
    """log_softmax(logits / temperature) of each sampled token, recomputed by one forward over prompt + completion."""
    n = out.tokens.shape[0] // ids.shape[0]
    full_ids = np.concatenate([np.repeat(ids, n, 0), np.asarray(out.tokens)], axis=1)
    full_mask = np.concatenate([np.repeat(mask, n, 0), np.asarray(out.mask)], axis=1)
    logits = np.asarray(model.apply(params, jnp.asarray(full_ids), jnp.asarray(full_mask)), np.float64)
    prompt_len = ids.shape[1]
    step_logits = logits[:, prompt_len - 1 : -1]  # the logits that predict each completion token
    ref = np.take_along_axis(np_log_softmax(step_logits / temperature), np.asarray(out.tokens)[..., None], -1)[..., 0]
    return step_logits, np.where(np.asarray(out.mask) == 1, ref, 0.0)


@pytest.mark.torch
@pytest.mark.parametrize("hf_pair", ["llama"], indirect=True)
def test_sampled_logps_match_a_full_forward(hf_pair):
    family, _, model, params = hf_pair
    ids, mask = left_pad(HF_PROMPTS)
    temperature, top_k = 0.7, 10
    out = generate(model, params, ids, mask, jax.random.key(3), max_new_tokens=10, num_samples=3,
                   temperature=temperature, top_k=top_k, top_p=0.9, eos_token_id=[1, 2])
    step_logits, ref = _full_forward_logps(model, params, ids, mask, out, temperature)
    np.testing.assert_allclose(np.asarray(out.logps), ref, rtol=1e-4, atol=1e-4)
    # Every sampled token is among the top_k of its logits.
    tokens, valid = np.asarray(out.tokens), np.asarray(out.mask) == 1
    kth = np.sort(step_logits, -1)[..., -top_k]
    chosen = np.take_along_axis(step_logits, tokens[..., None], -1)[..., 0]
    assert (chosen[valid] >= kth[valid] - 1e-4).all()
    # EOS rows are masked after the EOS.
    for r in range(tokens.shape[0]):
        length = int(out.lengths[r])
        assert not np.isin(tokens[r, : length - 1], [1, 2]).any()
        assert bool(out.truncated[r]) == (not np.isin(tokens[r, length - 1], [1, 2]))


@pytest.mark.torch
@pytest.mark.parametrize("hf_pair", ["llama"], indirect=True)
def test_sharded_params_give_the_same_greedy_output(hf_pair):
    from jrlhf import sharding

    family, _, model, params = hf_pair
    ids, mask = left_pad(HF_PROMPTS)
    kw = GREEDY_KW
    want = generate(model, params, ids, mask, jax.random.key(0), **kw)

    mesh = sharding.make_mesh((2, 2, 2))
    shardings = sharding.logical_to_shardings(jrlhf.models.logical_axes(model), mesh, shapes=params)
    sharded = jax.device_put(params, shardings)
    assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree_util.tree_leaves(sharded))
    got = generate(model, sharded, ids, mask, jax.random.key(0), **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.logps), np.asarray(want.logps), rtol=1e-4, atol=1e-4)
    # The rollout stays on the mesh, split over the batch axes (B * n = 8 rows over data x fsdp = 4).
    assert got.tokens.sharding.mesh.shape == mesh.shape
    assert got.tokens.sharding.spec[0] in (("data", "fsdp"), "data", "fsdp")
    # The random stream does not depend on the layout either: the same key samples the same tokens.
    sample_kw = dict(max_new_tokens=HF_NEW_TOKENS, num_samples=2, temperature=1.0)
    sampled = generate(model, sharded, ids, mask, jax.random.key(5), **sample_kw)
    reference = generate(model, params, ids, mask, jax.random.key(5), **sample_kw)
    np.testing.assert_array_equal(np.asarray(sampled.tokens), np.asarray(reference.tokens))


# ----------------------------------------------------------------------------------------------------------------
# min_new_tokens (transformers' name): EOS ids cannot end a completion early
# ----------------------------------------------------------------------------------------------------------------


def test_min_new_tokens_bans_eos_until_the_minimum_hand_checked():
    # token t -> t + 1 (logit 10), second choice t + 2 (logit 5); EOS = 6
    table = np.zeros((VOCAB, VOCAB), np.float32)
    for t in range(VOCAB):
        table[t, (t + 1) % VOCAB], table[t, (t + 2) % VOCAB] = 10.0, 5.0
    params = {"table": jnp.asarray(table)}
    ids, mask = left_pad([[5], [3], [1]])
    kw = dict(max_new_tokens=6, temperature=0.0, eos_token_id=6, pad_token_id=0)
    free = generate(BigramLM(), params, ids, mask, jax.random.key(0), **kw)
    np.testing.assert_array_equal(np.asarray(free.lengths), [1, 3, 5])  # 5->6; 3->4,5,6; 1->2,3,4,5,6
    out = generate(BigramLM(), params, ids, mask, jax.random.key(0), min_new_tokens=3, **kw)
    # banned at token indices 0-2: 5 -> 7 (second choice) -> 0 -> 1 -> 2 ...; 3 -> 4, 5, 7 (6 banned at index 2);
    # 1 -> 2, 3, 4, 5, 6 (EOS at index 4 >= 3 is allowed)
    np.testing.assert_array_equal(np.asarray(out.tokens), [[7, 0, 1, 2, 3, 4], [4, 5, 7, 0, 1, 2], [2, 3, 4, 5, 6, 0]])
    np.testing.assert_array_equal(np.asarray(out.lengths), [6, 6, 5])
    np.testing.assert_array_equal(np.asarray(out.truncated), [True, True, False])
    # the log-prob of a token picked under the ban is that of the unmodified distribution
    row5 = np_log_softmax(table[5].astype(np.float64))
    assert float(out.logps[0, 0]) == pytest.approx(row5[7], abs=1e-5)
    # sampled at T=1 with min_new_tokens = max_new_tokens: every completion has the full length, no EOS inside
    sampled = generate(BigramLM(), {"table": jnp.zeros((VOCAB, VOCAB))}, ids, mask, jax.random.key(1),
                       max_new_tokens=5, min_new_tokens=5, num_samples=16, eos_token_id=[6, 2], pad_token_id=0)
    assert (np.asarray(sampled.lengths) == 5).all()
    assert not np.isin(np.asarray(sampled.tokens), [6, 2]).any()
    np.testing.assert_allclose(np.asarray(sampled.logps), np.log(1.0 / VOCAB), atol=1e-6)  # unbanned distribution
    with pytest.raises(sampling.SamplingError, match="min_new_tokens"):
        generate(BigramLM(), params, ids, mask, jax.random.key(0), min_new_tokens=7, **kw)


@pytest.mark.torch
@pytest.mark.parametrize("hf_pair", ["llama"], indirect=True)
def test_min_new_tokens_matches_transformers_generate(hf_pair):
    import torch
    import transformers

    _, hf, model, params = hf_pair
    ids, mask = left_pad(HF_PROMPTS)
    free = generate(model, params, ids, mask, jax.random.key(0), max_new_tokens=8, temperature=0.0)
    eos = int(np.asarray(free.tokens)[0, 1])  # a token greedy decoding emits early: the ban changes the output
    kw = dict(max_new_tokens=8, temperature=0.0, eos_token_id=eos, pad_token_id=0)
    out = generate(model, params, ids, mask, jax.random.key(0), min_new_tokens=6, **kw)
    gen_config = transformers.GenerationConfig(do_sample=False, max_new_tokens=8, min_new_tokens=6, eos_token_id=eos,
                                               pad_token_id=0, bos_token_id=None, return_dict_in_generate=True,
                                               output_scores=True)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask, dtype=torch.long), generation_config=gen_config)
    want = ref.sequences[:, ids.shape[1]:].numpy()
    scores = torch.stack(ref.scores, dim=1).float().numpy()  # processed scores: EOS at -inf while banned
    got = np.asarray(out.tokens)
    early = generate(model, params, ids, mask, jax.random.key(0), **kw)
    assert int(early.lengths[0]) == 2 and (np.asarray(out.lengths) >= 6).all()  # the ban changed row 0
    compared = 0
    for b in range(len(HF_PROMPTS)):
        for t in range(want.shape[1]):
            if got[b, t] != want[b, t]:
                finite = np.sort(scores[b, t][np.isfinite(scores[b, t])])[-2:]
                assert finite[1] - finite[0] < 1e-4, f"row {b} diverges at step {t} with a clear argmax"
                break
            compared += 1
            if want[b, t] == eos:
                break
    assert compared >= 0.9 * np.asarray(out.lengths).sum()
