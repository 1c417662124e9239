"""The peak FLOP/s that MFU is measured against.

On CPU the peak is measured in the same run: the best throughput of a square float32 matmul, through XLA
(``jax.jit``) and through torch (``torch.mm``), each stack in its own process at its own threading, over a few sizes
and repeats (the best repeat, so a loaded machine lowers it less). On GPUs and TPUs it is the vendor's dense peak for the compute dtype, from
:data:`ACCELERATOR_PEAKS`.
"""

from __future__ import annotations

import time

# Dense (no sparsity) peak TFLOP/s from the vendors' datasheets: (match substring of the device kind, name,
# bfloat16 peak, float32 peak). The float32 peak is the non-tensor-core FP32 rate on NVIDIA parts.
ACCELERATOR_PEAKS = (
    ("H200", "NVIDIA H200", 989.4, 66.9),
    ("H100 PCIe", "NVIDIA H100 PCIe", 756.0, 51.2),
    ("H100", "NVIDIA H100 SXM", 989.4, 66.9),
    ("A100", "NVIDIA A100", 312.0, 19.5),
    ("L40S", "NVIDIA L40S", 362.1, 91.6),
    ("L4", "NVIDIA L4", 121.0, 30.3),
    ("A10", "NVIDIA A10", 125.0, 31.2),
    ("V100", "NVIDIA V100 (fp16 tensor cores)", 125.0, 15.7),
    ("TPU v6", "Google TPU v6e (Trillium)", 918.0, None),
    ("TPU v5p", "Google TPU v5p", 459.0, None),
    ("TPU v5 lite", "Google TPU v5e", 197.0, None),
    ("TPU v5e", "Google TPU v5e", 197.0, None),
    ("TPU v4", "Google TPU v4", 275.0, None),
)


def accelerator_peak(device_kind: str, dtype: str) -> dict | None:
    """The datasheet peak for ``device_kind`` (e.g. jax's ``device.device_kind``) and ``dtype``, or ``None``
    when the device is not in the table."""
    for needle, name, bf16, fp32 in ACCELERATOR_PEAKS:
        if needle.lower() in device_kind.lower():
            tflops = bf16 if dtype == "bfloat16" else fp32
            if tflops is None:
                return None
            return {"source": "datasheet", "device": name, "dtype": dtype, "flops_per_s": tflops * 1e12}
    return None


def _best_rate(run, flops: float, repeats: int, inner: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            run()
        best = min(best, (time.perf_counter() - start) / inner)
    return flops / best


def measure_stack(stack: str, sizes=(1024, 2048), repeats: int = 5, inner: int = 3) -> dict:
    """Best float32 square-matmul FLOP/s of one stack in this process at its current threading: ``stack="xla"``
    (``jax.jit(x @ y)``) or ``"torch"`` (``torch.mm``). Returns ``{"stack", "flops_per_s": best, "by_size": {n:
    flops/s}}``."""
    import numpy as np

    rates = {}
    for n in sizes:
        host = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
        if stack == "xla":
            import jax
            import jax.numpy as jnp

            a = jnp.asarray(host)
            matmul = jax.jit(lambda x, y: x @ y)
            matmul(a, a).block_until_ready()
            rates[n] = _best_rate(lambda: matmul(a, a).block_until_ready(), 2.0 * n ** 3, repeats, inner)
        elif stack == "torch":
            import torch

            t = torch.from_numpy(host)
            with torch.inference_mode():
                torch.mm(t, t)
                rates[n] = _best_rate(lambda: torch.mm(t, t), 2.0 * n ** 3, repeats, inner)
        else:
            raise ValueError(f"stack={stack!r}: use 'xla' or 'torch'")
    return {"stack": stack, "flops_per_s": max(rates.values()), "by_size": {str(k): v for k, v in rates.items()}}


def combine_cpu_peaks(measured: dict) -> dict:
    """The CPU peak for MFU from per-stack measurements ``{"xla": measure_stack(...), "torch": ...}``: the best of
    them (each measured in its own process at its own threading)."""
    rates = {stack: m["flops_per_s"] for stack, m in measured.items() if m and m.get("flops_per_s")}
    if not rates:
        return {"source": "unknown", "flops_per_s": None}
    return {"source": "measured", "device": "cpu", "dtype": "float32", "flops_per_s": max(rates.values()),
            "stacks": rates}


def device_peak(dtype: str) -> dict:
    """The peak of jax's default device: the datasheet entry on GPU/TPU, a measurement on CPU."""
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        return combine_cpu_peaks({"xla": measure_stack("xla")})
    peak = accelerator_peak(device.device_kind, dtype)
    if peak is None:
        return {"source": "unknown", "device": device.device_kind, "dtype": dtype, "flops_per_s": None}
    return peak
