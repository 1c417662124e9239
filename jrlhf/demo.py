"""``python -m jrlhf.demo``: the whole pipeline on the shipped addition task, then a table of held-out results.

SFT; a reward model (trained from scratch on the preference pairs), a second round of it on the SFT model's own
samples (``jrlhf pairs``: on-policy pairs labelled by the exact-match checker, mixed with the original pairs) and PPO
from the SFT model against it; DPO, GRPO, RLOO, REINFORCE++ and PPO with the exact-match reward from the same SFT
model. Every training stage is a ``jrlhf train`` run with a shipped config (``jrlhf/configs/*.yaml``); a stage whose
run directory (or, for the pairs, output file) already holds a finished result is reused, so a second ``make demo``
only prints the table. ``--quick`` runs a few steps of each stage (a smoke test of the pipeline, not of the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def stages(out: str, quick: bool):
    """``(name, run directory name, algorithm, overrides)`` of each stage, in order; the config is
    ``builtin:<run directory name>`` when such a shipped config exists (``ppo_rm``, ``reward_onpolicy``), else
    ``builtin:<algorithm>``. The ``pairs`` stage is ``jrlhf pairs`` (its "overrides" are the command's arguments,
    its "run directory" the output file)."""
    sft_model = os.path.join(out, "sft", "hf_model")
    rm_model = os.path.join(out, "reward_onpolicy", "hf_model")
    pairs = os.path.join(out, "pairs.jsonl")
    common = ["train.progress_bar=true"]
    if quick:
        common += ["train.steps=2", "train.log_every=1", "train.eval_every=0", "data.max_eval_examples=32",
                   "optim.warmup_steps=0"]
    from_sft = common + [f"train.init_from={sft_model}"]
    pairs_args = ["--model", sft_model, "--prompts", "builtin:addition/rl_prompts.jsonl", "--reward",
                  "addition_exact_match", "--max-new-tokens", "8", "--max-prompt-length", "12", "--reference-field",
                  "answer", "--include", "builtin:addition/preference_train.jsonl", "--out", pairs]
    if quick:
        pairs_args += ["--limit", "32", "--num-generations", "4"]
    return [
        ("sft", "sft", "sft", common),
        ("reward model", "reward", "reward", common),
        ("on-policy pairs", "pairs.jsonl", "pairs", pairs_args),
        ("reward model (on-policy pairs)", "reward_onpolicy", "reward",
         common + [f"train.init_from={os.path.join(out, 'reward', 'hf_model')}", f"data.train={pairs}"]),
        ("dpo", "dpo", "dpo", from_sft),
        ("grpo", "grpo", "grpo", from_sft),
        ("rloo", "rloo", "rloo", from_sft),
        ("reinforce++", "reinforce_pp", "reinforce_pp", from_sft),
        ("ppo (exact-match reward)", "ppo", "ppo", from_sft),
        # guarded against over-optimisation (jrlhf/configs/ppo_rm.yaml); --quick does not evaluate, so no selection
        ("ppo (learned reward model)", "ppo_rm", "ppo", from_sft + [f"algo.reward_model={rm_model}"]
         + (["train.metric_for_best_model=null", "train.load_best_model_at_end=false"] if quick else [])),
    ]


def _config_name(dirname: str, algorithm: str) -> str:
    from importlib import resources

    shipped = resources.files("jrlhf") / "configs" / f"{dirname}.yaml"
    return dirname if shipped.is_file() else algorithm


def _finished(run_dir: str, steps: int) -> dict | None:
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    done = summary.get("step") == steps or summary.get("early_stopped")
    return summary if done and not summary.get("preempted") else None


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_settings(run_dir: str, cfg) -> list:
    """The settings (``section.key``) in which ``cfg`` differs from the run's saved ``config.yaml`` (a stage's
    finished run is reused only for the same config). Only settings both hold count (a field added to the config
    since the run was saved is not a change), and not ``train.progress_bar`` / ``train.output_dir`` (a moved
    folder)."""
    import yaml

    from jrlhf.config import to_dict

    with open(os.path.join(run_dir, "config.yaml")) as f:
        saved = _flat(yaml.safe_load(f) or {})
    current = _flat(to_dict(cfg))
    ignored = ("train.progress_bar", "train.output_dir")
    return sorted(k for k in set(saved) & set(current) if k not in ignored and saved[k] != current[k])


def _exported_eval(summary: dict) -> dict:
    """The held-out results of the exported model: the best evaluated step's with ``train.load_best_model_at_end``,
    else the last step's."""
    best = summary.get("best") or {}
    return best.get("eval") or {} if best.get("exported") else summary.get("eval", {})


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def main(argv=None) -> int:
    """Runs the stages and prints the held-out table; returns a process exit status."""
    parser = argparse.ArgumentParser(prog="python -m jrlhf.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="directory of the stage runs (default runs/demo)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (pipeline smoke test)")
    args = parser.parse_args(argv)
    from jrlhf.config import load_config
    from jrlhf.train_loop import train

    rows = []
    for name, dirname, algorithm, overrides in stages(args.out, args.quick):
        run_dir = os.path.join(args.out, dirname)
        if algorithm == "pairs":
            if not os.path.exists(run_dir):
                print(f"\n=== {name}: jrlhf pairs {' '.join(overrides)}", flush=True)
                from jrlhf import cli

                status = cli.main(["pairs", *overrides])
                if status:
                    return status
            continue
        config = f"builtin:{_config_name(dirname, algorithm)}"
        cfg = load_config(config, overrides + [f"train.output_dir={run_dir}"], algorithm=algorithm)
        summary = _finished(run_dir, cfg.train.steps)
        if summary is not None and os.path.exists(os.path.join(run_dir, "config.yaml")):
            changed = changed_settings(run_dir, cfg)
            if changed:  # e.g. a demo folder made before the stage's config changed: its result would be stale
                print(f"jrlhf demo: error: {run_dir} holds a finished run of another config ({', '.join(changed)} "
                      "differ); move it away to rerun this stage", file=sys.stderr)
                from jrlhf.errors import EXIT_USER_ERROR

                return EXIT_USER_ERROR
        start = time.perf_counter()
        if summary is None:
            print(f"\n=== {name}: jrlhf train {algorithm} --config {config} "
                  + " ".join(f"--set {o}" for o in overrides + [f"train.output_dir={run_dir}"]), flush=True)
            summary = train(cfg)
            if summary.get("preempted"):  # SIGTERM / Ctrl-C: the stage saved its state; stop the demo here
                print(f"\n[demo] stopped during the {name} stage ({summary.get('stopped_by')}); its step "
                      f"{summary.get('step')} is saved: run the demo again to resume it", flush=True)
                from jrlhf.errors import EXIT_STOPPED

                return EXIT_STOPPED
        rows.append((name, _exported_eval(summary), time.perf_counter() - start))

    print("\nHeld-out results on the shipped addition task")
    print("| stage | exact match | preference accuracy | minutes |")
    print("| --- | --- | --- | --- |")
    for name, ev, seconds in rows:
        pref = ev.get("rewards/accuracies", ev.get("accuracy"))
        print(f"| {name} | {_fmt(ev.get('exact_match'))} | {_fmt(pref)} | {seconds / 60:.1f} |")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump([{"stage": n, "eval": e, "seconds": s} for n, e, s in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
