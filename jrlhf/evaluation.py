"""Held-out evaluation: greedy generation scored by a reward function, and preference accuracy.

Batches have one fixed shape (the last batch is filled up and its filler rows ignored), so evaluation compiles once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jrlhf import sampling
from jrlhf.data import BatchIterator, collate_preference, collate_prompts, tokenize_preference, tokenize_prompts


def _batches(examples, batch_size: int, collate):
    it = BatchIterator(examples, batch_size, collate, shuffle=False, drop_remainder=False, num_epochs=1,
                       process_index=0, process_count=1)
    return list(it)


def decode_completions(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    """Decodes each row's masked-in tokens, without special tokens: ``[N, L]`` int -> ``N`` strings."""
    return [tokenizer.decode([int(t) for t, m in zip(row, mrow) if m], skip_special_tokens=True)
            for row, mrow in zip(tokens, mask)]


def generate_completions(model, params, tokenizer, records, *, max_new_tokens: int, batch_size: int = 64,
                         max_prompt_length: int | None = None, temperature: float = 0.0, rng=None):
    """Generates one completion per prompt record (greedy by default).

    Args:
      model, params: a causal LM and its params (sharded or not).
      tokenizer: the tokenizer (pad and EOS set).
      records: prompt records ``{prompt, ...}``.
      max_new_tokens: completion budget.
      batch_size: prompts per generation call (fixed shape; the last batch is filled up).
      max_prompt_length: prompts are cut to this many tokens (keep_end), counted in the tokenisation report.
      temperature: 0 for greedy.

    Returns:
      ``(completions: list[str], records: list[dict])`` in the input order (records dropped by tokenisation are
      left out, as the report says).
    """
    data = tokenize_prompts(records, tokenizer, max_prompt_length=max_prompt_length)
    length = max(len(e["prompt_ids"]) for e in data.examples)
    collate = functools.partial(collate_prompts, pad_id=tokenizer.pad_token_id, length=length)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    texts, kept = [], []
    for i, batch in enumerate(_batches(data.examples, batch_size, collate)):
        out = sampling.generate(model, params, batch.prompt_ids, batch.prompt_mask, jax.random.fold_in(rng, i),
                                max_new_tokens=max_new_tokens, temperature=temperature,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
        real = np.asarray(batch.example_mask) > 0
        texts += decode_completions(tokenizer, tokens[real], mask[real])
        kept += [r for r, keep in zip(batch.records, real) if keep]
    return texts, kept


def reward_accuracy(model, params, tokenizer, records, reward_fn, *, max_new_tokens: int, batch_size: int = 64,
                    max_prompt_length: int | None = None) -> dict:
    """Mean reward of greedy completions (exact match for a 0/1 checker) on held-out prompt records.

    Returns:
      ``{"exact_match": float, "num_examples": int}``.
    """
    from jrlhf.rewards import combine_rewards

    texts, kept = generate_completions(model, params, tokenizer, records, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, max_prompt_length=max_prompt_length)
    prompts = [r["prompt"] for r in kept]
    total, _ = combine_rewards([reward_fn], None, prompts, texts, [None] * len(texts), kept)
    return {"exact_match": float(np.mean(total)), "num_examples": len(texts)}


def preference_scores(score_fn, tokenizer, records, *, batch_size: int = 64, max_length: int | None = None):
    """Runs ``score_fn(batch) -> (chosen [B], rejected [B])`` (jitted by the caller) over preference records.

    Returns:
      ``(chosen_scores [N], rejected_scores [N])`` numpy float32 arrays.
    """
    data = tokenize_preference(records, tokenizer, max_length=max_length)
    length = max(max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in data.examples)
    collate = functools.partial(collate_preference, pad_id=tokenizer.pad_token_id, length=length)
    chosen, rejected = [], []
    for batch in _batches(data.examples, batch_size, collate):
        real = np.asarray(batch.pop("example_mask")) > 0
        c, r = score_fn({k: jnp.asarray(v) for k, v in batch.items()})
        chosen.append(np.asarray(c)[real])
        rejected.append(np.asarray(r)[real])
    return np.concatenate(chosen), np.concatenate(rejected)
