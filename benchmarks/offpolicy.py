"""Wall time per step of the synchronous loop against asynchronous (one-step-off-policy) rollouts.

Runs a recipe (``builtin:grpo``, the addition task, by default) once per ``--staleness`` value with the same
overrides and prints one JSON line per run: the steady-state wall time per step (from the ``time`` stamps of the
``train.log_every`` records after the first one, so the first steps' compilation is left out), the training reward
averaged over the last logged steps, and the final held-out evaluation. Time it under the machine's timing lock::

    python -m benchmarks.offpolicy --steps 25 --staleness 0 1 --set train.init_from=runs/sft/hf_model
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Synchronous vs asynchronous rollouts: wall time per step.")
    p.add_argument("--recipe", default="builtin:grpo")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--staleness", type=int, nargs="+", default=[0, 1])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    import jax

    import jrlhf
    from jrlhf.config import load_config

    for repeat in range(args.repeats):
        for staleness in args.staleness:
            out = tempfile.mkdtemp(prefix=f"offpolicy_s{staleness}_")
            cfg = load_config(args.recipe, [*args.overrides, f"train.steps={args.steps}", f"train.output_dir={out}",
                                            f"algo.max_staleness={staleness}", "train.progress_bar=false",
                                            "train.eval_every=0", "train.export_hf=false",
                                            "train.tensorboard=false"])
            start = time.perf_counter()
            summary = jrlhf.train(cfg)
            total = time.perf_counter() - start
            rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
            train = [r for r in rows if r["split"] == "train"]
            steady = train[1:]
            per_step = ((steady[-1]["time"] - train[0]["time"]) / (steady[-1]["step"] - train[0]["step"])
                        if steady else float("nan"))
            print(json.dumps({"staleness": staleness, "repeat": repeat, "steps": args.steps,
                              "s_per_step": round(per_step, 4), "total_s": round(total, 1),
                              "reward_last": round(sum(r["reward"] for r in train[-2:]) / len(train[-2:]), 4),
                              "eval": summary["eval"], "backend": jax.default_backend(),
                              "devices": jax.device_count(), "load": os.getloadavg()[0]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
