"""The real-data recipes side by side with TRL 1.16: step time and peak memory, each system in its own process.

One side per process (``--side jrlhf`` or ``--side trl``), both reading the same recipe config
(``builtin:dpo_hh`` or ``builtin:grpo_gsm8k`` with the same ``--set`` overrides), the same model folder and data
file, so that batch size, lengths, truncation, β, learning rate, group size, temperature, prompt and reward are
the same. TRL runs at its own defaults for everything the recipe does not set (in TRL 1.16 that includes
``gradient_checkpointing=True``; ``--trl-no-gradient-checkpointing`` turns it off) and at the machine's default
threading (no ``OMP_WAIT_POLICY`` or thread count is set here).

Measured per step: wall time (TRL: ``on_step_begin`` to ``on_step_end`` in its own loop, so generation, rewards,
loss, backward and the optimizer; jrlhf: the time between consecutive ``metrics.jsonl`` records with
``train.log_every=1``, which also covers drawing the batch), tokens (non-pad prompt + completion tokens; chosen +
rejected for DPO) and the process's peak resident memory (``ru_maxrss``, so model loading, data and compilation
count too). The first ``--warmup`` steps are reported apart (compilation for jrlhf; first-touch allocations for
TRL). Prints one JSON line::

    python -m benchmarks.recipes_trl --recipe dpo_hh --side trl --steps 6 \\
        --set model.path=MODEL --set data.train=../shared/real_data/hh_rlhf_harmless_base_test.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far, in GB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _summary(side: str, recipe: str, times: list, tokens: list, warmup: int, extra: dict) -> dict:
    import numpy as np

    steady_t, steady_n = times[warmup:], tokens[warmup:]
    out = {
        "side": side, "recipe": recipe, "steps": len(times), "warmup_steps": warmup,
        "first_steps_s": [round(t, 2) for t in times[:warmup]],
        "step_s_median": round(float(np.median(steady_t)), 2) if steady_t else None,
        "step_s_mean": round(float(np.mean(steady_t)), 2) if steady_t else None,
        "tokens_per_step": round(float(np.mean(steady_n)), 1) if steady_n else None,
        "tokens_per_s": round(float(np.sum(steady_n) / np.sum(steady_t)), 1) if steady_t else None,
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "load_average": os.getloadavg(),
        "threads": {"torch": _torch_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
    }
    out.update(extra)
    return out


def _torch_threads():
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:
        return None


# ------------------------------------------------------------------------------------------------------ jrlhf


def timed_run_config(cfg, steps: int, prefix: str) -> str:
    """Sets a recipe's config for a timed run in place: ``steps`` steps into a fresh temporary output directory
    (returned), a metrics line every step, no evaluation, checkpoint, export, progress bar or TensorBoard (the final
    evaluation is cut to one example: it is not what is measured)."""
    out_dir = tempfile.mkdtemp(prefix=prefix)
    cfg.train.output_dir = out_dir
    cfg.train.steps = steps
    cfg.train.log_every = 1
    cfg.train.eval_every = 0
    cfg.train.save_every = 0
    cfg.train.export_hf = False
    cfg.train.progress_bar = False
    cfg.train.tensorboard = False
    cfg.data.eval_prompts = None
    cfg.data.max_eval_examples = 1
    return out_dir


def emit(result: dict, out: str | None) -> None:
    """Prints ``result`` as one JSON line and appends it to the file ``out`` when given."""
    line = json.dumps(result)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def run_jrlhf(cfg, steps: int, warmup: int) -> dict:
    """The recipe itself for ``steps`` steps (no evaluation, export or checkpoints), timed from its metrics log."""
    import jrlhf

    out_dir = timed_run_config(cfg, steps, "jrlhf-recipe-bench-")
    cfg.data.eval = None
    import jax

    compiles = []  # (event, seconds) of jax's trace / lowering / XLA compile events during the run

    def listener(event, duration, **kwargs):
        if event.startswith("/jax/core/compile/"):
            compiles.append((event, duration))

    jax.monitoring.register_event_duration_secs_listener(listener)
    start = time.perf_counter()
    jrlhf.train(cfg)
    total = time.perf_counter() - start
    records = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    records = [r for r in records if r.get("split") == "train"]
    times, tokens = [], []
    previous = None
    for r in records:
        if previous is not None:
            dt = r["time"] - previous
            times.append(dt)
            tokens.append(r["tokens_per_second"] * dt)
        previous = r["time"]
    # the first record's interval starts at the loop's start, which is not logged: leave step 1 out
    return _summary("jrlhf", cfg.algorithm, times, tokens, max(warmup - 1, 0),
                    {"total_s": round(total, 1), "note": "step 1 (with its compilation) is not in the list",
                     "compile_s_total": round(sum(d for _, d in compiles), 1),
                     "xla_compiles_over_1s": [round(d, 1) for e, d in compiles
                                              if e.endswith("backend_compile_duration") and d > 1.0],
                     "reward_mean": [r.get("reward") for r in records]})


# -------------------------------------------------------------------------------------------------------- TRL


class _StepTimer:
    def __init__(self):
        from transformers import TrainerCallback

        timer = self
        self.times, self.tokens, self.current_tokens = [], [], 0

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.times.append(time.perf_counter() - timer.start)
                timer.tokens.append(timer.current_tokens)
                print(f"[trl] step {len(timer.times)}: {timer.times[-1]:.1f} s, {timer.current_tokens} tokens, "
                      f"peak RSS {peak_rss_gb():.2f} GB", flush=True)

        self.callback = Callback()

    def count(self, trainer, tokens_of):
        original = trainer.compute_loss

        def compute_loss(model, inputs, *args, **kwargs):
            self.current_tokens = int(tokens_of(inputs))
            return original(model, inputs, *args, **kwargs)

        trainer.compute_loss = compute_loss
        trainer.add_callback(self.callback)


def _common_args(cfg, steps: int, output_dir: str, gradient_checkpointing: bool | None) -> dict:
    o = cfg.optim
    kwargs = dict(output_dir=output_dir, max_steps=steps, learning_rate=o.learning_rate,
                  lr_scheduler_type="constant_with_warmup" if o.warmup_steps else "constant",
                  warmup_steps=o.warmup_steps, weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm or 0.0,
                  adam_beta1=o.b1, adam_beta2=o.b2, adam_epsilon=o.eps, seed=cfg.train.seed, report_to=[],
                  use_cpu=True, logging_steps=1, save_strategy="no", eval_strategy="no", disable_tqdm=True,
                  push_to_hub=False)
    if gradient_checkpointing is not None:
        kwargs["gradient_checkpointing"] = gradient_checkpointing
    return kwargs


def run_trl_dpo(cfg, steps: int, warmup: int, gradient_checkpointing) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from jrlhf.algorithms.base import _holdout_split, with_system_prompt
    from jrlhf.data import load_records

    d, algo = cfg.data, cfg.algo
    records = _holdout_split(d)[0] if d.eval_holdout else load_records(d.train)
    records = [r for r in with_system_prompt(records, d.system_prompt)
               if all(m["content"].strip() for m in r["chosen"] + r["rejected"])]  # as invalid_records=drop
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records])
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    tmp = tempfile.mkdtemp(prefix="trl-recipe-bench-")
    args = DPOConfig(per_device_train_batch_size=d.batch_size, max_length=d.max_length,
                     truncation_mode=d.truncation_mode, beta=algo.beta, loss_type=[algo.loss_type],
                     **_common_args(cfg, steps, tmp, gradient_checkpointing))
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    timer = _StepTimer()
    timer.count(trainer, lambda x: x["attention_mask"].sum().item())
    trainer.train()
    return _summary("trl", "dpo", timer.times, timer.tokens, warmup,
                    {"trl_gradient_checkpointing": args.gradient_checkpointing, "pairs": len(records)})


def run_trl_grpo(cfg, steps: int, warmup: int, gradient_checkpointing) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from jrlhf.algorithms.base import with_system_prompt
    from jrlhf.algorithms.onpolicy import completion_length, load_reward_sources
    from jrlhf.data import load_records

    d, algo = cfg.data, cfg.algo
    records = with_system_prompt(load_records(d.train), d.system_prompt)
    dataset = Dataset.from_list([{"prompt": r["prompt"] if isinstance(r["prompt"], list) else
                                  [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                 for r in records])

    class _Run:  # what load_reward_sources reads
        pass

    run = _Run()
    run.cfg = cfg
    sources = load_reward_sources(run)

    def as_trl(fn):
        def reward(prompts, completions, completion_ids=None, **kwargs):
            return fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)

        reward.__name__ = getattr(fn, "__name__", "reward")
        return reward

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    tmp = tempfile.mkdtemp(prefix="trl-recipe-bench-")
    n_gen = algo.num_generations
    args = GRPOConfig(per_device_train_batch_size=d.batch_size * n_gen, num_generations=n_gen,
                      max_completion_length=completion_length(run), temperature=algo.temperature,
                      top_p=algo.top_p, top_k=algo.top_k, beta=algo.beta, loss_type=algo.loss_type,
                      scale_rewards=algo.scale_rewards, num_iterations=algo.num_iterations, epsilon=algo.epsilon,
                      mask_truncated_completions=algo.mask_truncated_completions,
                      reward_weights=list(sources.weights), log_completions=False,
                      **_common_args(cfg, steps, tmp, gradient_checkpointing))
    trainer = GRPOTrainer(model=model, reward_funcs=[as_trl(f) for f in sources.funcs], args=args,
                          train_dataset=dataset, processing_class=tokenizer)
    timer = _StepTimer()
    timer.count(trainer, lambda x: x["prompt_mask"].sum().item() + x["completion_mask"].sum().item())
    trainer.train()
    rewards = [h.get("reward") for h in trainer.state.log_history if "reward" in h]
    return _summary("trl", "grpo", timer.times, timer.tokens, warmup,
                    {"trl_gradient_checkpointing": args.gradient_checkpointing, "reward_mean": rewards})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="A real-data recipe's step time and peak memory, jrlhf or TRL.")
    p.add_argument("--recipe", required=True, help="builtin recipe name (dpo_hh, grpo_gsm8k) or a YAML path")
    p.add_argument("--side", choices=("jrlhf", "trl"), required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1, help="first steps reported apart")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--trl-no-gradient-checkpointing", action="store_true")
    p.add_argument("--out", default=None, help="append the JSON line to this file")
    args = p.parse_args(argv)

    from jrlhf.config import load_config

    path = args.recipe if args.recipe.endswith(".yaml") else f"builtin:{args.recipe}"
    cfg = load_config(path, args.overrides)
    if args.side == "jrlhf":
        result = run_jrlhf(cfg, args.steps, args.warmup)
    else:
        gc = False if args.trl_no_gradient_checkpointing else None
        run = run_trl_dpo if cfg.algorithm == "dpo" else run_trl_grpo
        result = run(cfg, args.steps, args.warmup, gc)
    result["overrides"] = args.overrides
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
