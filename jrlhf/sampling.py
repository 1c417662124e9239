"""Compiled autoregressive sampling over the KV cache: prefill once, then a ``lax.while_loop`` decode.

:func:`generate` is the rollout half of the on-policy algorithms. One XLA program per shape does all of it:

1. **Prefill** the (left-)padded prompts ``[B, P]`` once into a KV cache of ``P`` slots; only each row's last
   position is projected onto the vocabulary.
2. **Share** the prefill between the ``n`` samples of each prompt: the cache rows are repeated ``n`` times
   (row ``b * n + i`` is sample ``i`` of prompt ``b``, the contiguous groups GRPO expects) and the cache is
   extended with empty slots for the completion (``P + N - 1`` slots: the last token is never fed back).
3. **Decode** with a ``lax.while_loop`` whose carry holds the cache; every step runs the model on the one new
   token per row, writes its keys/values into the cache and samples the next token. The loop ends as soon as every
   row has produced an end-of-sequence token or a stop sequence, or after ``max_new_tokens``.

The cache is allocated inside the program and threaded through the loop carry, so XLA updates it in place: no
host round trip, no copy per step, nothing for the caller to donate.

Sampling follows the ``transformers`` order: ``logits / temperature``, then top-k, then top-p (nucleus) over what
top-k kept; :func:`filter_logits` is the exact distribution (ties included). ``temperature`` and ``top_p`` are traced, so changing them never recompiles; ``top_k``,
``max_new_tokens``, ``num_samples``, the EOS ids and the stop sequences are static (one compiled program per
setting, kept in a module-level cache). ``temperature == 0`` is greedy argmax. The per-step work avoids sorting the
vocabulary: one uniform per row and a blocked inverse CDF instead of a Gumbel per vocabulary entry, ``lax.top_k``
only when ``top_k > 0`` (for the k-th largest logit), and for top-p a bisection for the nucleus threshold,
skipped by ``lax.cond`` while ``top_p >= 1``.

The returned log-probs are those of the sampled tokens under ``log_softmax(logits / temperature)`` *before*
top-k/top-p filtering (the "old log-probs" of PPO/GRPO); for greedy decoding they are ``log_softmax(logits)``.

Sharding: the program runs on whatever mesh ``params`` live on (read from their ``NamedSharding``s, or passed as
``mesh``). The params enter with their own shardings (nothing is gathered onto one device; the compiler inserts
the same collectives as for a training forward pass), and the batch dimension of the prompts, the KV cache and the
outputs is sharded over the mesh's batch axes (``("data", "fsdp")`` by default) when it divides evenly.
"""

from __future__ import annotations

import collections
import math
import threading
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jrlhf.errors import JrlhfError
from jrlhf.sharding import BATCH_AXES, put_global

Array = jax.Array
try:  # the public alias; kept working should a jax release drop it from jax.core
    from jax.core import Tracer as _Tracer
except ImportError:  # pragma: no cover
    from jax._src.core import Tracer as _Tracer

__all__ = ["SampleOutput", "SamplingError", "generate", "filter_logits"]


class SamplingError(JrlhfError, ValueError):
    """An argument of :func:`generate` is invalid; the message names it and the fix."""


class SampleOutput(NamedTuple):
    """What :func:`generate` returns; row ``b * n + i`` is sample ``i`` of prompt ``b``.

    Attributes:
      tokens: ``[B*n, N]`` int32 completion tokens; ``pad_token_id`` after the end.
      mask: ``[B*n, N]`` int32, 1 for generated tokens (the EOS token / the stop sequence included), 0 after.
      logps: ``[B*n, N]`` float32 log-prob of each sampled token under ``log_softmax(logits / temperature)``
        before top-k/top-p filtering (``log_softmax(logits)`` when greedy); 0 where ``mask`` is 0.
      truncated: ``[B*n]`` bool, True when the row produced no EOS token / stop sequence within ``N`` tokens.
      lengths: ``[B*n]`` int32 number of generated tokens (``mask.sum(-1)``).
    """

    tokens: Array
    mask: Array
    logps: Array
    truncated: Array
    lengths: Array


# ----------------------------------------------------------------------------------------------------------------
# Token selection
# ----------------------------------------------------------------------------------------------------------------


def filter_logits(logits: Array, *, top_k: int = 0, top_p: float | Array = 1.0) -> Array:
    """The distribution :func:`generate` samples from: top-k then top-p (nucleus) filtering of ``[..., V]`` float
    logits (pass ``logits / temperature``); dropped tokens get ``-inf``, kept ones keep their logit.

    * top-k (``top_k > 0``): keep every token whose logit is at least the ``top_k``-th largest, so tokens tied with
      it are all kept (``transformers``' ``TopKLogitsWarper``).
    * top-p (``top_p < 1``), over what top-k kept, with the probabilities of those logits: rank the tokens by
      probability; a token is kept when the mass of the tokens ranked above it is below ``top_p`` (the most likely
      token is always kept), then every token exactly as likely as a kept one is kept too, so the nucleus does not
      depend on the order of tied tokens. Without ties this is ``transformers``' ``TopPLogitsWarper`` (which, on a
      tie at the nucleus boundary, keeps tied tokens by its sort order).

    This reference sorts the vocabulary; the sampler uses sort-free equivalents (a threshold for top-k, a bisection
    for the nucleus threshold) that give the same set. ``top_k == 0`` and ``top_p >= 1`` disable each filter.
    """
    logits = jnp.asarray(logits, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = lax.top_k(logits, int(top_k))[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    ranked = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_above < top_p) | (top_p >= 1.0)
    threshold = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def _nucleus_unsorted(weights: Array, top_p: Array) -> Array:
    """Zeroes the weights ``[R, V]`` (unnormalised probabilities >= 0, any order) outside the top-p nucleus.

    The nucleus is every token at least as likely as the threshold ``w*``: the largest weight whose "mass of the
    tokens >= w*" still reaches ``top_p`` of the total. Non-negative float32 values order like their int32 bit
    patterns, so a 31-step bisection over those bit patterns finds ``w*`` exactly, with ``O(V)`` work per step
    instead of sorting the vocabulary (which XLA:CPU does slowly).
    """
    bits = lax.bitcast_convert_type(weights, jnp.int32)
    target = top_p * jnp.sum(weights, axis=-1)

    def bisect(_, bounds):
        low, high = bounds  # mass(>= low) >= target > mass(>= high)
        mid = low + (high - low) // 2
        reaches = jnp.sum(jnp.where(bits >= mid[:, None], weights, 0.0), axis=-1) >= target
        return jnp.where(reaches, mid, low), jnp.where(reaches, high, mid)

    rows = weights.shape[0]
    low, _ = lax.fori_loop(0, 31, bisect, (jnp.zeros((rows,), jnp.int32), jnp.max(bits, axis=-1) + 1))
    return jnp.where(bits >= low[:, None], weights, 0.0)


def _inverse_cdf(weights: Array, uniform: Array) -> Array:
    """Draws index ``j`` of each row of ``weights [R, K]`` (>= 0) with probability ``w_j / sum(w)``: ``[R]`` int32.

    One uniform ``u`` in ``(0, 1)`` per row instead of one Gumbel per vocabulary entry (random bits are the
    costly part on CPU): the draw is the first index whose cumulative weight reaches ``u * total``. The cumulative
    sum is blocked (block totals, then one block's entries), as XLA:CPU's ``cumsum`` over a large vocabulary is
    slow. A zero-weight entry is never drawn: the chosen block and entry always add positive weight.
    """
    rows, size = weights.shape
    block = min(size, 1 << max(4, math.ceil(math.log2(math.sqrt(size)))))
    num_blocks = -(-size // block)
    if num_blocks * block != size:
        weights = jnp.pad(weights, ((0, 0), (0, num_blocks * block - size)))
    blocks = weights.reshape(rows, num_blocks, block)
    block_cum = jnp.cumsum(jnp.sum(blocks, axis=-1), axis=-1)  # [R, num_blocks]
    target = uniform * block_cum[:, -1]
    chosen = jnp.minimum(jnp.sum((block_cum < target[:, None]).astype(jnp.int32), axis=-1), num_blocks - 1)
    before = jnp.concatenate([jnp.zeros((rows, 1), block_cum.dtype), block_cum[:, :-1]], axis=-1)
    inner_cum = jnp.cumsum(jnp.take_along_axis(blocks, chosen[:, None, None], axis=1)[:, 0], axis=-1)
    # Rest of the target inside the chosen block: > 0 (the block is the first whose cumulative reaches it), and
    # clipped to the block's own total against rounding, so the entry found has positive weight.
    rest = jnp.minimum(target - jnp.take_along_axis(before, chosen[:, None], axis=-1)[:, 0], inner_cum[:, -1])
    entry = jnp.sum((inner_cum < rest[:, None]).astype(jnp.int32), axis=-1)
    return jnp.minimum(chosen * block + entry, size - 1)


def _argmax(logits: Array) -> Array:
    """``argmax(logits, -1)`` (first maximum) as two plain reductions: ``[R, V]`` -> ``[R]`` int32.

    XLA:CPU lowers ``jnp.argmax`` to a variadic (value, index) reduction that does not vectorise; a max followed
    by a min over the matching indices is several times faster on a large vocabulary.
    """
    top = jnp.max(logits, axis=-1, keepdims=True)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(logits == top, index, logits.shape[-1] - 1), axis=-1)


def _token_logp(logits: Array, token: Array) -> Array:
    """``log_softmax(logits)[token]`` for ``[R, V]`` logits and ``[R]`` tokens, without the full log-softmax."""
    picked = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _select_tokens(
    logits: Array, key: Array, temperature: Array, top_p: Array, *, top_k: int, banned: Array | None = None
) -> tuple[Array, Array]:
    """Picks the next token of each row and its pre-filter log-prob.

    Args:
      logits: ``[R, V]`` float32 next-token logits.
      key: PRNG key for this step.
      temperature: ``[]`` float32; 0 selects greedy argmax.
      top_p: ``[]`` float32 nucleus mass (>= 1 disables).
      top_k: static number of candidates (0 = all).
      banned: optional ``[V]`` bool of tokens that cannot be picked (``min_new_tokens``' EOS ids, removed before
        top-k/top-p as ``transformers``' ``MinNewTokensLengthLogitsProcessor`` runs before the warpers); the
        returned log-prob stays that of the unfiltered distribution.

    Returns:
      ``(tokens [R] int32, logps [R] float32)``: logps under ``log_softmax(logits / temperature)`` before
      filtering (``log_softmax(logits)`` when greedy).
    """
    rows, vocab = logits.shape

    def greedy(_):
        token = _argmax(logits if banned is None else jnp.where(banned[None, :], -jnp.inf, logits))
        return token, _token_logp(logits, token)

    def sample(_):
        scaled = logits / temperature
        top = jnp.max(scaled, axis=-1, keepdims=True)
        tiny = jnp.finfo(jnp.float32).tiny
        uniform = jax.random.uniform(key, (rows,), jnp.float32, minval=tiny, maxval=1.0)
        weights = jnp.exp(scaled - top)
        log_total = jnp.log(jnp.sum(weights, axis=-1))
        candidates = scaled
        if banned is not None:
            weights = jnp.where(banned[None, :], 0.0, weights)
            candidates = jnp.where(banned[None, :], -jnp.inf, scaled)
        if 0 < top_k < vocab:  # every token at least as likely as the k-th (ties kept, as filter_logits)
            kth = lax.top_k(candidates, top_k)[0][:, -1:]
            weights = jnp.where(candidates >= kth, weights, 0.0)
        weights = lax.cond(top_p < 1.0, _nucleus_unsorted, lambda w, _: w, weights, top_p)
        token = _inverse_cdf(weights, uniform)
        token = token.astype(jnp.int32)
        picked = jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0]
        return token, picked - top[:, 0] - log_total

    return lax.cond(temperature > 0, sample, greedy, None)


# ----------------------------------------------------------------------------------------------------------------
# Sharding helpers
# ----------------------------------------------------------------------------------------------------------------


def _mesh_of(params: Any) -> jax.sharding.Mesh | None:
    """The mesh of the first ``NamedSharding``-placed leaf of ``params``, or None (single device / traced)."""
    for leaf in jax.tree_util.tree_leaves(params):
        sharding = getattr(leaf, "sharding", None) if not isinstance(leaf, _Tracer) else None
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


class _BatchSharder:
    """Constrains the batch dimension of arrays to the mesh's batch axes when it divides evenly."""

    def __init__(self, mesh: jax.sharding.Mesh | None, batch_axes: tuple[str, ...]):
        self.mesh = mesh
        self.axes = tuple(a for a in batch_axes if mesh is not None and a in mesh.axis_names)
        self.size = math.prod(mesh.shape[a] for a in self.axes) if self.axes else 1

    def spec(self, ndim: int, batch_dim: int, batch_size: int, rest=P.UNCONSTRAINED) -> P | None:
        if self.mesh is None or not self.axes or self.size == 1 or batch_size % self.size:
            return None
        parts = [rest] * ndim
        parts[batch_dim] = self.axes if len(self.axes) > 1 else self.axes[0]
        return P(*parts)

    def constrain(self, x: Array, batch_dim: int = 0) -> Array:
        spec = self.spec(x.ndim, batch_dim, x.shape[batch_dim])
        if spec is None:
            return x
        return lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def place(self, x: Any, batch_dim: int | None = 0) -> Any:
        """Host-side: puts ``x`` on the mesh, batch-sharded (or replicated when it does not divide)."""
        if self.mesh is None or isinstance(x, _Tracer):
            return x
        if not isinstance(x, jax.Array):
            x = jnp.asarray(x)
        spec = None
        if batch_dim is not None and x.ndim:
            spec = self.spec(x.ndim, batch_dim, x.shape[batch_dim], rest=None)
        return put_global(x, NamedSharding(self.mesh, spec if spec is not None else P()))


# ----------------------------------------------------------------------------------------------------------------
# The compiled program
# ----------------------------------------------------------------------------------------------------------------


class _Static(NamedTuple):
    """Everything the compiled program is specialised on besides array shapes/dtypes/shardings."""

    max_new_tokens: int
    num_samples: int
    top_k: int
    min_new_tokens: int
    eos_ids: tuple[int, ...]
    pad_token_id: int
    stop_sequences: tuple[tuple[int, ...], ...]
    cache_dtype: Any
    batch_axes: tuple[str, ...]


def _init_cache(model: Any, batch_size: int, max_length: int, dtype: Any):
    from jrlhf import models

    config = getattr(model, "config", None)
    if config is None:
        raise SamplingError(
            f"model: {type(model).__name__} has no `config` attribute; pass a model built by "
            "jrlhf.models.init_model or jrlhf.models.from_pretrained."
        )
    return models.init_cache(config, batch_size, max_length, dtype=dtype)


def _first(output: Any) -> Array:
    """The LM output of ``model.apply`` (an ``"lm+value"`` model returns ``(logits, values)``)."""
    return output[0] if isinstance(output, tuple) else output


def _output_projection(model: Any, params: Any) -> Array | None:
    """``[H, V]`` output projection of a jrlhf causal LM, transposed once per call; None for other models.

    Projecting the last hidden state with it is the model's own LM head (same weights, compute dtype, float32
    accumulation); holding it as ``[H, V]`` makes every decode step's ``[R, H] x [H, V]`` matmul a plain,
    contiguous one instead of a contraction over the minor dimension of ``[V, H]`` (about 2x faster on CPU).
    """
    from jrlhf import models

    if not isinstance(model, models.CausalLM):
        return None
    return models.unembedding_matrix(model, params).astype(model.config.dtype).T


def _next_logits(
    model: Any, params: Any, ids: Array, mask: Array, cache: Any, last: Array | None, projection: Array | None
) -> tuple[Array, Any]:
    """Runs ``ids [R, T]`` through the model into ``cache``; returns the logits ``[R, V]`` f32 at column ``last``.

    ``last [R]`` int picks each row's column (None: the last column). With ``projection`` only that column is
    projected onto the vocabulary (a prompt's ``[B, P, V]`` logits would cost ``P`` decode steps' output layer).
    """

    def pick(x):
        if last is None:
            return x[:, -1]
        return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]

    if projection is not None:
        hidden, cache = model.apply(params, ids, mask, cache=cache, return_hidden=True)
        hidden = pick(_first(hidden))
        logits = jnp.einsum("bh,hv->bv", hidden, projection, preferred_element_type=jnp.float32)
        return logits, cache
    logits, cache = model.apply(params, ids, mask, cache=cache)
    return pick(_first(logits)).astype(jnp.float32), cache


def _build(model: Any, static: _Static, mesh: jax.sharding.Mesh | None):
    """Returns the jitted ``(params, prompt_ids, prompt_mask, rng, temperature, top_p) -> SampleOutput``."""
    n = static.num_samples
    steps = static.max_new_tokens
    sharder = _BatchSharder(mesh, static.batch_axes)
    eos = np.asarray(static.eos_ids, np.int32)
    stops = static.stop_sequences
    can_stop = bool(static.eos_ids) or bool(stops)
    window = max((len(s) for s in stops), default=0)
    ban_eos = static.min_new_tokens > 0 and bool(static.eos_ids)

    def banned_at(step):
        """``[V]`` bool: the EOS ids while fewer than ``min_new_tokens`` tokens were generated (None: no ban)."""
        if not ban_eos:
            return None
        vocab = model.config.vocab_size
        is_eos = jnp.zeros((vocab,), bool).at[jnp.asarray(eos)].set(True)
        return is_eos & (step < static.min_new_tokens)
    if stops:
        # Right-aligned stop sequences; -1 marks the "any token" slots left of shorter sequences.
        stop_table = np.full((len(stops), window), -1, np.int32)
        for j, seq in enumerate(stops):
            stop_table[j, window - len(seq) :] = seq

    def constrain_cache(cache):
        return cache._replace(
            k=sharder.constrain(cache.k, 1), v=sharder.constrain(cache.v, 1), mask=sharder.constrain(cache.mask, 0)
        )

    def run(params, prompt_ids, prompt_mask, rng, temperature, top_p):
        batch, prompt_len = prompt_ids.shape
        rows = batch * n
        prompt_ids = sharder.constrain(prompt_ids.astype(jnp.int32))
        prompt_mask = sharder.constrain(prompt_mask.astype(jnp.int32))

        # 1. Prefill the B prompts once into a cache of exactly P slots.
        cache = constrain_cache(_init_cache(model, batch, prompt_len, static.cache_dtype))
        projection = _output_projection(model, params)
        # Next-token logits sit at each row's last real token (the last column when left-padded).
        last = jnp.max(jnp.where(prompt_mask > 0, jnp.arange(prompt_len), 0), axis=-1)
        next_logits, cache = _next_logits(model, params, prompt_ids, prompt_mask, cache, last, projection)

        # 2. Share it: row b*n+i <- prompt b; append empty slots for the completion (never the last token).
        extra = steps - 1

        def widen(x, axis):
            x = jnp.repeat(x, n, axis=axis) if n > 1 else x
            pad = [(0, 0)] * x.ndim
            pad[axis + 1] = (0, extra)
            return jnp.pad(x, pad) if extra else x

        cache = constrain_cache(
            cache._replace(k=widen(cache.k, 1), v=widen(cache.v, 1), mask=widen(cache.mask, 0))
        )
        next_logits = sharder.constrain(jnp.repeat(next_logits, n, axis=0) if n > 1 else next_logits)

        def emit(step, token, logp, state):
            """Writes the step's token into the outputs and updates which rows are finished."""
            tokens, logps, done, lengths, recent = state
            live = ~done
            tokens = lax.dynamic_update_slice(
                tokens, jnp.where(live, token, static.pad_token_id)[:, None], (0, step)
            )
            logps = lax.dynamic_update_slice(logps, jnp.where(live, logp, 0.0)[:, None], (0, step))
            lengths = lengths + live.astype(jnp.int32)
            finished = jnp.zeros_like(done)
            if eos.size:
                finished = jnp.any(token[:, None] == eos[None, :], axis=-1)
            if stops:
                recent = jnp.concatenate([recent[:, 1:], token[:, None]], axis=1)
                match = (recent[:, None, :] == stop_table[None]) | (stop_table[None] < 0)
                finished = finished | jnp.any(jnp.all(match, axis=-1), axis=-1)
            done = done | finished
            return tokens, logps, done, lengths, recent

        state = (
            sharder.constrain(jnp.full((rows, steps), static.pad_token_id, jnp.int32)),
            sharder.constrain(jnp.zeros((rows, steps), jnp.float32)),
            sharder.constrain(jnp.zeros((rows,), bool)),
            sharder.constrain(jnp.zeros((rows,), jnp.int32)),
            sharder.constrain(jnp.full((rows, window), -1, jnp.int32)),
        )
        token, logp = _select_tokens(next_logits, jax.random.fold_in(rng, 0), temperature, top_p, top_k=static.top_k,
                                     banned=banned_at(0))
        state = emit(0, token, logp, state)

        # 3. Decode: one model call on one token per row per step, over the cache held in the loop carry.
        def cond(carry):
            step, _, _, state = carry
            more = step < steps
            return (more & ~jnp.all(state[2])) if can_stop else more

        def body(carry):
            step, cache, token, state = carry
            logits, cache = _next_logits(
                model, params, token[:, None], jnp.ones((rows, 1), jnp.int32), cache, None, projection
            )
            cache = constrain_cache(cache)
            token, logp = _select_tokens(
                logits,
                jax.random.fold_in(rng, step),
                temperature,
                top_p,
                top_k=static.top_k,
                banned=banned_at(step),
            )
            return step + 1, cache, token, emit(step, token, logp, state)

        if steps > 1:
            _, _, _, state = lax.while_loop(cond, body, (jnp.int32(1), cache, token, state))
        tokens, logps, done, lengths, _ = state
        mask = (jnp.arange(steps)[None, :] < lengths[:, None]).astype(jnp.int32)
        return SampleOutput(tokens=tokens, mask=mask, logps=logps, truncated=~done, lengths=lengths)

    return jax.jit(run)


_COMPILED: collections.OrderedDict = collections.OrderedDict()
_COMPILED_MAX = 64
_COMPILED_LOCK = threading.Lock()


def _compiled(model: Any, static: _Static, mesh: jax.sharding.Mesh | None):
    """The jitted program for (model, static settings, mesh), built once and kept (LRU of 64)."""
    try:
        key = (model, static, mesh)
        hash(key)
    except TypeError:  # an unhashable model config: key on identity, keeping the model alive in the entry.
        key = (id(model), static, mesh)
    with _COMPILED_LOCK:
        entry = _COMPILED.get(key)
        if entry is None:
            entry = (model, _build(model, static, mesh))
            _COMPILED[key] = entry
            while len(_COMPILED) > _COMPILED_MAX:
                _COMPILED.popitem(last=False)
        else:
            _COMPILED.move_to_end(key)
        return entry[1]


# ----------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------


def _as_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SamplingError(f"{name}: expected an int >= {minimum}, got {value!r}.")
    return int(value)


def _eos_tuple(eos_token_id: Any) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    ids = [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else list(eos_token_id)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
            raise SamplingError(
                f"eos_token_id: expected None, a token id >= 0 or a list of them, got {eos_token_id!r}."
            )
    return tuple(sorted({int(i) for i in ids}))


def _stop_tuple(stop_sequences: Any) -> tuple[tuple[int, ...], ...]:
    if not stop_sequences:
        return ()
    out = []
    for seq in stop_sequences:
        if isinstance(seq, str) or not hasattr(seq, "__iter__"):
            raise SamplingError(
                f"stop_sequences: expected a list of token-id lists (tokenise stop strings first), got {seq!r}."
            )
        seq = tuple(seq)
        if not seq or any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0 for t in seq):
            raise SamplingError(f"stop_sequences: each entry must be a non-empty list of token ids >= 0, got {seq!r}.")
        out.append(tuple(int(t) for t in seq))
    return tuple(dict.fromkeys(out))


def _check_scalar(name: str, value: Any, low: float, high: float, low_open: bool) -> Any:
    """Validates a Python/numpy number; traced or device values pass through unchecked (no host sync)."""
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        v = float(value)
        bad = not math.isfinite(v) or v > high or (v <= low if low_open else v < low)
        if bad:
            interval = f"{'(' if low_open else '['}{low}, {high}]"
            raise SamplingError(f"{name}: expected a value in {interval}, got {value!r}.")
    return jnp.asarray(value, jnp.float32)


def generate(
    model: Any,
    params: Any,
    prompt_ids: Any,
    prompt_mask: Any,
    rng: Array,
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    min_new_tokens: int = 0,
    temperature: float | Array = 1.0,
    top_k: int = 0,
    top_p: float | Array = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    stop_sequences: Sequence[Sequence[int]] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    batch_axes: Sequence[str] = BATCH_AXES,
    cache_dtype: Any = None,
) -> SampleOutput:
    """Samples ``num_samples`` completions of up to ``max_new_tokens`` tokens for each prompt, in one program.

    Args:
      model: a jrlhf causal LM (``model.apply(params, ids, mask, cache=cache) -> (logits, cache)``, ``model.config``).
      params: its parameters, placed however training placed them (sharded params stay sharded).
      prompt_ids: ``[B, P]`` int token ids, left-padded (right padding works too: the next-token logits are read
        at each row's last real token).
      prompt_mask: ``[B, P]`` int/bool, 1 for real prompt tokens, 0 for padding; every row needs a real token.
      rng: a PRNG key. The same key (and arguments) gives the same output.
      max_new_tokens: static ``N`` >= 1, the completion length of the outputs.
      num_samples: static ``n`` >= 1 completions per prompt; row ``b * n + i`` is sample ``i`` of prompt ``b``.
      min_new_tokens: static, 0 <= ``min_new_tokens`` <= ``max_new_tokens``: the ``eos_token_id`` ids cannot be
        sampled before this many tokens were generated (``transformers``' ``min_new_tokens``: their logits are
        ``-inf`` before top-k/top-p); ``min_new_tokens = max_new_tokens`` gives fixed-length completions.
        ``stop_sequences`` still end a completion early. ``logps`` stay those of the unmodified distribution.
      temperature: traced float >= 0; 0 is greedy argmax.
      top_k: static int >= 0; keep the ``top_k`` most likely tokens (0 = off).
      top_p: traced float in (0, 1]; nucleus sampling over what top-k kept (1 = off).
      eos_token_id: None (run to ``max_new_tokens``), a token id, or a list of ids ending a completion (as
        ``transformers.generate`` stops at every id of a generation config's list; a checkpoint's full set is
        :func:`jrlhf.models.checkpoint.eos_token_ids`).
      pad_token_id: the token written after a completion's end.
      stop_sequences: optional list of token-id lists; a completion ends once its generated tokens end with one of
        them (the stop sequence is kept and masked in, like EOS).
      mesh: the mesh to run on; defaults to the mesh of ``params``' ``NamedSharding``s (None: no constraints).
      batch_axes: mesh axes the batch dimension is sharded over (those missing from the mesh are ignored).
      cache_dtype: KV cache dtype (default: the model's).

    Returns:
      :class:`SampleOutput` with ``tokens``/``mask``/``logps`` ``[B*n, N]`` and ``truncated``/``lengths``
      ``[B*n]``. Nothing is read back to the host: the call returns as soon as the program is dispatched.
    """
    max_new_tokens = _as_int("max_new_tokens", max_new_tokens, 1)
    num_samples = _as_int("num_samples", num_samples, 1)
    min_new_tokens = _as_int("min_new_tokens", min_new_tokens, 0)
    if min_new_tokens > max_new_tokens:
        raise SamplingError(f"min_new_tokens: {min_new_tokens} exceeds max_new_tokens={max_new_tokens}; use at most "
                            "max_new_tokens (equal gives fixed-length completions).")
    top_k = _as_int("top_k", top_k, 0)
    pad_token_id = _as_int("pad_token_id", pad_token_id, 0)
    temperature = _check_scalar("temperature", temperature, 0.0, math.inf, low_open=False)
    top_p = _check_scalar("top_p", top_p, 0.0, 1.0, low_open=True)
    ids_shape, mask_shape = np.shape(prompt_ids), np.shape(prompt_mask)
    if len(ids_shape) != 2 or ids_shape[1] < 1:
        raise SamplingError(f"prompt_ids: expected shape [batch, prompt_len] with prompt_len >= 1, got {ids_shape}.")
    if tuple(mask_shape) != tuple(ids_shape):
        raise SamplingError(f"prompt_mask: shape {mask_shape} must equal prompt_ids' shape {ids_shape}.")
    # Host data becomes int32 here, so that int64 numpy prompts and int32 device prompts share one program.
    if not isinstance(prompt_ids, jax.Array):
        prompt_ids = np.asarray(prompt_ids, np.int32)
    if not isinstance(prompt_mask, jax.Array):
        prompt_mask = np.asarray(prompt_mask, np.int32)
    if not isinstance(prompt_mask, _Tracer) and (
        not isinstance(prompt_mask, jax.Array) or prompt_mask.is_fully_addressable
    ):
        empty = np.flatnonzero(~np.asarray(prompt_mask).astype(bool).any(-1))
        if empty.size:
            raise SamplingError(
                f"prompt_mask: rows {empty[:8].tolist()} have no real token; every prompt needs at least one "
                "(e.g. a BOS token)."
            )
    eos_ids = _eos_tuple(eos_token_id)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and any(i >= vocab for i in eos_ids):
        raise SamplingError(f"eos_token_id: {eos_token_id!r} is outside the model's vocabulary of {vocab} tokens.")

    if mesh is None:
        mesh = _mesh_of(params)
    static = _Static(
        max_new_tokens=max_new_tokens,
        num_samples=num_samples,
        top_k=top_k,
        min_new_tokens=min_new_tokens,
        eos_ids=eos_ids,
        pad_token_id=pad_token_id,
        stop_sequences=_stop_tuple(stop_sequences),
        cache_dtype=None if cache_dtype is None else jnp.dtype(cache_dtype),
        batch_axes=tuple(batch_axes),
    )
    fn = _compiled(model, static, mesh)
    sharder = _BatchSharder(mesh, static.batch_axes)
    return fn(
        params,
        sharder.place(prompt_ids),
        sharder.place(prompt_mask),
        sharder.place(rng, None),
        sharder.place(temperature, None),
        sharder.place(top_p, None),
    )
