"""Where the time of a GRPO step goes: the recipe's own loop (``jrlhf.train``), its parts timed one by one.

Runs a recipe (``builtin:grpo_gsm8k`` by default, with the same ``--set`` overrides as ``jrlhf train``) for
``--steps`` steps and wraps, for the length of the run, the parts the loop calls: the sampler
(:func:`jrlhf.sampling.generate`), the rollout's forward program (sequences, reference log-probs when the recipe
has a reference), the host reward (decoding is timed with the rewards: ``_score`` receives decoded text, the
decode itself is in ``rollout (rest)``), and the compiled update. Each wrapped call is waited for
(``block_until_ready``), so a part's time is its own; jax's compile events during the call (trace, lowering, XLA
compile) are summed and reported apart as ``compile_s``, so ``run_s = wall - compile``. Per step it prints one
JSON line, then a summary line; ``--decode-split`` also times the sampler at 1 new token on the same prompts
(prefill + one token), giving the per-token decode time as ``(t(N) - t(1)) / (N - 1)`` (valid when no row ends
early: the sampler is called without EOS for this).

    python -m benchmarks.grpo_profile --steps 3 --set model.path=MODEL \\
        --set data.train=../shared/real_data/gsm8k_train.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Time the parts of a GRPO recipe's steps.")
    p.add_argument("--recipe", default="grpo_gsm8k")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--decode-split", action="store_true", help="also time the sampler at 1 and N new tokens")
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = p.parse_args(argv)

    import jax

    import jrlhf
    from jrlhf import sampling, train_loop
    from jrlhf.algorithms import onpolicy
    from jrlhf.config import load_config

    from benchmarks.jrlhf_side import CompileTracker

    parts: list = []  # (step, part, wall, compile, info)
    current = {"step": 0}

    def timed(name, fn, info_fn=None):
        def wrapper(*a, **k):
            start = time.perf_counter()
            with CompileTracker.track() as record:
                out = fn(*a, **k)
                jax.block_until_ready(out)
            wall = time.perf_counter() - start
            info = info_fn(a, k, out) if info_fn else {}
            parts.append({"step": current["step"], "part": name, "wall_s": round(wall, 3),
                          "compile_s": round(record["seconds"], 3), "compiles": record["compiles"], **info})
            return out

        return wrapper

    def gen_info(a, k, out):
        ids = a[2]
        return {"shape": list(ids.shape), "new_tokens": k.get("max_new_tokens"),
                "rows": int(out.tokens.shape[0]), "mean_len": float(jax.device_get(out.lengths).mean()),
                "max_len": int(jax.device_get(out.lengths).max())}

    originals = {"generate": sampling.generate, "forward": onpolicy._forward_jit, "score": onpolicy._score,
                 "rollout": onpolicy.rollout, "update": train_loop.make_onpolicy_update}
    sampling.generate = timed("generate", originals["generate"], gen_info)
    onpolicy._forward_jit = timed("rollout_forward", originals["forward"],
                                  lambda a, k, out: {"shape": list(out[0]["input_ids"].shape)})
    onpolicy._score = timed("reward (host)", originals["score"])
    onpolicy.rollout = timed("rollout (all)", originals["rollout"])

    def make_update(*a, **k):
        fn = originals["update"](*a, **k)

        def update(state, batch, frozen):
            current["step"] += 1
            return timed("update", fn, lambda a_, k_, out: {"shape": list(batch["input_ids"].shape)})(
                state, batch, frozen)

        return update

    train_loop.make_onpolicy_update = make_update

    path = args.recipe if args.recipe.endswith(".yaml") else f"builtin:{args.recipe}"
    cfg = load_config(path, args.overrides)
    from benchmarks.recipes_trl import timed_run_config

    out_dir = timed_run_config(cfg, args.steps, "jrlhf-grpo-profile-")
    start = time.perf_counter()
    jrlhf.train(cfg)
    total = time.perf_counter() - start
    # parts of step k were recorded while current["step"] == k - 1 (the update bumps it first)
    lines = []
    records = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    records = [r for r in records if r.get("split") == "train"]
    for step in range(1, args.steps + 1):
        mine = [q for q in parts if (q["step"] == step - 1 and q["part"] != "update")
                or (q["step"] == step and q["part"] == "update")]
        summary = {"step": step, "parts": mine}
        rollout_all = sum(q["wall_s"] for q in mine if q["part"] == "rollout (all)")
        inner = sum(q["wall_s"] for q in mine if q["part"] in ("generate", "rollout_forward", "reward (host)"))
        summary["rollout (rest: decode text, metrics, transfers)"] = round(rollout_all - inner, 3)
        if step - 1 < len(records):
            summary["reward"] = records[step - 1].get("reward")
        lines.append(summary)
        print(json.dumps(summary), flush=True)
    result = {"total_s": round(total, 1), "steps": args.steps,
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2),
              "load_average": os.getloadavg(), "overrides": args.overrides}

    if args.decode_split:
        sampling.generate = originals["generate"]
        result["decode_split"] = decode_split(cfg)
    print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            for line in lines + [result]:
                f.write(json.dumps(line) + "\n")
    return 0


def decode_split(cfg) -> dict:
    """Sampler times at 1 and N new tokens (no EOS) on the recipe's first prompt batch: prefill vs per token."""
    import jax
    import numpy as np

    from jrlhf import sampling
    from jrlhf.algorithms import onpolicy
    from jrlhf.models import from_pretrained
    from jrlhf.train_loop import resolve_tokenizer

    from benchmarks.jrlhf_side import CompileTracker

    tokenizer = resolve_tokenizer(cfg)
    model, params = from_pretrained(cfg.model.path, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)
    from jrlhf.algorithms.base import with_system_prompt
    from jrlhf.data import collate_prompts, load_records, tokenize

    records = with_system_prompt(load_records(cfg.data.train)[: cfg.data.batch_size], cfg.data.system_prompt)
    data = tokenize(records, tokenizer, "prompt", max_prompt_length=cfg.data.max_prompt_length)
    batch = collate_prompts(data.examples, pad_id=tokenizer.pad_token_id)
    ids, mask = np.asarray(batch.prompt_ids, np.int32), np.asarray(batch.prompt_mask, np.int32)
    n = onpolicy.completion_length(type("R", (), {"cfg": cfg})())
    out = {"prompt_shape": list(ids.shape)}
    for new in (1, n):
        times = []
        for i in range(3):
            start = time.perf_counter()
            with CompileTracker.track() as record:
                jax.block_until_ready(sampling.generate(model, params, ids, mask, jax.random.key(i),
                                                        max_new_tokens=new, num_samples=cfg.algo.num_generations,
                                                        temperature=1.0, eos_token_id=None))
            times.append((time.perf_counter() - start, record["seconds"]))
        out[f"new_{new}"] = {"first_s": round(times[0][0], 2), "compile_s": round(times[0][1], 2),
                             "run_s": [round(t, 3) for t, _ in times[1:]]}
    t1 = min(t for t, _ in [(x, 0) for x in out["new_1"]["run_s"]])
    tn = min(out[f"new_{n}"]["run_s"])
    out["prefill_and_first_s"] = t1
    out["per_token_decode_s"] = round((tn - t1) / max(n - 1, 1), 4)
    return out


if __name__ == "__main__":
    sys.exit(main())
