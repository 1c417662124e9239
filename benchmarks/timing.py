"""Alternating (A B A B ...) timing of two systems running the same benchmark in one process.

A :class:`Runner` is one system's side of one benchmark. Either it exposes ``step() -> tokens`` (one blocking step;
the default :meth:`Runner.loop` calls it) or it overrides :meth:`Runner.loop` to drive its own training loop and
call ``between(index, seconds, tokens, cpu_seconds)`` after each of its steps (the TRL trainers).
:func:`alternate` runs system A's
loop and, after each A step, one timed step of system B, so the two are interleaved step by step and share whatever
the machine's load does at that moment. The first ``warmup`` steps of each are discarded.

Besides wall time, each step's process CPU time (all threads, ``time.process_time``) is recorded: on a machine shared
with other work, wall time includes the time the process waits for a core, CPU time much less so.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import Callable


class Runner:
    """One system's side of a benchmark.

    Attributes:
      name: the benchmark (``dpo_step``, ``generate_greedy``...).
      label: what the system is, for the report (``"jrlhf"``, ``"TRL DPOTrainer"``...).
      system: ``"jrlhf"`` or ``"pytorch"``.
      flops: model FLOPs of one step (see :mod:`benchmarks.sizes`).
    """

    system = ""

    def __init__(self, name: str, label: str, flops: float):
        self.name = name
        self.label = label
        self.flops = float(flops)

    def compile(self) -> float | None:
        """Compiles / warms up before timing; returns the compile seconds (``None``: nothing to compile)."""
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


@dataclasses.dataclass
class Measurement:
    """The timed steps of one system on one benchmark (warm-up excluded).

    Attributes:
      name, label, system: as on the :class:`Runner`.
      seconds: wall seconds of each timed step.
      tokens: tokens of each timed step.
      cpu_seconds: process CPU seconds (all threads) of each timed step.
      flops: model FLOPs of one step.
      compile_seconds: jrlhf trace + lower + compile seconds (None for eager PyTorch).
      first_step_seconds: wall seconds of the first (warm-up) step, compile included.
      recompiles: compilations during the timed steps.
    """

    name: str
    label: str
    system: str
    seconds: list
    tokens: list
    cpu_seconds: list
    flops: float
    compile_seconds: float | None = None
    first_step_seconds: float | None = None
    recompiles: int = 0

    @property
    def tokens_per_second(self) -> list:
        return [t / s for t, s in zip(self.tokens, self.seconds)]

    def summary(self) -> dict:
        """Median step time and tokens/s (with the spread), achieved FLOP/s at the median step time."""
        rates = self.tokens_per_second
        median_s = statistics.median(self.seconds)
        return {
            "name": self.name, "label": self.label, "system": self.system, "steps": len(self.seconds),
            "median_step_s": median_s, "min_step_s": min(self.seconds), "max_step_s": max(self.seconds),
            "median_tokens_per_s": statistics.median(rates), "tokens_per_step": statistics.median(self.tokens),
            "median_cpu_s": statistics.median(self.cpu_seconds),
            "median_tokens_per_cpu_s": statistics.median(t / c for t, c in zip(self.tokens, self.cpu_seconds)
                                                         if c > 0) if any(c > 0 for c in self.cpu_seconds) else None,
            "iqr_tokens_per_s": _iqr(rates), "flops_per_step": self.flops,
            "achieved_flops_per_s": self.flops / median_s if median_s > 0 else None,
            "compile_s": self.compile_seconds, "first_step_s": self.first_step_seconds,
            "recompiles": self.recompiles, "seconds": list(self.seconds), "tokens": list(self.tokens),
            "cpu_seconds": list(self.cpu_seconds),
        }


def _iqr(values: list) -> list:
    if len(values) < 2:
        return [values[0], values[0]] if values else [None, None]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def alternate(a: Runner, b: Runner, warmup: int, repeats: int, log: Callable[[str], None] = print):
    """Times ``a`` and ``b`` alternately: each ``a`` step is followed by one ``b`` step; the first ``warmup`` of
    each are discarded. Compiles both first. Returns ``(Measurement of a, Measurement of b)``."""
    if warmup < 1 or repeats < 1:
        raise ValueError(f"warmup={warmup}, repeats={repeats}: both must be >= 1 (the first step is never timed)")
    compile_s = {}
    for runner in (a, b):
        start = time.perf_counter()
        compile_s[runner.label] = runner.compile()
        if compile_s[runner.label] is not None:
            log(f"  {runner.label}: compiled in {compile_s[runner.label]:.1f}s "
                f"({time.perf_counter() - start:.1f}s with the first call)")
    records = {a.label: ([], [], []), b.label: ([], [], [])}
    first = {}

    def between(index: int, seconds: float, tokens: int, cpu: float) -> None:
        other_cpu = time.process_time()
        other_start = time.perf_counter()
        other_tokens = b.step()
        other_seconds = time.perf_counter() - other_start
        other_cpu = time.process_time() - other_cpu
        for runner, s, t, c in ((a, seconds, tokens, cpu), (b, other_seconds, other_tokens, other_cpu)):
            if index == 0:
                first[runner.label] = s
            if index >= warmup:
                for column, value in zip(records[runner.label], (s, t, c)):
                    column.append(value)
        if index >= warmup:
            log(f"  step {index - warmup + 1}/{repeats}: {a.label} {seconds * 1e3:.1f} ms, "
                f"{b.label} {other_seconds * 1e3:.1f} ms")

    gc.collect()
    a.loop(warmup + repeats, between)
    out = []
    for runner in (a, b):
        seconds, tokens, cpu = records[runner.label]
        if len(seconds) != repeats:
            raise RuntimeError(f"{runner.label} ran {len(seconds)} timed steps instead of {repeats}")
        out.append(Measurement(name=runner.name, label=runner.label, system=runner.system, seconds=seconds,
                               tokens=tokens, cpu_seconds=cpu, flops=runner.flops,
                               compile_seconds=compile_s[runner.label],
                               first_step_seconds=first.get(runner.label), recompiles=runner.recompiles()))
    return out[0], out[1]


def paired_speedup(jrlhf: Measurement, reference: Measurement) -> float:
    """Median over the alternating pairs of (jrlhf tokens/s / reference tokens/s): steps run back to back share the
    machine's load of that moment, so this ratio moves less with the load than the ratio of medians."""
    return statistics.median(j / r for j, r in zip(jrlhf.tokens_per_second, reference.tokens_per_second))


def speedup(jrlhf: Measurement, reference: Measurement, key: str = "median_tokens_per_s") -> float | None:
    """Ratio of median tokens/s (or of ``key``), jrlhf over the reference."""
    mine, theirs = jrlhf.summary()[key], reference.summary()[key]
    return None if mine is None or not theirs else mine / theirs
