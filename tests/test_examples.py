"""The offline examples in examples/ run as a user runs them (``python examples/NAME.py``) and print what they claim."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _run_example(name: str) -> str:
    path = [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_dpo_variant_example_is_short_and_trains():
    source = (ROOT / "examples" / "dpo_variant.py").read_text()
    assert len(source.splitlines()) < 40
    out = _run_example("dpo_variant.py")
    logged = {int(m[0]): (float(m[1]), float(m[2]))
              for m in re.findall(r"step (\d+): loss ([-\d.]+) margin ([-\d.]+)", out)}
    assert sorted(logged) == [1, 6, 11, 16, 20], out
    # Step 1 runs with the policy equal to the reference: every log-ratio is 0, so the loss is -log sigmoid(-gamma)
    # with the example's gamma = 0.2, worked out by hand: log(1 + e^0.2).
    assert logged[1][0] == round(float(np.log1p(np.exp(0.2))), 4) and logged[1][1] == 0.0, out
    losses = [logged[s][0] for s in sorted(logged)]
    assert all(b < a for a, b in zip(losses, losses[1:])), out  # 20 Adam steps on one batch: the loss falls
    assert logged[20][1] > 0.5, out  # and the chosen completions' log-ratio pulls ahead of the rejected ones'
