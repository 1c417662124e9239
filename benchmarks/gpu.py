"""``python -m benchmarks.gpu`` (``make bench-gpu``): the accelerator benchmark on one GPU, in under 8 minutes.

Runs, for the Qwen2-0.5B and Qwen2-1.5B configurations (random weights, bf16 compute over float32 master weights,
full rematerialisation for 1.5B): the DPO step (16 pairs x 768 tokens) and the GRPO update (16 rows x 768
tokens) of jrlhf against a plain PyTorch loop and, when TRL is importable, TRL's trainers; and greedy generation
of 64 rows x 512 new tokens against ``transformers.generate``. MFU is against ``--peak-tflops`` (default 790
TFLOP/s dense bf16). The systems of a benchmark run one after the other (``--sequential``: each quits before the
next starts, so one GPU's memory holds one of them); jax does not preallocate (``XLA_PYTHON_CLIENT_PREALLOCATE``).

``python -m benchmarks.gpu --shrink`` runs the same plan at tiny shapes on the CPU (a check of the script on a
machine without an accelerator; its times mean nothing). Results: ``bench_results/gpu/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ("qwen2-0.5b", "qwen2-1.5b")
TRAINING = "dpo_step,grpo_update_step"
GENERATION = "generate_greedy"


def commands(args) -> list:
    """The ``benchmarks.run`` command lines of the plan."""
    systems = "jrlhf,plain" + (",trl" if importlib.util.find_spec("trl") is not None else "")
    out = []
    for size in SIZES:
        common = [sys.executable, "-m", "benchmarks.run", "--size", size, "--out", args.out, "--sequential",
                  "--warmup", "1", "--rounds", "1", "--worker-timeout", str(args.worker_timeout)]
        if args.shrink:
            common.append("--shrink")
        else:
            common += ["--peak-tflops", str(args.peak_tflops)]
        out.append(common + ["--benchmarks", TRAINING, "--systems", systems, "--block", "3"])
        out.append(common + ["--benchmarks", GENERATION, "--systems", "jrlhf,trl", "--block", "1"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shrink", action="store_true", help="the plan at tiny shapes on the CPU (a dry run)")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak for MFU (default: 790)")
    parser.add_argument("--out", default=os.path.join("bench_results", "gpu"))
    parser.add_argument("--worker-timeout", type=int, default=420)
    parser.add_argument("--print", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", HF_HUB_OFFLINE="1")
    if args.shrink:
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    start = time.perf_counter()
    failures = 0
    for command in commands(args):
        print("$ " + " ".join(command[1:]), flush=True)
        if args.print:
            continue
        failures += subprocess.run(command, env=env, cwd=ROOT).returncode != 0
        print(f"[bench-gpu] {time.perf_counter() - start:.0f}s so far", flush=True)
    print(f"[bench-gpu] done in {time.perf_counter() - start:.0f}s, {failures} command(s) failed; results in "
          f"{args.out}/", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
