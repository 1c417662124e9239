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
                         max_prompt_length: int | None = None, temperature: float = 0.0, rng=None,
                         limits: dict | None = None, max_tokens: int | None = None):
    """Generates one completion per prompt record (greedy by default).

    Args:
      model, params: a causal LM and its params (sharded or not).
      tokenizer: the tokenizer (pad and EOS set).
      records: prompt records ``{prompt, ...}``.
      max_new_tokens: completion budget.
      batch_size: prompts per generation call (fixed shape; the last batch is filled up).
      max_prompt_length: prompts are cut to this many tokens (keep_end), counted in the tokenisation report.
      temperature: 0 for greedy.
      limits: :class:`jrlhf.data.LengthLimits` fields (the training run's, :func:`jrlhf.algorithms.base.length_limits`:
        ``max_prompt_length``, ``truncation_mode`` and ``invalid_records`` apply); replaces ``max_prompt_length``.
      max_tokens: at most this many prompt + completion positions per batch (the KV cache grows with them); lowers
        ``batch_size`` (see :func:`scoring_batch_size`).

    Returns:
      ``(completions: list[str], records: list[dict])`` in the input order (records dropped by tokenisation are
      left out, as the report says).
    """
    data = tokenize_prompts(records, tokenizer, **(limits or {"max_prompt_length": max_prompt_length}))
    length = max(len(e["prompt_ids"]) for e in data.examples)
    collate = functools.partial(collate_prompts, pad_id=tokenizer.pad_token_id, length=length)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    texts, kept = [], []
    batch_size = scoring_batch_size(batch_size, 1, length + max_new_tokens, max_tokens)
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
                    max_prompt_length: int | None = None, limits: dict | None = None,
                    max_tokens: int | None = None) -> dict:
    """Mean reward of greedy completions (exact match for a 0/1 checker) on held-out prompt records.

    Returns:
      ``{"exact_match": float, "num_examples": int}``.
    """
    from jrlhf.rewards import combine_rewards

    texts, kept = generate_completions(model, params, tokenizer, records, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, max_prompt_length=max_prompt_length, limits=limits,
                                       max_tokens=max_tokens)
    prompts = [r["prompt"] for r in kept]
    total, _ = combine_rewards([reward_fn], None, prompts, texts, [None] * len(texts), kept)
    return {"exact_match": float(np.mean(total)), "num_examples": len(texts)}


def scoring_batch_size(batch_size: int, rows_per_example: int, length: int, max_tokens: int | None) -> int:
    """The examples per scoring batch: ``batch_size``, lowered so that ``examples x rows_per_example x length``
    padded tokens stay within ``max_tokens`` (at least 1; ``None``: no cap). Activation memory of a forward pass
    grows with the padded tokens of the batch."""
    if max_tokens is None:
        return int(batch_size)
    return int(max(1, min(batch_size, max_tokens // max(1, rows_per_example * length))))


def preference_scores(score_fn, tokenizer, records, *, batch_size: int = 64, max_length: int | None = None,
                      limits: dict | None = None, max_tokens: int | None = None):
    """Runs ``score_fn(batch) -> (chosen [B], rejected [B])`` (jitted by the caller) over preference records.

    Args:
      score_fn: scores one padded preference batch (one fixed shape for the whole pass: it compiles once).
      tokenizer: the run's tokenizer.
      records: ``{prompt, chosen, rejected}`` records.
      batch_size: pairs per batch, lowered by ``max_tokens`` (see :func:`scoring_batch_size`).
      max_length: used when ``limits`` is not given.
      limits: :class:`jrlhf.data.LengthLimits` fields; pass the training run's
        (:func:`jrlhf.algorithms.base.length_limits`) so that held-out pairs are cut as training pairs are.
      max_tokens: at most this many padded tokens (chosen and rejected rows) per batch.

    Returns:
      ``(chosen_scores [N], rejected_scores [N])`` numpy float32 arrays, one per kept pair (the tokenisation report
      counts the dropped ones).
    """
    data = tokenize_preference(records, tokenizer, **(limits or {"max_length": max_length}))
    length = max(max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in data.examples)
    collate = functools.partial(collate_preference, pad_id=tokenizer.pad_token_id, length=length)
    chosen, rejected = [], []
    for batch in _batches(data.examples, scoring_batch_size(batch_size, 2, length, max_tokens), collate):
        real = np.asarray(batch.pop("example_mask")) > 0
        c, r = score_fn({k: jnp.asarray(v) for k, v in batch.items()})
        chosen.append(np.asarray(c)[real])
        rejected.append(np.asarray(r)[real])
    return np.concatenate(chosen), np.concatenate(rejected)
