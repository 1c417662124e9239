"""Command line: ``jrlhf train ALGO --config FILE [--set key=value ...]`` and ``jrlhf plot RUN_DIR [RUN_DIR ...]``."""

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
    return p


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
