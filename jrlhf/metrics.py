"""Metric writers: stdout, a JSONL file and TensorBoard (tensorboardX), written by process 0 only."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np


def to_python_scalars(metrics: dict) -> dict:
    """Converts a dict of scalar arrays (fetched to host) into plain Python floats/ints."""
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        if a.size != 1:
            continue
        x = a.item()
        out[k] = float(x) if isinstance(x, (float, np.floating)) or not isinstance(x, (int, bool)) else x
    return out


class MetricsWriter:
    """Writes one record per logged step to ``<run_dir>/metrics.jsonl``, TensorBoard and (optionally) stdout.

    Records have the form ``{"step": int, "time": float, "split": "train"|"eval", <name>: float, ...}``.
    Only the main process writes (pass ``enabled=False`` elsewhere).
    """

    def __init__(self, run_dir: str, *, tensorboard: bool = True, stdout: bool = False, enabled: bool = True):
        self.run_dir = run_dir
        self.enabled = enabled
        self.stdout = stdout
        self._tb = None
        self._file = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._file = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def write(self, step: int, metrics: dict, split: str = "train") -> None:
        """Writes scalar ``metrics`` for ``step``; non-finite values are written as null."""
        if not self.enabled:
            return
        scalars = to_python_scalars(metrics)
        record = {"step": int(step), "time": time.time(), "split": split}
        record.update({k: (v if math.isfinite(v) else None) for k, v in scalars.items()
                       if k not in ("step", "time", "split")})
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                if math.isfinite(v) and k not in ("step", "time", "split"):
                    self._tb.add_scalar(f"{split}/{k}", v, step)
        if self.stdout:
            body = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
            print(f"[{split} step {step}] {body}", flush=True)

    def write_text(self, step: int, name: str, text: str) -> None:
        """Logs a text sample (e.g. completions of on-policy runs) to ``samples.jsonl`` and TensorBoard."""
        if not self.enabled:
            return
        with open(os.path.join(self.run_dir, "samples.jsonl"), "a") as f:
            f.write(json.dumps({"step": int(step), "name": name, "text": text}) + "\n")
        if self._tb is not None:
            self._tb.add_text(name, text, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: str) -> list[dict]:
    """Reads ``metrics.jsonl`` of a run directory; a missing file names the directory."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no metrics.jsonl in run directory '{run_dir}' (is it a jrlhf run directory?)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
