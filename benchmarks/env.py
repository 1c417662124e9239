"""Thread and runtime environment of one benchmark process, set before jax or torch is imported.

Every system runs in its own process (``python -m benchmarks.worker serve``) with its own threading, so neither
stack's thread pools compete with the other's. The defaults are each stack's own: torch's intra-op pool has one
thread per core with OpenMP's default wait policy (threads spin briefly between kernels, which is what makes
eager PyTorch fast on small ops); XLA:CPU sizes its pools from the CPUs the process may run on. Nothing here sets
``OMP_WAIT_POLICY``: ``PASSIVE`` made ``transformers.generate`` about 3x slower on 2 cores.

Optional settings (``--torch-threads``, ``--cpus``, ``XLA_FLAGS``) are recorded with every result, so a report
always says what each side ran with.
"""

from __future__ import annotations

import os
import sys

QUIET = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY",
                    "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "XLA_FLAGS", "JAX_PLATFORMS")


def heavy_modules_loaded() -> list[str]:
    """Names of the already-imported modules whose thread pools read the environment at import."""
    return [name for name in ("jax", "jaxlib", "torch") if name in sys.modules]


def configure(device_count: int | None = None, platform: str | None = None, cpus: int | None = None) -> dict:
    """Sets the environment of this process for benchmarking; call before importing jax or torch.

    Thread settings are left at each stack's defaults (see the module docstring); only the offline / quiet
    variables are set.

    Args:
      device_count: simulate this many XLA CPU devices (``--xla_force_host_platform_device_count``); ``None``
        keeps one.
      platform: ``"cpu"`` to force ``JAX_PLATFORMS=cpu``; ``None`` leaves jax's choice (GPU/TPU when present).
      cpus: restrict the process to its first ``cpus`` CPUs (``sched_setaffinity``); ``None`` keeps them all.

    Returns:
      The thread-related environment of the process after the change (recorded in the results).

    Raises:
      RuntimeError: jax or torch was imported before: their thread pools would ignore the settings.
      ValueError: ``cpus < 1``.
    """
    loaded = heavy_modules_loaded()
    if loaded:
        raise RuntimeError(f"benchmarks.env.configure must run before importing {loaded}: their thread pools are "
                           "sized at import; start a fresh process (python -m benchmarks.worker)")
    os.environ.update(QUIET)
    flags = xla_flags(device_count, os.environ.get("XLA_FLAGS", ""))
    if flags:
        os.environ["XLA_FLAGS"] = flags
    else:
        os.environ.pop("XLA_FLAGS", None)
    if platform is not None:
        os.environ["JAX_PLATFORMS"] = platform
    if cpus is not None:
        if cpus < 1:
            raise ValueError(f"cpus={cpus}: must be >= 1")
        available = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, available[:cpus])
    return describe()


def describe() -> dict:
    """The thread-related environment variables that are set, and the CPUs this process may run on."""
    out = {name: os.environ[name] for name in THREAD_VARIABLES if name in os.environ}
    if hasattr(os, "sched_getaffinity"):
        out["cpus"] = len(os.sched_getaffinity(0))
    return out


def xla_flags(device_count: int | None, existing: str = "") -> str:
    """``XLA_FLAGS`` with ``device_count`` simulated CPU devices (``None``: the flag removed, one device); the other
    flags of ``existing`` are kept."""
    name = "--xla_force_host_platform_device_count"
    kept = [flag for flag in existing.split() if flag.split("=")[0] != name]
    if device_count is not None:
        kept.append(f"{name}={int(device_count)}")
    return " ".join(kept)


def configure_torch(threads: int | None = None) -> dict:
    """Sets torch's intra-op threads when ``threads`` is given (``None``: torch's default, one per core) and returns
    what torch runs with: ``{"torch_threads": ..., "torch_interop_threads": ...}``."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return {"torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads()}
