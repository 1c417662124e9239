"""Checks a virtual environment that holds jrlhf from a plain ``pip install .`` (no extras, no PyTorch).

Run with that environment's Python from outside the repository (so that the installed copy is imported):
imports every module of the package, then trains one step each of SFT, DPO and GRPO with the ``jrlhf`` console
script on chat-format records built from the shipped addition task (the shipped character tokenizer's chat
template renders them, which needs jinja2), each later stage starting from the SFT run's exported model. Exits
non-zero on the first failure; prints the versions it ran with.

    python3.12 -m venv /tmp/v && /tmp/v/bin/pip install . && (cd /tmp && /tmp/v/bin/python /path/to/this/file)
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import pkgutil
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "transformers", "tokenizers", "jinja2",
            "numpy")


def _check(condition: bool, message: str) -> None:
    if not condition:
        sys.exit(f"fresh-install check: FAILED: {message}")


def import_every_module() -> int:
    import jrlhf

    location = os.path.dirname(os.path.abspath(jrlhf.__file__))
    _check(not location.startswith(REPO + os.sep),
           f"jrlhf was imported from the source tree ({location}), not from the installed package; run this "
           "script from another directory")
    names = ["jrlhf"] + [m.name for m in pkgutil.walk_packages(jrlhf.__path__, "jrlhf.")]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001: any failure to import is what this check reports
            _check(False, f"import {name}: {type(error).__name__}: {error}")
    return len(names)


def chat_records(workdir: str) -> dict:
    """Chat-format copies of the shipped SFT pairs, preference pairs and RL prompts (the first rows of each)."""
    from jrlhf.data import load_records, write_jsonl

    def user(text):
        return [{"role": "user", "content": text}]

    def assistant(text):
        return [{"role": "assistant", "content": text}]

    sft = [{"messages": user(r["prompt"]) + assistant(r["completion"])}
           for r in load_records("builtin:addition/sft_train.jsonl")[:64]]
    pairs = [{"prompt": user(r["prompt"]), "chosen": assistant(r["chosen"]), "rejected": assistant(r["rejected"])}
             for r in load_records("builtin:addition/preference_train.jsonl")[:32]]
    prompts = [dict(r, prompt=user(r["prompt"])) for r in load_records("builtin:addition/rl_prompts.jsonl")[:16]]
    eval_prompts = [dict(r, prompt=user(r["prompt"])) for r in load_records("builtin:addition/eval.jsonl")[:16]]
    paths = {}
    for name, records in (("sft", sft), ("pairs", pairs), ("prompts", prompts), ("eval", eval_prompts)):
        paths[name] = os.path.join(workdir, f"{name}.jsonl")
        write_jsonl(paths[name], records)
    return paths


def train(algorithm: str, workdir: str, *overrides: str) -> dict:
    output_dir = os.path.join(workdir, algorithm)
    script = os.path.join(os.path.dirname(sys.executable), "jrlhf")
    _check(os.path.exists(script), f"the console script {script} was not installed")
    command = [script, "train", algorithm, "--set", "train.steps=1", "--set", f"train.output_dir={output_dir}",
               "--set", "train.log_every=1", *overrides]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True,
                          env=dict(os.environ, JRLHF_TRACEBACK="1"))
    _check(done.returncode == 0, f"{' '.join(command)} exited with {done.returncode}:\n{done.stderr[-4000:]}")
    with open(os.path.join(output_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        losses = [row["loss"] for row in map(json.loads, f) if "loss" in row]
    _check(len(losses) >= 1 and all(abs(v) < float("inf") for v in losses),
           f"{algorithm}: expected a finite training loss in metrics.jsonl, got {losses}")
    _check(os.path.exists(os.path.join(output_dir, "hf_model", "config.json")),
           f"{algorithm}: no exported hf_model/ in {output_dir}")
    print(f"  {algorithm}: 1 step, loss {losses[-1]:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return summary


def main() -> int:
    print(f"fresh-install check: Python {platform.python_version()}, "
          + ", ".join(f"{n} {importlib.metadata.version(n)}" for n in VERSIONS), flush=True)
    for absent in ("torch", "trl"):
        _check(importlib.util.find_spec(absent) is None,
               f"{absent} is installed here; this check is for an environment without it")
    print(f"  imported {import_every_module()} modules of the installed package", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        paths = chat_records(workdir)
        common = ("--set", "data.batch_size=8", "--set", "data.max_length=64", "--set", "data.eval_batch_size=16",
                  "--set", f"data.eval_prompts={paths['eval']}")
        train("sft", workdir, *common, "--set", f"data.train={paths['sft']}", "--set",
              "model.overrides.max_position_embeddings=128", "--set", "train.eval_every=0")
        sft_model = os.path.join(workdir, "sft", "hf_model")
        from_sft = ("--set", f"train.init_from={sft_model}")
        train("dpo", workdir, *common, *from_sft, "--set", f"data.train={paths['pairs']}", "--set", "data.eval=null")
        train("grpo", workdir, *common, *from_sft, "--set", f"data.train={paths['prompts']}",
              "--set", "data.max_prompt_length=32", "--set", "algo.num_generations=4", "--set", "train.eval_every=0")
    print("fresh-install check: passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
