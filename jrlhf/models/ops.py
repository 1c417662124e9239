"""Matmul and attention kernels with hand-written backward passes.

Autodiff of an einsum lets XLA pick operand layouts for the weight gradient, and on CPU it often picks a
transposed-transposed GEMM that runs at a fraction of the plain one's speed. These custom VJPs express every
backward product as a GEMM with at most one transposed operand (``dW = X^T dY``, ``dX = dY W^T``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

_NN = (((1,), (0,)), ((), ()))  # [M, K] x [K, N]
_NT = (((1,), (1,)), ((), ()))  # [M, K] x [N, K]
_TN = (((0,), (0,)), ((), ()))  # [K, M] x [K, N]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x: Array, w: Array, transpose_w: bool, out_dtype) -> Array:
    """``x [M, K] @ w [K, N]`` (or ``@ w.T`` for ``w [N, K]`` when ``transpose_w``) -> ``[M, N]`` out_dtype."""
    return lax.dot_general(x, w, _NT if transpose_w else _NN, preferred_element_type=out_dtype)


def _matmul_fwd(x, w, transpose_w, out_dtype):
    return _matmul(x, w, transpose_w, out_dtype), (x, w)


def _matmul_bwd(transpose_w, out_dtype, residuals, dy):
    x, w = residuals
    dy_x = dy.astype(x.dtype)
    if transpose_w:  # y = x w^T: dx = dy w, dw = dy^T x
        dx = lax.dot_general(dy_x, w, _NN, preferred_element_type=jnp.float32)
        dw = lax.dot_general(dy_x, x, _TN, preferred_element_type=jnp.float32)
    else:  # y = x w: dx = dy w^T, dw = x^T dy
        dx = lax.dot_general(dy_x, w, _NT, preferred_element_type=jnp.float32)
        dw = lax.dot_general(x, dy_x, _TN, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense(x: Array, w: Array, in_dims: int = 1, out_dtype=None) -> Array:
    """Contracts the last ``in_dims`` axes of ``x [..., *in]`` with the first ``in_dims`` axes of
    ``w [*in, *out]`` -> ``[..., *out]`` (``out_dtype`` default ``x.dtype``; accumulation in float32)."""
    lead, contract = x.shape[: x.ndim - in_dims], x.shape[x.ndim - in_dims:]
    if tuple(w.shape[:in_dims]) != tuple(contract):
        raise ValueError(f"dense: x {x.shape} and w {w.shape} do not contract over {in_dims} axes")
    out_shape = w.shape[in_dims:]
    k = 1
    for size in contract:
        k *= size
    y = _matmul(x.reshape(-1, k), w.reshape(k, -1), False, jnp.dtype(out_dtype or x.dtype))
    return y.reshape(*lead, *out_shape)


def dense_transposed(x: Array, w: Array, out_dtype=None) -> Array:
    """``x [..., K] @ w.T`` for ``w [N, K]`` -> ``[..., N]`` (e.g. logits from an embedding ``[V, H]``)."""
    y = _matmul(x.reshape(-1, x.shape[-1]), w, True, jnp.dtype(out_dtype or x.dtype))
    return y.reshape(*x.shape[:-1], w.shape[0])


# ----------------------------------------------------------------------------------------------- attention

_NEG = float(jnp.finfo(jnp.float32).min)


def _scores(q, k, mask, scale):
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * jnp.float32(scale)
    return jnp.where(mask[:, None, None], scores, _NEG)


def _attend(q, k, v, mask, scale):
    scores = _scores(q, k, mask, scale)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    exp = jnp.exp(scores - row_max)
    row_sum = jnp.sum(exp, axis=-1, keepdims=True)
    probs = exp / row_sum
    out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype), (row_max, row_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(q: Array, k: Array, v: Array, mask: Array, scale: float) -> Array:
    """Softmax attention with grouped heads, softmax in float32.

    q ``[B, K, G, T, D]``, k/v ``[B, K, S, D]`` (compute dtype), mask ``[B or 1, T, S]`` bool (True: may attend)
    -> ``[B, K, G, T, D]`` in q's dtype. Rows without any allowed key give the mean of v (finite, never NaN) and
    pass no gradient to masked keys. The backward pass recomputes the probabilities from the saved row
    max and sum, so only ``O(B * heads * T)`` extra floats are kept per layer (never ``[T, S]``).
    """
    return _attend(q, k, v, mask, scale)[0]


def _attention_fwd(q, k, v, mask, scale):
    out, (row_max, row_sum) = _attend(q, k, v, mask, scale)
    return out, (q, k, v, mask, out, row_max, row_sum)


def _attention_bwd(scale, residuals, d_out):
    q, k, v, mask, out, row_max, row_sum = residuals
    B, K, G, T, D = q.shape
    S = k.shape[2]
    dt = q.dtype
    d_out = d_out.astype(dt)
    probs = jnp.exp(_scores(q, k, mask, scale) - row_max) / row_sum
    # (g, t) merged into one row axis: every product is a batched GEMM over (b, k)
    probs_rows = probs.reshape(B, K, G * T, S)
    d_out_rows = d_out.reshape(B, K, G * T, D)
    d_probs = jnp.einsum("bkmd,bksd->bkms", d_out_rows, v, preferred_element_type=jnp.float32)
    dv = jnp.einsum("bkms,bkmd->bksd", probs_rows.astype(dt), d_out_rows, preferred_element_type=jnp.float32)
    # sum_s p * dp == sum_d out * d_out (cheaper: D instead of S terms)
    row_dot = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1).reshape(B, K, G * T, 1)
    d_scores = probs_rows * (d_probs - row_dot)
    mask_rows = jnp.broadcast_to(mask[:, None, None], (mask.shape[0], K, G, T, S)).reshape(-1, K, G * T, S)
    d_scores = (jnp.where(mask_rows, d_scores, 0.0) * jnp.float32(scale)).astype(dt)
    dq = jnp.einsum("bkms,bksd->bkmd", d_scores, k, preferred_element_type=jnp.float32).reshape(B, K, G, T, D)
    dk = jnp.einsum("bkms,bkmd->bksd", d_scores, q.reshape(B, K, G * T, D), preferred_element_type=jnp.float32)
    return dq.astype(dt), dk.astype(k.dtype), dv.astype(v.dtype), None


attention.defvjp(_attention_fwd, _attention_bwd)
