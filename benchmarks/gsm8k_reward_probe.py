"""How candidate GSM8K rewards are distributed on a model's own samples, before any training.

Samples ``--prompts`` GSM8K questions x ``--generations`` completions with jrlhf's sampler (temperature 1, the
recipe's prompt variants) and prints, per prompt variant, each candidate reward's mean, the share of samples that
hit the length limit, and how many groups (the completions of one prompt) have a nonzero reward variance, which
is what GRPO learns from. Used to choose the reward of the GSM8K GRPO recipe (README, "Real-data recipes")::

    python -m benchmarks.gsm8k_reward_probe --model ~/.cache/jrlhf/smollm2-135m-instruct \\
        --data ../shared/real_data/gsm8k_train.jsonl --prompts 32 --generations 4 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jrlhf import sampling  # noqa: E402
from jrlhf.data import collate_prompts, load_records, load_tokenizer, tokenize_prompts  # noqa: E402
from jrlhf.evaluation import decode_completions  # noqa: E402
from jrlhf.models import from_pretrained  # noqa: E402
from jrlhf.rewards import ANSWER_INSTRUCTION as INSTRUCTION  # noqa: E402
from jrlhf.rewards import combine_rewards, get_reward_fn, make_format_reward, math_answer  # noqa: E402

VARIANTS = {
    # the question alone, under the checkpoint's own default system prompt
    "plain": lambda q: q,
    # the question and a one-line instruction in the user turn
    "instruct": lambda q: f"{q}\n{INSTRUCTION}",
    # the same instruction as the system prompt
    "system": lambda q: [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": q}],
}


def _candidates() -> dict:
    """Candidate rewards: the shipped ones, a strict ``\\boxed{}`` format, ``answer is N`` anywhere, and the GSM8K
    recipe's (:mod:`jrlhf.rewards.gsm8k`)."""
    out = {
        "math_answer": math_answer,
        "boxed_format": make_format_reward(r".*\\boxed\{[^{}]+\}.*"),
        "answer_is_format": make_format_reward(r"answer is\s*\$?-?[\d,]*\.?\d+", mode="search",
                                               flags=re.IGNORECASE),
    }
    for name in ("gsm8k_answer", "gsm8k_format", "gsm8k_shaped"):
        out[name] = get_reward_fn(name)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--variants", default="plain,instruct,system")
    p.add_argument("--batch", type=int, default=32, help="prompts per sampler call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the completions and rewards")
    args = p.parse_args(argv)

    tokenizer = load_tokenizer(args.model)
    model, params = from_pretrained(args.model)
    records = load_records(args.data)
    chosen = random.Random(args.seed).sample(range(len(records)), args.prompts)
    records = [records[i] for i in chosen]
    candidates = _candidates()
    eos = tokenizer.eos_token_id
    dump = {}
    for variant in args.variants.split(","):
        shaped = [dict(r, prompt=VARIANTS[variant](r["prompt"])) for r in records]
        data = tokenize_prompts(shaped, tokenizer)
        start = time.perf_counter()
        texts, truncated, lengths, rows = [], [], [], []
        for first in range(0, len(data.examples), args.batch):
            chunk = data.examples[first:first + args.batch]
            batch = collate_prompts(chunk, pad_id=tokenizer.pad_token_id)
            out = sampling.generate(model, params, batch.prompt_ids, batch.prompt_mask,
                                    jax.random.PRNGKey(args.seed + first), max_new_tokens=args.max_new_tokens,
                                    num_samples=args.generations, temperature=args.temperature,
                                    eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
            tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
            texts += decode_completions(tokenizer, tokens, mask)
            truncated += np.asarray(out.truncated).tolist()
            lengths += np.asarray(out.lengths).tolist()
            rows += [r for r in batch.records for _ in range(args.generations)]
        seconds = time.perf_counter() - start
        n_gen = args.generations
        print(f"\n== variant '{variant}': {len(texts)} samples ({len(texts) // n_gen} prompts x {n_gen}), "
              f"{args.max_new_tokens} new tokens max, {seconds:.0f} s; hit the length limit "
              f"{np.mean(truncated):.0%}, mean length {np.mean(lengths):.0f} tokens")
        print(f"{'reward':<22} {'mean':>6} {'nonzero':>8} {'groups w/ variance':>19}")
        table = {}
        for name, fn in candidates.items():
            total, _ = combine_rewards([fn], None, [r["prompt"] for r in rows], texts, [[]] * len(texts), rows)
            groups = total.reshape(-1, n_gen)
            varied = int((groups.std(axis=1) > 0).sum())
            table[name] = {"mean": float(np.mean(total)), "nonzero": float(np.mean(total != 0)),
                           "groups_with_variance": varied, "groups": len(groups)}
            print(f"{name:<22} {np.mean(total):>6.3f} {np.mean(total != 0):>8.0%} {varied:>12d} / {len(groups)}")
        dump[variant] = {"truncated": float(np.mean(truncated)), "mean_length": float(np.mean(lengths)),
                         "seconds": seconds, "rewards": table,
                         "samples": [{"prompt": r["prompt"], "answer": r["answer"], "completion": t}
                                     for r, t in zip(rows, texts)]}
        if args.out:  # after every variant, so that a stopped probe keeps what it measured
            with open(args.out, "w") as f:
                json.dump(dump, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
