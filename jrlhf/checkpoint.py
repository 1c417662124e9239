"""Orbax checkpoints with exact resume.

A checkpoint at step ``s`` holds two items: ``state`` (the whole train state pytree: params, optimizer state, step,
RNG, algorithm state, and any mutable frozen params such as a TR-DPO reference) and ``meta`` (JSON: the data
iterator's position, the resolved config and the model config, checked on restore).
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from jrlhf.errors import JrlhfError


class CheckpointError(JrlhfError):
    """A checkpoint is missing or does not belong to this run's model; the message says which and why."""


def _abstract(tree):
    """ShapeDtypeStructs carrying each leaf's sharding, the restore target for orbax."""

    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(leaf, tree)


class Checkpointer:
    """Saves every N steps (async), keeps the last ``keep`` checkpoints, restores the latest.

    Only the main process writes metadata (orbax coordinates the array writes of all processes).
    """

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or ``None``."""
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Starts saving ``state`` and ``meta`` at ``step`` (returns at once when async)."""
        if step in (self.manager.all_steps() or []):
            return False
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               meta=ocp.args.JsonSave(meta)), force=force)

    def wait(self) -> None:
        """Blocks until an in-flight async save has finished."""
        self.manager.wait_until_finished()

    def restore(self, state_like, *, step: int | None = None, expect_model: dict | None = None):
        """Restores ``(state, meta)`` from ``step`` (default: latest) into the shapes/shardings of ``state_like``.

        ``expect_model`` (a model config dict) is compared with the saved one: a checkpoint of another model is
        an error naming the first differing key.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint found in '{self.directory}'")
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if expect_model is not None:
            check_same_model(meta.get("model_config", {}), expect_model, self.directory)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(state_like))))
        return restored["state"], meta

    def close(self) -> None:
        self.wait()
        self.manager.close()


def check_same_model(saved: dict, current: dict, where: str) -> None:
    """Raises :class:`CheckpointError` if two model config dicts differ in an architecture key."""
    keys = sorted(set(saved) | set(current))
    for k in keys:
        if k in ("dtype", "param_dtype", "remat", "scan_layers"):
            continue
        if saved.get(k) != current.get(k):
            raise CheckpointError(
                f"checkpoint in '{where}' is from another model: '{k}' is {saved.get(k)!r} there but "
                f"{current.get(k)!r} in this run's model (use another train.output_dir or the matching model)")
