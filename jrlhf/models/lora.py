"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) on the decoder's projection kernels.

A targeted projection ``y = x W`` (``W [*in, *out]``) becomes ``y = x W + s * ((drop(x) A) B)`` with ``A [*in, r]``,
``B [r, *out]`` and ``s = alpha / r`` (rsLoRA, Kalajdzievski 2023, arXiv:2312.03732: ``s = alpha / sqrt(r)``).
The adapters are two more leaves of the params pytree beside the kernel they adapt, stacked over layers like it::

    layers/attn/wq_lora_a  [L, H, r]      ("layers", "embed", None)
    layers/attn/wq_lora_b  [L, r, N, D]   ("layers", None, "heads", "head_dim")
    layers/attn/wo_lora_a  [L, N, D, r]   ("layers", "heads", "head_dim", None)
    layers/attn/wo_lora_b  [L, r, H]      ("layers", None, "embed")

so the logical-axis rule table (:data:`jrlhf.sharding.DEFAULT_RULES`) shards them like their kernels (the rank
axis is replicated). Initialisation follows PEFT's defaults: ``A`` uniform in ``+-1/sqrt(fan_in)`` (PyTorch's
``kaiming_uniform_(a=sqrt(5))`` of a ``[r, in]`` weight) or, with ``init="gaussian"``, ``N(0, 1/r^2)`` (PEFT's
``std = 1/r``); ``B`` zeros, so a fresh adapter leaves the model's outputs exactly unchanged.

The model's config carries the adapter settings (``ModelConfig.lora``, a :class:`LoraConfig`);
:func:`base_model` is the same module without them: applied to the same params it ignores the adapter leaves
and computes the base model, which is how the training losses take reference log-probs without a second copy of
the weights. :func:`merge_params` folds the adapters into the kernels (a plain model for Hugging Face export);
:func:`save_peft_adapter` writes the adapters in PEFT's format (``adapter_config.json`` +
``adapter_model.safetensors``) for ``peft.PeftModel.from_pretrained``.

Module names (``target_modules``) are those of the Hugging Face Llama family, which PEFT users write:
``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (attention) and ``gate_proj``, ``up_proj``, ``down_proj`` (MLP);
a pattern may be an exact name or a shell glob (``"*_proj"``), and ``"all-linear"`` selects all seven.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

MODULES = {
    # name: (sub-module, kernel, number of input axes of the kernel)
    "q_proj": ("attn", "wq", 1),
    "k_proj": ("attn", "wk", 1),
    "v_proj": ("attn", "wv", 1),
    "o_proj": ("attn", "wo", 2),
    "gate_proj": ("mlp", "w_gate", 1),
    "up_proj": ("mlp", "w_up", 1),
    "down_proj": ("mlp", "w_down", 1),
}
"""The projections LoRA can adapt: name -> (sub-module, kernel parameter, input axes of the kernel)."""

DEFAULT_TARGETS = tuple(MODULES)
INITS = ("default", "gaussian")
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"
_KERNEL_TO_NAME = {kernel: name for name, (_, kernel, _) in MODULES.items()}
_PEFT_SUBMODULE = {"attn": "self_attn", "mlp": "mlp"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA settings (PEFT's ``LoraConfig`` names and defaults where they exist). Frozen and hashable.

    Attributes:
      r: adapter rank (PEFT ``r``, default 8).
      alpha: scaling numerator (PEFT ``lora_alpha``, default 8): the update is scaled by ``alpha / r``, or
        ``alpha / sqrt(r)`` with ``use_rslora``.
      dropout: dropout probability on the input of the adapter path (PEFT ``lora_dropout``); active only in a
        forward pass with ``deterministic=False`` and a ``"dropout"`` RNG.
      target_modules: names or glob patterns of the projections to adapt (see :data:`MODULES`; ``"all-linear"``:
        all). A projection the architecture lacks (``gate_proj`` of GPT-2's plain MLP) is skipped.
      use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
      init: ``"default"`` (A uniform ``+-1/sqrt(fan_in)``, B zero: PEFT ``init_lora_weights=True``) or
        ``"gaussian"`` (A ``N(0, 1/r^2)``, B zero).
      dtype: storage dtype of the adapter params (default float32, whatever the base's ``param_dtype``).

    Raises:
      ValueError: a setting out of range or a pattern that matches no module name, naming the field.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: tuple = DEFAULT_TARGETS
    use_rslora: bool = False
    init: str = "default"
    dtype: Any = "float32"

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if isinstance(self.r, bool) or not isinstance(self.r, (int, np.integer)) or self.r < 1:
            raise ValueError(f"lora.r must be a positive integer (the adapter rank), got {self.r!r}")
        set_("r", int(self.r))
        if not float(self.alpha) > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha!r}")
        set_("alpha", float(self.alpha))
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        set_("dropout", float(self.dropout))
        targets = self.target_modules
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        if not targets:
            raise ValueError(f"lora.target_modules is empty; name some of {', '.join(MODULES)}")
        for pattern in targets:
            if not isinstance(pattern, str) or not _matches(pattern):
                raise ValueError(f"lora.target_modules entry {pattern!r} matches no module; use names or glob "
                                 f"patterns over {', '.join(MODULES)} (or 'all-linear')")
        set_("target_modules", targets)
        if self.init not in INITS:
            raise ValueError(f"lora.init={self.init!r}; choose one of {INITS}")
        set_("dtype", np.dtype(jnp.dtype(self.dtype)).name)

    @property
    def scaling(self) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _matches(pattern: str) -> list:
    if pattern == "all-linear":
        return list(MODULES)
    return [name for name in MODULES if fnmatch.fnmatchcase(name, pattern)]


def targeted(lora: LoraConfig, model_config=None) -> tuple:
    """The module names :data:`MODULES` that ``lora.target_modules`` selects (in :data:`MODULES` order), without
    those the architecture of ``model_config`` lacks (``gate_proj`` of a plain MLP)."""
    chosen = set()
    for pattern in lora.target_modules:
        chosen.update(_matches(pattern))
    if model_config is not None and model_config.mlp != "gated":
        chosen.discard("gate_proj")
    return tuple(name for name in MODULES if name in chosen)


def kernel_targeted(config, kernel: str) -> bool:
    """Whether the kernel parameter ``kernel`` (``"wq"``, ``"w_up"``...) of a model with ``config`` has adapters."""
    lora = getattr(config, "lora", None)
    return lora is not None and _KERNEL_TO_NAME.get(kernel) in targeted(lora, config)


def adapter_delta(module, kernel: str, x, in_shape: tuple, out_shape: tuple, in_axes: tuple, out_axes: tuple,
                  deterministic: bool = True):
    """The adapter term ``s * (drop(x) A) B`` of the projection ``kernel`` inside a Flax module (declares the
    ``{kernel}_lora_a`` / ``_lora_b`` params). ``x [..., *in_shape]`` in the compute dtype -> ``[..., *out_shape]``
    in that dtype."""
    import flax.linen as nn

    from jrlhf.models.ops import dense

    c = module.config
    lora: LoraConfig = c.lora
    dtype = jnp.dtype(lora.dtype)
    a = module.param(kernel + SUFFIX_A, nn.with_logical_partitioning(nn.initializers.zeros, in_axes + (None,)),
                     tuple(in_shape) + (lora.r,), dtype)
    b = module.param(kernel + SUFFIX_B, nn.with_logical_partitioning(nn.initializers.zeros, (None,) + out_axes),
                     (lora.r,) + tuple(out_shape), dtype)
    if lora.dropout > 0.0 and not deterministic:
        x = nn.Dropout(lora.dropout)(x, deterministic=False)
    dt = c.dtype
    h = dense(x, a.astype(dt), in_dims=len(in_shape))
    return dense(h, b.astype(dt)) * jnp.asarray(lora.scaling, dt)


# ------------------------------------------------------------------------------------------------ params


def is_adapter_path(path) -> bool:
    """Whether a pytree key path (or a tuple of names) ends at an adapter leaf (``*_lora_a`` / ``*_lora_b``)."""
    last = path[-1]
    name = getattr(last, "key", last)
    return isinstance(name, str) and name.endswith((SUFFIX_A, SUFFIX_B))


def trainable_mask(params, extra: tuple = ("score",)) -> Any:
    """Pytree of Python bools matching ``params``: True at the adapter leaves and at leaves named in ``extra`` (the
    scalar head ``score``, which a LoRA run trains in full, as PEFT's ``modules_to_save``)."""

    def decide(path, _):
        name = getattr(path[-1], "key", None)
        return is_adapter_path(path) or name in extra

    return jax.tree_util.tree_map_with_path(decide, params)


def has_adapters(model) -> bool:
    """Whether ``model`` (a jrlhf module) carries LoRA adapters (``model.config.lora`` is set)."""
    return getattr(getattr(model, "config", None), "lora", None) is not None


def base_model(model):
    """The module of ``model`` without adapters (same head): applied to the LoRA params it ignores the adapter
    leaves and gives the base model's outputs, bit for bit. ``model`` itself when it has no adapters."""
    from jrlhf.models.transformer import build_model

    if getattr(model.config, "lora", None) is None:
        return model
    return build_model(model.config.replace(lora=None), model.head)


def with_lora(model, lora: Optional[LoraConfig]):
    """The module of ``model`` with the adapter settings ``lora`` (``None``: without adapters)."""
    from jrlhf.models.transformer import build_model

    return build_model(model.config.replace(lora=lora), model.head)


def _adapter_leaves(model):
    """``[(path tuple, kernel name, in_dims, shape, dtype)]`` of the adapter leaves ``model`` declares."""
    from jrlhf.models.transformer import abstract_params

    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(model))[0]:
        keys = tuple(k.key for k in path)
        if is_adapter_path(keys):
            kernel = keys[-1][: -len(SUFFIX_A)]
            out.append((keys, kernel, MODULES[_KERNEL_TO_NAME[kernel]][2], tuple(leaf.shape), leaf.dtype))
    return out


def _get(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def _set(tree, keys, value):
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _copy_tree(tree):
    return {k: _copy_tree(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def init_adapters(model, rng) -> dict:
    """Fresh adapter params of a LoRA ``model`` (``{"params": {...}}`` holding only the adapter leaves): ``A`` by
    ``lora.init``, ``B`` zeros, in ``lora.dtype``. Leaf ``k`` (in pytree order) draws from ``fold_in(rng, k)``."""
    lora: LoraConfig = model.config.lora
    if lora is None:
        raise ValueError("init_adapters: the model has no LoRA settings (ModelConfig.lora is None)")
    out: dict = {}
    for index, (keys, kernel, in_dims, shape, dtype) in enumerate(_adapter_leaves(model)):
        if keys[-1].endswith(SUFFIX_B):
            value = jnp.zeros(shape, dtype)
        else:
            layers, in_shape = shape[: len(shape) - in_dims - 1], shape[len(shape) - in_dims - 1:-1]
            fan_in = int(np.prod(in_shape))
            key = jax.random.fold_in(rng, index)
            if lora.init == "gaussian":
                value = jax.random.normal(key, shape, jnp.float32) / lora.r
            else:
                bound = 1.0 / math.sqrt(fan_in)
                value = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
            del layers
            value = value.astype(dtype)
        _set(out, keys, value)
    return out


def add_adapters(model, params, lora: LoraConfig, rng):
    """``(lora_model, params + fresh adapters)`` for a model without adapters and its params; the base leaves are
    the same arrays (not copied)."""
    if getattr(model.config, "lora", None) is not None:
        raise ValueError("add_adapters: the model already has adapters (ModelConfig.lora is set)")
    lora_model = with_lora(model, lora)
    merged = _copy_tree(params)
    adapters = init_adapters(lora_model, rng)
    for path, value in jax.tree_util.tree_flatten_with_path(adapters)[0]:
        _set(merged, tuple(k.key for k in path), value)
    return lora_model, merged


def adapter_params(params) -> dict:
    """The adapter leaves of ``params`` alone (the same nesting)."""
    out: dict = {}
    for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(k.key for k in path)
        if is_adapter_path(keys):
            _set(out, keys, value)
    return out


def strip_adapters(params) -> dict:
    """``params`` without the adapter leaves (the base model's params; same arrays)."""
    out: dict = {}
    for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(k.key for k in path)
        if not is_adapter_path(keys):
            _set(out, keys, value)
    return out


def merged_kernel(kernel, a, b, in_dims: int, scaling: float):
    """``kernel + scaling * A B`` of one (layer-stacked) projection, computed in float32 and returned in the
    kernel's dtype. kernel ``[L, *in, *out]``, a ``[L, *in, r]``, b ``[L, r, *out]``."""
    k32 = np.asarray(kernel, np.float32)
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    lead = a32.shape[: a32.ndim - in_dims - 1]
    r = a32.shape[-1]
    n_in = int(np.prod(a32.shape[len(lead):-1]))
    n_out = int(np.prod(b32.shape[len(lead) + 1:]))
    delta = np.matmul(a32.reshape(*lead, n_in, r), b32.reshape(*lead, r, n_out)).reshape(k32.shape)
    return (k32 + np.float32(scaling) * delta).astype(np.asarray(kernel).dtype)


def merge_params(model, params):
    """``(base_model, merged params)``: every adapted kernel replaced by ``W + s * A B`` (host numpy, in the
    kernel's dtype) and the adapter leaves dropped, for a plain (Hugging Face) export. A model without adapters
    is returned with its params unchanged."""
    lora = getattr(model.config, "lora", None)
    if lora is None:
        return model, params
    host = jax.device_get(params)
    merged = strip_adapters(host)
    for keys, kernel, in_dims, _, _ in _adapter_leaves(model):
        if not keys[-1].endswith(SUFFIX_A):
            continue
        parent = keys[:-1]
        w = _get(host, parent + (kernel,))
        a, b = _get(host, parent + (kernel + SUFFIX_A,)), _get(host, parent + (kernel + SUFFIX_B,))
        _set(merged, parent + (kernel,), merged_kernel(w, a, b, in_dims, lora.scaling))
    return base_model(model), merged


# ------------------------------------------------------------------------------------------------ PEFT format


PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def peft_state_dict(model, params) -> dict:
    """PEFT-named numpy tensors of the adapters: ``base_model.model.<prefix>layers.{i}.<self_attn|mlp>.<name>.
    lora_A.weight [r, in]`` and ``lora_B.weight [out, r]`` (float32), where ``in`` / ``out`` flatten the kernel's
    axes as the Hugging Face weight does.

    Raises:
      ValueError: no adapters, or a family whose Hugging Face projections differ from jrlhf's (GPT-2 fuses q, k and
        v in ``c_attn``): export the merged model instead.
    """
    from jrlhf.models.weights import FAMILY_WEIGHTS

    lora = getattr(model.config, "lora", None)
    if lora is None:
        raise ValueError("peft_state_dict: the model has no adapters (ModelConfig.lora is None)")
    if model.config.family == "gpt2":
        raise ValueError("PEFT export of gpt2 adapters is not supported (transformers fuses q, k, v into c_attn); "
                         "export the merged model with save_pretrained instead")
    if model.head not in ("lm", "lm+value"):
        raise ValueError(f"PEFT export writes causal-LM adapters; the model's head is {model.head!r}")
    prefix = "base_model.model." + FAMILY_WEIGHTS[model.config.family].prefix
    host = jax.device_get(params)["params"]["layers"]
    out = {}
    for name in targeted(lora, model.config):
        sub, kernel, in_dims = MODULES[name]
        a = np.asarray(host[sub][kernel + SUFFIX_A], np.float32)  # [L, *in, r]
        b = np.asarray(host[sub][kernel + SUFFIX_B], np.float32)  # [L, r, *out]
        for i in range(a.shape[0]):
            base = f"{prefix}layers.{i}.{_PEFT_SUBMODULE[sub]}.{name}"
            out[f"{base}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, lora.r).T)
            out[f"{base}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(lora.r, -1).T)
    return out


def peft_config_dict(model, base_model_name_or_path: Optional[str] = None) -> dict:
    """The ``adapter_config.json`` dict PEFT reads for these adapters (``peft_type`` LORA, ``task_type``
    CAUSAL_LM, ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``use_rslora``, ``bias`` none)."""
    lora: LoraConfig = model.config.lora
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": list(targeted(lora, model.config)), "use_rslora": lora.use_rslora, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True if lora.init == "default" else "gaussian",
        "inference_mode": True, "modules_to_save": None,
    }


def save_peft_adapter(model, params, path: str, base_model_name_or_path: Optional[str] = None) -> None:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (:func:`peft_state_dict`) to ``path``:
    ``peft.PeftModel.from_pretrained(<the base transformers model>, path)`` gives the LoRA model's logits.

    Raises:
      ValueError: as :func:`peft_state_dict`.
    """
    from safetensors.numpy import save_file

    tensors = peft_state_dict(model, params)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, PEFT_CONFIG), "w") as f:
        json.dump(peft_config_dict(model, base_model_name_or_path), f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(path, PEFT_WEIGHTS), metadata={"format": "pt"})
