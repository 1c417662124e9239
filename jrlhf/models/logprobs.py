"""Selected-token log-probabilities, optionally in vocabulary chunks so that ``[B, T, V]`` is never materialised."""

from __future__ import annotations

import functools
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


def _tile_rows(idx, count, i, tile, total):
    """Rows of position tile ``i``: ``(rows [tile] to gather, clipped; rows_out [tile], ``total`` past the end for
    the slots beyond ``count`` so that scatters drop them; valid [tile] bool)."""
    rows = lax.dynamic_slice_in_dim(idx, i * tile, tile)
    valid = (i * tile + jnp.arange(tile)) < count
    return rows, jnp.where(valid, rows, total), valid


def _tile_logits(h, weight, rows, inv_temp):
    return dense_transposed(jnp.take(h, rows, axis=0), weight, out_dtype=jnp.float32) * inv_temp


def _positions(where, tile):
    """Flat indices of the ``True`` entries of ``where [M]`` (ascending, padded to a whole number of tiles) and
    their count."""
    total = where.shape[0]
    count = jnp.sum(where.astype(jnp.int32))
    idx = jnp.nonzero(where, size=total, fill_value=0)[0].astype(jnp.int32)
    padded = -(-total // tile) * tile
    return jnp.pad(idx, (0, padded - total)), count


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _selected_logprobs(h, weight, targets, where, tile, temperature):
    return _selected_logprobs_fwd(h, weight, targets, where, tile, temperature)[0]


def _selected_logprobs_fwd(h, weight, targets, where, tile, temperature):
    total = h.shape[0]
    inv_temp = jnp.float32(1.0 / temperature)
    idx, count = _positions(where, tile)

    def body(i, carry):
        out, lse_all = carry
        rows, rows_out, _ = _tile_rows(idx, count, i, tile, total)
        logits = _tile_logits(h, weight, rows, inv_temp)
        top = lax.stop_gradient(jnp.max(logits, axis=-1))
        lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[:, None]), axis=-1))
        picked = jnp.take_along_axis(logits, jnp.take(targets, rows)[:, None], axis=-1)[:, 0]
        out = out.at[rows_out].set(picked - lse, mode="drop")
        return out, lse_all.at[rows_out].set(lse, mode="drop")

    zeros = jnp.zeros((total,), jnp.float32)
    out, lse_all = lax.fori_loop(0, -(-count // tile), body, (zeros, zeros))
    return out, (h, weight, targets, idx, count, lse_all)


def _selected_logprobs_bwd(tile, temperature, residuals, d_out):
    h, weight, targets, idx, count, lse_all = residuals
    total, vocab = h.shape[0], weight.shape[0]
    inv_temp = jnp.float32(1.0 / temperature)

    def body(i, carry):
        d_h, d_w = carry
        rows, rows_out, valid = _tile_rows(idx, count, i, tile, total)
        g = jnp.where(valid, jnp.take(d_out, rows), 0.0)
        probs = jnp.exp(_tile_logits(h, weight, rows, inv_temp) - jnp.take(lse_all, rows)[:, None])
        # d logp[target] / d logits = onehot(target) - softmax, times 1/temperature
        hit = jnp.arange(vocab)[None, :] == jnp.take(targets, rows)[:, None]
        d_logits = (g[:, None] * (jnp.where(hit, 1.0, 0.0) - probs) * inv_temp).astype(h.dtype)
        d_rows = lax.dot_general(d_logits, weight, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        d_h = d_h.at[rows_out].add(d_rows, mode="drop")
        d_w = d_w + lax.dot_general(d_logits, jnp.take(h, rows, axis=0), (((0,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)
        return d_h, d_w

    init = (jnp.zeros(h.shape, jnp.float32), jnp.zeros(weight.shape, jnp.float32))
    d_h, d_w = lax.fori_loop(0, -(-count // tile), body, init)
    return d_h.astype(h.dtype), d_w.astype(weight.dtype), None, None


_selected_logprobs.defvjp(_selected_logprobs_fwd, _selected_logprobs_bwd)


def selected_token_logprobs(hidden: Array, unembedding: Array, targets: Array, where: Array, tile: int = 256,
                            temperature: float = 1.0) -> Array:
    """``log softmax(hidden @ unembedding.T / temperature)[targets]`` at the positions ``where`` marks only.

    hidden ``[B, T, H]`` (any float dtype; matmuls run in it with float32 accumulation), unembedding ``[V, H]``,
    targets ``[B, T]`` int in ``[0, V)``, where ``[B, T]`` bool -> ``[B, T]`` float32, 0.0 where ``where`` is
    False. The marked positions are gathered into tiles of ``tile`` rows and each tile's ``[tile, V]`` float32
    logits are projected, normalised and dropped (a loop whose trip count is ``ceil(count / tile)``, so the work
    follows the number of marked positions, not ``B * T``: a preference loss needs the completion tokens only,
    TRL 1.16's fused LM head likewise projects only labelled positions). The backward pass (hand-written) recomputes
    each tile's logits from the saved per-position log-normaliser, so memory is ``O(tile * V + B * T * H)``.
    Differentiable in ``hidden`` and ``unembedding``.
    """
    if hidden.ndim != 3 or targets.shape != hidden.shape[:2] or where.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [B, T, H] and targets, where [B, T]; got {hidden.shape}, "
                         f"{targets.shape} and {where.shape}")
    if unembedding.ndim != 2 or unembedding.shape[1] != hidden.shape[-1]:
        raise ValueError(f"unembedding must be [V, H={hidden.shape[-1]}], got {unembedding.shape}")
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    B, T, H = hidden.shape
    vocab = unembedding.shape[0]
    flat_targets = jnp.clip(targets.reshape(-1).astype(jnp.int32), 0, vocab - 1)
    out = _selected_logprobs(hidden.reshape(B * T, H), unembedding.astype(hidden.dtype), flat_targets,
                             where.reshape(-1).astype(bool), int(min(tile, B * T)), float(temperature))
    return out.reshape(B, T)


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
