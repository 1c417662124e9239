"""Rollout machinery shared by the on-policy algorithms (GRPO, PPO, RLOO, REINFORCE++).

One call of the ``collect`` built by :func:`make_collect` turns a :class:`jrlhf.data.PromptBatch` into a rollout
batch for :func:`jrlhf.step.make_onpolicy_update`:

1. **generate**: :func:`jrlhf.sampling.generate` samples ``num_generations`` completions per prompt from one
   prefill, on the mesh the (sharded) policy params live on. Row ``b * n + i`` is sample ``i`` of prompt ``b``.
2. **forward** (one jitted program on the same mesh): prompt + completion sequences, reference log-probs
   (``frozen["ref_params"]``), old values (critic), reward-model scores (``frozen["reward_params"]``).
3. **rewards** (host): the completions are decoded and scored by the reward functions
   (:func:`jrlhf.rewards.combine_rewards`; an error or a NaN stops the run with the offending sample shown),
   weighted and summed with the reward model's score.

The rollout batch (every array's leading dimension is ``R = batch_size * num_generations`` rows):

* ``input_ids``, ``attention_mask`` ``[R, P + N]`` int32: left-padded prompt, then the completion (right-padded);
* ``loss_mask`` ``[R, P + N]`` int32: 1 on completion tokens that are trained on (0 on the prompt, on padding, and on
  truncated completions with ``mask_truncated_completions``); so ``ctx.globals["num_tokens"]`` is the mini-batch's
  trained-token count;
* ``old_logps`` ``[R, N]`` float32: the sampler's log-probs of the completion tokens under ``logits / temperature``
  (the rollout policy, TRL's old log-probs);
* ``ref_logps`` ``[R, N]`` float32 (when a reference is used): the reference's log-probs, same temperature;
* ``old_values`` ``[R, N]`` float32 (PPO): the critic's value of the state before each completion token;
* ``scores`` ``[R]`` float32: the combined sequence reward (NaN where no reward applies to a sample);
* ``truncated`` ``[R]`` int32: 1 when the completion hit ``max_completion_length`` without EOS (any id of
  :func:`jrlhf.evaluation.run_stop_token_ids`).

Rows whose score is NaN (no reward function applied, the reward model absent) are unscorable: every algorithm's
``prepare_batch`` passes the batch through :func:`drop_unscorable`, so they get no loss and no gradient and stay out
of every baseline, mean, std and count.

Completion-frame arrays ``[R, N]`` pair with ``loss_mask[:, P:]``; the policy's log-prob of completion token ``j``
comes from the logits at position ``P + j - 1``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jrlhf import distributed, losses, sampling
from jrlhf.config import ConfigError
from jrlhf.evaluation import run_stop_token_ids
from jrlhf.models import (build_model, logical_axes, logits_from_hidden, sequence_scores, token_logprobs_from_hidden,
                          token_logprobs_from_logits, unembedding_matrix)
from jrlhf.sharding import BATCH_AXES, mesh_axis_size, put_global

DATA_KIND = "prompt"
DEFAULT_MAX_COMPLETION_LENGTH = 512  # TRL 1.16's GRPOConfig / RLOOConfig default
REWARD_MODEL_NAME = "reward_model"


@dataclasses.dataclass
class RolloutConfig:
    """Generation and reward settings shared by the on-policy algorithms (TRL 1.16 ``GRPOConfig`` names).

    Attributes:
      num_generations: completions sampled per prompt from one prefill (the group size of GRPO and RLOO).
      max_completion_length: completion budget ``N`` in tokens; ``None`` takes ``data.max_completion_length``, else
        TRL's 512.
      temperature: sampling temperature (> 0); the training log-probs use the same ``logits / temperature``.
      top_p: nucleus sampling mass (1 = off).
      top_k: top-k sampling (0 = off).
      stop_token_ids: token ids that end a completion (kept in it, like EOS), besides every EOS id of the model's
        ``config.json`` / ``generation_config.json`` and the tokenizer's, which always do
        (:func:`jrlhf.evaluation.run_stop_token_ids`; vLLM's ``SamplingParams.stop_token_ids``). Held-out
        generation during training stops at them too.
      mask_truncated_completions: completions that hit ``max_completion_length`` without EOS get no loss (their
        rewards still enter the group statistics, as in TRL).
      reward_funcs: reward functions by registered name (:func:`jrlhf.rewards.get_reward_fn`), or mappings
        ``{name: NAME, **options}`` for factories such as ``format``.
      reward_weights: one weight per reward source (the ``reward_funcs`` in order, then the reward model);
        ``None``: all 1.
      reward_model: local Hugging Face directory of a jrlhf reward model (``jrlhf train reward``); its score of the
        whole sequence at the last real token is one more reward source, logged as ``rewards/reward_model/mean``.
      logprob_chunk_size: vocabulary chunk for the log-softmax (``None``: full logits; with a chunk the ``entropy``
        metric is not computed).
      num_completions_to_print: completions written to the run's samples log every ``train.log_every`` steps.
    """

    num_generations: int = 8
    max_completion_length: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple = ()
    mask_truncated_completions: bool = False
    reward_funcs: tuple = ()
    reward_weights: tuple | None = None
    reward_model: str | None = None
    logprob_chunk_size: int | None = None
    num_completions_to_print: int = 4


# ------------------------------------------------------------------------------------------------ settings


def completion_length(run) -> int:
    """The completion budget ``N``: ``algo.max_completion_length``, else ``data.max_completion_length``, else 512."""
    algo = run.cfg.algo
    if algo.max_completion_length is not None:
        return int(algo.max_completion_length)
    if run.cfg.data.max_completion_length is not None:
        return int(run.cfg.data.max_completion_length)
    return DEFAULT_MAX_COMPLETION_LENGTH


def check_rollout_config(run, *, min_generations: int = 1) -> None:
    """Rejects rollout settings that cannot work, naming the key and the fix."""
    algo = run.cfg.algo
    if not isinstance(algo.num_generations, int) or algo.num_generations < min_generations:
        raise ConfigError(f"algo.num_generations={algo.num_generations!r}: {run.cfg.algorithm} needs at least "
                          f"{min_generations} completion(s) per prompt")
    if completion_length(run) < 1:
        raise ConfigError(f"algo.max_completion_length={completion_length(run)}: must be >= 1")
    if not algo.temperature > 0:
        raise ConfigError(f"algo.temperature={algo.temperature}: training needs a positive sampling temperature "
                          "(the log-probs are those of logits / temperature)")
    if not 0 < algo.top_p <= 1:
        raise ConfigError(f"algo.top_p={algo.top_p}: must be in (0, 1]")
    if algo.top_k < 0:
        raise ConfigError(f"algo.top_k={algo.top_k}: must be >= 0 (0 = off)")
    if not algo.reward_funcs and not algo.reward_model:
        from jrlhf.rewards import reward_fn_names

        raise ConfigError("no reward: set algo.reward_funcs (registered: " + ", ".join(reward_fn_names())
                          + ") and/or algo.reward_model (a reward-model directory from `jrlhf train reward`)")
    sources = len(algo.reward_funcs) + (1 if algo.reward_model else 0)
    if algo.reward_weights is not None and len(algo.reward_weights) != sources:
        raise ConfigError(f"algo.reward_weights has {len(algo.reward_weights)} entries for {sources} reward "
                          "source(s) (the reward_funcs in order, then the reward_model)")
    if run.tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token: completions could never end (set one in data.tokenizer)")


@dataclasses.dataclass
class RewardSources:
    """Resolved reward sources: host functions with their metric names, weights, and an optional reward model."""

    funcs: list
    names: list
    weights: np.ndarray
    model: Any = None
    params: Any = None


def load_reward_sources(run) -> RewardSources:
    """Resolves ``algo.reward_funcs`` / ``reward_weights`` / ``reward_model`` (loaded with ``run.load_model``)."""
    from jrlhf.rewards import get_reward_fn, reward_fn_name

    algo = run.cfg.algo
    funcs, names, used = [], [], {}
    for entry in algo.reward_funcs:
        if isinstance(entry, str):
            fn = get_reward_fn(entry)
        elif isinstance(entry, dict) and "name" in entry:
            options = {k: v for k, v in entry.items() if k != "name"}
            fn = get_reward_fn(entry["name"], **options)
        else:
            raise ConfigError(f"algo.reward_funcs entry {entry!r}: give a registered name or {{name: NAME, ...}}")
        base = entry if isinstance(entry, str) else reward_fn_name(fn)
        used[base] = used.get(base, 0) + 1
        funcs.append(fn)
        names.append(base if used[base] == 1 else f"{base}_{used[base]}")
    count = len(funcs) + (1 if algo.reward_model else 0)
    weights = np.ones(count, np.float32) if algo.reward_weights is None else np.asarray(algo.reward_weights,
                                                                                        np.float32)
    model = params = None
    if algo.reward_model:
        model, params = run.load_model(algo.reward_model, "score")
        if model.config.vocab_size != run.model.config.vocab_size:
            raise ConfigError(f"algo.reward_model '{algo.reward_model}' has vocab_size {model.config.vocab_size} "
                              f"but the policy has {run.model.config.vocab_size}: train the reward model with the "
                              "policy's tokenizer")
    return RewardSources(funcs=funcs, names=names, weights=weights, model=model, params=params)


def frozen_parts(run, *, ref: bool, rewards: RewardSources, ref_model=None):
    """``(frozen, frozen_specs)`` with ``ref_params`` (a copy of the initial policy) and ``reward_params``; ``(None,
    None)`` when neither is needed."""
    frozen, specs = {}, {}
    if ref:
        frozen["ref_params"] = run.params
        specs["ref_params"] = logical_axes(ref_model or run.model)
    if rewards.model is not None:
        frozen["reward_params"] = rewards.params
        specs["reward_params"] = logical_axes(rewards.model)
    return (frozen, specs) if frozen else (None, None)


def lm_view(model):
    """The LM-only module over the same params: the sampler and the reference pass need logits, not values (an
    ``lm+value`` model's params hold the LM params plus the value head, which the LM module ignores)."""
    return model if model.head == "lm" else build_model(model.config, "lm")


# ------------------------------------------------------------------------------------------------ forward


def completion_forward(model, params, input_ids, attention_mask, num_completion_tokens: int, *, temperature: float,
                       chunk_size: int | None = None, with_entropy: bool = True):
    """Log-probs (and entropies, values) of the completion tokens of ``[B, P + N]`` prompt+completion sequences.

    Args:
      model, params: an ``lm`` or ``lm+value`` model and its params.
      input_ids, attention_mask: ``[B, P + N]`` int.
      num_completion_tokens: ``N`` (static).
      temperature: the logits are divided by it (the sampling temperature).
      chunk_size: vocabulary chunk for the log-softmax (``None``: full logits).
      with_entropy: also return the token entropies of ``softmax(logits / temperature)`` (full logits only).

    Returns:
      ``(logps [B, N] f32, entropies [B, N] f32 or None, values [B, N] f32 or None)``; ``values`` (``lm+value``
      models) are those of the state before each completion token (position ``P + j - 1``).
    """
    n = int(num_completion_tokens)
    start = input_ids.shape[1] - n - 1
    targets = input_ids[:, start + 1:]
    entropies = None
    # the LM head runs on the completion positions only (the prompt positions' logits are never used)
    out = model.apply(params, input_ids, attention_mask, return_hidden=True)
    hidden, values = out if model.head == "lm+value" else (out, None)
    hidden = hidden[:, start:-1]
    if chunk_size is None:
        logits = logits_from_hidden(hidden, unembedding_matrix(model, params))
        logps = token_logprobs_from_logits(logits, targets, temperature)
        if with_entropy:
            entropies = losses.entropy_from_logits(logits, temperature=temperature)
    else:
        logps = token_logprobs_from_hidden(hidden, unembedding_matrix(model, params), targets, chunk_size,
                                           temperature)
    if values is not None:
        values = values[:, start:-1].astype(jnp.float32)
    return logps, entropies, values


def completion_part(batch: dict) -> tuple[int, jax.Array]:
    """``(N, completion loss mask [B, N] bool)`` of a rollout (mini-)batch."""
    n = batch["old_logps"].shape[1]
    return n, batch["loss_mask"][:, -n:] > 0


def rollout_forward(model, params, batch: dict, rollout) -> tuple:
    """:func:`completion_forward` of a rollout (mini-)batch with the ``temperature`` and ``logprob_chunk_size`` of
    ``rollout`` (a :class:`RolloutConfig`): ``(mask [B, N] bool, logps [B, N] f32, entropies [B, N] f32 or None,
    values [B, N] f32 or None)``."""
    n, mask = completion_part(batch)
    logps, entropies, values = completion_forward(model, params, batch["input_ids"], batch["attention_mask"], n,
                                                  temperature=rollout.temperature,
                                                  chunk_size=rollout.logprob_chunk_size)
    return mask, logps, entropies, values


def scorable_scores(batch: dict) -> tuple[jax.Array, jax.Array]:
    """``(scores [B] f32 with NaN -> 0, completion mask [B, N] bool without the rows no reward applies to)``."""
    _, mask = completion_part(batch)
    scores = batch["scores"].astype(jnp.float32)
    scorable = ~jnp.isnan(scores)
    return jnp.where(scorable, scores, 0.0), mask & scorable[:, None]


def drop_unscorable(batch: dict) -> dict:
    """A copy of a rollout batch whose unscorable rows (NaN score: no reward applied) carry no loss: their
    completion ``loss_mask`` is zeroed (so token counts leave them out) and ``sequence_mask [R]`` int32 marks the
    scorable rows (so ``ctx.globals["num_sequences"]`` counts only those, see :func:`jrlhf.step.default_globals`)."""
    batch = dict(batch)
    scorable = ~jnp.isnan(batch["scores"].astype(jnp.float32))
    batch["loss_mask"] = batch["loss_mask"] * scorable[:, None].astype(batch["loss_mask"].dtype)
    batch["sequence_mask"] = scorable.astype(jnp.int32)
    return batch


def scorable_mean(values: jax.Array, batch: dict) -> jax.Array:
    """Mean of per-row ``values [R]`` over the scorable rows of a rollout (0 when none is): float32 scalar."""
    scorable = ~jnp.isnan(batch["scores"].astype(jnp.float32))
    return losses.masked_mean(values, scorable)


def group_std_is_zero(values: np.ndarray, group_size: int) -> np.ndarray:
    """``[N / group_size]`` bool: whether each group's (NaN-excluded, Bessel) std is zero (TRL's
    ``frac_reward_zero_std``; a group with fewer than two scorable rewards has an undefined std: False)."""
    grouped = values.reshape(-1, group_size)
    out = np.zeros(grouped.shape[0], bool)
    for i, row in enumerate(grouped):
        row = row[~np.isnan(row)]
        out[i] = row.size > 1 and bool(np.isclose(np.std(row, ddof=1), 0.0))
    return out


def _batch_constraint(mesh, rows: int):
    size = mesh_axis_size(mesh, BATCH_AXES)
    spec = PartitionSpec(BATCH_AXES) if rows % size == 0 else PartitionSpec()
    return NamedSharding(mesh, spec)


# ------------------------------------------------------------------------------------------------ collect


@dataclasses.dataclass
class Collector:
    """What :func:`make_collect` needs to know about one algorithm.

    Attributes:
      policy_params: ``state.params -> the policy's params`` (identity unless the trained params also hold a
        separate critic).
      need_ref: compute ``ref_logps`` from ``frozen["ref_params"]``.
      values_fn: ``(params, input_ids, attention_mask, N) -> [R, N]`` old values (PPO), or ``None``.
      host_score_fn: optional ``(scores [R] np, truncated [R] np) -> scores`` applied on the host after the rewards
        (e.g. PPO's missing-EOS penalty).
      zero_std_over_batch: ``frac_reward_zero_std`` asks whether the whole batch's rewards have zero std (GRPO's
        ``scale_rewards: batch``) rather than the fraction of groups with zero std.
    """

    policy_params: Callable = lambda params: params
    need_ref: bool = False
    values_fn: Callable | None = None
    host_score_fn: Callable | None = None
    zero_std_over_batch: bool = False


def make_collect(run, rewards: RewardSources, collector: Collector) -> Callable:
    """Builds ``collect(state, prompt_batch, frozen, rng) -> (rollout batch, host metrics, samples text)``.

    Generation and every forward pass run on the mesh of the sharded params (nothing is gathered to one device);
    only the completion tokens (and the reward model's scores) come to the host, for the reward functions.

    Raises (from ``collect``):
      RewardError: a reward function raised, or returned NaN/inf or a non-number; the message shows the sample.
    """
    algo, mesh, tokenizer = run.cfg.algo, run.mesh, run.tokenizer
    n_gen = int(algo.num_generations)
    n_tokens = completion_length(run)
    stop_ids = run_stop_token_ids(run, algo.stop_token_ids)
    temperature = float(algo.temperature)
    lm = lm_view(run.model)
    reward_model = rewards.model
    rm_weight = float(rewards.weights[-1]) if reward_model is not None else 0.0
    func_weights = rewards.weights[: len(rewards.funcs)]

    def forward(params, frozen, prompt_ids, prompt_mask, tokens, token_mask, truncated):
        rows = tokens.shape[0]
        constraint = _batch_constraint(mesh, rows)
        pin = lambda x: jax.lax.with_sharding_constraint(x, constraint)  # noqa: E731
        ids = jnp.concatenate([jnp.repeat(prompt_ids, n_gen, axis=0), tokens], axis=1).astype(jnp.int32)
        prompt_part = jnp.repeat(prompt_mask, n_gen, axis=0).astype(jnp.int32)
        attention = jnp.concatenate([prompt_part, token_mask.astype(jnp.int32)], axis=1)
        trained = token_mask.astype(jnp.int32)
        if algo.mask_truncated_completions:
            trained = trained * (1 - truncated.astype(jnp.int32))[:, None]
        loss_mask = jnp.concatenate([jnp.zeros_like(prompt_part), trained], axis=1)
        out = {"input_ids": pin(ids), "attention_mask": pin(attention), "loss_mask": pin(loss_mask),
               "truncated": pin(truncated.astype(jnp.int32))}
        if collector.need_ref:
            ref_logps, _, _ = completion_forward(lm, frozen["ref_params"], ids, attention, n_tokens,
                                                 temperature=temperature, chunk_size=algo.logprob_chunk_size,
                                                 with_entropy=False)
            out["ref_logps"] = pin(ref_logps)
        if collector.values_fn is not None:
            out["old_values"] = pin(collector.values_fn(params, ids, attention, n_tokens))
        rm_scores = None
        if reward_model is not None:
            rm_scores = sequence_scores(reward_model.apply(frozen["reward_params"], ids, attention), attention)
        return out, rm_scores

    forward_jit = jax.jit(forward)

    def collect(state, prompt_batch, frozen, rng):
        prompt_ids, prompt_mask = _global_prompts(prompt_batch, mesh)
        params = collector.policy_params(state.params)
        sample = sampling.generate(lm, params, prompt_ids, prompt_mask, rng, max_new_tokens=n_tokens,
                                   num_samples=n_gen, temperature=temperature, top_k=int(algo.top_k),
                                   top_p=float(algo.top_p), eos_token_id=stop_ids,
                                   pad_token_id=tokenizer.pad_token_id, mesh=mesh)
        rows = sample.tokens.shape[0]
        device, rm_scores = forward_jit(state.params, frozen, prompt_ids, prompt_mask, sample.tokens, sample.mask,
                                        sample.truncated)
        device["old_logps"] = sample.logps
        host = distributed.process_allgather({"tokens": sample.tokens, "mask": sample.mask,
                                              "truncated": sample.truncated,
                                              **({"rm": rm_scores} if rm_scores is not None else {})})
        local = _local_rows(mesh, prompt_batch, n_gen, rows)
        tokens, mask, truncated = host["tokens"][local], host["mask"][local], host["truncated"][local]

        records = [r for r in prompt_batch.records for _ in range(n_gen)]
        prompts = [r.get("prompt") for r in records]
        completion_ids = [[int(t) for t, m in zip(row, mrow) if m] for row, mrow in zip(tokens, mask)]
        completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        scores, per_source = _score(rewards, func_weights, rm_weight, prompts, completions, completion_ids, records,
                                    None if rm_scores is None else host["rm"][local])
        logged_scores = scores.copy()
        if collector.host_score_fn is not None:
            scores = collector.host_score_fn(scores, truncated).astype(np.float32)
        device["scores"] = _global_rows(scores, mesh, rows)

        metrics = _rollout_metrics(logged_scores, per_source, mask, truncated, n_gen, prompt_batch,
                                   collector.zero_std_over_batch)
        samples = _samples_text(prompts, completions, logged_scores, int(algo.num_completions_to_print))
        return device, metrics, samples

    return collect


def _global_prompts(prompt_batch, mesh):
    """The prompt arrays as global arrays on the mesh (batch-sharded when the batch divides the batch axes)."""
    ids, mask = np.asarray(prompt_batch.prompt_ids), np.asarray(prompt_batch.prompt_mask)
    if jax.process_count() > 1:
        arrays = distributed.global_batch_from_local({"ids": ids, "mask": mask}, mesh)
        return arrays["ids"], arrays["mask"]
    sharding = _batch_constraint(mesh, ids.shape[0])
    return put_global(ids, sharding), put_global(mask, sharding)


def _local_rows(mesh, prompt_batch, n_gen: int, rows: int) -> np.ndarray:
    """Rows of the rollout that this process's prompts produced (all rows on one process)."""
    if jax.process_count() == 1:
        return np.arange(rows)
    prompt_rows = distributed.local_batch_rows(mesh, rows // n_gen)
    expected = (prompt_rows[:, None] * n_gen + np.arange(n_gen)[None, :]).reshape(-1)
    placed = distributed.local_batch_rows(mesh, rows)
    if not np.array_equal(expected, placed):
        raise ValueError("the mesh places this process's completion rows away from its prompts' rows; use a mesh "
                         "whose batch axes follow the process order (the default)")
    return expected


def _global_rows(values: np.ndarray, mesh, rows: int):
    """A host ``[local rows]`` array as a global ``[rows]`` array on the mesh."""
    if jax.process_count() > 1:
        return distributed.global_batch_from_local(values, mesh)
    return put_global(values, _batch_constraint(mesh, rows))


def _score(rewards: RewardSources, func_weights, rm_weight, prompts, completions, completion_ids, records,
           rm_scores):
    """Weighted sum of the reward sources (NaN where none applies) and the per-source rewards (NaN = None)."""
    from jrlhf.rewards import combine_rewards

    count = len(completions)
    per_source = {}
    total = np.zeros(count, np.float32)
    applicable = np.zeros(count, bool)
    if rewards.funcs:
        _, per_source = combine_rewards(rewards.funcs, func_weights, prompts, completions, completion_ids, records,
                                        names=rewards.names)
        for weight, name in zip(func_weights, rewards.names):
            column = per_source[name]
            total += np.where(np.isnan(column), 0.0, weight * column).astype(np.float32)
            applicable |= ~np.isnan(column)
    if rm_scores is not None:
        column = np.asarray(rm_scores, np.float32)
        if not np.all(np.isfinite(column)):
            row = int(np.flatnonzero(~np.isfinite(column))[0])
            from jrlhf.rewards import RewardError

            raise RewardError(f"the reward model scored sample {row} as {column[row]} (prompt={prompts[row]!r}, "
                              f"completion={completions[row]!r})")
        per_source[REWARD_MODEL_NAME] = column
        total += rm_weight * column
        applicable[:] = True
    total[~applicable] = np.nan
    return total, per_source


def _rollout_metrics(scores, per_source, mask, truncated, n_gen, prompt_batch, zero_std_over_batch=False) -> dict:
    """TRL-named host metrics of one rollout batch (this process's rows)."""
    from jrlhf.rewards import reward_metrics

    metrics = reward_metrics(scores, per_source)
    if zero_std_over_batch:
        metrics["frac_reward_zero_std"] = float(group_std_is_zero(scores, scores.shape[0])[0])
    elif n_gen > 1:
        metrics["frac_reward_zero_std"] = float(np.mean(group_std_is_zero(scores, n_gen)))
    lengths = mask.sum(-1).astype(np.float64)
    truncated = truncated.astype(bool)
    metrics["completions/mean_length"] = float(lengths.mean())
    metrics["completions/min_length"] = float(lengths.min())
    metrics["completions/max_length"] = float(lengths.max())
    metrics["completions/clipped_ratio"] = float(truncated.mean())
    terminated = lengths[~truncated] if (~truncated).any() else np.zeros(1)
    metrics["completions/mean_terminated_length"] = float(terminated.mean())
    metrics["completions/min_terminated_length"] = float(terminated.min())
    metrics["completions/max_terminated_length"] = float(terminated.max())
    prompt_tokens = int(np.sum(prompt_batch.prompt_mask)) * n_gen
    metrics["_num_tokens"] = prompt_tokens + int(lengths.sum())
    return metrics


def _samples_text(prompts, completions, scores, count: int) -> str:
    lines = []
    for prompt, completion, score in list(zip(prompts, completions, scores))[: max(count, 0)]:
        lines.append(f"{prompt!r} -> {completion!r}  reward={score:.4g}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ evaluation


def make_evaluate(run, policy_params: Callable = lambda params: params):
    """Held-out exact match of greedy completions of ``data.eval_prompts`` (``data.max_eval_examples`` of them)
    scored by ``data.eval_reward``; ``None`` without eval prompts."""
    from jrlhf.algorithms.base import generation_eval, load_eval_records

    cfg = run.cfg
    if not cfg.data.eval_prompts:
        return None
    records = load_eval_records(cfg.data.eval_prompts, cfg.data.max_eval_examples, key="data.eval_prompts")
    inner = generation_eval(run, records, model=lm_view(run.model), stop_token_ids=run.cfg.algo.stop_token_ids)

    def evaluate(params, frozen):
        return inner(policy_params(params), frozen)

    return evaluate


def sequence_globals(batch: dict, num_minibatches: int) -> dict:
    """Rollout-level counts shared by every mini-batch: ``rollout_tokens`` (trained completion tokens of the whole
    rollout) and ``tokens_per_minibatch`` (``rollout_tokens / num_minibatches``, TRL's ``dapo`` normaliser)."""
    _, mask = completion_part(batch)
    tokens = jnp.sum(mask.astype(jnp.float32))
    return {"rollout_tokens": tokens, "tokens_per_minibatch": tokens / float(num_minibatches)}



def num_minibatches(algo) -> int:
    """Optimizer steps per pass over a rollout batch (TRL's ``steps_per_generation``; ``None``: one)."""
    return 1 if algo.steps_per_generation is None else int(algo.steps_per_generation)


def policy_gradient_setup(run, loss_fn, prepare_batch, *, use_ref: bool, num_epochs: int, num_minibatches: int,
                          collector_options=None):
    """The :class:`AlgorithmSetup` shared by the critic-free algorithms (GRPO, RLOO, REINFORCE++): prompt data,
    reward sources, the reference in ``frozen`` when ``use_ref``, the rollout ``collect`` and held-out evaluation."""
    from jrlhf.algorithms.base import AlgorithmSetup, OnPolicy, tokenize_train

    train_data = tokenize_train(run, "prompt")
    rewards = load_reward_sources(run)
    frozen, frozen_specs = frozen_parts(run, ref=use_ref, rewards=rewards)
    collect = make_collect(run, rewards, Collector(need_ref=use_ref, **(collector_options or {})))
    return AlgorithmSetup(
        loss_fn=loss_fn,
        train_data=train_data,
        frozen=frozen,
        frozen_specs=frozen_specs,
        prepare_batch=prepare_batch,
        evaluate=make_evaluate(run),
        onpolicy=OnPolicy(collect=collect, num_epochs=int(num_epochs), num_minibatches=int(num_minibatches)),
    )
