"""Multi-host (multi-process) set-up: ``jax.distributed`` from arguments or environment, global batches.

Every process runs the same program on its own devices; a mesh spans the devices of all processes. Each process
loads only its rows of the global batch (:func:`local_batch_rows`) and :func:`global_batch_from_local` assembles
the global ``jax.Array`` (no data crosses processes). Only the main process (:func:`is_main_process`) writes logs
and checkpoint metadata.

Environment variables read by :func:`initialize` (arguments take precedence):

=========================  =================================================================================
``JRLHF_COORDINATOR``      ``host:port`` of the coordinator (process 0 listens there)
``JRLHF_NUM_PROCESSES``    number of processes
``JRLHF_PROCESS_ID``       this process's index, ``0 .. num_processes - 1``
``JRLHF_LOCAL_DEVICE_IDS`` optional comma-separated local device ids this process uses
``JRLHF_INIT_TIMEOUT``     seconds to wait for every process to connect (default 300)
``JRLHF_HEARTBEAT_TIMEOUT`` seconds without a heartbeat after which a process is declared dead (default 100)
=========================  =================================================================================

With none of them set and no argument, :func:`initialize` runs single-process (returns False), unless
``auto_detect=True``, which lets JAX detect a managed cluster (Cloud TPU pods, SLURM, Open MPI...).
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jrlhf.sharding import batch_sharding, replicated

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JRLHF_COORDINATOR"
ENV_NUM_PROCESSES = "JRLHF_NUM_PROCESSES"
ENV_PROCESS_ID = "JRLHF_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JRLHF_LOCAL_DEVICE_IDS"
ENV_INIT_TIMEOUT = "JRLHF_INIT_TIMEOUT"
ENV_HEARTBEAT_TIMEOUT = "JRLHF_HEARTBEAT_TIMEOUT"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer.") from None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    initialization_timeout: int | None = None,
    heartbeat_timeout: int | None = None,
    cpu_collectives: str | None = "gloo",
    auto_detect: bool = False,
) -> bool:
    """Starts ``jax.distributed`` from arguments or the ``JRLHF_*`` environment (see the module docstring).

    Must run before anything touches a JAX device. Safe to call twice (the second call does nothing).

    Args:
      coordinator_address: ``"host:port"`` of process 0's coordinator service.
      num_processes: total number of processes.
      process_id: this process's index.
      local_device_ids: local devices this process drives (default: all).
      initialization_timeout: seconds to wait for all processes to connect (default 300); a process that never
        shows up makes :func:`initialize` fail after this long instead of hanging.
      heartbeat_timeout: seconds of silence after which a process is declared dead and the others stop with an
        error (default 100).
      cpu_collectives: CPU collectives implementation (``"gloo"``; ``None`` keeps JAX's setting). Only matters on
        CPU, where multi-process collectives need it.
      auto_detect: with no address given, let JAX detect a managed cluster instead of running single-process.

    Returns:
      True if ``jax.distributed`` is (now) initialised, False when running single-process.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if local_device_ids is None and os.environ.get(ENV_LOCAL_DEVICE_IDS):
        local_device_ids = [int(v) for v in os.environ[ENV_LOCAL_DEVICE_IDS].split(",") if v.strip()]
    if initialization_timeout is None:
        initialization_timeout = _env_int(ENV_INIT_TIMEOUT) or 300
    if heartbeat_timeout is None:
        heartbeat_timeout = _env_int(ENV_HEARTBEAT_TIMEOUT) or 100

    if coordinator_address is None and not auto_detect:
        if num_processes not in (None, 1):
            raise ValueError(
                f"num_processes={num_processes} but no coordinator address: pass coordinator_address or set "
                f"{ENV_COORDINATOR}=host:port."
            )
        return False
    if coordinator_address is not None:
        if num_processes is None or process_id is None:
            raise ValueError(
                "multi-process run: give num_processes and process_id with the coordinator address (arguments or "
                f"{ENV_NUM_PROCESSES} / {ENV_PROCESS_ID})."
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes}).")
        if ":" not in coordinator_address:
            raise ValueError(f"coordinator_address={coordinator_address!r}: expected 'host:port'.")

    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs: dict[str, Any] = dict(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=int(initialization_timeout),
        heartbeat_timeout_seconds=int(heartbeat_timeout),
    )
    accepted = inspect.signature(jax.distributed.initialize).parameters
    for name in list(kwargs):
        if name not in accepted:
            log.warning("jax.distributed.initialize in this JAX version has no %r; ignoring it.", name)
            kwargs.pop(name)
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d, %d local devices of %d", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def shutdown() -> None:
    """Leaves the ``jax.distributed`` job (waits for the other processes); no-op when not initialised."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def is_main_process() -> bool:
    """True on process 0, the one that writes logs, metrics and checkpoint metadata."""
    return jax.process_index() == 0


def local_batch_rows(mesh: Mesh, global_batch_size: int) -> np.ndarray:
    """Indices ``[local_batch_size]`` (int64, increasing) of the global batch rows this process must load.

    The rows are those the batch sharding (:func:`jrlhf.sharding.batch_sharding`) places on this process's devices;
    feed ``global_batch[rows]`` to :func:`global_batch_from_local`.
    """
    sharding = batch_sharding(mesh)
    devices = set(sharding.addressable_devices)
    index_map = sharding.devices_indices_map((global_batch_size,))
    rows: set[int] = set()
    for device, index in index_map.items():
        if device in devices:
            rows.update(range(global_batch_size)[index[0]])
    return np.array(sorted(rows), dtype=np.int64)


def global_batch_from_local(local_batch: Any, mesh: Mesh, sharding: NamedSharding | None = None) -> Any:
    """Assembles a global batch from each process's rows.

    Args:
      local_batch: pytree of host arrays ``[local_batch_size, ...]``: this process's rows
        (:func:`local_batch_rows`), in increasing global order. Scalars are taken as global values (replicated).
      mesh: the global mesh.
      sharding: the global sharding (default: :func:`jrlhf.sharding.batch_sharding`).

    Returns:
      Pytree of global ``jax.Array`` ``[local_batch_size * num_batch_processes, ...]`` sharded by ``sharding``.
    """
    sharding = batch_sharding(mesh) if sharding is None else sharding

    def assemble(x):
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.make_array_from_process_local_data(replicated(mesh), x)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(assemble, local_batch)


def process_allgather(tree: Any) -> Any:
    """Host numpy copies of (possibly multi-process sharded) arrays, identical on every process."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)
