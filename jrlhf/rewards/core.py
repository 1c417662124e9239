"""Reward functions: the calling convention, a registry by name, and weighted combination.

A reward function is any Python callable with TRL's signature::

    fn(prompts, completions, completion_ids, **record_fields) -> list[float | None]

called on the host, outside jit, once per batch of ``N`` completions. ``prompts`` and ``completions`` are lists of
``N`` strings (or message lists), ``completion_ids`` a list of ``N`` token-id lists, and every other field of the
prompt records comes as a keyword argument holding a list of ``N`` values (e.g. ``answer=[...]``), so a function
should accept ``**kwargs``. ``None`` means "not applicable": that sample is left out of that function's mean and
contributes nothing to the weighted total (see :func:`combine_rewards`).
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np

from jrlhf.errors import JrlhfError

logger = logging.getLogger("jrlhf.rewards")

_REGISTRY: dict[str, Callable] = {}
_FACTORIES: dict[str, Callable] = {}


class RewardError(JrlhfError, ValueError):
    """A reward function failed or returned an invalid value; the message names it and shows the sample."""


def _describe(fn) -> str:
    """``module:qualname`` of a callable (its type's for a callable object)."""
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', repr(target))}"


def _same_function(a, b) -> bool:
    """Whether ``b`` is ``a`` or a redefinition of it (same module and qualified name, as when a notebook cell that
    defines and registers a reward function runs again)."""
    return a is b or (_describe(a) == _describe(b) and not _describe(a).endswith("<lambda>"))


def register_reward_fn(name: str, fn: Callable | None = None, *, factory: bool = False):
    """Registers a reward function (or, with ``factory=True``, a ``**kwargs -> reward function`` factory) under
    ``name``; usable as a decorator.

    Registering the same function again under the same name is not an error (a redefinition with the same module
    and qualified name, e.g. a re-run notebook cell, replaces the old one), so scripts and notebook cells can run
    twice.

    Raises:
      RewardError: ``name`` holds a different function (the message names both), or contains ``:`` (reserved for
        ``module:function`` import paths).
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise RewardError(f"reward function name {name!r}: use a non-empty name without ':' (names with ':' are "
                          "module:function import paths)")

    def register(target):
        existing = _REGISTRY.get(name, _FACTORIES.get(name))
        kind_matches = (name in _FACTORIES) == factory
        if existing is not None and not (kind_matches and _same_function(existing, target)):
            raise RewardError(f"reward function name '{name}' is taken by {_describe(existing)}; cannot register "
                              f"{_describe(target)} under it (choose another name)")
        (_FACTORIES if factory else _REGISTRY)[name] = target
        return target

    return register if fn is None else register(fn)


def reward_fn_names() -> list[str]:
    """Names :func:`get_reward_fn` accepts (besides ``module:function`` import paths)."""
    return sorted(set(_REGISTRY) | set(_FACTORIES))


def _import_reward(path: str) -> Callable:
    """The callable at ``module:function`` (``function`` may be dotted: ``module:Class.method``)."""
    import importlib

    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise RewardError(f"reward function '{path}': an import path is 'module:function' (e.g. 'my_rewards:length')")
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise RewardError(f"reward function '{path}': cannot import module '{module_name}' ({error}); put it on "
                          "PYTHONPATH") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise RewardError(f"reward function '{path}': module '{module_name}' has no attribute '{attr}'")
        target = getattr(target, part)
    if not callable(target):
        raise RewardError(f"reward function '{path}' is a {type(target).__name__}, not a callable")
    return target


def get_reward_fn(name: str, **kwargs) -> Callable:
    """The reward function ``name``: a registered name, or a ``module:function`` import path (the module is
    imported; with ``kwargs`` the imported callable is called with them as a factory of the reward function);
    registered factories (e.g. ``"format"``) are called with ``kwargs``.

    Raises:
      RewardError: unknown name (the known names are listed), an import path that does not resolve to a callable,
        or kwargs for a plain registered function.
    """
    if ":" in name:
        target = _import_reward(name)
        return target(**kwargs) if kwargs else target
    if name in _FACTORIES:
        fn = _FACTORIES[name](**kwargs)
        fn.__name__ = getattr(fn, "__name__", name)
        return fn
    if name in _REGISTRY:
        if kwargs:
            raise RewardError(f"reward function '{name}' takes no options, got {sorted(kwargs)}")
        return _REGISTRY[name]
    raise RewardError(f"unknown reward function '{name}'; registered: {', '.join(reward_fn_names())} (or give a "
                      "module:function import path, or pass the function itself)")


def resolve_reward_funcs(entries) -> tuple[list[Callable], list[str]]:
    """Reward functions and their metric names from ``reward_funcs`` entries.

    Args:
      entries: a sequence whose items are callables (TRL's signature, see the module docstring), registered names,
        ``module:function`` import paths, or mappings ``{name: NAME_OR_PATH, **options}`` (factories).

    Returns:
      ``(funcs, names)``: the callables, and one metric name each (the entry's string, else
      :func:`reward_fn_name`; repeats get a ``_2``, ``_3`` suffix).

    Raises:
      RewardError: an entry of another type, or one :func:`get_reward_fn` rejects.
    """
    if isinstance(entries, (str, dict)) or callable(entries):
        entries = (entries,)
    funcs, names, used = [], [], {}
    for entry in entries:
        if isinstance(entry, str):
            fn = get_reward_fn(entry)
            base = entry.rsplit(":", 1)[-1].rsplit(".", 1)[-1] if ":" in entry else entry
        elif isinstance(entry, dict) and "name" in entry:
            options = {k: v for k, v in entry.items() if k != "name"}
            fn = get_reward_fn(entry["name"], **options)
            base = reward_fn_name(fn)
        elif callable(entry):
            fn, base = entry, reward_fn_name(entry)
        else:
            raise RewardError(f"reward_funcs entry {entry!r}: give a callable, a registered name, a module:function "
                              "import path or {name: NAME, ...}")
        used[base] = used.get(base, 0) + 1
        funcs.append(fn)
        names.append(base if used[base] == 1 else f"{base}_{used[base]}")
    return funcs, names


def reward_fn_name(fn: Callable) -> str:
    """The name a reward function's metrics use: ``__name__``, else its class name."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def _show(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sample(prompts, completions, records, row: int) -> str:
    fields = {k: v for k, v in (records[row] if records else {}).items() if k not in ("prompt", "completion")}
    return (
        f"prompt={_show(prompts[row])}, completion={_show(completions[row])}"
        + (f", fields={_show(fields)}" if fields else "")
    )


def combine_rewards(
    funcs,
    weights,
    prompts,
    completions,
    completion_ids,
    records=None,
    *,
    names=None,
    extra_kwargs: dict | None = None,
):
    """Runs every reward function on a batch and sums them with weights, as TRL's GRPOTrainer does.

    Args:
      funcs: reward callables (see the module docstring), or registered names.
      weights: one float per function (``None``: all 1).
      prompts, completions: ``N`` prompts and decoded completions.
      completion_ids: ``N`` lists of completion token ids.
      records: ``N`` record dicts (the prompt records, repeated per sample); their fields other than ``prompt``,
        ``completion`` and ``completion_ids`` are passed as keyword lists.
      names: metric names for the functions (default: :func:`reward_fn_name`, deduplicated with a suffix).
      extra_kwargs: further keyword arguments passed to every function unchanged (e.g. ``step``).

    Returns:
      ``(total, per_func)``: ``total`` float32 ``[N]`` = sum over functions of ``weight * reward``, skipping
      ``None``; NaN where *every* function returned ``None`` (the sample cannot be scored; a warning names it).
      ``per_func`` maps each name to float32 ``[N]``, NaN where the function returned ``None``.

    Raises:
      RewardError: a function raised, returned a wrong number of values, or returned NaN/inf or a non-number; the
        message names the function and shows the offending sample.
    """
    funcs = [get_reward_fn(f) if isinstance(f, str) else f for f in funcs]
    if not funcs:
        raise RewardError("combine_rewards needs at least one reward function")
    count = len(completions)
    if len(prompts) != count or len(completion_ids) != count or (records is not None and len(records) != count):
        raise RewardError(
            f"prompts ({len(prompts)}), completions ({count}), completion_ids ({len(completion_ids)}) and records "
            f"({'-' if records is None else len(records)}) must have the same length"
        )
    weights = np.ones(len(funcs), np.float32) if weights is None else np.asarray(weights, np.float32)
    if weights.shape != (len(funcs),):
        raise RewardError(f"{weights.size} reward weights for {len(funcs)} reward functions")
    if names is None:
        names, used = [], {}
        for fn in funcs:
            base = reward_fn_name(fn)
            used[base] = used.get(base, 0) + 1
            names.append(base if used[base] == 1 else f"{base}_{used[base]}")
    kwargs = {}
    if records:
        keys = [k for k in records[0] if k not in ("prompt", "completion", "completion_ids")]
        kwargs = {k: [r.get(k) for r in records] for k in keys}
    kwargs.update(extra_kwargs or {})

    per_func = {}
    for fn, name in zip(funcs, names):
        try:
            values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        except Exception as error:  # noqa: BLE001 - re-raised with the function named
            raise RewardError(
                f"reward function '{name}' raised {type(error).__name__}: {error} (on a batch of {count}; first "
                f"sample: {_sample(prompts, completions, records, 0) if count else 'none'})"
            ) from error
        try:
            values = list(values)
        except TypeError:
            raise RewardError(
                f"reward function '{name}' returned {_show(values)}, not a list of {count} values"
            ) from None
        if len(values) != count:
            raise RewardError(
                f"reward function '{name}' returned {len(values)} rewards for {count} completions; return one "
                "float (or None) per completion"
            )
        column = np.full(count, np.nan, np.float32)
        for row, value in enumerate(values):
            if value is None:
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = None
            if number is None or isinstance(value, str) or not math.isfinite(number):
                raise RewardError(
                    f"reward function '{name}' returned {_show(value)} for sample {row} "
                    f"({_sample(prompts, completions, records, row)}); return a finite float, or None for "
                    "'not applicable'"
                )
            column[row] = number
        per_func[name] = column

    stacked = np.stack([per_func[n] for n in names], axis=1)  # [N, F]
    unscorable = np.isnan(stacked).all(axis=1)
    total = np.nansum(stacked * weights[None, :], axis=1).astype(np.float32)
    total[unscorable] = np.nan
    if unscorable.any():
        row = int(np.flatnonzero(unscorable)[0])
        logger.warning(
            "every reward function returned None for %d of %d samples, e.g. sample %d (%s)",
            int(unscorable.sum()), count, row, _sample(prompts, completions, records, row),
        )
    return total, per_func


def reward_metrics(total, per_func) -> dict[str, float]:
    """TRL-named reward metrics: ``reward``, ``reward_std``, ``rewards/{name}/mean``, ``rewards/{name}/std``
    (NaN entries, i.e. ``None`` rewards, excluded; std with ``ddof=1`` as ``torch.std``)."""

    def nanstd(x):
        x = x[~np.isnan(x)]
        return float(np.std(x, ddof=1)) if x.size > 1 else float("nan")

    def nanmean(x):
        x = x[~np.isnan(x)]
        return float(x.mean()) if x.size else float("nan")

    metrics = {"reward": nanmean(total), "reward_std": nanstd(total)}
    for name, values in per_func.items():
        metrics[f"rewards/{name}/mean"] = nanmean(values)
        metrics[f"rewards/{name}/std"] = nanstd(values)
    return metrics
