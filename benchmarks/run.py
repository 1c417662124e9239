"""``python -m benchmarks.run``: jrlhf against the PyTorch stacks, side by side, in one process.

Examples::

    python -m benchmarks.run                          # --size tiny, everything (~10 minutes on 2 CPU cores)
    python -m benchmarks.run --size small --benchmarks dpo_step,grpo_whole_step,generate_greedy
    python -m benchmarks.run --size qwen2-0.5b --dry-run   # configs, shapes, FLOPs, traced steps; no timing

Per benchmark both systems are built on the same checkpoint and data, compiled / warmed up, then timed
alternately (reference step, jrlhf step, ...). Afterwards, unless switched off, peak memory is measured per system
in its own subprocess and jrlhf's step is run on 1, 2, 4 and 8 simulated devices. Results go to
``bench_results/`` (or ``--out``): ``bench_<size>_<time>.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

from benchmarks import cases, env
from benchmarks.sizes import SIZES, get_size

DEFAULT_REPEATS = {"tiny": 10, "small": 5}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES), help="benchmark size (default: tiny)")
    parser.add_argument("--benchmarks", default="all",
                        help=f"comma-separated subset of: {', '.join(cases.BENCHMARKS)} (default: all)")
    parser.add_argument("--out", default="bench_results", help="output directory (default: bench_results/)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build configs, shapes, FLOPs and trace every jrlhf step abstractly; time nothing")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per system (default: 2)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per system (default: 10 for tiny, 5 for small, 20 on accelerators)")
    parser.add_argument("--threads", type=int, default=env.DEFAULT_THREADS, help="threads for both stacks")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-system memory subprocesses")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps run by each memory subprocess")
    parser.add_argument("--no-scaling", action="store_true", help="skip the simulated-device scaling runs")
    parser.add_argument("--scaling-devices", default="1,2,4,8", help="simulated device counts (default: 1,2,4,8)")
    parser.add_argument("--scaling-benchmarks", default="dpo_step", help="jrlhf steps run on the simulated meshes")
    parser.add_argument("--subprocess-timeout", type=int, default=900, help="seconds per subprocess")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scan-unroll", type=int, default=None,
                        help="jrlhf's layers per scan iteration (default: the size's, see benchmarks/sizes.py)")
    args = parser.parse_args(argv)
    args.names = cases.parse_benchmarks(args.benchmarks)
    args.scaling_names = cases.parse_benchmarks(args.scaling_benchmarks)
    args.devices = [int(x) for x in args.scaling_devices.split(",") if x.strip()]
    size = get_size(args.size)
    if args.repeats is None:
        args.repeats = DEFAULT_REPEATS.get(size.name, 20)
    if args.scan_unroll is not None and args.scan_unroll < 1:
        parser.error("--scan-unroll must be >= 1")
    for name in ("warmup", "repeats", "threads", "memory_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for n in args.devices:
        if n < 1 or size.batch_size % n:
            parser.error(f"--scaling-devices: {n} does not divide the batch size {size.batch_size}")
    return args


def quiet_libraries() -> None:
    """Silences progress bars and advisory warnings of transformers / TRL / datasets (not errors)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("transformers", "trl", "datasets", "accelerate", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for module in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "trl"):
        try:
            out[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - a missing optional stack is recorded, not fatal
            out[module] = None
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def meta(args, env_vars: dict, command: str) -> dict:
    import jax

    device = jax.devices()[0]
    name = _cpu_name() if device.platform == "cpu" else device.device_kind
    out = {"command": command, "time": datetime.datetime.now().isoformat(timespec="seconds"),
           "device": f"{device.platform}: {name}", "cpu_count": os.cpu_count(), "threads": args.threads,
           "warmup": args.warmup, "repeats": args.repeats, "memory_steps": args.memory_steps, "seed": args.seed,
           "git_commit": _git_commit(), "env": env_vars}
    try:
        out["load_average"] = os.getloadavg()
    except OSError:
        pass
    out.update(_versions())
    return out


def _size_dict(size) -> dict:
    return {"name": size.name, "description": size.description, "dtype": size.dtype,
            "batch_size": size.batch_size, "prompt_length": size.prompt_length,
            "completion_length": size.completion_length, "num_generations": size.num_generations,
            "accelerator": size.accelerator, "scan_unroll": size.scan_unroll, "hf_config": size.hf_config}


def run_benchmark(name: str, inputs, args, log) -> dict:
    """Builds both sides of ``name``, times them alternately and returns the row (or ``{"error": ...}``)."""
    from benchmarks import timing

    runners = []
    try:
        log(f"[{name}] building the PyTorch reference")
        runners.append(cases.build(name, "pytorch", inputs))
        log(f"[{name}] building jrlhf")
        runners.append(cases.build(name, "jrlhf", inputs))
        reference, jrlhf = timing.alternate(runners[0], runners[1], args.warmup, args.repeats, log=log)
        row = {"name": name, "reference": reference.summary(), "jrlhf": jrlhf.summary(),
               "speedup": timing.speedup(jrlhf, reference),
               "speedup_cpu": timing.speedup(jrlhf, reference, "median_tokens_per_cpu_s"),
               "speedup_paired": timing.paired_speedup(jrlhf, reference)}
        row["jrlhf"]["compile_cpu_s"] = getattr(runners[1], "compile_cpu_seconds", None)
        row["jrlhf"]["compiles"] = getattr(runners[1], "compiles", None)
        log(f"[{name}] {reference.label}: {row['reference']['median_tokens_per_s']:.0f} tok/s, jrlhf: "
            f"{row['jrlhf']['median_tokens_per_s']:.0f} tok/s -> {row['speedup']:.2f}x "
            f"(per CPU second: {row['speedup_cpu'] or float('nan'):.2f}x)")
        return row
    except Exception as error:  # noqa: BLE001 - one failing benchmark must not lose the others
        traceback.print_exc()
        return {"name": name, "error": f"{type(error).__name__}: {error}"}
    finally:
        for runner in runners:
            runner.close()
        del runners
        gc.collect()


def _subprocess(argv: list, timeout: int, log) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out_path = handle.name
    command = [sys.executable, "-m", "benchmarks.worker"] + argv + ["--out", out_path]
    env_vars = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env_vars["PYTHONPATH"] = root + os.pathsep + env_vars.get("PYTHONPATH", "")
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env_vars, cwd=root)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout)[-2000:]
            log(f"  subprocess failed ({done.returncode}):\n{tail}")
            return {"error": f"exit {done.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"}
        with open(out_path) as f:
            result = json.load(f)
        result["wall_s"] = time.perf_counter() - start
        return result
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    finally:
        if os.path.exists(out_path):
            os.remove(out_path)


def main(argv=None) -> int:
    args = parse_args(argv)
    size = get_size(args.size, scan_unroll=args.scan_unroll)
    env_vars = env.configure(args.threads, platform=None if size.accelerator else "cpu", pin=not size.accelerator)
    quiet_libraries()
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    log = lambda text: print(text, flush=True)  # noqa: E731

    from benchmarks import data as bdata
    from benchmarks import peak, plan, report

    env.configure_torch(args.threads)
    shape = cases.model_shape(size)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = f"bench_{size.name}_{'dry-run_' if args.dry_run else ''}{stamp}"
    result = {"meta": meta(args, env_vars, command), "size": _size_dict(size),
              "plan": plan.build_plan(size, args.names, shape), "benchmarks": []}

    if args.dry_run:
        log(f"[dry-run] --size {size.name}: {size.description}")
        result["plan"]["jrlhf_parameters"] = plan.jrlhf_parameter_count(size)
        result["plan"]["transformers_parameters"] = plan.torch_parameter_count(size)
        result["plan"]["abstract"] = plan.abstract_check(size, args.names)
        for entry in result["plan"]["benchmarks"]:
            traced = result["plan"]["abstract"][entry["name"]]
            log(f"  {entry['name']}: {entry['flops_per_step'] / 1e9:.1f} GFLOP/step, traced in "
                f"{traced['trace_s']:.1f}s")
        paths = report.write_plan(result, args.out, stem)
        log(f"[dry-run] parameters: jrlhf {result['plan']['jrlhf_parameters']:,}, transformers "
            f"{result['plan']['transformers_parameters']}; wrote {paths['json']}")
        return 0

    log(f"[peak] measuring the matmul peak ({size.dtype})")
    result["peak"] = peak.device_peak(size.dtype)
    if result["peak"].get("flops_per_s"):
        log(f"[peak] {result['peak']['flops_per_s'] / 1e9:.1f} GFLOP/s ({result['peak']['source']})")
    with tempfile.TemporaryDirectory(prefix="jrlhf-bench-ckpt-") as checkpoint:
        log(f"[setup] writing the shared checkpoint ({size.name})")
        paths = bdata.write_checkpoint(size, checkpoint, args.seed)
        inputs = cases.make_inputs(size, paths, args.seed, shape=shape)
        for name in args.names:
            result["benchmarks"].append(run_benchmark(name, inputs, args, log))
            report.write(result, args.out, stem)
        if not args.no_memory:
            result["memory"] = {}
            for system in ("jrlhf", "pytorch"):
                log(f"[memory] {system} in its own subprocess")
                result["memory"][system] = _subprocess(
                    ["memory", "--system", system, "--size", size.name, "--checkpoint", checkpoint,
                     "--benchmarks", ",".join(args.names), "--steps", str(args.memory_steps),
                     "--threads", str(args.threads), "--seed", str(args.seed),
                     "--scan-unroll", str(size.scan_unroll)]
                    + ([] if size.accelerator else ["--platform", "cpu"]), args.subprocess_timeout, log)
            report.write(result, args.out, stem)
        if not args.no_scaling:
            result["scaling"] = []
            for devices in args.devices:
                log(f"[scaling] jrlhf on {devices} simulated device(s)")
                result["scaling"].append(_subprocess(
                    ["scaling", "--devices", str(devices), "--size", size.name, "--checkpoint", checkpoint,
                     "--benchmarks", ",".join(args.scaling_names), "--steps", "3", "--threads", str(args.threads),
                     "--seed", str(args.seed), "--scan-unroll", str(size.scan_unroll)], args.subprocess_timeout, log))
                result["scaling"][-1].setdefault("devices", devices)
    paths = report.write(result, args.out, stem)
    log("")
    log(report.markdown(result))
    log(f"wrote {', '.join(paths.values())}")
    return 0 if all("error" not in row for row in result["benchmarks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
