"""Preference pairs from a policy's own samples, labelled by a reward function: on-policy data for a reward model.

The second round of the classic RLHF pipeline (Ouyang et al. 2022, "Training language models to follow
instructions with human feedback", sec. 3.5; Stiennon et al. 2020, sec. 3.2: comparisons are collected on samples of
the current policy) fits the reward model on the answers the policy actually gives, so that PPO meets no score the
reward model was never fitted on. Here a reward function stands in for the labeller: each prompt gets
``num_generations`` samples; the labeller scores each distinct completion (and, optionally, the record's reference
answer); the best-scored ones are paired against the worst-scored ones.

:func:`sample_preference_pairs` is the Python API; ``jrlhf pairs`` writes its output as JSONL that
``jrlhf train reward`` (or DPO) reads as ``data.train``, alone or after the original pairs (``--include``).
"""

from __future__ import annotations

import random
from typing import Callable

import jax
import numpy as np

from jrlhf.config import ConfigError


def _pairs_of_prompt(candidates: list, max_pairs: int, min_margin: float) -> list:
    """``candidates``: ``[(text, reward, kind)]`` (distinct texts, sampled ones first). The top tier (every
    candidate at the highest reward) is paired, in turn, against the others in increasing reward, as long as the
    margin exceeds ``min_margin``; sampled completions are preferred as chosen over the reference."""
    if not candidates:
        return []
    best = max(r for _, r, _ in candidates)
    top = [c for c in candidates if c[1] == best]
    top.sort(key=lambda c: c[2] != "policy")  # stable: sampled chosen first, the reference last
    below = sorted((c for c in candidates if best - c[1] > min_margin and c[2] == "policy"), key=lambda c: c[1])
    pairs = []
    for i, rejected in enumerate(below[:max_pairs]):
        chosen = top[i % len(top)]
        pairs.append({"chosen": chosen[0], "rejected": rejected[0], "chosen_reward": float(chosen[1]),
                      "rejected_reward": float(rejected[1]), "kind": chosen[2]})
    return pairs


def ranking_metrics(prompt_index, labels, scores) -> dict:
    """How well ``scores`` (e.g. a reward model's) rank each prompt's samples by ``labels`` (the labeller's).

    Args:
      prompt_index: ``[N]`` int, the prompt of each sample.
      labels, scores: ``[N]`` floats; a sample with a non-finite label or score is left out.

    Returns:
      ``pair_accuracy``: over every pair of samples of one prompt with different labels, the share the scores order
      as the labels do (a tie counts 1/2; NaN without such pairs), and ``ranked_pairs``, their number;
      ``best_of_n``: the mean label of each prompt's top-scored sample (first on a tie), against
      ``oracle_best_of_n`` (each prompt's best label) and ``mean_label``, over the prompts with a scored sample.
    """
    prompt_index, labels, scores = (np.asarray(a) for a in (prompt_index, labels, scores))
    keep = np.isfinite(labels) & np.isfinite(scores)
    wins = total = 0.0
    best, oracle, means = [], [], []
    for p in np.unique(prompt_index[keep]):
        own = keep & (prompt_index == p)
        y, z = labels[own].astype(np.float64), scores[own].astype(np.float64)
        higher = y[:, None] > y[None, :]
        wins += float(((z[:, None] > z[None, :]) & higher).sum() + 0.5 * ((z[:, None] == z[None, :]) & higher).sum())
        total += float(higher.sum())
        best.append(y[int(np.argmax(z))])
        oracle.append(y.max())
        means.append(y)
    nan = float("nan")
    return {"pair_accuracy": wins / total if total else nan, "ranked_pairs": int(total),
            "best_of_n": float(np.mean(best)) if best else nan,
            "oracle_best_of_n": float(np.mean(oracle)) if oracle else nan,
            "mean_label": float(np.mean(np.concatenate(means))) if means else nan}


def sample_preference_pairs(model, params, tokenizer, records: list, reward_fn: Callable | str, *,
                            max_new_tokens: int, num_generations: int = 8, temperature: float = 1.0,
                            max_pairs_per_prompt: int = 2, min_margin: float = 0.0,
                            reference_field: str | None = None, batch_size: int = 256, limits: dict | None = None,
                            eos_token_id=None, rng: jax.Array | None = None,
                            scorer: Callable | None = None) -> tuple[list[dict], dict]:
    """Samples ``num_generations`` completions per prompt and pairs the labeller's best against its worst.

    Per prompt: the distinct non-empty sampled completions (and, with ``reference_field``, the record's reference
    answer, e.g. ``"answer"``) are scored by ``reward_fn``; every candidate at the highest score is *chosen* (in turn)
    against the sampled completions scored more than ``min_margin`` below it, lowest first, up to
    ``max_pairs_per_prompt`` pairs. A prompt whose samples all score alike gives no pair unless the reference scores
    higher (then the reference is chosen: a labeller who writes the right answer). An empty completion is a
    legitimate sample but cannot be a preference record (the data layer refuses empty fields), so it is left out.

    Args:
      model, params: the policy (a causal LM) whose samples are labelled.
      tokenizer: its tokenizer (pad and EOS set).
      records: prompt records ``{prompt, ...}``; their other fields reach ``reward_fn`` as keyword lists (e.g.
        ``answer``), as in training.
      reward_fn: the labeller, a reward function ``(prompts, completions, completion_ids, **fields) -> [N]`` or a
        registered name / ``module:function`` path (:func:`jrlhf.rewards.get_reward_fn`); ``None`` scores are
        left out.
      max_new_tokens: completion budget per sample.
      num_generations: samples per prompt (>= 1).
      temperature: sampling temperature (> 0).
      max_pairs_per_prompt: at most this many pairs per prompt (>= 1).
      min_margin: a pair needs ``reward(chosen) - reward(rejected) > min_margin`` (>= 0).
      reference_field: record field holding a reference completion to label and offer as chosen, or ``None``.
      batch_size: prompts per generation call.
      limits: :class:`jrlhf.data.LengthLimits` fields for the prompts (e.g. ``{"max_prompt_length": 12}``).
      eos_token_id: ids that end a completion (default: the tokenizer's and the model config's EOS ids).
      rng: PRNG key (default ``PRNGKey(0)``).
      scorer: optional ``scores(prompts, completions) -> [N]`` (e.g. a reward model's,
        :func:`jrlhf.evaluation.reward_model_scores`): how it ranks the samples against the labeller is added to
        ``stats`` under ``scorer/`` (:func:`ranking_metrics` over every sample, duplicates included).

    Returns:
      ``(pairs, stats)``: ``pairs`` are records ``{prompt, chosen, rejected, chosen_reward, rejected_reward, kind}``
      (``kind`` ``"policy"`` or ``"reference"``: where the chosen answer came from) in the prompts' order, plus
      every other field of the prompt record; ``stats`` counts ``prompts``, ``samples``, ``mean_reward`` (of the
      samples), ``prompts_with_pairs``, ``pairs`` and ``reference_pairs``. The labeller runs once on every sample
      and once on the references that no sample equals; a completion sampled twice keeps its first label.

    Raises:
      ConfigError: an argument out of range. RewardError: the labeller failed (see :func:`jrlhf.rewards.combine_rewards`).
    """
    from jrlhf.evaluation import generate_completions
    from jrlhf.rewards import combine_rewards, get_reward_fn

    if isinstance(reward_fn, str):
        reward_fn = get_reward_fn(reward_fn)
    for name, value, low in (("num_generations", num_generations, 1), ("max_pairs_per_prompt", max_pairs_per_prompt, 1),
                             ("max_new_tokens", max_new_tokens, 1)):
        if int(value) != value or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0 to sample distinct completions, got {temperature!r}")
    if not min_margin >= 0:
        raise ConfigError(f"min_margin must be >= 0, got {min_margin!r}")
    if reference_field is not None:
        missing = [i + 1 for i, r in enumerate(records) if not str(r.get(reference_field, "")).strip()]
        if missing:
            raise ConfigError(f"reference_field '{reference_field}' is missing or empty in record(s) {missing[:5]}; "
                              "give a field every record has, or none")
    tagged = [dict(r, _pair_prompt=i) for i, r in enumerate(records) for _ in range(num_generations)]
    texts, kept = generate_completions(model, params, tokenizer, tagged, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, temperature=temperature, rng=rng, limits=limits,
                                       eos_token_id=eos_token_id)
    sample_rewards, ranking = [], {}
    candidates: dict[int, list] = {}  # prompt -> [(text, reward, kind)], distinct texts, samples first
    if kept:
        fields = [{k: v for k, v in r.items() if k != "_pair_prompt"} for r in kept]
        prompts = [r["prompt"] for r in kept]
        total, _ = combine_rewards([reward_fn], None, prompts, texts, [None] * len(texts), fields)
        sample_rewards = [float(x) for x in total if np.isfinite(x)]
        if scorer is not None:
            ranked = ranking_metrics([r["_pair_prompt"] for r in kept], total, scorer(prompts, texts))
            ranking = {f"scorer/{k}": v for k, v in ranked.items()}
        for record, text, reward in zip(kept, texts, total):
            own = candidates.setdefault(record["_pair_prompt"], [])
            if text.strip() and np.isfinite(reward) and all(text != c[0] for c in own):
                own.append((text, float(reward), "policy"))
    if reference_field is not None and candidates:
        index = [i for i in sorted(candidates)
                 if all(str(records[i][reference_field]) != c[0] for c in candidates[i])]
        if index:
            references = [str(records[i][reference_field]) for i in index]
            scores, _ = combine_rewards([reward_fn], None, [records[i]["prompt"] for i in index], references,
                                        [None] * len(index), [records[i] for i in index])
            for i, text, score in zip(index, references, scores):
                if np.isfinite(score):
                    candidates[i].append((text, float(score), "reference"))
    pairs, with_pairs = [], 0
    for i in sorted(candidates):
        extra = {k: v for k, v in records[i].items() if k not in ("chosen", "rejected", "kind")}
        own = _pairs_of_prompt(candidates[i], max_pairs_per_prompt, min_margin)
        with_pairs += bool(own)
        pairs += [{**extra, **pair} for pair in own]
    stats = {"prompts": len(records), "samples": len(texts),
             "mean_reward": float(np.mean(sample_rewards)) if sample_rewards else float("nan"),
             "prompts_with_pairs": with_pairs,
             "pairs": len(pairs), "reference_pairs": sum(p["kind"] == "reference" for p in pairs), **ranking}
    return pairs, stats


def mix_records(*sources: list, seed: int = 0) -> list:
    """Concatenates record lists and shuffles them with ``seed`` (Python's ``random.Random``), so that a reward
    model's batches mix on-policy pairs with the original ones."""
    mixed = [r for records in sources for r in records]
    random.Random(seed).shuffle(mixed)
    return mixed
