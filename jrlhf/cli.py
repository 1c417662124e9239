"""Command line: ``jrlhf train ALGO --config FILE [--set key=value ...]`` and ``jrlhf plot RUN_DIR``."""

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
    pl = sub.add_parser("plot", help="draw a run's metric curves to PNG")
    pl.add_argument("run_dir")
    pl.add_argument("--out", default=None, help="output PNG (default RUN_DIR/curves.png)")
    pl.add_argument("--keys", nargs="*", default=None, help="metric names to draw (default: loss/reward/kl/...)")
    return p


def main(argv=None) -> int:
    """Entry point of the ``jrlhf`` console script; user errors print one line and exit with status 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from jrlhf.errors import USER_ERRORS

    args = _parser().parse_args(argv)
    try:
        if args.command == "plot":
            from jrlhf.plot import plot_run

            print(plot_run(args.run_dir, args.out, args.keys))
            return 0
        from jrlhf.config import load_config, to_dict

        cfg = load_config(args.config or f"builtin:{args.algorithm}", args.overrides, algorithm=args.algorithm)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            return 0
        from jrlhf.train_loop import train

        summary = train(cfg)
        return 143 if summary.get("preempted") else 0
    except USER_ERRORS as e:
        if os.environ.get("JRLHF_TRACEBACK"):
            raise
        print(f"jrlhf: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
