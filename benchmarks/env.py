"""Thread and runtime environment of a benchmark process, set before jax or torch is imported.

Both stacks get the same number of threads (2 by default). torch's OpenMP threads spin while waiting unless
``OMP_WAIT_POLICY=PASSIVE``; spinning threads of one stack would steal the cores of the other when the two run
alternately in one process, so the policy is passive for both.

XLA:CPU has no flag for its intra-op thread count: it sizes its pools from the CPUs the process may run on
(``sched_getaffinity``); ``--xla_cpu_multi_thread_eigen`` made no measurable difference on the thunk runtime. So on a
machine with more CPUs than ``threads`` the process is pinned to ``threads`` CPUs (both stacks then see the same
cores), and torch gets ``torch.set_num_threads(threads)``.
"""

from __future__ import annotations

import os
import sys

DEFAULT_THREADS = 2


def heavy_modules_loaded() -> list[str]:
    """Names of the already-imported modules whose thread pools read the environment at import."""
    return [name for name in ("jax", "jaxlib", "torch") if name in sys.modules]


def configure(threads: int = DEFAULT_THREADS, device_count: int | None = None, platform: str | None = None,
              pin: bool = True) -> dict:
    """Sets the environment of this process for benchmarking; call before importing jax or torch.

    Args:
      threads: intra-op threads for torch (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``) and XLA:CPU.
      device_count: simulate this many XLA CPU devices (``--xla_force_host_platform_device_count``); ``None``
        keeps one.
      platform: ``"cpu"`` to force ``JAX_PLATFORMS=cpu``; ``None`` leaves jax's choice (GPU/TPU when present).
      pin: restrict the process to ``threads`` CPUs when more are available (see the module docstring).

    Returns:
      The environment variables that were set (recorded in the results).

    Raises:
      RuntimeError: jax or torch was imported before: their thread pools would ignore the settings.
    """
    loaded = heavy_modules_loaded()
    if loaded:
        raise RuntimeError(f"benchmarks.env.configure must run before importing {loaded}: their thread pools are "
                           "sized at import; start a fresh process (python -m benchmarks.run)")
    if threads < 1:
        raise ValueError(f"threads={threads}: must be >= 1")
    values = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": "PASSIVE",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_DISABLED": "true",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "XLA_FLAGS": xla_flags(device_count, os.environ.get("XLA_FLAGS", "")),
    }
    if platform is not None:
        values["JAX_PLATFORMS"] = platform
    os.environ.update(values)
    recorded = dict(values)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if pin and len(cpus) > threads:
        os.sched_setaffinity(0, cpus[:threads])
        cpus = cpus[:threads]
    recorded["cpus"] = ",".join(str(c) for c in cpus)
    return recorded


def xla_flags(device_count: int | None, existing: str = "") -> str:
    """``XLA_FLAGS`` with ``device_count`` simulated CPU devices (``None``: the flag removed, one device); the other
    flags of ``existing`` are kept."""
    name = "--xla_force_host_platform_device_count"
    kept = [flag for flag in existing.split() if flag.split("=")[0] != name]
    if device_count is not None:
        kept.append(f"{name}={int(device_count)}")
    return " ".join(kept)


def configure_torch(threads: int = DEFAULT_THREADS) -> None:
    """Sets torch's intra-op threads (and one inter-op thread) once torch is imported."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set or parallel work already started: keep what is there
        pass
