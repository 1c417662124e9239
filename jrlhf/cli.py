"""Command line: ``jrlhf train ALGO --config FILE [--set key=value ...]``, ``jrlhf plot RUN_DIR [RUN_DIR ...]`` and
``jrlhf pairs --model DIR --prompts SRC --reward NAME --out FILE --max-new-tokens N``."""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    from jrlhf.algorithms import ALGORITHMS

    p = argparse.ArgumentParser(prog="jrlhf", description="Pure-JAX RLHF: train and inspect runs.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train with one algorithm")
    t.add_argument("algorithm", choices=sorted(ALGORITHMS), help="algorithm to run")
    t.add_argument("--config", "-c", default=None,
                   help="YAML config file, or builtin:NAME for one shipped in jrlhf/configs (default builtin:ALGORITHM)")
    t.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=200 (repeatable)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    pl = sub.add_parser("plot", help="draw a run's metric curves to PNG; with several runs (or --proxy-gold), the "
                                     "learned (proxy) reward against the gold reward of each")
    pl.add_argument("run_dir", nargs="+")
    pl.add_argument("--proxy-gold", action="store_true",
                    help="draw only proxy vs gold reward over steps (runs logging both; default RUN_DIR/proxy_gold.png)")
    pl.add_argument("--labels", nargs="*", default=None, help="legend labels of the runs (with --proxy-gold)")
    pl.add_argument("--out", default=None, help="output PNG (default RUN_DIR/curves.png)")
    pl.add_argument("--keys", nargs="*", default=None, help="metric names to draw (default: loss/reward/kl/...)")
    pr = sub.add_parser("pairs", help="preference pairs from a policy's own samples, labelled by a reward function "
                                      "(on-policy data for a reward model)")
    pr.add_argument("--model", required=True, help="the policy: a local Hugging Face directory (e.g. RUN/hf_model)")
    pr.add_argument("--prompts", required=True, help="prompt records: a JSONL path, builtin:NAME, hf:DIR or tfds:NAME")
    pr.add_argument("--reward", required=True,
                    help="the labeller: a registered reward function or module:function (e.g. addition_exact_match)")
    pr.add_argument("--out", default=None,
                    help="output JSONL of {prompt, chosen, rejected, ...} records (none: only the counts are printed)")
    pr.add_argument("--max-new-tokens", type=int, required=True, help="completion budget per sample")
    pr.add_argument("--num-generations", type=int, default=8, help="samples per prompt (default 8)")
    pr.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    pr.add_argument("--max-pairs-per-prompt", type=int, default=2, help="pairs per prompt at most (default 2)")
    pr.add_argument("--min-margin", type=float, default=0.0,
                    help="a pair needs reward(chosen) - reward(rejected) > this (default 0)")
    pr.add_argument("--reference-field", default=None,
                    help="record field with a reference completion, labelled and offered as chosen (e.g. answer)")
    pr.add_argument("--max-prompt-length", type=int, default=None,
                    help="prompts cut to this many tokens (default: not cut)")
    pr.add_argument("--limit", type=int, default=None, help="read at most this many prompt records")
    pr.add_argument("--batch-size", type=int, default=256, help="prompts per generation call (default 256)")
    pr.add_argument("--include", default=None,
                    help="preference records (e.g. the original pairs) written out with the new pairs, the two "
                         "shuffled together")
    pr.add_argument("--seed", type=int, default=0, help="sampling and shuffling seed (default 0)")
    pr.add_argument("--reward-model", default=None,
                    help="a reward-model directory: also print how it ranks the samples against the labeller "
                         "(pair accuracy within a prompt, best-of-n)")
    return p


def _pairs(args) -> int:
    """``jrlhf pairs``: samples, labels and writes the pairs; prints the counts."""
    import jax

    from jrlhf.data import load_records, write_jsonl
    from jrlhf.data.tokenizer import load_tokenizer
    from jrlhf.models.checkpoint import from_pretrained
    from jrlhf.pairs import mix_records, sample_preference_pairs

    from jrlhf.config import ConfigError

    for flag, path in (("--model", args.model), ("--reward-model", args.reward_model)):
        if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
            hint = (f"; did you mean {os.path.join(path, 'hf_model')} (a run's exported model)?"
                    if os.path.isfile(os.path.join(path, "hf_model", "config.json")) else "")
            raise ConfigError(f"{flag} '{path}' is not a Hugging Face model folder (no config.json){hint}")
    records = load_records(args.prompts, limit=args.limit, key="--prompts")
    include = load_records(args.include, key="--include") if args.include else []
    tokenizer = load_tokenizer(args.model)
    model, params = from_pretrained(args.model)
    limits = {"max_prompt_length": args.max_prompt_length} if args.max_prompt_length else None
    scorer = None
    if args.reward_model:
        from jrlhf.evaluation import reward_model_scores

        try:
            score_model = from_pretrained(args.reward_model, head="score")
        except ValueError as error:
            raise ConfigError(f"--reward-model '{args.reward_model}' is not a reward model (a score-head checkpoint "
                              f"of `jrlhf train reward`): {error}") from None
        scorer = reward_model_scores(*score_model, tokenizer, batch_size=args.batch_size)
    pairs, stats = sample_preference_pairs(
        model, params, tokenizer, records, args.reward, max_new_tokens=args.max_new_tokens,
        num_generations=args.num_generations, temperature=args.temperature,
        max_pairs_per_prompt=args.max_pairs_per_prompt, min_margin=args.min_margin,
        reference_field=args.reference_field, batch_size=args.batch_size, limits=limits,
        rng=jax.random.PRNGKey(args.seed), scorer=scorer)
    out = mix_records(include, pairs, seed=args.seed) if include else pairs
    if args.out:
        write_jsonl(args.out, out)
    sampled = (f"{stats['samples']} samples of {stats['prompts']} prompts, mean reward {stats['mean_reward']:.4g}")
    if args.out:
        none = ("" if pairs else "; no prompt's samples were scored differently by the labeller (more "
                "--num-generations, or --reference-field, give pairs)")
        print(f"[pairs] {sampled}; {stats['pairs']} pairs ({stats['reference_pairs']} with the reference chosen) "
              f"from {stats['prompts_with_pairs']} prompts{none}; wrote {len(out)} records to {args.out}"
              + (f" ({len(include)} from {args.include})" if include else ""))
    else:
        print(f"[pairs] {sampled}; no --out: nothing written")
    if scorer is not None:
        n = args.num_generations
        print(f"[pairs] {args.reward_model} ranks the samples: pair accuracy {stats['scorer/pair_accuracy']:.3f} "
              f"over {stats['scorer/ranked_pairs']} pairs of one prompt's samples with different rewards; "
              f"best-of-{n} reward {stats['scorer/best_of_n']:.3f} (the best of the {n} samples: "
              f"{stats['scorer/oracle_best_of_n']:.3f}, a random one: {stats['scorer/mean_label']:.3f})")
    return 0


def main(argv=None) -> int:
    """Entry point of the ``jrlhf`` console script; returns the exit status (:mod:`jrlhf.errors` ``EXIT_*``).

    0: done. 2: a user error, printed as one line (bad config or data, run directory in use, a save that failed,
    non-finite loss). 3: stopped by SIGTERM/SIGINT with the latest state saved (rerun to resume). A second signal
    ends the process by that signal (130 for SIGINT, 143 for SIGTERM): nothing more was saved. Any other error
    propagates (Python prints the traceback, status 1) after the latest completed step was saved.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from jrlhf.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_STOPPED, EXIT_USER_ERROR, USER_ERRORS

    args = _parser().parse_args(argv)
    try:
        if args.command == "pairs":
            return _pairs(args)
        if args.command == "plot":
            from jrlhf.plot import plot_proxy_gold, plot_run

            if args.proxy_gold or len(args.run_dir) > 1:
                if args.labels and len(args.labels) != len(args.run_dir):
                    raise ValueError(f"--labels gives {len(args.labels)} labels for {len(args.run_dir)} runs")
                print(plot_proxy_gold(args.run_dir, args.out, args.labels))
            else:
                print(plot_run(args.run_dir[0], args.out, args.keys))
            return 0
        from jrlhf.config import check_no_placeholders, load_config, to_dict

        cfg = load_config(args.config or f"builtin:{args.algorithm}", args.overrides, algorithm=args.algorithm)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            return 0
        check_no_placeholders(cfg)  # before jax starts: a recipe's required setting left out
        from jrlhf.train_loop import train

        summary = train(cfg)
        return EXIT_STOPPED if summary.get("preempted") else EXIT_OK
    except USER_ERRORS as e:
        if os.environ.get("JRLHF_TRACEBACK"):
            raise
        message = " ".join(str(e).split("\n"))
        print(f"jrlhf: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # Ctrl-C before the run's own handler was installed (start-up, config loading)
        print("jrlhf: interrupted before training started; nothing to save", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
