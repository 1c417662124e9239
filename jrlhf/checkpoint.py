"""Orbax checkpoints with exact resume, verified restore with fallback, free-space checks, and the run-directory lock.

A checkpoint at step ``s`` holds two items: ``state`` (the whole train state pytree: params, optimizer state, step,
RNG, algorithm state, and any mutable frozen params such as a TR-DPO reference) and ``meta`` (JSON: the data
iterator's position, the resolved config and the model config, checked on restore).

Restore tries the newest checkpoint first and falls back to the newest one that reads completely; a checkpoint that
does not read (a truncated or missing file, missing metadata) is moved, never deleted, to
``<run_dir>/skipped_checkpoints/<step>`` and named with the reason.

:class:`RunLock` keeps two runs out of one ``train.output_dir``: a lock file holding the owner's pid, host and process
start time, created atomically, removed on exit, and taken over when its owner is gone (same host, pid dead or reused).
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import socket
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from jrlhf.errors import CheckpointSaveError, JrlhfError, RunLockedError

LOCK_NAME = ".jrlhf-run.lock"
SKIPPED_DIR = "skipped_checkpoints"
FREE_SPACE_MARGIN = 1.1  # need 10% over the state's bytes (orbax metadata, file-system blocks)
FREE_SPACE_EXTRA_BYTES = 16 * 2**20


class CheckpointError(JrlhfError):
    """A checkpoint is missing or does not belong to this run's model; the message says which and why."""


def _abstract(tree):
    """ShapeDtypeStructs carrying each leaf's sharding, the restore target for orbax."""

    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(leaf, tree)


def _first_line(error: BaseException) -> str:
    """``Type: first line`` of the root cause of ``error`` (TensorStore wraps the useful message), shortened."""
    seen = set()
    while (error.__cause__ or error.__context__) is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0].split(" See full TensorStore details")[0] if lines else ""
    if len(text) > 240:
        text = text[:240] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def state_nbytes(tree) -> int:
    """Bytes of the arrays in ``tree`` (global sizes), the size of a checkpoint's ``state`` item to within metadata."""
    return int(sum(np.prod(np.shape(x), dtype=np.int64) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


class Checkpointer:
    """Saves every N steps (async), keeps the last ``keep`` checkpoints, restores the newest complete one.

    Only the main process writes metadata (orbax coordinates the array writes of all processes). Every save first
    checks the free space of ``directory`` (:data:`FREE_SPACE_MARGIN` x the state's bytes); a save that cannot start
    or fails in the background raises :class:`jrlhf.errors.CheckpointSaveError` naming the step, the cause and the
    last good checkpoint, which stays intact (orbax writes into a temporary folder and only renames it when complete;
    older checkpoints are only removed after a newer one completed).
    """

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True, log=None):
        self.directory = os.path.abspath(directory)
        self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                     enable_async_checkpointing=async_save)
        self._log = log or (lambda message: print(message, flush=True))
        self._in_flight: int | None = None
        self.manager = self._open()

    def _open(self):
        return ocp.CheckpointManager(self.directory, options=self._options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or ``None``."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the finished checkpoints, oldest first."""
        return sorted(self.manager.all_steps() or [])

    # ------------------------------------------------------------------------------------------------ saving

    def check_free_space(self, step: int, state) -> None:
        """Raises :class:`CheckpointSaveError` unless the file system of ``directory`` has room for ``state``."""
        need = int(state_nbytes(state) * FREE_SPACE_MARGIN) + FREE_SPACE_EXTRA_BYTES
        os.makedirs(self.directory, exist_ok=True)
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise CheckpointSaveError(
                f"not enough free space to save the step {step} checkpoint in '{self.directory}': it needs about "
                f"{_mib(need)}, {_mib(free)} are free; {self._last_good()}. Free some space (or lower "
                "train.keep_checkpoints / move train.output_dir) and rerun the same command to resume")

    def _last_good(self) -> str:
        try:
            self.manager.reload()
            last = self.manager.latest_step()
        except Exception:  # noqa: BLE001 - only for the message
            last = None
        return (f"the last good checkpoint, step {last}, is intact" if last is not None
                else "no earlier checkpoint exists")

    def _failed(self, step, error: BaseException):
        self._in_flight = None
        self._discard_partial(step)
        if isinstance(error, CheckpointSaveError):
            raise error
        hint = ("the disk is full: free some space" if isinstance(error, OSError) and error.errno == errno.ENOSPC
                else "check the disk and the permissions of train.output_dir")
        raise CheckpointSaveError(f"saving the step {step} checkpoint in '{self.directory}' failed "
                                  f"({_first_line(error)}); {self._last_good()}. The run stopped: {hint}, then "
                                  "rerun the same command to resume") from error

    def _discard_partial(self, step) -> None:
        """Removes the unfinished temporary folder of a failed save (never a finished checkpoint)."""
        if step is None or jax.process_index() != 0 or not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if name.startswith(f"{step}.") and "tmp" in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Starts saving ``state`` and ``meta`` at ``step`` (returns at once when async).

        Raises:
          CheckpointSaveError: too little free space, or the save (or the previous in-flight one) failed.
        """
        if step in self.all_steps():
            return False
        self.wait()
        self.check_free_space(step, state)
        try:
            started = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                      meta=ocp.args.JsonSave(meta)), force=force)
        except Exception as error:  # noqa: BLE001 - any failure to write is reported the same way
            self._failed(step, error)
        self._in_flight = step if started else None
        return started

    def wait(self) -> None:
        """Blocks until an in-flight async save has finished.

        Raises:
          CheckpointSaveError: the in-flight save failed (its partial folder is removed).
        """
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001
            self._failed(self._in_flight, error)
        self._in_flight = None

    # ------------------------------------------------------------------------------------------------ restoring

    def read_meta(self, step: int) -> dict:
        """The meta dict saved with ``step`` (read alone, without the state)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, state_like, *, step: int | None = None, expect_model: dict | None = None):
        """Restores ``(state, meta)`` into the shapes/shardings of ``state_like``.

        With ``step=None`` the newest checkpoint that reads completely is used: each newer one that fails to read is
        reported (step and reason) and moved to ``<run_dir>/skipped_checkpoints/`` (kept, never deleted), so later
        saves of those steps start clean. ``expect_model`` (a model config dict) is compared with the saved one: a
        checkpoint of another model is an error naming the first differing key (no fallback: the run is wrong).

        Raises:
          CheckpointError: no checkpoint, none readable (every reason listed), or another model's checkpoint.
        """
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint found in '{self.directory}'")
        skipped = []
        for candidate in steps:
            meta, state, why = None, None, None
            try:
                meta = self.manager.restore(candidate, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                if not isinstance(meta, dict) or "step" not in meta:
                    raise ValueError("the meta item holds no step")
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is skipped with its reason
                why = f"meta: {_first_line(error)}"
            if _all_processes(why is None):
                if expect_model is not None:
                    check_same_model(meta.get("model_config", {}), expect_model, self.directory)
                try:
                    restored = self.manager.restore(candidate, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(_abstract(state_like))))
                    state = jax.block_until_ready(restored["state"])
                except Exception as error:  # noqa: BLE001
                    why = f"state: {_first_line(error)}"
            if not _all_processes(why is None):
                skipped.append((candidate, why or "unreadable on another process"))
                continue
            if skipped:
                self._set_aside(skipped, candidate)
            return state, meta
        reasons = "; ".join(f"step {s}: {why}" for s, why in skipped)
        raise CheckpointError(f"no readable checkpoint in '{self.directory}' ({reasons}); the folders are left as "
                              "they are: move them away or set train.resume=false to start over")

    def _set_aside(self, skipped, used: int) -> None:
        run_dir = os.path.dirname(self.directory)
        target_root = os.path.join(run_dir, SKIPPED_DIR)
        for step, why in skipped:
            target = os.path.join(target_root, str(step))
            if jax.process_index() == 0:
                os.makedirs(target_root, exist_ok=True)
                suffix = 1
                while os.path.exists(target):
                    target = os.path.join(target_root, f"{step}-{suffix}")
                    suffix += 1
                shutil.move(os.path.join(self.directory, str(step)), target)
                self._log(f"[resume] skipped checkpoint step {step}, it does not read ({why}); moved to {target} "
                          f"(kept, not deleted); using step {used}")
        _barrier("jrlhf-skipped-checkpoints")
        self.manager.close()
        self.manager = self._open()

    def close(self) -> None:
        self.wait()
        self.manager.close()


def _all_processes(flag: bool) -> bool:
    """``flag`` and-ed over all processes (so every process takes the same restore decision)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.array([flag], np.int32))))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_same_model(saved: dict, current: dict, where: str) -> None:
    """Raises :class:`CheckpointError` if two model config dicts differ in an architecture key.

    A key missing from ``saved`` (a checkpoint written before :class:`jrlhf.models.ModelConfig` had that field)
    stands for the field's default, which is what that model was built with."""
    import dataclasses

    from jrlhf.models.config import ModelConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}
    defaults = json.loads(json.dumps(defaults, default=str))  # as the saved metadata (tuples become lists)
    saved = {**{k: defaults[k] for k in current if k not in saved and k in defaults}, **saved}
    keys = sorted(set(saved) | set(current))
    for k in keys:
        if k in ("dtype", "param_dtype", "remat", "scan_layers"):
            continue
        if saved.get(k) != current.get(k):
            raise CheckpointError(
                f"checkpoint in '{where}' is from another model: '{k}' is {saved.get(k)!r} there but "
                f"{current.get(k)!r} in this run's model (use another train.output_dir or the matching model)")


# ---------------------------------------------------------------------------------------------------- run lock


def _process_start_ticks(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), to tell a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive use of a run directory: ``<run_dir>/.jrlhf-run.lock`` for the life of the run.

    The lock file (JSON: ``pid``, ``host``, ``start_ticks``, ``started``, ``argv``) is created atomically (hard link
    of a complete temporary file, so a reader never sees a half-written one). An existing lock is *stale*, and taken
    over with a note, when it was written on this host and its pid is gone or belongs to a newer process (pid reuse,
    told by the process start time). A lock from another host cannot be checked: the error names that host and pid,
    and the file to delete once that run is known to be dead. :meth:`release` removes the file if it is still ours;
    a ``kill -9`` leaves it behind, which the next run detects as stale.
    """

    def __init__(self, run_dir: str):
        self.run_dir = os.path.abspath(run_dir)
        self.path = os.path.join(self.run_dir, LOCK_NAME)
        self.held = False
        self._info = None

    def _owner(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _stale(self, owner: dict) -> str | None:
        """Why ``owner``'s lock is stale, or ``None`` if its run may be alive."""
        if not owner:
            return "the lock file is unreadable or empty"
        if owner.get("host") != socket.gethostname():
            return None
        pid = int(owner.get("pid", -1))
        if pid <= 0 or not _pid_alive(pid):
            return f"process {pid} is no longer running"
        ticks = _process_start_ticks(pid)
        if owner.get("start_ticks") is not None and ticks is not None and ticks != owner["start_ticks"]:
            return f"pid {pid} now belongs to another process"
        return None

    def acquire(self) -> "RunLock":
        """Takes the lock.

        Raises:
          RunLockedError: another live run (or a run on another host) holds it; the message names it and the fix.
        """
        os.makedirs(self.run_dir, exist_ok=True)
        pid = os.getpid()
        self._info = {"pid": pid, "host": socket.gethostname(), "start_ticks": _process_start_ticks(pid),
                      "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "argv": sys.argv}
        for _ in range(5):
            if self._create():
                self.held = True
                return self
            owner = self._owner()
            if owner is None:
                continue  # released meanwhile: try again
            why = self._stale(owner)
            if why is None:
                where = f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}"
                raise RunLockedError(
                    f"train.output_dir '{self.run_dir}' is in use by another run ({where}); wait for it to end or "
                    f"use another train.output_dir (if that run is dead, delete {self.path})")
            self._take_over(owner, why)
        raise RunLockedError(f"could not take the lock {self.path} (other runs keep creating it); use another "
                             "train.output_dir")

    def _create(self) -> bool:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self._info, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create (not atomic against a crash mid-write)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(self._info, f)
            return True
        finally:
            os.remove(tmp)

    def _take_over(self, owner: dict, why: str) -> None:
        aside = f"{self.path}.stale.{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            with open(aside) as f:
                moved = json.load(f)
        except (OSError, ValueError):
            moved = {}
        if moved != owner:  # another process replaced the stale lock in between: put its lock back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
        else:
            print(f"[lock] taking over the stale lock of pid {owner.get('pid')} on {owner.get('host')} in "
                  f"{self.run_dir} ({why})", flush=True)
        os.remove(aside)

    def release(self) -> None:
        """Removes the lock file if this process still holds it (no-op otherwise)."""
        if not self.held:
            return
        self.held = False
        owner = self._owner()
        if owner and owner.get("pid") == self._info["pid"] and owner.get("host") == self._info["host"]:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def acquire_run_lock(run_dir: str) -> RunLock:
    """Takes :class:`RunLock` on ``run_dir`` for this run.

    Single process: this process takes it. Several processes (multi-host): process 0 takes it and the outcome is
    shared with every process, so all of them stop with the same one-line error when the directory is in use (the
    other processes never touch the lock file; with a run directory that is not shared between hosts, only host 0's
    copy is protected).

    Raises:
      RunLockedError: the run directory is in use.
    """
    lock = RunLock(run_dir)
    if jax.process_count() == 1:
        return lock.acquire()
    from jax.experimental import multihost_utils

    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except RunLockedError as e:
            error = e
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if int(failed):
        if error is not None:
            raise error
        raise RunLockedError(f"train.output_dir '{lock.run_dir}' is in use by another run (process 0 could not take "
                             f"{lock.path}; see its error)")
    return lock
