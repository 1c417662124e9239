"""Loading and saving Hugging Face checkpoint directories (``config.json`` + safetensors)."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jrlhf.errors import ModelFileError
from jrlhf.models.config import HEADS, ModelConfig
from jrlhf.models.transformer import abstract_params, build_model
from jrlhf.models.weights import FAMILY_WEIGHTS

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"


# --------------------------------------------------------------------------- reading


class _TensorSource:
    """Name -> lazily read numpy array over one checkpoint directory (single file or sharded)."""

    def __init__(self, path: str):
        self.path = path
        self._files: Dict[str, Any] = {}
        self._torch_cache: Dict[str, dict] = {}
        single, index = os.path.join(path, SAFETENSORS), os.path.join(path, SAFETENSORS_INDEX)
        tsingle, tindex = os.path.join(path, TORCH_BIN), os.path.join(path, TORCH_BIN_INDEX)
        if os.path.exists(single):
            self.kind, self.weight_map = "safetensors", self._safetensors_names(SAFETENSORS)
        elif os.path.exists(index):
            self.kind, self.weight_map = "safetensors", self._read_index(index)
        elif os.path.exists(tsingle) or os.path.exists(tindex):
            try:
                import torch  # noqa: F401
            except ImportError as error:
                raise ImportError(f"{path} holds only {TORCH_BIN}; reading it needs torch installed "
                                  "(or convert the checkpoint to safetensors)") from error
            self.kind = "torch"
            self.weight_map = (self._read_index(tindex) if os.path.exists(tindex)
                               else {n: TORCH_BIN for n in self._torch_file(TORCH_BIN)})
        else:
            raise FileNotFoundError(
                f"no weights in {path}: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN} or {TORCH_BIN_INDEX}")

    @staticmethod
    def _read_index(index_path: str) -> Dict[str, str]:
        data = read_json_file(index_path, "a checkpoint index")
        if not isinstance(data.get("weight_map"), dict):
            raise ModelFileError(f"{index_path}: no 'weight_map' mapping; re-export the checkpoint")
        return dict(data["weight_map"])

    def _safetensors(self, filename: str):
        if filename not in self._files:
            from safetensors import safe_open

            file = os.path.join(self.path, filename)
            try:
                self._files[filename] = safe_open(file, framework="np")
            except Exception as error:  # safetensors raises its own SafetensorError or OSError
                raise ModelFileError(f"{file} is not a readable safetensors file ({_first_line(error)}); it may be "
                                     "truncated or damaged: copy or export it again") from None
        return self._files[filename]

    def _safetensors_names(self, filename: str) -> Dict[str, str]:
        return {name: filename for name in self._safetensors(filename).keys()}

    def _torch_file(self, filename: str) -> dict:
        if filename not in self._torch_cache:
            import torch

            file = os.path.join(self.path, filename)
            try:
                self._torch_cache = {filename: torch.load(file, map_location="cpu", weights_only=True)}
            except Exception as error:
                import pickle

                if isinstance(error, pickle.UnpicklingError):
                    raise ModelFileError(
                        f"{file} was refused: it holds pickled objects other than tensors, which could run code "
                        "(read with weights_only=True); use a safetensors checkpoint from a source you trust") from None
                raise ModelFileError(f"{file} is not a readable PyTorch checkpoint ({_first_line(error)}); it may be "
                                     "truncated or damaged: copy or export it again") from None
        return self._torch_cache[filename]

    def names(self):
        return self.weight_map.keys()

    def get(self, name: str) -> np.ndarray:
        filename = self.weight_map[name]
        if self.kind == "safetensors":
            try:
                return self._safetensors(filename).get_tensor(name)
            except ModelFileError:
                raise
            except Exception as error:
                raise ModelFileError(f"{os.path.join(self.path, filename)}: tensor {name!r} is unreadable "
                                     f"({_first_line(error)}); the file may be truncated: copy or export it again"
                                     ) from None
        tensor = self._torch_file(filename)[name]
        import torch

        if tensor.dtype == torch.bfloat16:
            import ml_dtypes

            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()


def _set_path(tree: dict, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree: dict, path):
    for key in path:
        tree = tree[key]
    return tree


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def read_json_file(path: str, what: str) -> dict:
    """The JSON object in ``path``.

    Raises:
      ModelFileError: not UTF-8, malformed JSON (line and column named) or not an object; the message names ``path``.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as error:
        raise ModelFileError(f"{path} ({what}) is not UTF-8 text (byte offset {error.start})") from None
    except json.JSONDecodeError as error:
        raise ModelFileError(f"{path} ({what}) is malformed JSON: {error.msg} at line {error.lineno}, column "
                             f"{error.colno}") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} ({what}) must hold a JSON object, got {type(data).__name__}")
    return data


def read_hf_config(path: str) -> dict:
    """The ``config.json`` dict of a local HF checkpoint directory.

    Raises:
      FileNotFoundError: no ``config.json``. ModelFileError: it is malformed (the file, line and column named).
    """
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: from_pretrained needs a local HF checkpoint directory")
    return read_json_file(config_path, "the model config")


GENERATION_CONFIG = "generation_config.json"


def _eos_entries(value, where: str) -> list:
    """The ids of one ``eos_token_id`` entry (None, an int or a list of ints); ValueError naming ``where``."""
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{where}: eos_token_id must be a token id >= 0 or a list of them, got {value!r}")
    return [int(v) for v in values]


def eos_token_ids(path: Optional[str] = None, *, tokenizer: Any = None, model_config: Any = None,
                  extra: Any = ()) -> tuple:
    """Every token id that ends a completion of a model: the one place jrlhf collects them.

    The union, in this order and without repeats, of the ``eos_token_id`` entries (an id or a list of ids) of
    ``path/config.json`` and ``path/generation_config.json`` (either file may be absent), of ``model_config``
    (a :class:`ModelConfig` or anything with ``eos_token_id``), of ``tokenizer.eos_token_id``, and of ``extra``
    (a user's ``stop_token_ids``). ``transformers.generate`` stops at every id of the generation config, which
    (for Qwen2/Qwen3-Instruct, Gemma 3, Phi...) lists more than the tokenizer's EOS, e.g. an end-of-turn token.

    Returns:
      A tuple of ints (possibly empty), the ``eos_token_id`` argument of :func:`jrlhf.sampling.generate`.

    Raises:
      ValueError: an entry that is not a token id ``>= 0`` (or a list of them), naming the file or argument.
    """
    ids: list = []
    if path:
        for filename in ("config.json", GENERATION_CONFIG):
            file_path = os.path.join(path, filename)
            if os.path.isfile(file_path):
                with open(file_path) as f:
                    ids += _eos_entries(json.load(f).get("eos_token_id"), file_path)
    if model_config is not None:
        ids += _eos_entries(getattr(model_config, "eos_token_id", None), "the model config")
    if tokenizer is not None:
        ids += _eos_entries(getattr(tokenizer, "eos_token_id", None), "the tokenizer")
    ids += _eos_entries(list(extra) if extra is not None else None, "stop_token_ids")
    return tuple(dict.fromkeys(ids))


def from_pretrained(path: str, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, head: str = "lm",
                    head_rng: Optional[jax.Array] = None, shardings: Any = None, strict: bool = True,
                    **config_overrides):
    """Loads a local Hugging Face checkpoint directory: returns ``(model, params)``.

    path: directory with ``config.json`` and ``model.safetensors`` (or a sharded ``model.safetensors.index.json``,
    or ``pytorch_model.bin`` where torch is installed, read with ``weights_only=True``).
    dtype: compute dtype; param_dtype: storage dtype of the returned parameters.
    head: "lm" (``AutoModelForCausalLM`` weights), "score"/"value" (a ``...ForSequenceClassification`` checkpoint
    with one label: its ``score`` weight), or "lm+value". When the checkpoint has no ``score.weight`` (e.g. a value
    head on top of an SFT model) pass ``head_rng`` to initialise it; otherwise this is an error.
    shardings: optional pytree of ``jax.sharding.Sharding`` matching the returned ``params`` (e.g. from
    ``logical_axes(model)`` through the sharding rules), used to place each tensor as it is loaded.
    strict: raise on checkpoint tensors the model does not use (other than known buffers and an unused LM/score
    head). ``config_overrides``: ModelConfig fields (``remat``, ``dropout_rate``...).

    Raises ValueError naming the tensor and both shapes on any missing or mismatched weight.
    """
    if head not in HEADS:
        raise ValueError(f"head={head!r}; choose one of {HEADS}")
    config = ModelConfig.from_hf_dict(read_hf_config(path), dtype=dtype, param_dtype=param_dtype,
                                      **config_overrides)
    model = build_model(config, head)
    family = FAMILY_WEIGHTS[config.family]
    source = _TensorSource(path)
    names = set(source.names())
    # checkpoints saved from the bare trunk (e.g. ``LlamaModel``) have no ``model.`` / ``transformer.`` prefix
    trunk_first = family.rules(config, "lm")[0].hf_name
    prefix = family.prefix
    if prefix + trunk_first not in names and trunk_first in names:
        prefix = ""

    expected = abstract_params(model)["params"]
    target = np.dtype(jnp.dtype(param_dtype))
    params: dict = {}
    used = set()
    for rule in family.rules(config, head):
        base = rule.hf_name if rule.top_level else prefix + rule.hf_name
        layer_names = [base.format(i=i) for i in range(config.num_layers)] if rule.per_layer else [base]
        is_scalar_head = rule.paths == (("score",),)
        if is_scalar_head and base not in names and head_rng is not None:
            fresh = config.initializer_range * jax.random.normal(head_rng, expected["score"].shape, jnp.float32)
            _set_path(params, ("score",), np.asarray(fresh).astype(target))
            continue
        parts = [[] for _ in rule.paths]
        for name in layer_names:
            if name not in names:
                hint = " (the checkpoint has no scalar head: pass head_rng to initialise one)" if is_scalar_head else ""
                raise ValueError(f"checkpoint {path} is missing tensor {name!r} of shape {rule.hf_shape}{hint}")
            array = source.get(name)
            if tuple(array.shape) != rule.hf_shape:
                raise ValueError(f"tensor {name!r}: checkpoint shape {tuple(array.shape)} but the config "
                                 f"({config.family}) expects {rule.hf_shape}")
            used.add(name)
            for slot, converted in zip(parts, rule.to_params(array)):
                slot.append(np.asarray(converted).astype(target))
        for param_path, slot in zip(rule.paths, parts):
            _set_path(params, param_path, np.stack(slot) if rule.per_layer else slot[0])

    unused = names - used
    ignorable = {n for n in unused if n.endswith(family.ignorable_suffixes)
                 or n in ("lm_head.weight", "score.weight")}
    if strict and unused - ignorable:
        extra = sorted(unused - ignorable)
        raise ValueError(f"checkpoint {path} has {len(extra)} tensors this {config.family} config does not use, "
                         f"e.g. {extra[:5]} (check num_hidden_layers and the head; strict=False ignores them)")

    flat_expected = jax.tree_util.tree_flatten_with_path(expected)[0]
    for key_path, leaf in flat_expected:
        keys = tuple(k.key for k in key_path)
        try:
            value = _get_path(params, keys)
        except KeyError:
            raise ValueError(f"no checkpoint tensor maps to parameter {'/'.join(keys)} {leaf.shape}") from None
        if value.shape != leaf.shape:
            raise ValueError(f"parameter {'/'.join(keys)}: converted shape {value.shape}, model expects {leaf.shape}")
    params = {"params": jax.tree_util.tree_map(lambda _, v: v, expected, params)}
    if shardings is not None:
        return model, jax.tree_util.tree_map(jax.device_put, params, shardings)
    return model, jax.tree_util.tree_map(jnp.asarray, params)


# --------------------------------------------------------------------------- writing


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = str(size).strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _export_head(model, head: Optional[str]) -> str:
    head = model.head if head is None else head
    available = {"lm": ("lm",), "lm+value": ("lm+value", "lm", "value", "score"), "value": ("value", "score"),
                 "score": ("score", "value")}[model.head]
    if head not in available:
        raise ValueError(f"cannot export head={head!r} from a model with head={model.head!r}; choose {available}")
    return head


def hf_state_dict(model, params, dtype: Any = None, head: Optional[str] = None) -> Dict[str, np.ndarray]:
    """HF-named numpy tensors of ``params`` (``dtype`` default: as stored; ``head`` as in :func:`save_pretrained`).
    A LoRA model's adapters are merged into the kernels (:func:`jrlhf.models.lora.merge_params`)."""
    from jrlhf.models.lora import merge_params

    model, params = merge_params(model, params)
    config: ModelConfig = model.config
    family = FAMILY_WEIGHTS[config.family]
    head = _export_head(model, head)
    tree = jax.device_get(params["params"])
    out = {}
    for rule in family.rules(config, head):
        name = rule.hf_name if rule.top_level else family.prefix + rule.hf_name
        values = [np.asarray(_get_path(tree, p)) for p in rule.paths]
        layers = range(config.num_layers) if rule.per_layer else [None]
        for i in layers:
            args = values if i is None else [v[i] for v in values]
            array = np.ascontiguousarray(rule.to_hf(*args))
            if dtype is not None:
                array = array.astype(np.dtype(jnp.dtype(dtype)))
            if tuple(array.shape) != rule.hf_shape:
                raise ValueError(f"tensor {name.format(i=i)}: exported shape {array.shape}, expected {rule.hf_shape}")
            out[name.format(i=i) if i is not None else name] = array
    return out


def save_pretrained(model, params, path: str, dtype: Any = None, max_shard_size="5GB",
                    head: Optional[str] = None) -> None:
    """Writes ``config.json`` and safetensors weights that transformers loads.

    head (default ``model.head``): "lm" writes a causal LM (``AutoModelForCausalLM``); "score"/"value" a
    ``...ForSequenceClassification`` with ``num_labels=1`` (``AutoModelForSequenceClassification``); "lm+value"
    writes the causal LM plus ``score.weight`` (transformers reports it as unexpected and ignores it;
    ``from_pretrained(..., head="lm+value")`` reloads both). An "lm+value" model can export either view alone.
    A LoRA model (``model.config.lora``) is written merged (``W + s A B``): a plain checkpoint of the base
    architecture (:func:`jrlhf.models.lora.save_peft_adapter` writes the adapters alone, in PEFT's format).
    dtype: dtype of the written tensors (default: the parameters' dtype). Checkpoints larger than
    ``max_shard_size`` (bytes or e.g. "2GB") are split into ``model-0000i-of-0000n.safetensors`` with an index.
    """
    from safetensors.numpy import save_file

    from jrlhf.models.lora import merge_params

    os.makedirs(path, exist_ok=True)
    model, params = merge_params(model, params)  # a LoRA model exports W + s A B: a plain checkpoint
    head = _export_head(model, head)
    tensors = hf_state_dict(model, params, dtype, head)
    written_dtype = dtype if dtype is not None else next(iter(tensors.values())).dtype
    config_dict = model.config.to_hf_dict(head, dtype=written_dtype)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
    limit = _parse_size(max_shard_size)
    shards, current, size = [], {}, 0
    for name, array in tensors.items():
        if current and size + array.nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
    shards.append(current)
    for stale in (SAFETENSORS, SAFETENSORS_INDEX):
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SAFETENSORS), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, filename), metadata=metadata)
        weight_map.update({name: filename for name in shard})
    total = sum(a.nbytes for a in tensors.values())
    with open(os.path.join(path, SAFETENSORS_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
