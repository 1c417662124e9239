"""Model configuration: one frozen dataclass for every supported decoder family.

A family (GPT-2, Llama, Qwen2, Qwen3, Mistral, Gemma 3) is a set of architecture switches on :class:`ModelConfig`
plus a weight-name map (``jrlhf.models.weights``). ``ModelConfig.from_hf_dict`` reads a Hugging Face ``config.json``
dict and ``ModelConfig.to_hf_dict`` writes one that ``transformers`` loads.

The family contract (what a new family provides):

1. a config mapping: one ``_<family>_from_hf(hf) -> dict of ModelConfig fields`` and the inverse in ``to_hf_dict``
   (plus its ``transformers`` class names in ``_ARCHITECTURES``); settings the decoder does not implement are a
   ``ValueError`` naming the config key, never ignored;
2. a weight-name map: an entry of ``jrlhf.models.weights.FAMILY_WEIGHTS`` (HF tensor name <-> stacked parameter);
3. only where the architecture needs it, one more switch of the single decoder (``jrlhf.models.transformer``).

The decoder switches: ``norm`` ("rms" | "layer"), ``norm_offset`` (RMSNorm multiplies by ``offset + w``: 1.0 for
Gemma's ``(1 + w)``), ``sandwich_norm`` (norms after attention and after the MLP too: four per layer), ``qk_norm``
(per-head RMSNorm of queries and keys before RoPE), ``mlp`` ("gated" | "plain") with ``activation``, ``positions``
("rope" | "learned"), ``rope_theta`` / ``rope_scaling`` (global layers) and ``rope_local_theta`` (sliding-window
layers' own base), biases (``qkv_bias``, ``out_bias``, ``mlp_bias``), ``sliding_window`` with
``sliding_window_layers``, ``query_pre_attn_scalar`` (attention scale ``scalar ** -0.5`` instead of
``head_dim ** -0.5``), ``embed_scale`` (embeddings times ``sqrt(hidden_size)``), ``tie_word_embeddings``.
``tests/test_model_families.py`` is the checklist every registered family passes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

FAMILIES = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma3_text")
ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")
HEADS = ("lm", "lm+value", "value", "score")

_ARCHITECTURES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
    "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "mistral": ("MistralForCausalLM", "MistralForSequenceClassification"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
}


def _canonical_dtype(value: Any, field: str) -> np.dtype:
    try:
        return np.dtype(jnp.dtype(value))
    except TypeError as error:
        raise ValueError(f"ModelConfig.{field}={value!r} is not a dtype; use e.g. 'float32' or jnp.bfloat16") from error


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of one decoder-only transformer (frozen and hashable, so usable as a static arg).

    Shapes: ``H = hidden_size``, ``N = num_heads``, ``K = num_kv_heads`` (GQA when ``K < N``), ``D = head_dim``,
    ``F = intermediate_size``, ``V = vocab_size``, ``L = num_layers``.

    Architecture switches (set by ``from_hf_dict`` per family): ``norm`` ("rms" | "layer"), ``mlp`` ("gated": SwiGLU,
    "plain": GPT-2 style), ``positions`` ("rope" | "learned"), biases, tied embeddings, ``sliding_window`` with
    ``sliding_window_layers`` (per layer, ``None`` meaning every layer), ``qk_norm`` (Qwen3, Gemma 3: per-head
    RMSNorm ``[D]`` of q and k before RoPE), ``norm_offset`` (Gemma: RMSNorm scale ``1 + w``; 0.0 elsewhere),
    ``sandwich_norm`` (Gemma 3: also a norm on the attention and MLP outputs before the residual add),
    ``embed_scale`` (Gemma: embeddings times ``sqrt(H)`` rounded to the compute dtype, as transformers rounds it to
    the weights' dtype), ``query_pre_attn_scalar`` (Gemma: attention scale ``scalar ** -0.5``), ``rope_local_theta``
    (Gemma 3: the RoPE base of the sliding-window layers; ``rope_theta`` and ``rope_scaling`` are the global
    layers'). See the module docstring for the family contract.

    Numerics: ``dtype`` is the compute dtype (activations, matmul inputs; logits are always float32), ``param_dtype``
    the storage dtype of parameters. ``remat`` chooses per-layer rematerialisation: "none", "full" (save only the
    layer inputs), "dots" (save all matmul outputs) or "dots_no_batch" (save weight-matmul outputs, recompute
    attention). ``scan_unroll`` is how many layers one iteration of the scan over layers runs: 1 (default) keeps a
    rolled loop (compile time independent of depth), ``num_layers`` unrolls it fully, which is faster for shallow
    models on CPU (no per-iteration buffer copies); the parameters keep their stacked ``[L, ...]`` layout either way.
    It applies to forward passes without a KV cache (training, scoring); the sampler's cached passes keep the rolled
    loop, which updates the cache in place.
    Dropout is off unless ``dropout_rate`` / ``attention_dropout_rate`` are set and the forward pass is
    called with ``deterministic=False``.

    ``lora``: ``None`` or a :class:`jrlhf.models.lora.LoraConfig` (or a dict of its fields): low-rank adapters on
    the projections it targets, as extra parameter leaves (``wq_lora_a``...); not part of the Hugging Face config
    (:func:`jrlhf.models.save_pretrained` writes the merged weights).
    """

    family: str = "llama"
    vocab_size: int = 128
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: int = 2048
    norm: str = "rms"
    norm_eps: float = 1e-6
    mlp: str = "gated"
    activation: str = "silu"
    positions: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: Any = ()
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    scale_attention: bool = True
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    sliding_window_layers: Optional[tuple] = None
    qk_norm: bool = False
    norm_offset: float = 0.0
    sandwich_norm: bool = False
    embed_scale: bool = False
    query_pre_attn_scalar: Optional[float] = None
    rope_local_theta: Optional[float] = None
    initializer_range: float = 0.02
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    remat: str = "none"
    scan_unroll: int = 1
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    lora: Any = None

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if self.lora is not None:
            from jrlhf.models.lora import LoraConfig

            if isinstance(self.lora, dict):
                set_("lora", LoraConfig(**self.lora))
            elif not isinstance(self.lora, LoraConfig):
                raise ValueError(f"ModelConfig.lora must be a jrlhf.models.lora.LoraConfig, a dict of its fields or "
                                 f"None, got {type(self.lora).__name__}")
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family={self.family!r} is not supported; choose one of {FAMILIES}")
        if self.num_kv_heads is None:
            set_("num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; set head_dim")
            set_("head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if isinstance(self.rope_scaling, dict):
            set_("rope_scaling", tuple(sorted(self.rope_scaling.items())))
        elif self.rope_scaling is None:
            set_("rope_scaling", ())
        else:
            set_("rope_scaling", tuple(sorted(tuple(self.rope_scaling))))
        rope_type = self.rope_type
        if self.positions == "rope" and rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_scaling rope_type={rope_type!r} is not supported (supported: {ROPE_TYPES}); "
                "remove rope_scaling/rope_parameters.rope_type from config.json or convert the checkpoint")
        if rope_type == "llama3":
            missing = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} - set(
                dict(self.rope_scaling))
            if missing:
                raise ValueError(f"llama3 rope_scaling needs the keys {sorted(missing)}")
        if rope_type == "linear" and "factor" not in dict(self.rope_scaling):
            raise ValueError("linear rope_scaling needs the key 'factor'")
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        for name, allowed in (("norm", ("rms", "layer")), ("mlp", ("gated", "plain")),
                              ("positions", ("rope", "learned")), ("activation", ACTIVATIONS),
                              ("remat", REMAT_POLICIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; choose one of {allowed}")
        if isinstance(self.scan_unroll, bool) or not isinstance(self.scan_unroll, int) or self.scan_unroll < 1:
            raise ValueError(f"ModelConfig.scan_unroll must be a positive int (layers per scan iteration), "
                             f"got {self.scan_unroll!r}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.sliding_window is not None:
            if int(self.sliding_window) < 1:
                raise ValueError(f"sliding_window must be a positive int or None, got {self.sliding_window}")
            set_("sliding_window", int(self.sliding_window))
        if self.sliding_window_layers is not None:
            layers = tuple(bool(x) for x in self.sliding_window_layers)
            if len(layers) != self.num_layers:
                raise ValueError(
                    f"sliding_window_layers has {len(layers)} entries but num_layers={self.num_layers}")
            set_("sliding_window_layers", layers)
        if self.query_pre_attn_scalar is not None:
            if float(self.query_pre_attn_scalar) <= 0:
                raise ValueError(f"query_pre_attn_scalar must be > 0, got {self.query_pre_attn_scalar}")
            set_("query_pre_attn_scalar", float(self.query_pre_attn_scalar))
        if self.rope_local_theta is not None:
            set_("rope_local_theta", float(self.rope_local_theta))
        set_("norm_offset", float(self.norm_offset))
        if (self.qk_norm or self.norm_offset or self.sandwich_norm) and self.norm != "rms":
            raise ValueError("qk_norm, norm_offset and sandwich_norm need norm='rms'")
        for name in ("dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        set_("dtype", _canonical_dtype(self.dtype, "dtype"))
        set_("param_dtype", _canonical_dtype(self.param_dtype, "param_dtype"))

    # ------------------------------------------------------------------ derived
    @property
    def rope_type(self) -> str:
        """The rotary scaling kind: "default", "linear" or "llama3"."""
        return dict(self.rope_scaling).get("rope_type", "default")

    @property
    def window_layers(self) -> tuple:
        """Per-layer booleans: True where the layer uses the sliding window (all False without one)."""
        if self.sliding_window is None:
            return (False,) * self.num_layers
        if self.sliding_window_layers is None:
            return (True,) * self.num_layers
        return self.sliding_window_layers

    def replace(self, **changes) -> "ModelConfig":
        """Returns a copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def rope_inv_freq(self, local: bool = False) -> np.ndarray:
        """Rotary inverse frequencies ``[D/2]`` float32, with rope scaling applied (computed as transformers does).
        ``local=True``: those of the sliding-window layers, base ``rope_local_theta`` and no scaling."""
        d = self.head_dim
        exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
        if local:
            return (1.0 / (np.float32(self.rope_local_theta) ** exponent)).astype(np.float32)
        inv_freq = (1.0 / (np.float32(self.rope_theta) ** exponent)).astype(np.float32)
        scaling = dict(self.rope_scaling)
        if self.rope_type == "linear":
            inv_freq = (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
        elif self.rope_type == "llama3":
            factor = float(scaling["factor"])
            low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
            old_len = float(scaling["original_max_position_embeddings"])
            low_wavelen, high_wavelen = old_len / low, old_len / high
            wavelen = (2 * math.pi / inv_freq).astype(np.float32)
            scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
            smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
            smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
        return inv_freq

    # --------------------------------------------------------------- HF dicts
    @classmethod
    def from_hf_dict(cls, hf: dict, **overrides) -> "ModelConfig":
        """Builds a config from a Hugging Face ``config.json`` dict (``model_type`` picks the family).

        Reads both the legacy ``rope_theta``/``rope_scaling`` keys and the ``rope_parameters`` block of transformers
        5. HF dropout probabilities are ignored (dropout off); pass ``dropout_rate=...`` in ``overrides`` to train
        with dropout. ``overrides`` are ModelConfig fields (e.g. ``dtype``, ``param_dtype``, ``remat``).
        """
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(
                f"config.json model_type={model_type!r} is not supported; supported families: {FAMILIES}")
        common = dict(
            family=model_type,
            vocab_size=int(hf["vocab_size"]),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
        if model_type == "gpt2":
            kwargs = _gpt2_from_hf(hf)
        elif model_type == "gemma3_text":
            kwargs = _gemma3_from_hf(hf)
        else:
            kwargs = _llama_like_from_hf(hf, model_type)
        kwargs.update(common)
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self, head: str = "lm", dtype: Any = None) -> dict:
        """Returns a ``config.json`` dict that ``transformers`` loads (``AutoModelForCausalLM`` for the "lm" and
        "lm+value" heads, ``AutoModelForSequenceClassification`` with ``num_labels=1`` for "value" and "score").
        ``dtype`` names the dtype the weights are saved in (default: ``param_dtype``)."""
        if head not in HEADS:
            raise ValueError(f"head={head!r}; choose one of {HEADS}")
        causal, classifier = _ARCHITECTURES[self.family]
        out = dict(model_type=self.family, architectures=[causal if head in ("lm", "lm+value") else classifier],
                   vocab_size=self.vocab_size, initializer_range=self.initializer_range,
                   bos_token_id=self.bos_token_id, pad_token_id=self.pad_token_id,
                   eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
                   tie_word_embeddings=self.tie_word_embeddings,
                   dtype=str(np.dtype(jnp.dtype(dtype if dtype is not None else self.param_dtype))))
        if head in ("value", "score"):
            out.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, num_labels=1)
        if self.family == "gpt2":
            out.update(_gpt2_to_hf(self))
        elif self.family == "gemma3_text":
            out.update(_gemma3_to_hf(self))
        else:
            out.update(_llama_like_to_hf(self))
        return out


# ------------------------------------------------------------------ families


def _gpt2_from_hf(hf: dict) -> dict:
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("config.json scale_attn_by_inverse_layer_idx=true (GPT-2) is not supported")
    if hf.get("add_cross_attention", False):
        raise ValueError("config.json add_cross_attention=true (GPT-2 encoder-decoder) is not supported")
    hidden = int(hf.get("n_embd", hf.get("hidden_size", 768)))
    heads = int(hf.get("n_head", hf.get("num_attention_heads", 12)))
    inner = hf.get("n_inner")
    return dict(
        hidden_size=hidden,
        intermediate_size=int(inner) if inner is not None else 4 * hidden,
        num_layers=int(hf.get("n_layer", hf.get("num_hidden_layers", 12))),
        num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        max_position_embeddings=int(hf.get("n_positions", hf.get("max_position_embeddings", 1024))),
        norm="layer", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        mlp="plain", activation=hf.get("activation_function", "gelu_new"), positions="learned",
        qkv_bias=True, out_bias=True, mlp_bias=True,
        scale_attention=bool(hf.get("scale_attn_weights", True)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def _gpt2_to_hf(config: ModelConfig) -> dict:
    if config.positions != "learned" or config.norm != "layer" or config.mlp != "plain":
        raise ValueError("a gpt2 family config must use learned positions, LayerNorm and the plain MLP")
    if config.num_kv_heads != config.num_heads or config.head_dim * config.num_heads != config.hidden_size:
        raise ValueError("GPT-2 has no grouped-query attention and needs head_dim * num_heads == hidden_size")
    if not (config.qkv_bias and config.out_bias and config.mlp_bias):
        raise ValueError("GPT-2 uses biases on every projection (qkv_bias, out_bias, mlp_bias)")
    return dict(
        n_embd=config.hidden_size, n_layer=config.num_layers, n_head=config.num_heads,
        n_inner=config.intermediate_size, n_positions=config.max_position_embeddings,
        activation_function=config.activation, layer_norm_epsilon=config.norm_eps,
        resid_pdrop=config.dropout_rate, embd_pdrop=config.dropout_rate, attn_pdrop=config.attention_dropout_rate,
        scale_attn_weights=config.scale_attention, scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False, add_cross_attention=False, use_cache=True,
    )


def _rope_from_hf(hf: dict) -> tuple:
    """Merges ``rope_parameters`` (transformers 5) and ``rope_theta``/``rope_scaling`` (older) into (theta, scaling)."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    for key, value in legacy.items():
        params.setdefault(key, value)
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("config.json rope_parameters nested per layer type is not supported")
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    partial = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"config.json partial_rotary_factor={partial} is not supported (only 1.0)")
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"config.json rope_scaling/rope_parameters rope_type={rope_type!r} is not supported; "
            f"supported: {ROPE_TYPES}")
    if rope_type == "default":
        return theta, ()
    scaling = {"rope_type": rope_type}
    keys = ("factor",) if rope_type == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    for key in keys:
        if key == "original_max_position_embeddings" and key not in params:
            params[key] = hf.get(key, hf.get("max_position_embeddings"))
        if key not in params:
            raise ValueError(f"config.json rope_scaling of type {rope_type!r} is missing {key!r}")
        scaling[key] = float(params[key]) if key != "original_max_position_embeddings" else int(params[key])
    return theta, tuple(sorted(scaling.items()))


def _llama_like_from_hf(hf: dict, family: str) -> dict:
    hidden = int(hf["hidden_size"])
    heads = int(hf["num_attention_heads"])
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hidden // heads
    theta, scaling = _rope_from_hf(hf)
    layers = int(hf["num_hidden_layers"])
    kwargs = dict(
        hidden_size=hidden, intermediate_size=int(hf["intermediate_size"]), num_layers=layers,
        num_heads=heads, num_kv_heads=int(kv_heads), head_dim=int(head_dim),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        norm="rms", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp="gated",
        activation=hf.get("hidden_act", "silu"), positions="rope", rope_theta=theta, rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if family == "llama":
        bias = bool(hf.get("attention_bias", False))
        kwargs.update(qkv_bias=bias, out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))
    elif family == "qwen2":
        kwargs.update(qkv_bias=True, out_bias=False, mlp_bias=False)
        kwargs.update(_qwen_windows(hf, layers))
    elif family == "qwen3":
        bias = bool(hf.get("attention_bias", False))
        kwargs.update(qkv_bias=bias, out_bias=bias, mlp_bias=False, qk_norm=True)
        kwargs.update(_qwen_windows(hf, layers))
    elif family == "mistral":
        kwargs.update(qkv_bias=False, out_bias=False, mlp_bias=False)
        if hf.get("sliding_window") is not None:
            kwargs.update(sliding_window=int(hf["sliding_window"]))
    return kwargs


def _layer_types(hf: dict, layers: int) -> Optional[tuple]:
    """``config.json`` ``layer_types`` as per-layer booleans (True: sliding window), None when absent."""
    types = hf.get("layer_types")
    if types is None:
        return None
    if len(types) != layers:
        raise ValueError(f"config.json layer_types has {len(types)} entries, num_hidden_layers={layers}")
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ValueError(f"config.json layer_types has unsupported entries {sorted(unknown)}")
    return tuple(t == "sliding_attention" for t in types)


def _qwen_windows(hf: dict, layers: int) -> dict:
    """Qwen2 / Qwen3 sliding windows: only with ``use_sliding_window``; ``layer_types`` if given, else the layers
    from ``max_window_layers`` on (transformers' rule)."""
    if not (hf.get("use_sliding_window", False) and hf.get("sliding_window") is not None):
        return {}
    window_layers = _layer_types(hf, layers)
    if window_layers is None:
        start = int(hf.get("max_window_layers", 0))
        window_layers = tuple(i >= start for i in range(layers))
    if not any(window_layers):
        return {}
    return dict(sliding_window=int(hf["sliding_window"]), sliding_window_layers=window_layers)


_NO_GEMMA_SWITCHES = dict(qk_norm=False, norm_offset=0.0, sandwich_norm=False, embed_scale=False,
                          query_pre_attn_scalar=None, rope_local_theta=None)


def _check_switches(config: "ModelConfig", expected: dict) -> None:
    wrong = {k: getattr(config, k) for k, v in expected.items() if getattr(config, k) != v}
    if wrong:
        raise ValueError(f"a {config.family} config cannot be exported with {wrong}; the family has "
                         f"{ {k: expected[k] for k in wrong} }")


def _gemma3_from_hf(hf: dict) -> dict:
    """Gemma 3 text decoder (``Gemma3ForCausalLM``): defaults are those of transformers' ``Gemma3TextConfig``."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            raise ValueError(f"config.json {key}={hf[key]} is not supported for gemma3_text (Gemma 3 checkpoints "
                             f"set it to null, and transformers' Gemma3 does not apply attention softcapping); "
                             f"set it to null")
    if hf.get("use_bidirectional_attention", False):
        raise ValueError("config.json use_bidirectional_attention=true (Gemma 3 encoder use) is not supported; "
                         "set it to false")
    hidden = int(hf["hidden_size"])
    heads = int(hf["num_attention_heads"])
    layers = int(hf["num_hidden_layers"])
    window_layers = _layer_types(hf, layers)
    if window_layers is None:
        pattern = int(hf.get("sliding_window_pattern", 6))
        window_layers = tuple(bool((i + 1) % pattern) for i in range(layers))
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:  # older config.json: rope_theta, rope_local_base_freq, rope_scaling (global layers only)
        full = dict(hf.get("rope_scaling") or {})
        full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
        local = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
    full.setdefault("rope_theta", 1_000_000.0)
    theta, scaling = _rope_from_hf({"rope_parameters": full,
                                    "max_position_embeddings": hf.get("max_position_embeddings", 131_072)})
    local_type = local.get("rope_type", "default")
    if local_type != "default":
        raise ValueError(f"config.json rope_parameters.sliding_attention rope_type={local_type!r} is not supported "
                         "(Gemma 3 scales the global layers only); use 'default'")
    bias = bool(hf.get("attention_bias", False))
    kwargs = dict(
        hidden_size=hidden, intermediate_size=int(hf["intermediate_size"]), num_layers=layers, num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=int(hf.get("head_dim") or 256),
        max_position_embeddings=int(hf.get("max_position_embeddings", 131_072)),
        norm="rms", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp="gated",
        activation=hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
        positions="rope", rope_theta=theta, rope_scaling=scaling,
        rope_local_theta=float(local.get("rope_theta", 10_000.0)),
        qkv_bias=bias, out_bias=bias, mlp_bias=False,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qk_norm=True, norm_offset=1.0, sandwich_norm=True, embed_scale=True,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
    )
    if any(window_layers) and hf.get("sliding_window", 4096) is not None:
        kwargs.update(sliding_window=int(hf.get("sliding_window", 4096)), sliding_window_layers=window_layers)
    return kwargs


def _gemma3_to_hf(config: "ModelConfig") -> dict:
    _check_switches(config, dict(positions="rope", norm="rms", mlp="gated", qk_norm=True, norm_offset=1.0,
                                 sandwich_norm=True, embed_scale=True, mlp_bias=False, out_bias=config.qkv_bias))
    if config.query_pre_attn_scalar is None or config.rope_local_theta is None:
        raise ValueError("a gemma3_text config needs query_pre_attn_scalar and rope_local_theta")
    windows = config.window_layers
    full = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
    full.update({k: v for k, v in config.rope_scaling if k != "rope_type"})
    return dict(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, hidden_activation=config.activation,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.norm_eps,
        rope_parameters={"full_attention": full,
                         "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_local_theta}},
        query_pre_attn_scalar=(int(config.query_pre_attn_scalar) if float(config.query_pre_attn_scalar).is_integer()
                               else config.query_pre_attn_scalar),  # transformers' field is an int
        sliding_window=config.sliding_window if any(windows) else config.max_position_embeddings,
        layer_types=["sliding_attention" if w else "full_attention" for w in windows],
        attention_bias=config.qkv_bias, attention_dropout=config.attention_dropout_rate,
        final_logit_softcapping=None, attn_logit_softcapping=None, use_bidirectional_attention=False,
        use_cache=True,
    )


def _llama_like_to_hf(config: ModelConfig) -> dict:
    family = config.family
    if config.positions != "rope" or config.norm != "rms" or config.mlp != "gated":
        raise ValueError(f"a {family} family config must use rotary positions, RMSNorm and the gated MLP")
    _check_switches(config, dict(_NO_GEMMA_SWITCHES, qk_norm=family == "qwen3"))
    if family in ("llama", "qwen3") and config.qkv_bias != config.out_bias:
        raise ValueError("Llama's attention_bias covers q/k/v and o together: qkv_bias must equal out_bias")
    if family == "qwen2" and (not config.qkv_bias or config.out_bias or config.mlp_bias):
        raise ValueError("Qwen2 has biases on q/k/v only: need qkv_bias=True, out_bias=False, mlp_bias=False")
    if family == "mistral" and (config.qkv_bias or config.out_bias or config.mlp_bias):
        raise ValueError("Mistral has no projection biases")
    if family == "qwen3" and config.mlp_bias:
        raise ValueError("Qwen3 has no MLP biases")
    if (family not in ("qwen2", "qwen3") and config.sliding_window_layers is not None
            and not all(config.sliding_window_layers)):
        raise ValueError(f"per-layer sliding windows cannot be exported as a {family} config")
    if family == "llama" and config.sliding_window is not None:
        raise ValueError("Llama has no sliding_window; use the mistral or qwen2 family")
    rope = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
    rope.update({k: v for k, v in config.rope_scaling if k != "rope_type"})
    out = dict(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, hidden_act=config.activation,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.norm_eps,
        rope_parameters=rope, rope_theta=config.rope_theta, attention_dropout=config.attention_dropout_rate,
        use_cache=True,
    )
    if config.rope_scaling:
        out["rope_scaling"] = dict(rope)
    if family == "llama":
        out.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias, pretraining_tp=1)
    elif family == "mistral":
        out.update(sliding_window=config.sliding_window)
    elif family == "qwen3":
        out.update(attention_bias=config.qkv_bias)
    if family in ("qwen2", "qwen3"):
        windows = config.window_layers
        use = any(windows)
        first = next((i for i, w in enumerate(windows) if w), config.num_layers)
        out.update(use_sliding_window=use, sliding_window=config.sliding_window if use else None,
                   max_window_layers=first,
                   layer_types=["sliding_attention" if w else "full_attention" for w in windows])
    return out


def tiny_config(family: str = "llama", **overrides) -> ModelConfig:
    """A tiny config of ``family`` for tests and demos: hidden 64, 2 layers, 4 heads (2 kv heads where the family has
    grouped-query attention), head_dim 16, vocab 128. ``overrides`` replace any ModelConfig field."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}; choose one of {FAMILIES}")
    if family == "gpt2":
        hf = dict(model_type="gpt2", vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_inner=256, n_positions=256)
    elif family == "gemma3_text":  # one sliding (window 4) and one global layer, as Gemma 3 interleaves them
        hf = dict(model_type=family, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  rms_norm_eps=1e-6, query_pre_attn_scalar=16, sliding_window=4,
                  layer_types=["sliding_attention", "full_attention"],
                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    else:
        hf = dict(model_type=family, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  rope_theta=10000.0, rms_norm_eps=1e-6)
    return ModelConfig.from_hf_dict(hf, **overrides)
