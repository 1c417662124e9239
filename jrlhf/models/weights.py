"""Weight-name maps between Hugging Face checkpoints and the stacked jrlhf parameter layout.

Each family is a list of :class:`WeightRule`: one HF tensor (``{i}`` standing for the layer index of per-layer
tensors) mapped to one or more jrlhf parameters, with the conversion both ways. HF linear weights are
``[out, in]``; jrlhf kernels are ``[in, ...out]`` with heads split out (``wq [H, N, D]``, ``wo [N, D, H]``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Tuple

import numpy as np

from jrlhf.models.config import ModelConfig

Path = Tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class WeightRule:
    """``hf_name`` (relative to the family prefix unless ``top_level``) <-> jrlhf params at ``paths``.

    ``to_params(hf_array) -> tuple of arrays`` (one per path), ``to_hf(*arrays) -> hf_array``; ``hf_shape`` is the
    expected checkpoint shape; ``per_layer`` rules have ``{i}`` in the name and stack on the leading layers axis.
    """

    hf_name: str
    paths: Tuple[Path, ...]
    hf_shape: Tuple[int, ...]
    to_params: Callable
    to_hf: Callable
    per_layer: bool = True
    top_level: bool = False


def _same(x):
    return (x,)


def _one(x):
    return x


def _linear_in(*out_shape):
    """HF ``[out, in]`` -> jrlhf ``[in, *out_shape]`` and back."""
    return (lambda w: (w.T.reshape(w.shape[1], *out_shape),),
            lambda k: k.reshape(k.shape[0], -1).T)


def _linear_out(*in_shape):
    """HF ``[out, in]`` with ``in`` split into ``in_shape`` -> jrlhf ``[*in_shape, out]`` and back."""
    return (lambda w: (w.T.reshape(*in_shape, w.shape[0]),),
            lambda k: k.reshape(-1, k.shape[-1]).T)


def _reshape(*shape):
    return (lambda b: (b.reshape(*shape),), lambda b: b.reshape(-1))


def _rule(hf_name, path, hf_shape, convert=(_same, _one), **kw):
    return WeightRule(hf_name, (path,), tuple(hf_shape), convert[0], convert[1], **kw)


def _head_rules(config: ModelConfig, head: str):
    rules = []
    H, V = config.hidden_size, config.vocab_size
    if head in ("lm", "lm+value") and not config.tie_word_embeddings:
        rules.append(_rule("lm_head.weight", ("lm_head",), (V, H), per_layer=False, top_level=True))
    if head in ("value", "score", "lm+value"):
        rules.append(_rule("score.weight", ("score",), (1, H), (lambda w: (w.T,), lambda k: k.T),
                           per_layer=False, top_level=True))
    return rules


def llama_rules(config: ModelConfig, head: str):
    """Llama / Qwen2 / Qwen3 / Mistral / Gemma 3 (``model.`` prefix): names of ``LlamaForCausalLM`` and friends.

    Switch-dependent tensors: ``qk_norm`` adds ``self_attn.q_norm`` / ``k_norm`` ``[D]``; ``sandwich_norm`` (Gemma 3)
    names the four norms ``input_layernorm`` (before attention), ``post_attention_layernorm`` (after it),
    ``pre_feedforward_layernorm`` and ``post_feedforward_layernorm``, where the other families'
    ``post_attention_layernorm`` is the norm before the MLP."""
    H, N, K, D, F, V = (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                        config.intermediate_size, config.vocab_size)
    L = "layers.{i}."
    rules = [
        _rule("embed_tokens.weight", ("embed", "embedding"), (V, H), per_layer=False),
        _rule("norm.weight", ("final_norm", "scale"), (H,), per_layer=False),
        _rule(L + "input_layernorm.weight", ("layers", "attn_norm", "scale"), (H,)),
        _rule(L + "self_attn.q_proj.weight", ("layers", "attn", "wq"), (N * D, H), _linear_in(N, D)),
        _rule(L + "self_attn.k_proj.weight", ("layers", "attn", "wk"), (K * D, H), _linear_in(K, D)),
        _rule(L + "self_attn.v_proj.weight", ("layers", "attn", "wv"), (K * D, H), _linear_in(K, D)),
        _rule(L + "self_attn.o_proj.weight", ("layers", "attn", "wo"), (H, N * D), _linear_out(N, D)),
        _rule(L + "mlp.gate_proj.weight", ("layers", "mlp", "w_gate"), (F, H), _linear_in(F)),
        _rule(L + "mlp.up_proj.weight", ("layers", "mlp", "w_up"), (F, H), _linear_in(F)),
        _rule(L + "mlp.down_proj.weight", ("layers", "mlp", "w_down"), (H, F), _linear_in(H)),
    ]
    if config.sandwich_norm:
        rules += [
            _rule(L + "post_attention_layernorm.weight", ("layers", "post_attn_norm", "scale"), (H,)),
            _rule(L + "pre_feedforward_layernorm.weight", ("layers", "mlp_norm", "scale"), (H,)),
            _rule(L + "post_feedforward_layernorm.weight", ("layers", "post_mlp_norm", "scale"), (H,)),
        ]
    else:
        rules.append(_rule(L + "post_attention_layernorm.weight", ("layers", "mlp_norm", "scale"), (H,)))
    if config.qk_norm:
        rules += [
            _rule(L + "self_attn.q_norm.weight", ("layers", "attn", "q_norm", "scale"), (D,)),
            _rule(L + "self_attn.k_norm.weight", ("layers", "attn", "k_norm", "scale"), (D,)),
        ]
    if config.qkv_bias:
        rules += [
            _rule(L + "self_attn.q_proj.bias", ("layers", "attn", "bq"), (N * D,), _reshape(N, D)),
            _rule(L + "self_attn.k_proj.bias", ("layers", "attn", "bk"), (K * D,), _reshape(K, D)),
            _rule(L + "self_attn.v_proj.bias", ("layers", "attn", "bv"), (K * D,), _reshape(K, D)),
        ]
    if config.out_bias:
        rules.append(_rule(L + "self_attn.o_proj.bias", ("layers", "attn", "bo"), (H,)))
    if config.mlp_bias:
        rules += [
            _rule(L + "mlp.gate_proj.bias", ("layers", "mlp", "b_gate"), (F,)),
            _rule(L + "mlp.up_proj.bias", ("layers", "mlp", "b_up"), (F,)),
            _rule(L + "mlp.down_proj.bias", ("layers", "mlp", "b_down"), (H,)),
        ]
    return rules + _head_rules(config, head)


def gpt2_rules(config: ModelConfig, head: str):
    """GPT-2 (``transformer.`` prefix): Conv1D weights are already ``[in, out]``; ``c_attn`` fuses q, k, v."""
    H, N, D, F, V, P = (config.hidden_size, config.num_heads, config.head_dim, config.intermediate_size,
                        config.vocab_size, config.max_position_embeddings)
    L = "h.{i}."

    def split_qkv_weight(w):  # [H, 3 * N * D] -> 3 x [H, N, D]
        return tuple(part.reshape(H, N, D) for part in np.split(w, 3, axis=1))

    def join_qkv_weight(q, k, v):
        return np.concatenate([x.reshape(x.shape[0], -1) for x in (q, k, v)], axis=1)

    def split_qkv_bias(b):
        return tuple(part.reshape(N, D) for part in np.split(b, 3))

    def join_qkv_bias(q, k, v):
        return np.concatenate([x.reshape(-1) for x in (q, k, v)])

    attn = ("layers", "attn")
    rules = [
        _rule("wte.weight", ("embed", "embedding"), (V, H), per_layer=False),
        _rule("wpe.weight", ("pos_embed",), (P, H), per_layer=False),
        _rule("ln_f.weight", ("final_norm", "scale"), (H,), per_layer=False),
        _rule("ln_f.bias", ("final_norm", "bias"), (H,), per_layer=False),
        _rule(L + "ln_1.weight", ("layers", "attn_norm", "scale"), (H,)),
        _rule(L + "ln_1.bias", ("layers", "attn_norm", "bias"), (H,)),
        _rule(L + "ln_2.weight", ("layers", "mlp_norm", "scale"), (H,)),
        _rule(L + "ln_2.bias", ("layers", "mlp_norm", "bias"), (H,)),
        WeightRule(L + "attn.c_attn.weight", (attn + ("wq",), attn + ("wk",), attn + ("wv",)), (H, 3 * N * D),
                   split_qkv_weight, join_qkv_weight),
        WeightRule(L + "attn.c_attn.bias", (attn + ("bq",), attn + ("bk",), attn + ("bv",)), (3 * N * D,),
                   split_qkv_bias, join_qkv_bias),
        _rule(L + "attn.c_proj.weight", attn + ("wo",), (N * D, H),
              (lambda w: (w.reshape(N, D, H),), lambda k: k.reshape(-1, k.shape[-1]))),
        _rule(L + "attn.c_proj.bias", attn + ("bo",), (H,)),
        _rule(L + "mlp.c_fc.weight", ("layers", "mlp", "w_up"), (H, F)),
        _rule(L + "mlp.c_fc.bias", ("layers", "mlp", "b_up"), (F,)),
        _rule(L + "mlp.c_proj.weight", ("layers", "mlp", "w_down"), (F, H)),
        _rule(L + "mlp.c_proj.bias", ("layers", "mlp", "b_down"), (H,)),
    ]
    return rules + _head_rules(config, head)


@dataclasses.dataclass(frozen=True)
class FamilyWeights:
    """A family's checkpoint naming: the prefix of trunk tensors, the rules, and harmless extra tensors."""

    prefix: str
    rules: Callable
    ignorable_suffixes: Tuple[str, ...] = ()


FAMILY_WEIGHTS = {
    "gpt2": FamilyWeights("transformer.", gpt2_rules, (".attn.bias", ".attn.masked_bias")),
    "llama": FamilyWeights("model.", llama_rules, (".rotary_emb.inv_freq",)),
    "qwen2": FamilyWeights("model.", llama_rules, (".rotary_emb.inv_freq",)),
    "mistral": FamilyWeights("model.", llama_rules, (".rotary_emb.inv_freq",)),
    "qwen3": FamilyWeights("model.", llama_rules, (".rotary_emb.inv_freq",)),
    "gemma3_text": FamilyWeights("model.", llama_rules, (".rotary_emb.inv_freq",)),
}
