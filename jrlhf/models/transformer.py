"""One Flax linen decoder for every supported family (switches: see ``jrlhf.models.config``), with LM / value /
score heads and an explicit KV cache.

Parameter layout (``params["params"]``), layers stacked on a leading ``L`` axis by ``nn.scan``::

    embed/embedding        [V, H]          ("vocab", "embed")
    pos_embed              [P, H]          (None, "embed")              learned positions (GPT-2) only
    layers/attn_norm/scale [L, H]          ("layers", "norm")           (+ bias for LayerNorm)
    layers/post_attn_norm/scale [L, H]     ("layers", "norm")           sandwich_norm only (Gemma 3)
    layers/attn/q_norm/scale, k_norm/scale [L, D]  ("layers", "norm")   qk_norm only (Qwen3, Gemma 3)
    layers/attn/wq         [L, H, N, D]    ("layers", "embed", "heads", "head_dim")     (+ bq [L, N, D])
    layers/attn/wk, wv     [L, H, K, D]    ("layers", "embed", "kv_heads", "head_dim")  (+ bk, bv [L, K, D])
    layers/attn/wo         [L, N, D, H]    ("layers", "heads", "head_dim", "embed")     (+ bo [L, H])
    layers/mlp_norm/scale  [L, H]
    layers/post_mlp_norm/scale [L, H]                                   sandwich_norm only (Gemma 3)
    layers/mlp/w_gate,w_up [L, H, F]       ("layers", "embed", "mlp")   (w_gate only for the gated MLP)
    layers/mlp/w_down      [L, F, H]       ("layers", "mlp", "embed")   (+ biases b_gate, b_up [L, F], b_down [L, H])
    final_norm/scale       [H]
    lm_head                [V, H]          ("vocab", "embed")           untied embeddings only
    score                  [H, 1]          ("embed", None)              value / score heads
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jrlhf.models.config import HEADS, ModelConfig
from jrlhf.models.logprobs import logits_from_hidden
from jrlhf.models.lora import adapter_delta, kernel_targeted
from jrlhf.models.ops import attention, dense

Array = jax.Array
_NEG = float(np.finfo(np.float32).min)


class KVCache(NamedTuple):
    """Preallocated key/value cache for incremental decoding (a plain pytree: donatable and shardable).

    k, v:  ``[L, B, S, K, D]`` in the compute dtype; mask: ``[B, S]`` int32, 1 where the slot holds a real token;
    index: ``[]`` int32, the next slot to write (the same for every row).
    """

    k: Array
    v: Array
    mask: Array
    index: Array


def init_cache(config: ModelConfig, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
    """An empty cache of ``max_length`` slots: k/v ``[L, B, S, K, D]`` zeros (``dtype`` default: compute dtype),
    mask ``[B, S]`` int32 zeros, index 0."""
    dtype = config.dtype if dtype is None else dtype
    shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   mask=jnp.zeros((batch_size, max_length), jnp.int32), index=jnp.zeros((), jnp.int32))


def _activation(name: str):
    return {
        "silu": jax.nn.silu,
        "gelu": functools.partial(jax.nn.gelu, approximate=False),
        "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
        "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
        "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
        "relu": jax.nn.relu,
    }[name]


_ZERO_INIT = frozenset({"bias", "bq", "bk", "bv", "bo", "b_up", "b_gate", "b_down"})


def init_kind(name: str, config: Optional[ModelConfig] = None) -> str:
    """How the parameter called ``name`` is initialised: "ones" (norm scales), "zeros" (biases, and norm scales
    of a ``config`` with ``norm_offset`` 1, whose effective scale ``1 + w`` then starts at one, as transformers
    initialises Gemma) or "normal" (``N(0, initializer_range^2)``: every kernel and embedding)."""
    if name == "scale":
        return "zeros" if config is not None and config.norm_offset == 1.0 else "ones"
    return "zeros" if name in _ZERO_INIT else "normal"


def _param(module: nn.Module, name: str, shape, axes):
    c = module.config
    init = {"ones": nn.initializers.ones, "zeros": nn.initializers.zeros,
            "normal": nn.initializers.normal(c.initializer_range)}[init_kind(name, c)]
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, c.param_dtype)


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last axis (``size``, default ``hidden_size``), computed in float32; returns the
    compute dtype. RMSNorm multiplies by ``norm_offset + scale`` (Gemma's ``1 + w`` with ``norm_offset=1``)."""

    config: ModelConfig
    size: Optional[int] = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        scale = _param(self, "scale", (self.size or c.hidden_size,), ("norm",))
        x32 = x.astype(jnp.float32)
        if c.norm == "layer":
            bias = _param(self, "bias", (c.hidden_size,), ("norm",))
            centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
            y = centred * lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + c.norm_eps)
            y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        else:
            y = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + c.norm_eps)
            y = y * (scale.astype(jnp.float32) + jnp.float32(c.norm_offset))
        return y.astype(c.dtype)


class Embed(nn.Module):
    """Token embedding ``[V, H]``; ``attend`` gives tied-embedding logits."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.embedding = _param(self, "embedding", (c.vocab_size, c.hidden_size), ("vocab", "embed"))

    def __call__(self, ids: Array) -> Array:
        # Out-of-range ids (e.g. a pad id beyond the vocabulary) are clipped rather than turned into NaNs that
        # would leak into real tokens through the attention matmul.
        x = jnp.take(self.embedding, ids, axis=0, mode="clip").astype(self.config.dtype)
        if self.config.embed_scale:  # sqrt(H) rounded to the compute dtype, as transformers rounds it
            x = x * jnp.asarray(np.sqrt(self.config.hidden_size), self.config.dtype)
        return x

    def attend(self, hidden: Array) -> Array:
        return logits_from_hidden(hidden, self.embedding)


def _apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates ``x [B, heads, T, D]`` by the half-split (HF "rotate_half") convention; cos/sin ``[B, T, D/2]``
    float32."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    cos, sin = cos[:, None], sin[:, None]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with rotary positions and an optional KV cache.

    Activations are heads-major (``q [B, N, T, D]``, ``k, v [B, K, S, D]``) so that the score and value matmuls
    are plain batched GEMMs; query head ``n`` reads kv head ``n // (N / K)`` as in transformers.
    """

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, shared: dict, layer_inputs: dict, cache_kv):
        c = self.config
        H, N, K, D = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        B, T = x.shape[:2]
        G = N // K
        wq = _param(self, "wq", (H, N, D), ("embed", "heads", "head_dim"))
        wk = _param(self, "wk", (H, K, D), ("embed", "kv_heads", "head_dim"))
        wv = _param(self, "wv", (H, K, D), ("embed", "kv_heads", "head_dim"))
        wo = _param(self, "wo", (N, D, H), ("heads", "head_dim", "embed"))
        dt = c.dtype
        q = dense(x, wq.astype(dt))  # [B, T, N, D]
        k = dense(x, wk.astype(dt))
        v = dense(x, wv.astype(dt))
        for kernel, heads in (("wq", N), ("wk", K), ("wv", K)):
            if kernel_targeted(c, kernel):  # LoRA: + s * (x A) B
                delta = adapter_delta(self, kernel, x, (H,), (heads, D), ("embed",),
                                      ("heads" if kernel == "wq" else "kv_heads", "head_dim"), self.deterministic)
                if kernel == "wq":
                    q = q + delta
                elif kernel == "wk":
                    k = k + delta
                else:
                    v = v + delta
        if c.qkv_bias:
            q = q + _param(self, "bq", (N, D), ("heads", "head_dim")).astype(dt)
            k = k + _param(self, "bk", (K, D), ("kv_heads", "head_dim")).astype(dt)
            v = v + _param(self, "bv", (K, D), ("kv_heads", "head_dim")).astype(dt)
        if c.qk_norm:  # per-head RMSNorm over D, before the rotation
            q = Norm(c, D, name="q_norm")(q)
            k = Norm(c, D, name="k_norm")(k)
        q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # heads-major
        if c.positions == "rope":
            cos, sin = shared["cos"], shared["sin"]
            if "cos_local" in shared:  # sliding-window layers rotate with their own base
                cos = jnp.where(layer_inputs["window"], shared["cos_local"], cos)
                sin = jnp.where(layer_inputs["window"], shared["sin_local"], sin)
            q = _apply_rope(q, cos, sin)
            k = _apply_rope(k, cos, sin)

        mask = shared["mask"]  # [B or 1, T, S] bool
        if "window_mask" in shared:
            mask = jnp.where(layer_inputs["window"], shared["window_mask"], mask)
        if c.query_pre_attn_scalar is not None:
            scale = float(c.query_pre_attn_scalar) ** -0.5
        else:
            scale = 1.0 / float(np.sqrt(D)) if c.scale_attention else 1.0
        qg = q.reshape(B, K, G, T, D)
        dropout = c.attention_dropout_rate > 0.0 and not self.deterministic

        if cache_kv is not None:  # inference only, no custom gradient needed
            # This layer's cache ``[B, S, K, D]`` is read, never written here: the model writes every layer's new
            # keys/values into the ``[L, B, S, K, D]`` cache once, after the layer scan. Writing it inside the
            # scan (cache in the scan carry) made a decode step's time grow about 3x faster with the cache length
            # on XLA:CPU (SmolLM2-135M, 32 rows: +0.17 s per 128 slots, now +0.06 s). Queries attend to the
            # cached slots before ``cache_index`` and to the ``T`` new tokens (slots ``cache_index + j``), with one
            # softmax over both.
            cache_k, cache_v = cache_kv
            index = shared["cache_index"]
            S = cache_k.shape[1]
            mask = jnp.broadcast_to(mask, (mask.shape[0], T, S))
            # T new tokens filling all S slots (a prefill into a cache of its own length) leave no cached slot to
            # read: that part is left out statically
            S_old = 0 if T >= S else S
            mask_new = lax.dynamic_slice_in_dim(mask, index, T, axis=2)  # [B, T, T]
            scores_new = jnp.einsum("bkgtd,bkud->bkgtu", qg, k, preferred_element_type=jnp.float32)
            scores = jnp.where(mask_new[:, None, None], scores_new * np.float32(scale), _NEG)
            if S_old:
                mask_old = mask & (jnp.arange(S, dtype=jnp.int32) < index)[None, None, :]
                scores_old = jnp.einsum("bkgtd,bskd->bkgts", qg, cache_k.astype(dt),
                                        preferred_element_type=jnp.float32)
                scores = jnp.concatenate(
                    [jnp.where(mask_old[:, None, None], scores_old * np.float32(scale), _NEG), scores], axis=-1)
            probs = jax.nn.softmax(scores, axis=-1)
            if dropout:
                probs = nn.Dropout(c.attention_dropout_rate)(probs, deterministic=False)
            probs = probs.astype(dt)
            out = jnp.einsum("bkgtu,bkud->bkgtd", probs[..., S_old:], v)
            if S_old:
                out = out + jnp.einsum("bkgts,bskd->bkgtd", probs[..., :S_old], cache_v.astype(dt))
            # the new keys/values ``[B, T, K, D]`` for the model to write at slots cache_index...
            cache_kv = (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))
        elif dropout:
            scores = jnp.einsum("bkgtd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32)
            scores = jnp.where(mask[:, None, None], scores * np.float32(scale), _NEG)
            probs = nn.Dropout(c.attention_dropout_rate)(jax.nn.softmax(scores, axis=-1), deterministic=False)
            out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(dt), v)
        else:
            out = attention(qg, k, v, mask, scale)
        out = jnp.swapaxes(out.reshape(B, N, T, D), 1, 2)  # [B, T, N, D]
        y = dense(out, wo.astype(dt), in_dims=2)
        if kernel_targeted(c, "wo"):
            y = y + adapter_delta(self, "wo", out, (N, D), (H,), ("heads", "head_dim"), ("embed",), self.deterministic)
        if c.out_bias:
            y = y + _param(self, "bo", (H,), ("embed",)).astype(dt)
        return y, cache_kv


class Mlp(nn.Module):
    """SwiGLU-style gated MLP (Llama family) or the plain two-layer MLP (GPT-2)."""

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        H, F, dt = c.hidden_size, c.intermediate_size, c.dtype
        act = _activation(c.activation)

        def proj(name, bias_name, h, shape, axes):
            out = dense(h, _param(self, name, shape, axes).astype(dt))
            if kernel_targeted(c, name):  # LoRA: + s * (h A) B
                out = out + adapter_delta(self, name, h, shape[:1], shape[1:], axes[:1], axes[1:],
                                          self.deterministic)
            if c.mlp_bias:
                out = out + _param(self, bias_name, shape[-1:], axes[-1:]).astype(dt)
            return out

        up = proj("w_up", "b_up", x, (H, F), ("embed", "mlp"))
        if c.mlp == "gated":
            h = act(proj("w_gate", "b_gate", x, (H, F), ("embed", "mlp"))) * up
        else:
            h = act(up)
        return proj("w_down", "b_down", h, (F, H), ("mlp", "embed"))


class Block(nn.Module):
    """One pre-norm decoder layer; the scan body over layers (carry: hidden; with a cache, the layer's cache slice
    comes in ``layer_inputs`` and the layer's new keys/values go out as the scan output)."""

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, carry, layer_inputs, shared):
        c = self.config
        x = carry
        cache_kv = None if shared["cache_index"] is None else (layer_inputs["cache_k"], layer_inputs["cache_v"])
        h = Norm(c, name="attn_norm")(x)
        attn, cache_kv = Attention(c, self.deterministic, name="attn")(h, shared, layer_inputs, cache_kv)
        if c.sandwich_norm:
            attn = Norm(c, name="post_attn_norm")(attn)
        if c.dropout_rate > 0.0 and not self.deterministic:
            attn = nn.Dropout(c.dropout_rate)(attn, deterministic=False)
        x = x + attn
        h = Mlp(c, self.deterministic, name="mlp")(Norm(c, name="mlp_norm")(x))
        if c.sandwich_norm:
            h = Norm(c, name="post_mlp_norm")(h)
        if c.dropout_rate > 0.0 and not self.deterministic:
            h = nn.Dropout(c.dropout_rate)(h, deterministic=False)
        x = x + h
        return x, cache_kv  # with a cache: this layer's new keys/values [B, T, K, D] (the scan stacks them)


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _segment_positions(segment_ids: Array, mask: Array) -> Array:
    """Positions restarting at 0 at every segment start (segments contiguous along T): ``[B, T]`` int32."""
    counts = jnp.cumsum(mask, axis=-1)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=-1)
    before = jnp.concatenate([jnp.zeros_like(counts[:, :1]), counts[:, :-1]], axis=-1)
    base = lax.cummax(jnp.where(starts, before, 0), axis=1)
    return counts - base - 1


class _DecoderModel(nn.Module):
    config: ModelConfig
    head: str = "lm"

    def _check_head(self, allowed):
        if self.head not in allowed:
            raise ValueError(f"{type(self).__name__}.head={self.head!r}; choose one of {allowed}")

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None, positions: Optional[Array] = None,
                 segment_ids: Optional[Array] = None, cache: Optional[KVCache] = None, return_hidden: bool = False,
                 deterministic: bool = True):
        """Forward pass.

        input_ids ``[B, T]`` int; attention_mask ``[B, T]`` (1 real, 0 pad; default all real); positions ``[B, T]``
        int (default ``cumsum(mask) - 1``, restarted per segment, or continuing the cache; learned position tables
        clip positions beyond ``max_position_embeddings``); segment_ids ``[B, T]`` int (packed sequences:
        block-diagonal attention, contiguous segments); cache: a :class:`KVCache` (written at slots
        ``index .. index + T - 1``; queries see valid slots up to their own). ``deterministic=False`` enables the
        configured dropout (needs ``rngs={"dropout": key}``). Ids outside ``[0, V)`` are clipped.

        Returns, by head: "lm" logits ``[B, T, V]`` f32; "value"/"score" scalars ``[B, T]`` f32; "lm+value"
        ``(logits, values)``. ``return_hidden=True`` replaces the logits by the final-normed hidden states
        ``[B, T, H]`` (compute dtype). With a cache the result is ``(output, new_cache)``.
        """
        c = self.config
        self._check_head(HEADS)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
        B, T = input_ids.shape
        given_mask = attention_mask is not None
        mask_i = (attention_mask.astype(jnp.int32) if given_mask else jnp.ones((B, T), jnp.int32))
        for name, arr in (("attention_mask", attention_mask), ("positions", positions),
                          ("segment_ids", segment_ids)):
            if arr is not None and arr.shape != (B, T):
                raise ValueError(f"{name} must have the shape of input_ids {(B, T)}, got {arr.shape}")

        # ---- slots, visibility mask and positions
        q_slots = jnp.arange(T, dtype=jnp.int32)
        if cache is None:
            S = T
            k_slots = q_slots
            visible = (k_slots[None, :] <= q_slots[:, None])[None]  # [1, T, T]
            if given_mask:
                visible = visible & (mask_i[:, None, :] > 0)
            if segment_ids is not None:
                visible = visible & (segment_ids[:, :, None] == segment_ids[:, None, :])
            if positions is None:
                if segment_ids is not None:
                    positions = _segment_positions(segment_ids, mask_i)
                elif given_mask:
                    positions = jnp.cumsum(mask_i, axis=-1) - 1
                else:
                    positions = jnp.broadcast_to(q_slots[None], (B, T))
            cache_index = None
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packing) cannot be combined with a KV cache")
            if cache.mask.shape[0] != B or cache.k.shape[1] != B:
                raise ValueError(f"cache batch size {cache.mask.shape[0]} does not match input_ids batch {B}")
            S = cache.k.shape[2]
            cache_index = cache.index.astype(jnp.int32)
            new_mask = lax.dynamic_update_slice(cache.mask, mask_i, (0, cache_index))
            q_slots = q_slots + cache_index
            k_slots = jnp.arange(S, dtype=jnp.int32)
            visible = (k_slots[None, :] <= q_slots[:, None])[None] & (new_mask[:, None, :] > 0)
            if positions is None:
                positions = jnp.sum(cache.mask, axis=-1, keepdims=True) + jnp.cumsum(mask_i, axis=-1) - 1
        positions = jnp.maximum(positions.astype(jnp.int32), 0)
        visible = jnp.broadcast_to(visible, (visible.shape[0], T, S))

        shared = {"mask": visible, "cache_index": cache_index}
        windows = c.window_layers
        # a window at least as long as every key range changes nothing: skipped statically
        if c.sliding_window is not None and c.sliding_window < S and any(windows):
            window_mask = visible & ((q_slots[:, None] - k_slots[None, :]) < c.sliding_window)[None]
            if all(windows):
                shared["mask"] = window_mask
            else:
                shared["window_mask"] = window_mask
        layer_inputs = {"layer": jnp.arange(c.num_layers, dtype=jnp.int32)}
        local_rope = c.positions == "rope" and c.rope_local_theta is not None and any(windows)
        if "window_mask" in shared or local_rope:
            layer_inputs["window"] = jnp.asarray(windows, bool)

        # ---- embeddings
        embed = Embed(c, name="embed")
        x = embed(input_ids)
        if c.positions == "learned":
            pos_table = _param(self, "pos_embed", (c.max_position_embeddings, c.hidden_size), (None, "embed"))
            x = x + jnp.take(pos_table, positions, axis=0, mode="clip").astype(c.dtype)
            shared["cos"] = shared["sin"] = None
        else:
            angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(c.rope_inv_freq())
            shared["cos"], shared["sin"] = jnp.cos(angles), jnp.sin(angles)
            if local_rope:
                angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(c.rope_inv_freq(local=True))
                shared["cos_local"], shared["sin_local"] = jnp.cos(angles), jnp.sin(angles)
        if c.dropout_rate > 0.0 and not deterministic:
            x = nn.Dropout(c.dropout_rate)(x, deterministic=False)

        # ---- layers (scanned)
        block = Block
        if c.remat != "none":
            block = nn.remat(Block, prevent_cse=False, policy=_REMAT_POLICIES[c.remat])
        layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                         in_axes=(0, nn.broadcast), length=c.num_layers,
                         # scan_unroll applies to cache-free passes only (decoding measured 13-33% slower unrolled)
                         unroll=1 if cache is not None else min(c.scan_unroll, c.num_layers),
                         metadata_params={nn.PARTITION_NAME: "layers"})(c, deterministic, name="layers")
        if cache is not None:
            layer_inputs["cache_k"], layer_inputs["cache_v"] = cache.k, cache.v
        x, new_kv = layers(x, layer_inputs, shared)
        hidden = Norm(c, name="final_norm")(x)

        # ---- heads
        outputs = []
        if self.head in ("lm", "lm+value"):
            if return_hidden:
                outputs.append(hidden)
            elif c.tie_word_embeddings:
                outputs.append(embed.attend(hidden))
            else:
                w = _param(self, "lm_head", (c.vocab_size, c.hidden_size), ("vocab", "embed"))
                outputs.append(logits_from_hidden(hidden, w))
        if self.head in ("value", "score", "lm+value"):
            w = _param(self, "score", (c.hidden_size, 1), ("embed", None))
            values = jnp.einsum("bth,h->bt", hidden.astype(jnp.float32), w[:, 0].astype(jnp.float32))
            if return_hidden and self.head != "lm+value":
                outputs.append(hidden)
            else:
                outputs.append(values)
        out = outputs[0] if len(outputs) == 1 else tuple(outputs)
        if cache is None:
            return out
        # every layer's new keys/values [L, B, T, K, D] written at slots cache_index.. in one update per array
        new_k = lax.dynamic_update_slice(cache.k, new_kv[0].astype(cache.k.dtype), (0, 0, cache_index, 0, 0))
        new_v = lax.dynamic_update_slice(cache.v, new_kv[1].astype(cache.v.dtype), (0, 0, cache_index, 0, 0))
        new_cache = KVCache(k=new_k, v=new_v, mask=new_mask, index=cache.index + T)
        return out, new_cache


class CausalLM(_DecoderModel):
    """Causal language model: ``head="lm"`` gives logits ``[B, T, V]``; ``head="lm+value"`` (PPO with a shared
    trunk) gives ``(logits [B, T, V], values [B, T])``. See :meth:`_DecoderModel.__call__` for the arguments."""

    head: str = "lm"

    def __post_init__(self):
        self._check_head(("lm", "lm+value"))
        super().__post_init__()


class ScalarHeadModel(_DecoderModel):
    """Decoder with a scalar head: per-token values ``[B, T]`` f32. ``head="value"`` (PPO critic) or ``"score"``
    (reward model; take :func:`sequence_scores` of the output). Both export as HF ``...ForSequenceClassification``."""

    head: str = "score"

    def __post_init__(self):
        self._check_head(("value", "score"))
        super().__post_init__()


def build_model(config: ModelConfig, head: str = "lm") -> _DecoderModel:
    """The module for ``head`` in {"lm", "lm+value", "value", "score"} (no parameters)."""
    if head in ("lm", "lm+value"):
        return CausalLM(config, head=head)
    if head in ("value", "score"):
        return ScalarHeadModel(config, head=head)
    raise ValueError(f"head={head!r}; choose one of {HEADS}")


def _dummy_ids():
    return jnp.zeros((1, 1), jnp.int32)


_SINGLE_DRAW_LIMIT = 1 << 27  # parameters; above it each tensor is drawn separately (no giant temporary)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _single_draw_init(rng, treedef_and_meta, dtype):
    """All "normal" tensors sliced out of one normal draw (XLA compiles one RNG instead of one per tensor)."""
    treedef, metas, std = treedef_and_meta
    total = sum(int(np.prod(shape)) for kind, shape in metas if kind == "normal")
    flat = jax.random.normal(rng, (max(total, 1),), jnp.float32) * std
    leaves, offset = [], 0
    for kind, shape in metas:
        if kind == "normal":
            size = int(np.prod(shape))
            leaves.append(flat[offset:offset + size].reshape(shape).astype(dtype))
            offset += size
        else:
            leaves.append((jnp.ones if kind == "ones" else jnp.zeros)(shape, dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


ADAPTER_RNG_SALT = 0x10A
"""``init_model`` draws LoRA adapters from ``fold_in(rng, ADAPTER_RNG_SALT)`` and the base from ``rng``, so a LoRA
model's base equals the model drawn without adapters from the same key."""


def init_model(config: ModelConfig, rng: Array, head: str = "lm"):
    """Builds the model for ``head`` and randomly initialised parameters: returns ``(model, params)`` with params a
    plain pytree ``{"params": {...}}`` in ``config.param_dtype``.

    Kernels and embeddings are ``N(0, initializer_range^2)``, biases zero, norm scales one; LoRA adapters
    (``config.lora``) as :func:`jrlhf.models.lora.init_adapters` (``B`` zero). For models up to
    ~134M parameters all normal tensors come from a single draw (fast to compile); larger ones use ``model.init``.
    """
    if config.lora is not None:  # the base drawn as without adapters, then fresh adapters (B = 0)
        from jrlhf.models.lora import add_adapters

        base, params = init_model(config.replace(lora=None), rng, head)
        return add_adapters(base, params, config.lora, jax.random.fold_in(rng, ADAPTER_RNG_SALT))
    model = build_model(config, head)
    shapes = abstract_params(model)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    if sum(int(np.prod(leaf.shape)) for _, leaf in flat) > _SINGLE_DRAW_LIMIT:
        return model, nn.meta.unbox(jax.jit(model.init)(rng, _dummy_ids()))
    metas = tuple((init_kind(path[-1].key, config), tuple(leaf.shape)) for path, leaf in flat)
    params = _single_draw_init(rng, (treedef, metas, float(config.initializer_range)), config.param_dtype)
    return model, params


def abstract_params(model: _DecoderModel):
    """``jax.ShapeDtypeStruct`` pytree of the parameters of ``model`` (nothing allocated)."""
    return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), _dummy_ids()))


def logical_axes(model: _DecoderModel):
    """Pytree matching ``params`` of ``jax.sharding.PartitionSpec`` over logical axis names (``vocab``, ``embed``,
    ``heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``layers``, ``norm``; ``None`` for unsharded axes)."""
    return nn.get_partition_spec(jax.eval_shape(model.init, jax.random.key(0), _dummy_ids()))


def sequence_scores(values: Array, attention_mask: Array) -> Array:
    """Score of each sequence at its last real token: values ``[B, T]``, attention_mask ``[B, T]`` -> ``[B]`` f32.

    Works for left and right padding (the rightmost position with mask 1); a row without real tokens gives
    ``values[:, 0]``."""
    T = values.shape[-1]
    idx = jnp.max(jnp.where(attention_mask > 0, jnp.arange(T), 0), axis=-1)
    return jnp.take_along_axis(values, idx[:, None], axis=-1)[:, 0].astype(jnp.float32)
