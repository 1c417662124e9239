"""Timing one system per process, in blocks interleaved across processes.

A :class:`Runner` is one system's side of one benchmark. Either it exposes ``step() -> tokens`` (one blocking step;
the default :meth:`Runner.loop` calls it) or it overrides :meth:`Runner.loop` to drive its own training loop and
call ``between(index, seconds, tokens, cpu_seconds)`` after each of its steps (the TRL trainers).

Each system runs in its own worker process (:func:`serve`, started by :class:`Worker`) with its own threading. The
workers of one benchmark are all built and compiled first (one after the other, so compile times are not
disturbed), then the orchestrator hands out blocks of steps in turn: a warm-up block to each, then ``rounds``
rounds of ``block`` timed steps, the order of the systems reversed every round (A B C, C B A, A B C...). Only one
process computes at a time, and a change of load hits every system within a round. A worker waiting for its next
block sleeps in a pipe read, so its threads are idle.

The protocol is JSON lines: the orchestrator writes ``{"cmd": "run", "steps": k}`` or ``{"cmd": "quit"}`` to the
worker's stdin; the worker answers ``{"event": "ready", ...}`` once compiled, ``{"event": "block", "seconds": [..],
"tokens": [..], "cpu_seconds": [..], "recompiles": n}`` after each block, or ``{"event": "error", "error": ...}``.
"""

from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import time
from typing import Callable, IO


class Runner:
    """One system's side of a benchmark.

    Attributes:
      name: the benchmark (``dpo_step``, ``generate_greedy``...).
      label: what the system is, for the report (``"jrlhf"``, ``"TRL DPOTrainer"``...).
      system: ``"jrlhf"``, ``"trl"`` (TRL trainer or ``transformers.generate``) or ``"plain"`` (a hand-written
        PyTorch loop).
      flops: model FLOPs of one step (see :mod:`benchmarks.sizes`).
    """

    system = ""

    def __init__(self, name: str, label: str, flops: float):
        self.name = name
        self.label = label
        self.flops = float(flops)

    def compile(self) -> float | None:
        """Compiles before timing; returns the compile seconds (``None``: nothing to compile)."""
        return None

    def step(self) -> int:
        """Runs one step to completion (blocking) and returns its token count."""
        raise NotImplementedError

    def loop(self, steps: int, between: Callable[[int, float, int, float], None]) -> None:
        """Runs ``steps`` timed steps, calling ``between(index, seconds, tokens, cpu_seconds)`` after each."""
        for index in range(steps):
            cpu = time.process_time()
            start = time.perf_counter()
            tokens = self.step()
            between(index, time.perf_counter() - start, tokens, time.process_time() - cpu)

    def recompiles(self) -> int:
        """Compilations seen during the timed steps (should be 0)."""
        return 0

    def close(self) -> None:
        """Releases temporary files."""


class _Quit(Exception):
    pass


def serve(runner: Runner, total_steps: int, commands: IO[str], replies: IO[str], ready: dict | None = None) -> None:
    """The worker side of the protocol (see the module docstring): sends ``ready`` (with ``ready``'s fields), then
    runs ``total_steps`` steps of ``runner`` in the blocks the orchestrator asks for, replying after each block.

    Raises:
      RuntimeError: a command asks for more steps than ``total_steps`` leaves, or is not understood.
    """
    def send(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    def receive() -> int:
        line = commands.readline()
        if not line:
            raise _Quit
        command = json.loads(line)
        if command.get("cmd") == "quit":
            raise _Quit
        if command.get("cmd") != "run" or int(command.get("steps", 0)) < 1:
            raise RuntimeError(f"worker: cannot run command {line.strip()!r}")
        return int(command["steps"])

    send(dict(ready or {}, event="ready"))
    block = {"left": 0, "seconds": [], "tokens": [], "cpu_seconds": [], "done": 0}
    recompiles_before = [runner.recompiles()]

    def begin() -> None:
        steps = receive()
        if block["done"] + steps > total_steps:
            raise RuntimeError(f"worker: {steps} more steps asked, {total_steps - block['done']} left")
        block.update(left=steps, seconds=[], tokens=[], cpu_seconds=[])

    def between(index: int, seconds: float, tokens: int, cpu_seconds: float) -> None:
        block["seconds"].append(seconds)
        block["tokens"].append(int(tokens))
        block["cpu_seconds"].append(cpu_seconds)
        block["left"] -= 1
        block["done"] += 1
        if block["left"] == 0:
            recompiles = runner.recompiles()
            send({"event": "block", "seconds": block["seconds"], "tokens": block["tokens"],
                  "cpu_seconds": block["cpu_seconds"], "recompiles": recompiles - recompiles_before[0]})
            recompiles_before[0] = recompiles
            if block["done"] < total_steps:
                begin()

    try:
        begin()
        runner.loop(total_steps, between)
        receive()  # the final quit
    except _Quit:
        pass


def block_order(systems: list, rounds: int) -> list:
    """The order in which the systems run their timed blocks: ``rounds`` rounds, every other one reversed
    (``[A, B, C, C, B, A, A, B, C]`` for 3 rounds)."""
    out = []
    for index in range(rounds):
        out.extend(systems if index % 2 == 0 else list(reversed(systems)))
    return out


class WorkerError(RuntimeError):
    """A worker process failed (its message ends with the tail of the worker's log)."""


class Worker:
    """The orchestrator's handle on one worker process (``python -m benchmarks.worker serve ...``).

    Args:
      argv: the worker's command line.
      log_path: file receiving the worker's stdout and stderr (libraries print there).
      env: the worker's environment.
      cwd: its working directory.
      timeout: seconds to wait for any one answer.
    """

    def __init__(self, argv: list, log_path: str, env: dict, cwd: str, timeout: float):
        self.log_path = log_path
        self.timeout = timeout
        self._log = open(log_path, "w")
        read_fd, write_fd = os.pipe()
        self.process = subprocess.Popen(argv + ["--reply-fd", str(write_fd)], stdin=subprocess.PIPE,
                                        stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True,
                                        pass_fds=(write_fd,))
        os.close(write_fd)
        self._replies = os.fdopen(read_fd, "r")

    def _tail(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def receive(self) -> dict:
        """The worker's next answer; raises :class:`WorkerError` on a timeout, an exit or an error answer."""
        ready, _, _ = select.select([self._replies], [], [], self.timeout)
        line = self._replies.readline() if ready else None
        if not line:
            self.kill()
            reason = "timed out" if ready == [] else f"exited with {self.process.poll()}"
            raise WorkerError(f"worker {reason}; its log ends with:\n{self._tail()}")
        message = json.loads(line)
        if message.get("event") == "error":
            self.kill()
            raise WorkerError(f"{message.get('error')}; log tail:\n{self._tail()}")
        return message

    def run(self, steps: int) -> dict:
        """Asks for ``steps`` steps and returns the block's answer."""
        self.process.stdin.write(json.dumps({"cmd": "run", "steps": steps}) + "\n")
        self.process.stdin.flush()
        return self.receive()

    def quit(self) -> None:
        """Asks the worker to stop and waits for it (killed after the timeout)."""
        try:
            if self.process.poll() is None:
                self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout=self.timeout)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            self.kill()
        self.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def close(self) -> None:
        for handle in (self._replies, self._log):
            try:
                handle.close()
            except OSError:
                pass


def summarize(blocks: list, flops: float) -> dict:
    """Statistics of one system's timed blocks (each a worker ``block`` answer): the median step time and
    tokens/s over all timed steps, the per-block medians, the achieved FLOP/s at the median step time."""
    seconds = [s for b in blocks for s in b["seconds"]]
    tokens = [t for b in blocks for t in b["tokens"]]
    rates = [t / s for t, s in zip(tokens, seconds)]
    median_s = statistics.median(seconds)
    return {
        "steps": len(seconds), "median_step_s": median_s, "min_step_s": min(seconds), "max_step_s": max(seconds),
        "median_tokens_per_s": statistics.median(rates), "tokens_per_step": statistics.median(tokens),
        "block_tokens_per_s": [statistics.median(t / s for t, s in zip(b["tokens"], b["seconds"])) for b in blocks],
        "median_cpu_s": statistics.median(c for b in blocks for c in b["cpu_seconds"]),
        "flops_per_step": flops, "achieved_flops_per_s": flops / median_s if median_s > 0 else None,
        "recompiles": sum(b.get("recompiles", 0) for b in blocks),
        "seconds": seconds, "tokens": tokens,
    }


def ratios(jrlhf: dict, other: dict) -> dict:
    """jrlhf over ``other`` (two :func:`summarize` results): the ratio of median tokens/s and the range of the
    per-round ratios (round ``i``'s block medians; the blocks of one round ran back to back)."""
    per_round = [j / o for j, o in zip(jrlhf["block_tokens_per_s"], other["block_tokens_per_s"])]
    return {"ratio": jrlhf["median_tokens_per_s"] / other["median_tokens_per_s"],
            "round_min": min(per_round), "round_max": max(per_round), "rounds": per_round}
