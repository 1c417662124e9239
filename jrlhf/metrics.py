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


class BestCheckpoint:
    """Best-checkpoint selection and early stopping on one held-out metric, the rule of Hugging Face
    ``Trainer`` (``metric_for_best_model``, ``greater_is_better``) and its ``EarlyStoppingCallback``
    (``early_stopping_patience``, ``early_stopping_threshold``).

    :meth:`update` takes each evaluation's result: a value strictly better than the best so far (greater, or lower
    with ``greater_is_better=False``) becomes the best; the patience counter is reset by a value better than the
    best *by more than* ``threshold`` and otherwise grows by one; :attr:`should_stop` once it reaches ``patience``
    (``patience=0``: never). The state (:meth:`state_dict`) is plain JSON, saved next to the run so a resumed run
    keeps its best.

    Raises (from :meth:`update`):
      ConfigError: ``metric`` is not in the evaluation result (the message lists the keys there).
    """

    def __init__(self, metric: str, *, greater_is_better: bool = True, patience: int = 0, threshold: float = 0.0):
        self.metric = metric
        self.greater_is_better = bool(greater_is_better)
        self.patience = int(patience)
        self.threshold = float(threshold)
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.best_eval: dict | None = None
        self.bad_evals = 0

    def _better(self, value: float, than: float, margin: float = 0.0) -> bool:
        return value - than > margin if self.greater_is_better else than - value > margin

    def update(self, step: int, result: dict) -> bool:
        """Records one evaluation at ``step``; returns whether it is the new best."""
        if self.metric not in result:
            from jrlhf.config import ConfigError

            raise ConfigError(f"train.metric_for_best_model '{self.metric}' is not among the evaluation's metrics "
                              f"({', '.join(sorted(result)) or 'none'}); name one of them")
        value = float(result[self.metric])
        if self.best_value is None or self._better(value, self.best_value, self.threshold):
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        improved = self.best_value is None or self._better(value, self.best_value)
        if improved:
            self.best_value, self.best_step, self.best_eval = value, int(step), dict(result)
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def state_dict(self) -> dict:
        return {"metric": self.metric, "best_value": self.best_value, "best_step": self.best_step,
                "best_eval": self.best_eval, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        if state.get("metric") != self.metric:
            return  # another metric: start afresh
        self.best_value, self.best_step = state.get("best_value"), state.get("best_step")
        self.best_eval, self.bad_evals = state.get("best_eval"), int(state.get("bad_evals", 0))
