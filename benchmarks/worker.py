"""Subprocess entry points of the benchmark driver (each in a fresh process, environment set before imports).

``python -m benchmarks.worker serve --system jrlhf|trl|plain --benchmark NAME ...``
    One system's side of one benchmark in its own process, at its own threading: builds and compiles it, then
    runs the blocks of steps the orchestrator asks for (:mod:`benchmarks.timing`).

``python -m benchmarks.worker peak --system jrlhf|trl``
    The best square-matmul FLOP/s of one stack (XLA or torch) in its own process (:mod:`benchmarks.peak`).

``python -m benchmarks.worker memory --system jrlhf|trl|plain ...``
    Peak memory of one system: for each benchmark, the peak host RSS while it is built, compiled / warmed up and
    run for a few steps, and apart the peak during the steps alone (``VmHWM`` after resetting it through
    ``/proc/self/clear_refs``, each time over the RSS at that moment), and the peak device memory where the device
    reports it. Between benchmarks the previous one's objects and jax's caches are dropped and glibc is asked to
    return freed memory to the system (``malloc_trim``), so that the next benchmark's growth shows in its RSS.

``python -m benchmarks.worker scaling --devices N ...``
    jrlhf's step on a data-parallel mesh of ``N`` simulated XLA CPU devices
    (``--xla_force_host_platform_device_count=N``): compile time and step time. The simulated devices share the
    same CPU cores, so these times check that the sharded program compiles and runs, not how it scales.

``peak``, ``memory`` and ``scaling`` write one JSON object to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Resets ``VmHWM`` to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_kib() -> int | None:
    value = _status_kib("VmHWM")
    if value is None:  # no /proc: fall back to the process-lifetime peak
        import resource

        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value


def _release_memory(system: str) -> None:
    """Drops garbage, jax's compiled-program caches (jrlhf) and returns glibc's free heap pages to the system."""
    gc.collect()
    if system == "jrlhf":
        import jax

        jax.clear_caches()
        gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _device_memory(system: str) -> dict:
    out = {}
    if system == "jrlhf":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            out["device_peak_mib"] = stats["peak_bytes_in_use"] / 2 ** 20
    else:
        import torch

        if torch.cuda.is_available():
            out["device_peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
            torch.cuda.reset_peak_memory_stats()
    return out


def memory(args) -> dict:
    from benchmarks import cases
    from benchmarks.sizes import get_size

    if args.system != "jrlhf":
        from benchmarks.env import configure_torch

        configure_torch(args.torch_threads)
    size = _size(args)
    inputs = cases.make_inputs(size, _paths(args, size), args.seed)
    baseline = _status_kib("VmRSS")
    results = []
    mib = lambda kib: None if kib is None else kib / 1024  # noqa: E731
    for name in cases.parse_benchmarks(args.benchmarks):
        if args.system not in cases.SYSTEMS[name]:
            continue
        _release_memory(args.system)
        exact = _reset_peak_rss()
        before = _status_kib("VmRSS")
        start = time.perf_counter()
        runner = cases.build(name, args.system, inputs)
        runner.compile()
        runner.loop(1, lambda *unused: None)  # warm-up (first eager step / first call after compile)
        peak_setup = _peak_rss_kib()
        _reset_peak_rss()
        steps_before = _status_kib("VmRSS")
        runner.loop(args.steps, lambda *unused: None)
        peak_steps = _peak_rss_kib()
        peak = max(peak_setup or 0, peak_steps or 0) or None
        record = {"name": name, "system": args.system, "label": runner.label, "rss_before_mib": mib(before),
                  "peak_rss_mib": mib(peak), "peak_rss_delta_mib": mib(peak - before) if peak and before else None,
                  "steps_peak_rss_delta_mib": (mib(peak_steps - steps_before) if peak_steps and steps_before
                                               else None),
                  "peak_is_per_benchmark": exact, "seconds": time.perf_counter() - start}
        record.update(_device_memory(args.system))
        results.append(record)
        runner.close()
        del runner
    return {"system": args.system, "baseline_rss_mib": baseline / 1024 if baseline else None, "results": results}


def scaling(args) -> dict:
    import jax

    from benchmarks import cases
    from benchmarks.sizes import get_size
    from jrlhf.sharding import make_mesh

    size = _size(args)
    if jax.device_count() != args.devices:
        raise RuntimeError(f"expected {args.devices} devices, jax sees {jax.device_count()}")
    inputs = cases.make_inputs(size, _paths(args, size), args.seed)
    mesh = make_mesh({"data": args.devices, "fsdp": 1, "tensor": 1})
    results = []
    for name in cases.parse_benchmarks(args.benchmarks):
        runner = cases.build(name, "jrlhf", inputs, mesh=mesh)
        compile_s = runner.compile()
        seconds, tokens = [], []

        def record(index, s, t, cpu):
            seconds.append(s)
            tokens.append(t)

        runner.loop(args.steps, record)
        median = statistics.median(seconds)
        results.append({"name": name, "devices": args.devices, "compile_s": compile_s, "median_step_s": median,
                        "median_tokens_per_s": statistics.median(t / s for t, s in zip(tokens, seconds)),
                        "recompiles": runner.recompiles(), "seconds": seconds})
        runner.close()
        del runner
        gc.collect()
    return {"devices": args.devices, "results": results}


def _size(args):
    from benchmarks.sizes import get_size, shrink

    size = get_size(args.size, scan_unroll=args.scan_unroll, model_path=args.model_path, remat=args.remat)
    return shrink(size) if args.shrink else size


def _paths(args, size) -> dict:
    if size.model_path is not None:
        return {"lm": size.model_path}
    return {name: os.path.join(args.checkpoint, name) for name in ("lm", "lm_value", "score")}


def serve_one(args) -> None:
    """Builds and compiles one system's side of one benchmark, then serves timed blocks (see
    :func:`benchmarks.timing.serve`); an error is answered as ``{"event": "error"}``."""
    import traceback

    from benchmarks import env, timing

    replies = os.fdopen(args.reply_fd, "w")
    try:
        from benchmarks import cases

        settings = env.describe()
        if args.system == "jrlhf":
            import jax

            settings["jax_devices"] = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
        else:
            settings.update(env.configure_torch(args.torch_threads))
        size = _size(args)
        start = time.perf_counter()
        inputs = cases.make_inputs(size, _paths(args, size), args.seed, shape=cases.model_shape(size))
        runner = cases.build(args.benchmark, args.system, inputs)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        compile_s = runner.compile()
        ready = {"label": runner.label, "system": args.system, "flops": runner.flops, "build_s": build_s,
                 "compile_s": compile_s, "compile_and_first_call_s": time.perf_counter() - start,
                 "compile_cpu_s": getattr(runner, "compile_cpu_seconds", None),
                 "compiles": getattr(runner, "compiles", None), "settings": settings, "pid": os.getpid()}
    except Exception as error:  # noqa: BLE001 - reported to the orchestrator, which records it
        traceback.print_exc()
        replies.write(json.dumps({"event": "error", "error": f"{type(error).__name__}: {error}"}) + "\n")
        replies.flush()
        return
    try:
        timing.serve(runner, args.total_steps, sys.stdin, replies, ready=ready)
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        replies.write(json.dumps({"event": "error", "error": f"{type(error).__name__}: {error}"}) + "\n")
        replies.flush()
    finally:
        runner.close()


def peak(args) -> dict:
    """The best float32 (or the size's dtype) matmul rate of one stack in this process, at its own threading."""
    from benchmarks import env
    from benchmarks import peak as bpeak

    settings = env.describe()
    if args.system != "jrlhf":
        settings.update(env.configure_torch(args.torch_threads))
    out = bpeak.measure_stack("xla" if args.system == "jrlhf" else "torch")
    out["settings"] = settings
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("serve", "peak", "memory", "scaling"))
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--model-path", default=None, help="a real checkpoint (see benchmarks.sizes.real_size)")
    parser.add_argument("--shrink", action="store_true", help="the size's layout at tiny shapes (CPU check)")
    parser.add_argument("--checkpoint", default=None, help="directory written by benchmarks.data.write_checkpoint")
    parser.add_argument("--benchmark", default=None, help="serve: the benchmark")
    parser.add_argument("--benchmarks", default="all", help="memory / scaling: the benchmarks")
    parser.add_argument("--system", choices=("jrlhf", "trl", "plain"), default="jrlhf")
    parser.add_argument("--total-steps", type=int, default=1, help="serve: steps the orchestrator will ask for")
    parser.add_argument("--reply-fd", type=int, default=None, help="serve: file descriptor of the answers")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--cpus", type=int, default=None, help="restrict the process to this many CPUs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scan-unroll", type=int, default=None, help="jrlhf's layers per scan iteration")
    parser.add_argument("--remat", default=None, help="jrlhf's per-layer rematerialisation (ModelConfig.remat)")
    parser.add_argument("--platform", default=None, help="JAX_PLATFORMS value (e.g. cpu)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from benchmarks import env

    env.configure(device_count=args.devices if args.mode == "scaling" else None,
                  platform="cpu" if args.mode == "scaling" else args.platform, cpus=args.cpus)
    from benchmarks.run import quiet_libraries

    quiet_libraries()
    if args.mode == "serve":
        serve_one(args)
        return 0
    result = {"peak": peak, "memory": memory, "scaling": scaling}[args.mode](args)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
