"""``python -m benchmarks.run``: jrlhf against TRL, a plain PyTorch loop and ``transformers.generate``, each system in
its own process at its own threading.

Examples::

    python -m benchmarks.run                          # --size tiny, every benchmark
    python -m benchmarks.run --size small --benchmarks dpo_step,grpo_update_step,generate_greedy
    python -m benchmarks.run --size smollm2-135m --model-path DIR --benchmarks dpo_step,generate_greedy
    python -m benchmarks.run --size qwen2-0.5b --dry-run   # configs, shapes, FLOPs, traced steps; no timing

Per benchmark, one worker process per system (jrlhf; TRL's trainer or ``transformers.generate``; a plain PyTorch
loop where one is defined) is built and compiled in turn, then the workers run blocks of steps in turn: a warm-up
block each, then ``--rounds`` rounds of ``--block`` timed steps, the order reversed every round (see
:mod:`benchmarks.timing`). The report gives the command, the load (``uptime``) before and after, the matmul peak
measured in the same run, each system's threading, and per benchmark the median tokens/s with the ratios and their
range over the rounds. Results go to ``bench_results/`` (or ``--out``): ``bench_<size>_<time>.json``, ``.md`` and
``.png``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from benchmarks import cases, env
from benchmarks.sizes import SIZES, get_size, shrink

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BLOCK = {"tiny": 5, "small": 2}
ALL_SYSTEMS = ("jrlhf", "trl", "plain")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny",
                        help=f"benchmark size: {', '.join(SIZES)}; with --model-path any name (default: tiny)")
    parser.add_argument("--model-path", default=None,
                        help="a real Hugging Face checkpoint folder (both systems load its weights; DPO 8 x 512 "
                             "tokens, generation 8 x 256 new tokens)")
    parser.add_argument("--shrink", action="store_true",
                        help="run the size's layout at tiny shapes on the CPU (checks an accelerator plan)")
    parser.add_argument("--benchmarks", default="all",
                        help=f"comma-separated subset of: {', '.join(cases.BENCHMARKS)} (default: all the size "
                             "supports)")
    parser.add_argument("--systems", default=",".join(ALL_SYSTEMS),
                        help="systems to run: jrlhf, trl (TRL / transformers.generate), plain (plain PyTorch loop)")
    parser.add_argument("--out", default="bench_results", help="output directory (default: bench_results/)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build configs, shapes, FLOPs and trace every jrlhf step abstractly; time nothing")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per system (default: 2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of timed blocks (default: 3)")
    parser.add_argument("--block", type=int, default=None,
                        help="timed steps per block (default: 5 for tiny, 2 for small and larger)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads of the PyTorch workers (default: torch's own, one per core)")
    parser.add_argument("--cpus", type=int, default=None, help="restrict every worker to this many CPUs")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="accelerators: the dense peak for MFU in TFLOP/s (default: benchmarks/peak.py's table)")
    parser.add_argument("--no-peak", action="store_true", help="skip the matmul peak measurement (CPU)")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory per system")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps run by each memory subprocess")
    parser.add_argument("--scaling", action="store_true", help="also run jrlhf on 1, 2, 4, 8 simulated devices")
    parser.add_argument("--scaling-devices", default="1,2,4,8", help="simulated device counts (default: 1,2,4,8)")
    parser.add_argument("--scaling-benchmarks", default="dpo_step", help="jrlhf steps run on the simulated meshes")
    parser.add_argument("--sequential", action="store_true",
                        help="run the systems one after the other (each quits before the next starts) instead of "
                             "interleaving their blocks: for one accelerator whose memory cannot hold every system")
    parser.add_argument("--worker-timeout", type=int, default=900, help="seconds to wait for any worker answer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scan-unroll", type=int, default=None,
                        help="jrlhf's layers per scan iteration (default: the size's, see benchmarks/sizes.py)")
    parser.add_argument("--remat", default=None,
                        help="jrlhf's per-layer rematerialisation in the training steps, a ModelConfig.remat value "
                             "(none, full, dots, dots_no_batch; default: the size's); 'full' bounds activation "
                             "memory on a real checkpoint at 512 tokens")
    args = parser.parse_args(argv)
    try:
        size = resolve_size(args)
    except ValueError as error:
        parser.error(str(error))
    names = cases.parse_benchmarks(args.benchmarks)
    if size.benchmarks is not None:
        if args.benchmarks == "all":
            names = tuple(n for n in names if n in size.benchmarks)
        unsupported = [n for n in names if n not in size.benchmarks]
        if unsupported:
            parser.error(f"--benchmarks: {unsupported} need heads a real checkpoint does not have; choose among "
                         f"{', '.join(size.benchmarks)}")
    args.names = names
    args.system_list = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    unknown = [s for s in args.system_list if s not in ALL_SYSTEMS]
    if unknown or "jrlhf" not in args.system_list:
        parser.error(f"--systems {args.systems!r}: must include jrlhf; choose among {', '.join(ALL_SYSTEMS)}")
    args.scaling_names = cases.parse_benchmarks(args.scaling_benchmarks)
    args.devices = [int(x) for x in args.scaling_devices.split(",") if x.strip()]
    if args.block is None:
        args.block = DEFAULT_BLOCK.get(size.name, 2)
    if args.scan_unroll is not None and args.scan_unroll < 1:
        parser.error("--scan-unroll must be >= 1")
    for name in ("warmup", "rounds", "block", "memory_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for n in args.devices if args.scaling else ():
        if n < 1 or size.batch_size % n:
            parser.error(f"--scaling-devices: {n} does not divide the batch size {size.batch_size}")
    return args


def resolve_size(args):
    """The :class:`BenchSize` of the command line (``--size``, ``--model-path``, ``--scan-unroll``, ``--shrink``)."""
    size = get_size(args.size, scan_unroll=args.scan_unroll, model_path=args.model_path, remat=args.remat)
    return shrink(size) if args.shrink else size


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


def versions() -> dict:
    """Installed versions of the stacks (read from the package metadata: nothing is imported)."""
    out = {"python": platform.python_version()}
    for module in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "trl"):
        try:
            out[module] = importlib.metadata.version(module)
        except importlib.metadata.PackageNotFoundError:
            out[module] = None
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def uptime() -> str:
    """``uptime``'s line (load averages over 1, 5 and 15 minutes), or the load averages alone."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        try:
            return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
        except OSError:
            return "unknown"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=ROOT)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def size_dict(size) -> dict:
    return {"name": size.name, "description": size.description, "dtype": size.dtype,
            "batch_size": size.batch_size, "prompt_length": size.prompt_length,
            "completion_length": size.completion_length, "num_generations": size.num_generations,
            "generation_rows": size.gen_rows, "generation_new_tokens": size.gen_new_tokens,
            "accelerator": size.accelerator, "scan_unroll": size.scan_unroll, "remat": size.remat,
            "model_path": size.model_path, "hf_config": size.hf_config}


def worker_env() -> dict:
    """The workers' environment: this one (no thread settings added), the repository first on the path."""
    env_vars = dict(os.environ)
    env_vars["PYTHONPATH"] = ROOT + os.pathsep + env_vars.get("PYTHONPATH", "")
    return env_vars


def worker_argv(args, size, checkpoint: str | None, mode: str, system: str) -> list:
    argv = [sys.executable, "-m", "benchmarks.worker", mode, "--system", system, "--size", args.size,
            "--seed", str(args.seed), "--scan-unroll", str(size.scan_unroll), "--remat", size.remat]
    if args.model_path:
        argv += ["--model-path", args.model_path]
    if args.shrink:
        argv.append("--shrink")
    if checkpoint:
        argv += ["--checkpoint", checkpoint]
    if args.torch_threads is not None:
        argv += ["--torch-threads", str(args.torch_threads)]
    if args.cpus is not None:
        argv += ["--cpus", str(args.cpus)]
    if not size.accelerator:
        argv += ["--platform", "cpu"]
    return argv


def one_shot(argv: list, timeout: int, log) -> dict:
    """Runs a worker mode that writes one JSON object to ``--out``; returns it (or ``{"error": ...}``)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out_path = handle.name
    start = time.perf_counter()
    try:
        done = subprocess.run(argv + ["--out", out_path], capture_output=True, text=True, timeout=timeout,
                              env=worker_env(), cwd=ROOT)
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


def measure_peak(args, size, log) -> dict:
    """The matmul peak of this run: on CPU each stack's best square matmul in its own process (the best of both);
    on accelerators ``--peak-tflops`` or the datasheet table."""
    from benchmarks import peak

    if size.accelerator:
        if args.peak_tflops:
            return {"source": "--peak-tflops", "flops_per_s": args.peak_tflops * 1e12, "dtype": size.dtype}
        import jax

        return peak.device_peak(size.dtype)
    measured = {}
    for stack, system in (("xla", "jrlhf"), ("torch", "trl")):
        measured[stack] = one_shot(worker_argv(args, size, None, "peak", system), args.worker_timeout, log)
    out = peak.combine_cpu_peaks({k: v for k, v in measured.items() if "error" not in v})
    out["measurements"] = measured
    return out


def run_benchmark(name: str, args, size, checkpoint: str, log, logs_dir: str) -> dict:
    """One benchmark: every system in its own worker, built and compiled in turn, then interleaved blocks."""
    from benchmarks import timing

    systems = [s for s in cases.SYSTEMS[name] if s in args.system_list]
    total = args.warmup + args.rounds * args.block
    row = {"name": name, "systems": {}}
    workers = {}
    if getattr(args, "sequential", False):
        for system in systems:
            one = argparse.Namespace(**vars(args))
            one.system_list = (system,)
            part = _interleaved(name, [system], one, size, checkpoint, log, logs_dir, total)
            row["systems"].update(part["systems"])
        return _finish(name, row, log)
    return _finish(name, _interleaved(name, systems, args, size, checkpoint, log, logs_dir, total), log)


def _finish(name: str, row: dict, log) -> dict:
    from benchmarks import timing

    jr = (row["systems"].get("jrlhf") or {}).get("summary")
    if jr is None:
        row.setdefault("error", (row["systems"].get("jrlhf") or {}).get("error", "jrlhf did not run"))
        return row
    row["ratios"] = {s: timing.ratios(jr, r["summary"]) for s, r in row["systems"].items()
                     if s != "jrlhf" and "summary" in r}
    log(f"[{name}] jrlhf {jr['median_tokens_per_s']:.0f} tok/s; " + "; ".join(
        f"vs {row['systems'][s]['ready']['label']}: {r['ratio']:.2f}x (rounds {r['round_min']:.2f}-"
        f"{r['round_max']:.2f})" for s, r in row["ratios"].items()))
    return row


def _interleaved(name: str, systems: list, args, size, checkpoint: str, log, logs_dir: str, total: int) -> dict:
    from benchmarks import timing

    row = {"name": name, "systems": {}}
    workers = {}
    try:
        for system in systems:
            log(f"[{name}] starting {system}")
            argv = worker_argv(args, size, checkpoint, "serve", system) + ["--benchmark", name, "--total-steps",
                                                                           str(total)]
            worker = timing.Worker(argv, os.path.join(logs_dir, f"{name}_{system}.log"), worker_env(), ROOT,
                                   args.worker_timeout)
            try:
                ready = worker.receive()
            except timing.WorkerError as error:
                log(f"[{name}] {system} failed: {str(error)[:2000]}")
                row["systems"][system] = {"error": str(error).splitlines()[0]}
                continue
            workers[system] = worker
            row["systems"][system] = {"ready": ready, "blocks": []}
            compile_text = (f", compiled in {ready['compile_s']:.1f}s" if ready.get("compile_s") is not None
                            else "")
            log(f"[{name}] {ready['label']}: built in {ready['build_s']:.1f}s{compile_text}")
        def run_block(system, steps):
            try:
                return workers[system].run(steps)
            except timing.WorkerError as error:
                log(f"[{name}] {system} failed: {str(error)[:3000]}")
                row["systems"][system] = {"error": str(error).splitlines()[0]}
                workers.pop(system).quit()
                return None

        for system in list(workers):
            block = run_block(system, args.warmup)
            if block is not None:
                row["systems"][system]["warmup_seconds"] = block["seconds"]
        for system in timing.block_order(list(workers), args.rounds):
            if system not in workers:
                continue
            block = run_block(system, args.block)
            if block is not None:
                row["systems"][system]["blocks"].append(block)
                log(f"  {system}: " + ", ".join(f"{s * 1e3:.0f}" for s in block["seconds"]) + " ms")
        for system, record in row["systems"].items():
            if record.get("blocks"):
                record["summary"] = timing.summarize(record["blocks"], record["ready"]["flops"])
    finally:
        for worker in workers.values():
            worker.quit()
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    size = resolve_size(args)
    env.configure(platform=None if size.accelerator else "cpu")
    quiet_libraries()
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    log = lambda text: print(text, flush=True)  # noqa: E731

    from benchmarks import data as bdata
    from benchmarks import plan, report

    shape = cases.model_shape(size)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = f"bench_{size.name}_{'dry-run_' if args.dry_run else ''}{stamp}"
    meta = {"command": command, "time": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": f"cpu: {cpu_name()}" if not size.accelerator else "accelerator", "cpu_count": os.cpu_count(),
            "warmup": args.warmup, "rounds": args.rounds, "block": args.block, "seed": args.seed,
            "git_commit": git_commit(), "uptime_before": uptime(), "orchestrator_env": env.describe(),
            "torch_threads_flag": args.torch_threads, "cpus_flag": args.cpus}
    meta.update(versions())
    result = {"meta": meta, "size": size_dict(size), "plan": plan.build_plan(size, args.names, shape),
              "benchmarks": []}
    log(f"[run] {command}\n[run] before: {meta['uptime_before']}")

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

    if not args.no_peak:
        log("[peak] measuring the matmul peak of each stack in its own process")
        result["peak"] = measure_peak(args, size, log)
        if result["peak"].get("flops_per_s"):
            log(f"[peak] {result['peak']['flops_per_s'] / 1e9:.1f} GFLOP/s ({result['peak']['source']})")
    os.makedirs(args.out, exist_ok=True)
    logs_dir = os.path.join(args.out, stem + "_logs")
    os.makedirs(logs_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="jrlhf-bench-ckpt-") as checkpoint:
        if size.model_path is None:
            log(f"[setup] writing the shared checkpoint ({size.name})")
            bdata.write_checkpoint(size, checkpoint, args.seed, heads=cases.checkpoints_needed(args.names))
        for name in args.names:
            result["benchmarks"].append(run_benchmark(name, args, size, checkpoint, log, logs_dir))
            report.write(result, args.out, stem)
        if args.memory:
            result["memory"] = {}
            for system in args.system_list:
                log(f"[memory] {system} in its own subprocess")
                result["memory"][system] = one_shot(
                    worker_argv(args, size, checkpoint, "memory", system)
                    + ["--benchmarks", ",".join(args.names), "--steps", str(args.memory_steps)],
                    args.worker_timeout, log)
            report.write(result, args.out, stem)
        if args.scaling:
            result["scaling"] = []
            for devices in args.devices:
                log(f"[scaling] jrlhf on {devices} simulated device(s)")
                out = one_shot(worker_argv(args, size, checkpoint, "scaling", "jrlhf")
                               + ["--devices", str(devices), "--benchmarks", ",".join(args.scaling_names),
                                  "--steps", "3"], args.worker_timeout, log)
                out.setdefault("devices", devices)
                result["scaling"].append(out)
    if not args.no_peak and not size.accelerator:
        log("[peak] measuring the matmul peak again (end of the run)")
        result["peak_end"] = measure_peak(args, size, log)
    result["meta"]["uptime_after"] = uptime()
    log(f"[run] after: {result['meta']['uptime_after']}")
    paths = report.write(result, args.out, stem)
    log("")
    log(report.markdown(result))
    log(f"wrote {', '.join(paths.values())}")
    return 0 if all("error" not in row for row in result["benchmarks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
