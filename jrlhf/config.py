"""Typed run configuration: nested dataclasses, YAML files and ``key=value`` overrides.

A run is described by :class:`RunConfig`; its ``algo`` section is the dataclass of the chosen algorithm
(``jrlhf.algorithms.<name>.Config``). Unknown keys are errors that name the key and the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml


from jrlhf.errors import JrlhfError


class ConfigError(JrlhfError, ValueError):
    """A configuration value or key is invalid; the message names it and the fix."""


@dataclass
class LoraSection:
    """Low-rank adapters (``model.lora``; :class:`jrlhf.models.lora.LoraConfig`, PEFT's names and defaults).

    ``r`` rank; ``alpha`` scaling numerator (the update is scaled by ``alpha / r``, ``alpha / sqrt(r)`` with
    ``use_rslora``); ``dropout`` on the adapter input (must be 0 in ``jrlhf train``: its losses run the model
    deterministically); ``target_modules`` names or glob patterns over ``q_proj``, ``k_proj``, ``v_proj``,
    ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj`` (default: all seven; ``all-linear`` too); ``init``
    ``default`` (A uniform +-1/sqrt(fan_in), B zero) or ``gaussian``; ``dtype`` of the adapter params.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    use_rslora: bool = False
    init: str = "default"
    dtype: str = "float32"

    def __post_init__(self):
        try:
            self.to_model()
        except ValueError as error:
            raise ConfigError(f"model.{error}") from None

    def to_model(self):
        """The :class:`jrlhf.models.lora.LoraConfig` of these settings."""
        from jrlhf.models.lora import LoraConfig

        return LoraConfig(r=self.r, alpha=self.alpha, dropout=self.dropout, target_modules=tuple(self.target_modules),
                          use_rslora=self.use_rslora, init=self.init, dtype=self.dtype)


@dataclass
class ModelSection:
    """Which model to train.

    ``path`` is a local Hugging Face directory (config.json + safetensors), or ``None`` to build a fresh random
    model from ``family`` and ``overrides`` (:class:`jrlhf.models.ModelConfig` fields over
    :func:`jrlhf.models.tiny_config`; ``vocab_size`` defaults to the tokenizer's). ``remat`` is "none", "full",
    "dots" or "dots_no_batch" (per-layer rematerialisation); ``scan_unroll`` the layers per iteration of the scan
    over layers (1: rolled; the layer count: fully unrolled, faster for shallow models on CPU). ``lora``
    (:class:`LoraSection`, ``None``: off) trains low-rank adapters on the frozen model, which is also the
    reference (no copy of the weights); ``--set model.lora.r=8`` turns it on.
    """

    path: str | None = None
    family: str = "llama"
    overrides: dict = field(default_factory=dict)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_unroll: int = 1
    lora: LoraSection | None = None


@dataclass
class DataSection:
    """Training/eval data and tokenisation.

    ``tokenizer``: ``None`` (default) is the model's own: the tokenizer files in ``train.init_from`` /
    ``model.path``, or the shipped character tokenizer for a fresh random model (``model.path`` unset); ``"char"``
    or a local folder picks one explicitly (it must match the pretrained model's own tokenizer, when its folder has
    one). ``pad_token``: for a tokenizer without a pad token, ``"eos"`` reuses EOS (see
    :func:`jrlhf.data.load_tokenizer`). The limits (``max_length``, ``max_prompt_length``, ``max_completion_length``,
    ``truncation_mode``), ``overlong`` (``truncate`` / ``drop`` / ``error``) and ``invalid_records`` (``error`` /
    ``drop``: records with a missing or empty field) apply to the training and the held-out records alike.
    ``eval_batch_size`` is the number of held-out records per evaluation batch; scoring passes lower it so that a
    batch holds at most ``eval_max_tokens`` padded tokens (both sides of a pair counted).
    Training batches are padded to a length bucket (one compilation per bucket): ``buckets`` lists them
    explicitly; otherwise powers of two up to ``max_length`` (the default), or with ``pad_to_multiple_of: N`` powers
    of two below ``N``, then multiples of ``N`` (:func:`jrlhf.data.length_buckets`; 64 pads the HH recipe's batches
    to 428 tokens on average instead of 495, at a few more compilations).
    ``eval_stop_token_ids``: token ids that end a generated eval completion, besides every EOS id of the model's
    ``config.json`` / ``generation_config.json`` and the tokenizer's (:func:`jrlhf.evaluation.run_stop_token_ids`).
    ``eval_holdout`` > 0 holds the last ``eval_holdout`` records of ``train`` out of training and evaluates on them
    as ``eval`` (preference algorithms: DPO, reward model), for data that ships as one file; it cannot be combined
    with ``eval``. ``system_prompt``, when set, is the system message of every training and held-out prompt that
    has none (plain-string prompts become a system + user conversation; needs a tokenizer with a chat template).
    """

    train: str = "builtin:addition/sft_train.jsonl"
    eval: str | None = None
    eval_prompts: str | None = None
    eval_reward: str = "addition_exact_match"
    eval_max_new_tokens: int = 8
    tokenizer: str | None = None
    pad_token: str | None = None
    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int = 64
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    truncation_mode: str = "keep_end"
    overlong: str = "truncate"
    invalid_records: str = "error"
    eval_max_tokens: int = 16384
    buckets: tuple = ()
    pad_to_multiple_of: int | None = None
    packing: bool = False
    shuffle: bool = True
    max_eval_examples: int | None = None
    eval_stop_token_ids: tuple = ()
    eval_holdout: int = 0
    system_prompt: str | None = None

    def __post_init__(self):
        choices = {"overlong": ("truncate", "drop", "error"), "invalid_records": ("error", "drop"),
                   "truncation_mode": ("keep_end", "keep_start")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ConfigError(f"data.{key}={getattr(self, key)!r} is not one of {', '.join(valid)}")
        for key in ("batch_size", "eval_batch_size", "eval_max_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}={getattr(self, key)} must be >= 1")
        p = self.pad_to_multiple_of
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise ConfigError(f"data.pad_to_multiple_of={p!r} must be a positive int or null (powers of two)")
        if p is not None and self.buckets:
            raise ConfigError("data.pad_to_multiple_of and data.buckets both set: give one bucket rule "
                              "(explicit buckets, or multiples of pad_to_multiple_of)")


@dataclass
class OptimSection:
    """Optimizer; see :class:`jrlhf.step.OptimizerConfig`."""

    name: str = "adamw"
    learning_rate: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


@dataclass
class MeshSection:
    """Device mesh sizes; ``-1`` takes the rest of the devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclass
class TrainSection:
    """Loop settings: length, seeds, logging, evaluation and checkpoint cadence.

    ``max_nonfinite``: how many updates with a non-finite loss or gradient may be skipped (in-graph, the parameters
    untouched) before the run stops with :class:`jrlhf.errors.NonFiniteLossError` (default 0: stop at the first).

    Best-checkpoint selection (Hugging Face ``TrainingArguments`` names, the rule of
    :class:`jrlhf.metrics.BestCheckpoint`): ``metric_for_best_model`` names a metric of the periodic evaluation
    (e.g. ``reward_model``, the learned reward model's mean score of greedy completions of held-out prompts in a
    PPO run with ``algo.reward_model``); ``greater_is_better``; ``load_best_model_at_end`` exports the best
    evaluated parameters to ``hf_model/`` (written when each new best is found) instead of the last ones;
    ``early_stopping_patience`` > 0 stops the run after that many evaluations without an improvement larger than
    ``early_stopping_threshold``. The summary's ``best`` holds the best step, value and evaluation.
    """

    output_dir: str = "runs/default"
    steps: int = 100
    seed: int = 0
    num_microbatches: int = 1
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = True
    export_hf: bool = True
    init_from: str | None = None
    max_nonfinite: int = 0
    progress_bar: bool = True
    tensorboard: bool = True
    metric_for_best_model: str | None = None
    greater_is_better: bool = True
    load_best_model_at_end: bool = False
    early_stopping_patience: int = 0
    early_stopping_threshold: float = 0.0


@dataclass
class RunConfig:
    """Everything that defines a run. ``algo`` holds the algorithm's own dataclass."""

    algorithm: str = "sft"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    train: TrainSection = field(default_factory=TrainSection)
    algo: Any = None


def _nearest(key: str, valid) -> str:
    """`` (did you mean 'x'?)`` for a close match (difflib ratio >= 0.6), else the valid keys when there are few."""
    valid = list(valid)
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if match:
        return f" (did you mean '{match[0]}'?)"
    if not valid:
        return " (this section takes no keys)"
    return f" (valid keys: {', '.join(valid)})" if len(valid) <= 40 else ""


_PLACEHOLDER = re.compile(r"^<set ([A-Za-z_][\w.]*)=")


def check_no_placeholders(cfg: "RunConfig") -> None:
    """A shipped recipe marks the settings a user must give with placeholders such as
    ``"<set model.path=/path/to/hf_model_dir>"``; a run that still holds one stops here, before any work.

    Raises:
      ConfigError: naming the key and the ``--set`` to give.
    """

    def walk(value, where):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), f"{where}.{f.name}" if where else f.name)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")
        elif isinstance(value, str) and _PLACEHOLDER.match(value):
            raise ConfigError(f"{where} is not set: give it on the command line, e.g. --set {where}=... "
                              f"(the config holds the placeholder {value!r})")

    walk(cfg, "")


def _coerce(value, annotation, where: str):
    """Coerces a YAML value to a dataclass field's annotated type, with a clear error."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {})  # noqa: S307 - annotations of our own dataclasses
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any or value is None:
        if value is None and annotation is not Any and type(None) not in args:
            raise ConfigError(f"config key '{where}' may not be null")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"bad value for '{where}'")
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, prefix=where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{where}' must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key '{where}' must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{where}' must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{where}' must be a string, got {value!r}")
        return value
    if annotation is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
        return (value,)
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls, data: dict | None, prefix: str = ""):
    """Builds dataclass ``cls`` from a nested dict; unknown keys raise :class:`ConfigError` naming the key."""
    data = {} if data is None else data
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or cls.__name__}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{where}'{_nearest(key, fields)}")
        kwargs[key] = _coerce(value, hints[key], where)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """The plain-dict (YAML-serialisable) form of a config dataclass."""

    def convert(x):
        if dataclasses.is_dataclass(x):
            return {f.name: convert(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [convert(v) for v in x]
        if isinstance(x, dict):
            return {k: convert(v) for k, v in x.items()}
        if callable(x):  # a reward function passed as a callable: its import path
            target = x if hasattr(x, "__qualname__") else type(x)
            return f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', '?')}"
        return x

    return convert(cfg)


def _set_nested(d: dict, dotted: str, value):
    keys = dotted.split(".")
    for k in keys[:-1]:
        nxt = d.get(k)
        if nxt is None:
            nxt = d[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set '{dotted}': '{k}' is not a section")
        d = nxt
    d[keys[-1]] = value


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, also reading ``1e-4`` / ``3E5`` (exponent without a dot) as floats.

    YAML 1.1, which PyYAML implements, needs a dot (``1.0e-4``); YAML 1.2 and JSON do not, and learning rates are
    written that way everywhere.
    """


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml_problem(error: yaml.YAMLError) -> str:
    """``line L, column C: problem`` of a PyYAML error, on one line."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def parse_yaml(text: str, where: str):
    """Reads YAML ``text`` with jrlhf's loader (``1e-4`` is a float).

    Raises:
      ConfigError: malformed YAML; the message names ``where``, the line and column, and the problem.
    """
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise ConfigError(f"{where} is not valid YAML ({_yaml_problem(error)})") from None


def parse_overrides(overrides) -> dict:
    """Parses ``["a.b=1", "c=x"]`` into a nested dict; values are read as YAML scalars (``1e-4`` is a float).

    Raises:
      ConfigError: an item without ``=`` or with a value that is not valid YAML (the item is named).
    """
    out: dict = {}
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.steps=200)")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"override '{item}' has no key before '=' (e.g. train.steps=200)")
        value = parse_yaml(raw, f"the value of --set '{item}'") if raw.strip() else ""
        _set_nested(out, key.strip(), value)
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    """Recursively merges ``extra`` into a copy of ``base``."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def builtin_config_path(name: str) -> str:
    """Path of a YAML file shipped in ``jrlhf/configs`` (``name`` with or without ``.yaml``)."""
    fname = name if name.endswith(".yaml") else name + ".yaml"
    return str(resources.files("jrlhf") / "configs" / fname)


def load_yaml(path: str) -> dict:
    """Reads a YAML config; ``builtin:NAME`` reads a shipped one. Missing files name the path."""
    if path.startswith("builtin:"):
        path = builtin_config_path(path[len("builtin:"):])
    if not os.path.exists(path):
        raise ConfigError(f"config file '{path}' does not exist (shipped configs: builtin:NAME, see jrlhf/configs/)")
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                          f"{error.start}); save it as UTF-8") from None
    data = parse_yaml(text, f"config file '{path}'") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return data


def build_config(data: dict, algorithm: str | None = None) -> RunConfig:
    """Builds a :class:`RunConfig` (with the algorithm's own ``algo`` dataclass) from a nested dict."""
    from jrlhf.algorithms import get_algorithm

    data = dict(data)
    name = algorithm or data.get("algorithm", "sft")
    if algorithm and data.get("algorithm") not in (None, algorithm):
        raise ConfigError(f"config says algorithm '{data['algorithm']}' but '{algorithm}' was asked for")
    data["algorithm"] = name
    algo_mod = get_algorithm(name)
    algo_data = data.pop("algo", None)
    cfg = from_dict(RunConfig, data)
    cfg.algo = from_dict(algo_mod.Config, algo_data, prefix="algo")
    check_model_overrides(cfg.model.overrides)
    return cfg


def check_model_overrides(overrides: dict) -> None:
    """``model.overrides`` keys must be :class:`jrlhf.models.ModelConfig` fields.

    Raises:
      ConfigError: an unknown key, named with the nearest field (``hiden_size`` -> ``hidden_size``).
    """
    from jrlhf.models import ModelConfig

    valid = [f.name for f in dataclasses.fields(ModelConfig)]
    for key in overrides:
        if key not in valid:
            raise ConfigError(f"unknown config key 'model.overrides.{key}'{_nearest(str(key), valid)}; "
                              "model.overrides takes ModelConfig fields")


def load_config(path: str | None = None, overrides=(), algorithm: str | None = None) -> RunConfig:
    """Loads a YAML file (or ``builtin:NAME``), applies ``key=value`` overrides, and validates every key."""
    data = load_yaml(path) if path else {}
    data = deep_merge(data, parse_overrides(overrides))
    return build_config(data, algorithm)
