"""Selected-token log-probabilities, optionally in vocabulary chunks so that ``[B, T, V]`` is never materialised."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from jrlhf.models.ops import dense_transposed

Array = jax.Array


def unembedding_matrix(model, params) -> Array:
    """The output projection ``[V, H]`` of an LM-head model (the tied embedding or ``lm_head``)."""
    if model.head not in ("lm", "lm+value"):
        raise ValueError(f"model.head={model.head!r} has no LM head")
    p = params["params"]
    return p["embed"]["embedding"] if model.config.tie_word_embeddings else p["lm_head"]


def logits_from_hidden(hidden: Array, unembedding: Array) -> Array:
    """``hidden [B, T, H]`` (final-normed, e.g. ``model.apply(..., return_hidden=True)`` sliced to the positions
    that need logits) times ``unembedding [V, H]`` transposed -> ``[B, T, V]`` float32 logits, exactly as the model's
    LM head computes them (matmul in the hidden's dtype, float32 accumulation)."""
    return dense_transposed(hidden, unembedding.astype(hidden.dtype), out_dtype=jnp.float32)


def token_logprobs_from_hidden(hidden: Array, unembedding: Array, targets: Array, chunk_size: int = 8192,
                               temperature: float = 1.0) -> Array:
    """``log softmax(hidden @ unembedding.T / temperature)[targets]`` without building ``[B, T, V]``.

    hidden ``[B, T, H]`` (any float dtype; matmuls run in it with float32 accumulation), unembedding ``[V, H]``,
    targets ``[B, T]`` int in ``[0, V)`` -> ``[B, T]`` float32. The normaliser is a running max/log-sum-exp over
    vocabulary chunks of ``chunk_size`` rows (rematerialised in the backward pass, so memory is ``O(B*T*chunk)``);
    the selected logit is a gather of the target rows. Differentiable in ``hidden`` and ``unembedding``.
    """
    if hidden.ndim != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [B, T, H] and targets [B, T]; got {hidden.shape} and {targets.shape}")
    if unembedding.ndim != 2 or unembedding.shape[1] != hidden.shape[-1]:
        raise ValueError(f"unembedding must be [V, H={hidden.shape[-1]}], got {unembedding.shape}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    vocab = unembedding.shape[0]
    chunk = min(int(chunk_size), vocab)
    n_chunks = -(-vocab // chunk)
    weight = unembedding.astype(hidden.dtype)
    inv_temp = jnp.float32(1.0 / temperature)

    @jax.checkpoint
    def body(carry, i):
        running_max, running_sum = carry
        start = i * chunk
        # the last chunk is shifted back to stay in bounds; columns already counted are masked out
        start_clamped = jnp.minimum(start, vocab - chunk)
        w = lax.dynamic_slice_in_dim(weight, start_clamped, chunk, axis=0)
        logits = dense_transposed(hidden, w, out_dtype=jnp.float32) * inv_temp
        fresh = (start_clamped + jnp.arange(chunk)) >= start
        logits = jnp.where(fresh, logits, -jnp.inf)
        new_max = lax.stop_gradient(jnp.maximum(running_max, jnp.max(logits, axis=-1)))
        new_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(
            jnp.exp(logits - new_max[..., None]), axis=-1)
        return (new_max, new_sum), None

    init = (jnp.full(targets.shape, -jnp.inf, jnp.float32), jnp.zeros(targets.shape, jnp.float32))
    (final_max, final_sum), _ = lax.scan(body, init, jnp.arange(n_chunks))
    log_normaliser = final_max + jnp.log(final_sum)
    target_rows = jnp.take(weight, targets, axis=0, mode="clip")
    target_logits = jnp.einsum("bth,bth->bt", hidden.astype(jnp.float32), target_rows.astype(jnp.float32))
    return target_logits * inv_temp - log_normaliser


def token_entropy_from_hidden(hidden: Array, unembedding: Array, chunk_size: int = 8192,
                              temperature: float = 1.0) -> Array:
    """Shannon entropy (nats) of ``softmax(hidden @ unembedding.T / temperature)`` without building ``[B, T, V]``.

    hidden ``[B, T, H]`` (any float dtype; matmuls in it with float32 accumulation), unembedding ``[V, H]`` ->
    ``[B, T]`` float32. One pass over vocabulary chunks of ``chunk_size`` rows keeps, per position, the running max
    ``m``, ``s = sum exp(z - m)`` and ``u = sum exp(z - m) z`` of the scaled logits ``z``; the entropy is
    ``m + log s - u / s`` (= ``logsumexp(z) - sum softmax(z) z``, :func:`jrlhf.losses.entropy_from_logits`).
    Memory ``O(B*T*chunk)``. Carries no gradient (a metric and a token-selection signal, TRL's use of entropies).
    """
    if hidden.ndim != 3:
        raise ValueError(f"hidden must be [B, T, H]; got {hidden.shape}")
    if unembedding.ndim != 2 or unembedding.shape[1] != hidden.shape[-1]:
        raise ValueError(f"unembedding must be [V, H={hidden.shape[-1]}], got {unembedding.shape}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hidden = lax.stop_gradient(hidden)
    vocab = unembedding.shape[0]
    chunk = min(int(chunk_size), vocab)
    n_chunks = -(-vocab // chunk)
    weight = lax.stop_gradient(unembedding).astype(hidden.dtype)
    inv_temp = jnp.float32(1.0 / temperature)

    def body(carry, i):
        running_max, running_sum, running_dot = carry
        start = i * chunk
        start_clamped = jnp.minimum(start, vocab - chunk)
        w = lax.dynamic_slice_in_dim(weight, start_clamped, chunk, axis=0)
        logits = dense_transposed(hidden, w, out_dtype=jnp.float32) * inv_temp
        fresh = (start_clamped + jnp.arange(chunk)) >= start
        new_max = jnp.maximum(running_max, jnp.max(jnp.where(fresh, logits, -jnp.inf), axis=-1))
        scale = jnp.exp(running_max - new_max)
        weights = jnp.where(fresh, jnp.exp(logits - new_max[..., None]), 0.0)
        new_sum = running_sum * scale + jnp.sum(weights, axis=-1)
        new_dot = running_dot * scale + jnp.sum(weights * jnp.where(fresh, logits, 0.0), axis=-1)
        return (new_max, new_sum, new_dot), None

    shape = hidden.shape[:2]
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
    (final_max, final_sum, final_dot), _ = lax.scan(body, init, jnp.arange(n_chunks))
    return final_max + jnp.log(final_sum) - final_dot / final_sum


def token_logprobs_from_logits(logits: Array, targets: Array, temperature: float = 1.0) -> Array:
    """``log_softmax(logits / temperature)`` at ``targets``: logits ``[B, T, V]``, targets ``[B, T]`` -> ``[B, T]``
    float32."""
    logits = logits.astype(jnp.float32) / temperature
    selected = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return selected - jax.nn.logsumexp(logits, axis=-1)


def model_token_logprobs(model, params, input_ids: Array, attention_mask: Optional[Array] = None,
                         positions: Optional[Array] = None, segment_ids: Optional[Array] = None,
                         chunk_size: Optional[int] = None, temperature: float = 1.0):
    """Per-token ``log p(input_ids[:, t] | input_ids[:, :t])`` for ``t >= 1``: ``[B, T - 1]`` float32.

    input_ids / attention_mask / positions / segment_ids ``[B, T]`` as for ``model.apply``. ``chunk_size=None``
    computes full logits; an int uses :func:`token_logprobs_from_hidden` (never materialises ``[B, T, V]``).
    For a ``head="lm+value"`` model returns ``(logprobs [B, T-1], values [B, T])``. Pair the result with
    ``loss_mask[:, 1:]``.
    """
    if model.head not in ("lm", "lm+value"):
        raise ValueError(f"model.head={model.head!r} has no LM head; token log-probs need 'lm' or 'lm+value'")
    targets = input_ids[:, 1:]
    kwargs = dict(attention_mask=attention_mask, positions=positions, segment_ids=segment_ids)
    values = None
    if chunk_size is None:
        out = model.apply(params, input_ids, **kwargs)
        logits, values = out if model.head == "lm+value" else (out, None)
        logprobs = token_logprobs_from_logits(logits[:, :-1], targets, temperature)
    else:
        out = model.apply(params, input_ids, return_hidden=True, **kwargs)
        hidden, values = out if model.head == "lm+value" else (out, None)
        logprobs = token_logprobs_from_hidden(hidden[:, :-1], unembedding_matrix(model, params), targets,
                                              chunk_size, temperature)
    return logprobs if values is None else (logprobs, values)
