"""Rollouts and the on-policy contract shared by GRPO, PPO, RLOO and REINFORCE++.

:func:`rollout` turns prompts into a :class:`RolloutBatch`, the typed input of the compiled on-policy update
(:func:`jrlhf.step.make_onpolicy_update`), from plain arguments: a model, its params, prompts (token ids, records
and a tokenizer, or a :class:`jrlhf.data.PromptBatch`), the sampling settings of a :class:`RolloutConfig` (or any
algorithm config) and reward functions as Python callables. One call:

1. **generate**: :func:`jrlhf.sampling.generate` samples ``num_generations`` completions per prompt from one
   prefill, on the mesh the (sharded) policy params live on. Row ``b * n + i`` is sample ``i`` of prompt ``b``.
2. **forward** (one jitted program on the same mesh): prompt + completion sequences and, when given, reference
   log-probs (``ref_params``), old values (``values_fn``: PPO's critic) and reward-model scores (``reward_params``).
3. **rewards** (host): the completions are decoded and scored by the reward functions
   (:func:`jrlhf.rewards.combine_rewards`; an error or a NaN stops the run with the offending sample shown),
   weighted and summed with the reward model's score.

**Where the reference log-probs are computed** (``RolloutConfig.reference_logps``): ``"rollout"`` (default) --
:func:`rollout` computes ``ref_logps`` once from the ``ref_params`` it is given; ``"update"`` -- the rollout leaves
``ref_logps`` out and the algorithm's ``prepare_batch`` computes it inside the compiled update from
``frozen.ref_params`` (:class:`Frozen`), once per rollout batch before the mini-batches. Both give the same numbers.

Each algorithm module's ``make(model, config)`` returns an :class:`OnPolicyAlgorithm` (the
:class:`jrlhf.algorithms.base.Algorithm` contract plus the rollout and the update's epoch / mini-batch counts);
its ``setup(run)`` for ``jrlhf train`` is one user of it, and ``collect`` (:func:`make_collect`) is one user of
:func:`rollout`.

Rows whose score is NaN (no reward function applied, the reward model absent) are unscorable: every algorithm's
``prepare_batch`` passes the batch through :func:`drop_unscorable`, so they get no loss and no gradient and stay out
of every baseline, mean, std and count.

Completion-frame arrays ``[R, N]`` pair with ``loss_mask[:, P:]``; the policy's log-prob of completion token ``j``
comes from the logits at position ``P + j - 1``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from jrlhf import distributed, losses, sampling
from jrlhf.algorithms.base import Algorithm, AlgorithmInputError, check_fields
from jrlhf.config import ConfigError
from jrlhf.evaluation import run_stop_token_ids
from jrlhf.models import (build_model, logical_axes, logits_from_hidden, sequence_scores, token_entropy_from_hidden,
                          token_logprobs_from_hidden, token_logprobs_from_logits, unembedding_matrix)
from jrlhf.models.lora import base_model, has_adapters
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
      min_new_tokens: EOS (and ``stop_token_ids``) cannot end a completion before this many tokens
        (``transformers``' ``min_new_tokens``; ``= max_completion_length`` gives fixed-length completions). The
        log-probs stay those of the policy's unmodified distribution.
      reward_funcs: reward functions: Python callables (from Python), registered names
        (:func:`jrlhf.rewards.get_reward_fn`), ``module:function`` import paths, or mappings
        ``{name: NAME, **options}`` for factories such as ``format``.
      reward_weights: one weight per reward source (the ``reward_funcs`` in order, then the reward model);
        ``None``: all 1.
      reward_model: local Hugging Face directory of a jrlhf reward model (``jrlhf train reward``); its score of the
        whole sequence at the last real token is one more reward source, logged as ``rewards/reward_model/mean``.
      logprob_chunk_size: vocabulary chunk for the log-softmax and the entropies (``None``: full logits).
      num_completions_to_print: completions written to the run's samples log every ``train.log_every`` steps.
      reference_logps: where the reference log-probs are computed: ``"rollout"`` (once, by :func:`rollout`, stored
        in ``RolloutBatch.ref_logps``) or ``"update"`` (inside the compiled update's ``prepare_batch``, from
        ``frozen.ref_params``; the rollout then needs no reference params). Same numbers either way.
      vllm_importance_sampling_correction: correct for the sampler/trainer mismatch (TRL's name; here the sampler
        is jrlhf's KV-cache decode): the rollout's ``old_logps`` become the trainer's recomputed log-probs and the
        sampler's are kept as ``sampler_logps``; the policy loss is weighted (or masked) by their ratio
        (:func:`jrlhf.losses.rollout_importance_weights`). Off by default: ``old_logps`` are the sampler's. With it
        on, the mismatch metrics (``sampling/*``) are logged too.
      log_rollout_mismatch: also without the correction, run the trainer's forward over every rollout and log the
        ``sampling/*`` mismatch metrics (mean and max ``|logp_sampler - logp_trainer|``, their k3 KL, the share of
        ratios outside ``[1/C, C]``). Off by default: it costs one more forward pass of the policy per rollout
        (TRL computes it only with its vLLM correction on), and jrlhf's sampler and trainer are the same model.
      vllm_importance_sampling_mode: ``token_truncate``, ``token_mask``, ``sequence_truncate`` or ``sequence_mask``
        (TRL 1.16's names and default).
      vllm_importance_sampling_clip_max: the cap ``C`` (TRL's default 3; ``None``: no upper bound, mask modes only);
        also the bound of the ``frac_outside`` metric (``[1 / C, C]`` unless ``clip_min`` is set; ``C = 3`` when
        ``None``).
      vllm_importance_sampling_clip_min: the lower bound (default none).
      dynamic_sampling: DAPO's dynamic sampling: groups whose rewards all agree (zero std: no advantage) are dropped
        and further prompt batches are generated until the batch holds ``B`` groups with signal
        (:func:`dynamic_rollout`; needs ``num_generations >= 2``).
      max_num_gen_batches: the most generation rounds one batch may take (verl's name; the first round counts);
        slots still empty after that get the dropped groups back with their score set to NaN (no loss, no count).
      env: multi-turn episodes against an environment instead of single completions
        (:func:`jrlhf.algorithms.multiturn.multiturn_rollout`): a registered name (``calculator``) or a
        ``module:Class`` import path (:func:`jrlhf.envs.make_env_factory`); the environment gives the rewards.
        ``None``: single-turn rollouts.
      env_args: keyword arguments of the environment's class.
      max_turns: with ``env``, the most assistant turns per episode (each at most ``max_completion_length``
        tokens).
      max_episode_tokens: with ``env``, the token budget of an episode after its prompt (assistant and environment
        tokens together: the ``N`` columns of the rollout batch); ``None``: ``2 * max_turns *
        max_completion_length``.
      max_staleness: asynchronous (off-policy) rollouts: the rollout trained at loop step ``k`` is generated, in a
        background thread while earlier updates run, by the params of step ``max(0, k - max_staleness)``
        (:class:`AsyncRollouts`); ``0`` (default) is the synchronous loop, ``1`` is one-step-off-policy training
        (verl's ``one_step_off_policy`` recipe; AReaL's ``max_head_offpolicyness``, PipelineRL's ``max_lag``, where
        0 also means synchronous). The importance ratio's denominator ``old_logps`` is the behaviour policy's: the
        log-probs of the params that generated the rollout, so the ratio corrects for the staleness. Costs
        ``max_staleness`` extra copies of the params on the device and in each checkpoint.
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
    min_new_tokens: int = 0
    reference_logps: str = "rollout"
    vllm_importance_sampling_correction: bool = False
    vllm_importance_sampling_mode: str = "sequence_mask"
    vllm_importance_sampling_clip_max: float | None = 3.0
    vllm_importance_sampling_clip_min: float | None = None
    log_rollout_mismatch: bool = False
    dynamic_sampling: bool = False
    max_num_gen_batches: int = 10
    env: str | None = None
    env_args: dict | None = None
    max_turns: int = 1
    max_episode_tokens: int | None = None
    max_staleness: int = 0


# ------------------------------------------------------------------------------------------------ settings


def completion_length(run) -> int:
    """The completion budget ``N``: ``algo.max_completion_length``, else ``data.max_completion_length``, else 512."""
    algo = run.cfg.algo
    if algo.max_completion_length is not None:
        return int(algo.max_completion_length)
    if run.cfg.data.max_completion_length is not None:
        return int(run.cfg.data.max_completion_length)
    return DEFAULT_MAX_COMPLETION_LENGTH


REFERENCE_LOGPS = ("rollout", "update")


def check_rollout_settings(algo, *, min_generations: int = 1, max_completion_length: int | None = None,
                           algorithm: str = "this algorithm") -> None:
    """Rejects rollout settings of a :class:`RolloutConfig` (or an algorithm's config) that cannot work, naming the
    key and the fix (:class:`jrlhf.config.ConfigError`); the run-free part of :func:`check_rollout_config`."""
    if not isinstance(algo.num_generations, int) or algo.num_generations < min_generations:
        raise ConfigError(f"algo.num_generations={algo.num_generations!r}: {algorithm} needs at least "
                          f"{min_generations} completion(s) per prompt")
    n = algo.max_completion_length if max_completion_length is None else max_completion_length
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ConfigError(f"algo.max_completion_length={n!r}: must be an int >= 1")
    if not isinstance(algo.min_new_tokens, int) or algo.min_new_tokens < 0 or (n is not None
                                                                              and algo.min_new_tokens > n):
        raise ConfigError(f"algo.min_new_tokens={algo.min_new_tokens!r}: must be an int in [0, "
                          f"max_completion_length={n}] (equal gives fixed-length completions)")
    if not algo.temperature > 0:
        raise ConfigError(f"algo.temperature={algo.temperature}: training needs a positive sampling temperature "
                          "(the log-probs are those of logits / temperature)")
    if not 0 < algo.top_p <= 1:
        raise ConfigError(f"algo.top_p={algo.top_p}: must be in (0, 1]")
    if algo.top_k < 0:
        raise ConfigError(f"algo.top_k={algo.top_k}: must be >= 0 (0 = off)")
    if algo.reference_logps not in REFERENCE_LOGPS:
        raise ConfigError(f"algo.reference_logps={algo.reference_logps!r}: use 'rollout' (computed by the rollout) "
                          "or 'update' (computed inside the compiled update from frozen.ref_params)")
    check_correction_settings(algo)
    if algo.dynamic_sampling and algo.num_generations < 2:
        raise ConfigError(f"algo.dynamic_sampling needs groups: num_generations={algo.num_generations} (>= 2)")
    if not isinstance(algo.max_num_gen_batches, int) or algo.max_num_gen_batches < 1:
        raise ConfigError(f"algo.max_num_gen_batches={algo.max_num_gen_batches!r}: must be an int >= 1 (generation "
                          "rounds per batch, the first included)")
    check_staleness_settings(algo)
    if getattr(algo, "env", None) is not None:
        from jrlhf.algorithms.multiturn import check_env_settings

        check_env_settings(algo, algorithm)
    sources = len(algo.reward_funcs) + (1 if algo.reward_model else 0)
    if algo.reward_weights is not None and sources and len(algo.reward_weights) != sources:
        raise ConfigError(f"algo.reward_weights has {len(algo.reward_weights)} entries for {sources} reward "
                          "source(s) (the reward_funcs in order, then the reward_model)")


def check_staleness_settings(algo) -> None:
    """Rejects ``max_staleness`` settings that cannot work (:class:`jrlhf.config.ConfigError` naming the key)."""
    s = getattr(algo, "max_staleness", 0)
    if isinstance(s, bool) or not isinstance(s, int) or s < 0:
        raise ConfigError(f"algo.max_staleness={s!r}: must be an int >= 0 (0: synchronous rollouts, 1: "
                          "one-step-off-policy)")
    if s == 0:
        return
    if algo.dynamic_sampling:
        raise ConfigError("algo.max_staleness > 0 with algo.dynamic_sampling is not supported (the extra prompt "
                          "batches would be drawn from the data stream by the background rollout); set one of them "
                          "off")
    if getattr(algo, "env", None) is not None:
        raise ConfigError("algo.max_staleness > 0 is not supported with algo.env (multi-turn rollouts) yet; set "
                          "algo.max_staleness: 0")
    if jax.process_count() > 1:
        raise ConfigError("algo.max_staleness > 0 is not supported on several processes yet (the background "
                          "rollout's collectives could interleave with the update's); set algo.max_staleness: 0")


def check_correction_settings(algo) -> None:
    """Rejects rollout-correction settings that cannot work (:class:`jrlhf.config.ConfigError` naming the key)."""
    mode = algo.vllm_importance_sampling_mode
    if mode not in losses.IS_MODES:
        raise ConfigError(f"algo.vllm_importance_sampling_mode={mode!r}: use one of {', '.join(losses.IS_MODES)}")
    high, low = algo.vllm_importance_sampling_clip_max, algo.vllm_importance_sampling_clip_min
    if high is None and mode.endswith("_truncate"):
        raise ConfigError(f"algo.vllm_importance_sampling_clip_max=None: {mode} needs the cap C (TRL's default 3.0)")
    if high is not None and not high > 0 or low is not None and not low >= 0 or (
            high is not None and low is not None and low > high):
        raise ConfigError(f"algo.vllm_importance_sampling_clip_min={low} / clip_max={high}: need 0 <= clip_min <= "
                          "clip_max, clip_max > 0")


def check_rollout_config(run, *, min_generations: int = 1) -> None:
    """Rejects rollout settings of a run that cannot work, naming the key and the fix."""
    algo = run.cfg.algo
    check_rollout_settings(algo, min_generations=min_generations, max_completion_length=completion_length(run),
                           algorithm=run.cfg.algorithm)
    if getattr(algo, "env", None) is None and not algo.reward_funcs and not algo.reward_model:
        from jrlhf.rewards import reward_fn_names

        raise ConfigError("no reward: set algo.reward_funcs (registered: " + ", ".join(reward_fn_names())
                          + "; or module:function import paths) and/or algo.reward_model (a reward-model directory "
                          "from `jrlhf train reward`)")
    if run.tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token: completions could never end (set one in data.tokenizer)")


def as_config(config, config_cls, algorithm: str):
    """``config`` as a ``config_cls`` instance: an instance passes, a mapping is built into one (unknown keys are a
    :class:`jrlhf.config.ConfigError` naming them and the valid ones), ``None`` gives the defaults."""
    if config is None:
        return config_cls()
    if isinstance(config, config_cls):
        return config
    if isinstance(config, Mapping):
        names = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ConfigError(f"{algorithm}.Config has no field(s) {', '.join(unknown)}; fields: "
                              f"{', '.join(sorted(names))}")
        return config_cls(**config)
    raise ConfigError(f"{algorithm}.make: config must be a {algorithm}.Config (or a dict of its fields), got "
                      f"{type(config).__name__}")


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
    from jrlhf.rewards import RewardError, resolve_reward_funcs

    algo = run.cfg.algo
    try:
        funcs, names = resolve_reward_funcs(algo.reward_funcs)
    except RewardError as error:
        raise ConfigError(f"algo.reward_funcs: {error}") from None
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


@struct.dataclass
class Frozen:
    """What the on-policy algorithms hold fixed during training (a pytree: jit, sharding and checkpoints take it).

    Attributes:
      ref_params: the reference policy's params (a copy of the initial policy), or ``None`` (no KL term).
      reward_params: the reward model's params (``RolloutConfig.reward_model``), or ``None``.
    """

    ref_params: Any = None
    reward_params: Any = None


def frozen_parts(run, *, ref: bool, rewards: RewardSources, ref_model=None):
    """``(frozen, frozen_specs)``: :class:`Frozen` with ``ref_params`` (a copy of the initial policy) and
    ``reward_params``, and the same structure of logical specs; ``(None, None)`` when neither is needed. With a
    LoRA policy the reference is its base model on the trained params (:func:`reference_for`): no ``ref_params``."""
    if has_adapters(run.model):
        ref = False
    if not ref and rewards.model is None:
        return None, None
    frozen = Frozen(ref_params=run.params if ref else None,
                    reward_params=rewards.params if rewards.model is not None else None)
    specs = Frozen(ref_params=logical_axes(ref_model or run.model) if ref else None,
                   reward_params=logical_axes(rewards.model) if rewards.model is not None else None)
    return frozen, specs


def reference_for(model, policy_params, ref_params):
    """``(ref_model, ref_params)`` of the reference pass: with a LoRA ``model``, its base model (adapters off) on
    the policy's own params (no copy of the weights); else ``model``'s LM view on ``ref_params``."""
    if has_adapters(model):
        return base_model(lm_view(model)), policy_params
    return lm_view(model), ref_params


def check_lora_reference(model, config, algorithm: str) -> None:
    """With LoRA the reference log-probs come from the base model on the policy params, which the rollout has and
    ``prepare_batch`` (``reference_logps: update``) does not.

    Raises:
      ConfigError: ``reference_logps: update`` with a LoRA model.
    """
    if has_adapters(model) and getattr(config, "reference_logps", "rollout") == "update":
        raise ConfigError(f"algo.reference_logps=update with model.lora: {algorithm}'s reference is the base model "
                          "on the policy params, computed in the rollout; set algo.reference_logps=rollout")


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
      with_entropy: also return the token entropies of ``softmax(logits / temperature)`` (with a chunk, computed
        over vocabulary chunks by :func:`jrlhf.models.token_entropy_from_hidden`: never ``[B, N, V]`` float32).

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
        if with_entropy:
            entropies = token_entropy_from_hidden(hidden, unembedding_matrix(model, params), chunk_size, temperature)
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


def apply_rollout_correction(batch: dict, config) -> dict:
    """A copy of a (prepared) rollout batch with the rollout correction of ``config`` applied, once per rollout
    inside the compiled update, before the batch-global counts are taken (a no-op with
    ``vllm_importance_sampling_correction`` off):

    * ``is_weights [R, N]`` float32: :func:`jrlhf.losses.rollout_importance_weights` of ``old_logps`` (the
      trainer's) against ``sampler_logps``; the policy loss multiplies each token's term by it;
    * the mask modes drop tokens (``token_mask``) or whole sequences (``sequence_mask``) from ``loss_mask``, and a
      dropped sequence from ``sequence_mask``, so they leave every count the loss divides by (the counts are those
      of the whole rollout, so accumulation stays exact).

    Raises:
      AlgorithmInputError: the correction is on and the batch has no ``sampler_logps``.
    """
    on, mode, clip_max, clip_min = correction_of(config)
    if not on:
        return batch
    if batch.get("sampler_logps") is None:
        raise AlgorithmInputError("vllm_importance_sampling_correction: the rollout batch has no 'sampler_logps' "
                                  f"({OPTIONAL_ROLLOUT_FIELDS['sampler_logps']}); make it with rollout() and the same "
                                  "config")
    batch = dict(batch)
    n, mask = completion_part(batch)
    weights, keep = losses.rollout_importance_weights(batch["old_logps"], batch["sampler_logps"], mask, mode=mode,
                                                      clip_max=clip_max, clip_min=clip_min)
    loss_mask = batch["loss_mask"]
    batch["loss_mask"] = loss_mask.at[:, -n:].set(keep.astype(loss_mask.dtype))
    if mode == "sequence_mask":
        dropped = jnp.any(mask, axis=-1) & ~jnp.any(keep, axis=-1)
        sequence_mask = batch.get("sequence_mask", jnp.ones(mask.shape[:1], jnp.int32))
        batch["sequence_mask"] = sequence_mask * (~dropped).astype(jnp.int32)
    batch["is_weights"] = weights
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


ROLLOUT_FIELDS = {
    "input_ids": "[R, P + N] int32: left-padded prompt, then the completion (right-padded)",
    "attention_mask": "[R, P + N] int32: 1 on real prompt and completion tokens",
    "loss_mask": "[R, P + N] int32: 1 on the completion tokens trained on (0 on the prompt, padding and, with "
                 "mask_truncated_completions, truncated completions)",
    "old_logps": "[R, N] float32: the sampler's log-probs of the completion tokens under logits / temperature "
                 "(the rollout policy, TRL's old log-probs)",
    "scores": "[R] float32: the combined sequence reward (NaN where no reward applies)",
    "truncated": "[R] int32: 1 where the completion hit max_completion_length without a stop token",
}
OPTIONAL_ROLLOUT_FIELDS = {
    "ref_logps": "[R, N] float32: the reference's log-probs of the completion tokens, same temperature "
                 "(reference_logps='rollout'; else computed inside the update from frozen.ref_params)",
    "old_values": "[R, N] float32 (PPO): the critic's value of the state before each completion token",
    "sampler_logps": "[R, N] float32: the sampler's log-probs of the completion tokens (with "
                     "vllm_importance_sampling_correction, where old_logps are the trainer's recomputed ones)",
}
_FIELD_ORDER = tuple(ROLLOUT_FIELDS) + tuple(OPTIONAL_ROLLOUT_FIELDS)


@struct.dataclass
class RolloutBatch(Mapping):
    """One rollout, the input of the compiled on-policy update. ``R = prompts * num_generations`` rows (row
    ``b * n + i`` is sample ``i`` of prompt ``b``), ``P`` prompt and ``N = max_completion_length`` completion
    columns; completion-frame arrays ``[R, N]`` pair with ``loss_mask[:, P:]``.

    Attributes:
      input_ids: ``[R, P + N]`` int32: left-padded prompt, then the completion (right-padded).
      attention_mask: ``[R, P + N]`` int32: 1 on real prompt and completion tokens.
      loss_mask: ``[R, P + N]`` int32: 1 on the completion tokens trained on (0 on the prompt, on padding, and on
        truncated completions with ``mask_truncated_completions``).
      old_logps: ``[R, N]`` float32: the sampler's log-probs of the completion tokens under
        ``logits / temperature`` (the rollout policy, TRL's old log-probs); 0 on padding.
      scores: ``[R]`` float32: the weighted sum of the reward sources; NaN where none applies (no loss, see
        :func:`drop_unscorable`).
      truncated: ``[R]`` int32: 1 where the completion hit ``max_completion_length`` without a stop token.
      ref_logps: ``[R, N]`` float32 or ``None``: the reference's log-probs, same temperature; ``None`` when no
        reference was given to :func:`rollout` (``reference_logps: update`` computes it inside the update).
      old_values: ``[R, N]`` float32 or ``None`` (PPO): the critic's value of the state before each completion
        token.
      sampler_logps: ``[R, N]`` float32 or ``None``: with ``vllm_importance_sampling_correction``, the sampler's
        log-probs (``old_logps`` then hold the trainer's forward at the rollout's params, TRL's and verl's old
        log-probs); ``None`` otherwise.

    A pytree (``jax.tree`` maps over the fields that are not ``None``) and a read-only mapping of those fields
    (``batch["old_logps"]``, ``dict(batch)``): a missing optional field raises ``KeyError``; the algorithms'
    ``prepare_batch`` turn it into a dict to which they add their own fields (``advantages``...).
    """

    input_ids: Any
    attention_mask: Any
    loss_mask: Any
    old_logps: Any
    scores: Any
    truncated: Any
    ref_logps: Any = None
    old_values: Any = None
    sampler_logps: Any = None

    def __getitem__(self, key):
        value = getattr(self, key) if key in _FIELD_ORDER else None
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self):
        return (name for name in _FIELD_ORDER if getattr(self, name) is not None)

    def __len__(self):
        return sum(1 for _ in self)

    @property
    def num_completion_tokens(self) -> int:
        """``N``."""
        return int(self.old_logps.shape[1])


class Rollout(NamedTuple):
    """What :func:`rollout` returns.

    Attributes:
      batch: the :class:`RolloutBatch` (device arrays, on the mesh of the params).
      metrics: TRL-named host metrics of the rollout (``reward``, ``reward_std``, ``rewards/{name}/mean``,
        ``frac_reward_zero_std``, ``completions/*``) and ``_num_tokens`` (prompt + completion tokens).
      prompts: the ``R`` prompts as given to the reward functions (each prompt repeated per sample).
      completions: the ``R`` decoded completions.
      scores: ``[R]`` float32 numpy: the combined rewards (before ``host_score_fn``; NaN = unscorable).
      rewards: ``{source name: [R] float32}`` per reward source before weighting (NaN = ``None``).
      trainer_logps: ``[R, N]`` float32 device array: the trained policy's forward on the rollout (what the
        ``sampling/*`` mismatch metrics compare with the sampler's log-probs); ``None`` unless
        ``config.log_rollout_mismatch`` or the correction is on.
      sampler_logps: ``[R, N]`` float32 device array: the sampler's log-probs.
      episodes: multi-turn rollouts only: the :class:`jrlhf.algorithms.multiturn.Episodes` (turn rewards, turn
        spans, end reasons, the environments' episode metrics); ``None`` for single-turn rollouts.
    """

    batch: RolloutBatch
    metrics: dict
    prompts: list
    completions: list
    scores: np.ndarray
    rewards: dict
    trainer_logps: Any = None
    sampler_logps: Any = None
    episodes: Any = None


class _Key:
    """A static jit argument compared by value when hashable, else by identity (models, functions, meshes)."""

    def __init__(self, obj):
        self.obj = obj
        try:
            self._hash = hash(("v", obj))
            self._by_value = True
        except TypeError:
            self._hash, self._by_value = hash(("i", id(obj))), False

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        if not isinstance(other, _Key):
            return False
        if self.obj is other.obj:
            return True
        return self._by_value and other._by_value and type(self.obj) is type(other.obj) and self.obj == other.obj


class _ForwardSpec(NamedTuple):
    n_gen: int
    n_tokens: int
    temperature: float
    chunk_size: Any
    mask_truncated: bool
    ref_model: _Key
    reward_model: _Key
    values_fn: _Key
    mesh: _Key
    policy_model: _Key = _Key(None)
    correction: tuple = (False, "sequence_mask", 3.0, None)  # (on, mode, clip_max, clip_min)
    mismatch: bool = False  # run the trainer's forward over the rollout (the sampling/* metrics)


def _pin(mesh, rows):
    if mesh is None:
        return lambda x: x
    constraint = _batch_constraint(mesh, rows)
    return lambda x: jax.lax.with_sharding_constraint(x, constraint)


def correction_of(config) -> tuple:
    """``(on, mode, clip_max, clip_min)``: the rollout-correction settings of a config (defaults when it has none)."""
    return (bool(getattr(config, "vllm_importance_sampling_correction", False)),
            getattr(config, "vllm_importance_sampling_mode", "sequence_mask"),
            getattr(config, "vllm_importance_sampling_clip_max", 3.0),
            getattr(config, "vllm_importance_sampling_clip_min", None))


def mismatch_metrics(trainer_logps, sampler_logps, completion_mask, correction: tuple) -> dict:
    """The ``sampling/*`` metrics of one rollout (jit-safe; counts over the whole batch): the mismatch metrics of
    :func:`jrlhf.losses.rollout_mismatch_metrics` always, and with the correction on the applied weights'
    :func:`jrlhf.losses.importance_weight_metrics`."""
    on, mode, clip_max, clip_min = correction
    metrics = losses.rollout_mismatch_metrics(trainer_logps, sampler_logps, completion_mask,
                                              clip_max=3.0 if clip_max is None else clip_max, clip_min=clip_min)
    if on:
        weights, keep = losses.rollout_importance_weights(trainer_logps, sampler_logps, completion_mask, mode=mode,
                                                          clip_max=clip_max, clip_min=clip_min)
        metrics.update(losses.importance_weight_metrics(weights, keep, completion_mask, mode))
    return metrics


def _forward_impl(spec: _ForwardSpec, policy_params, value_params, ref_params, reward_params, prompt_ids,
                  prompt_mask, tokens, token_mask, truncated, sampler_logps):
    n_gen, mesh = spec.n_gen, spec.mesh.obj
    pin = _pin(mesh, tokens.shape[0])
    ids = jnp.concatenate([jnp.repeat(prompt_ids, n_gen, axis=0), tokens], axis=1).astype(jnp.int32)
    prompt_part = jnp.repeat(prompt_mask, n_gen, axis=0).astype(jnp.int32)
    attention = jnp.concatenate([prompt_part, token_mask.astype(jnp.int32)], axis=1)
    trained = token_mask.astype(jnp.int32)
    if spec.mask_truncated:
        trained = trained * (1 - truncated.astype(jnp.int32))[:, None]
    loss_mask = jnp.concatenate([jnp.zeros_like(prompt_part), trained], axis=1)
    out = {"input_ids": pin(ids), "attention_mask": pin(attention), "loss_mask": pin(loss_mask),
           "truncated": pin(truncated.astype(jnp.int32))}
    trainer_logps, metrics = None, {}
    if spec.mismatch or spec.correction[0]:
        # the trainer's numerics on the sampled tokens: the same forward the loss runs (full sequence, no KV cache)
        trainer_logps, _, _ = completion_forward(spec.policy_model.obj, policy_params, ids, attention,
                                                 spec.n_tokens, temperature=spec.temperature,
                                                 chunk_size=spec.chunk_size, with_entropy=False)
        trainer_logps = pin(trainer_logps)
        metrics = mismatch_metrics(trainer_logps, sampler_logps, trained > 0, spec.correction)
    if spec.correction[0]:
        out["old_logps"], out["sampler_logps"] = trainer_logps, sampler_logps
    else:
        out["old_logps"] = sampler_logps
    if ref_params is not None:
        ref_logps, _, _ = completion_forward(spec.ref_model.obj, ref_params, ids, attention, spec.n_tokens,
                                             temperature=spec.temperature, chunk_size=spec.chunk_size,
                                             with_entropy=False)
        out["ref_logps"] = pin(ref_logps)
    if spec.values_fn.obj is not None:
        out["old_values"] = pin(spec.values_fn.obj(value_params, ids, attention, spec.n_tokens))
    rm_scores = None
    if reward_params is not None:
        model = spec.reward_model.obj
        rm_scores = sequence_scores(model.apply(reward_params, ids, attention), attention)
    return out, rm_scores, trainer_logps, metrics


_forward_jit = jax.jit(_forward_impl, static_argnums=0)


def reference_logps(ref_model, ref_params, batch, config) -> jax.Array:
    """The reference's log-probs ``[R, N]`` float32 of a rollout (mini-)batch's completion tokens under
    ``logits / config.temperature`` (``config.logprob_chunk_size``); jit-safe. What :func:`rollout` stores as
    ``ref_logps`` and what ``prepare_batch`` computes with ``reference_logps: update``."""
    n = batch["old_logps"].shape[1]
    logps, _, _ = completion_forward(lm_view(ref_model), ref_params, batch["input_ids"], batch["attention_mask"], n,
                                     temperature=config.temperature, chunk_size=config.logprob_chunk_size,
                                     with_entropy=False)
    return logps


def with_reference_logps(batch, frozen, ref_model, config, algorithm: str):
    """``batch`` (a dict) with ``ref_logps``: kept when the rollout computed it, else computed from
    ``frozen.ref_params`` with ``ref_model`` (inside the compiled update: ``reference_logps: update``).

    Raises:
      AlgorithmInputError: neither is available (the message names ``ref_logps``, ``frozen.ref_params`` and the
        ways to provide them).
    """
    if batch.get("ref_logps") is not None:
        return batch
    ref_params = getattr(frozen, "ref_params", None)
    if ref_params is None and isinstance(frozen, Mapping):
        ref_params = frozen.get("ref_params")
    if ref_params is None or ref_model is None:
        raise AlgorithmInputError(
            f"{algorithm}: the rollout batch has no 'ref_logps' ([R, N] float32 reference log-probs) and "
            + ("frozen has no ref_params" if ref_model is not None else "the update was built without a model")
            + ": pass ref_params to rollout(), or frozen=algorithm.init_frozen(params) to the update")
    return {**batch, "ref_logps": reference_logps(ref_model, ref_params, batch, config)}


def _prompt_batch(prompts, tokenizer, max_prompt_length):
    """A :class:`jrlhf.data.PromptBatch` from a PromptBatch, ``(ids [B, P], mask [B, P])`` or records / strings."""
    from jrlhf.data import PromptBatch, collate_prompts, tokenize

    if isinstance(prompts, PromptBatch):
        return prompts
    if isinstance(prompts, tuple) and len(prompts) == 2 and np.ndim(prompts[0]) == 2:
        ids, mask = np.asarray(prompts[0], np.int32), np.asarray(prompts[1], np.int32)
        if ids.shape != mask.shape:
            raise AlgorithmInputError(f"rollout: prompt ids {ids.shape} and mask {mask.shape} must have one shape "
                                      "[B, P]")
        if tokenizer is not None:
            texts = tokenizer.batch_decode([row[m > 0].tolist() for row, m in zip(ids, mask)],
                                           skip_special_tokens=True)
        else:
            texts = [None] * len(ids)
        return PromptBatch(ids, mask, [{"prompt": t} for t in texts], np.ones(len(ids), np.int32))
    if isinstance(prompts, (list, tuple)) and prompts:
        if tokenizer is None:
            raise AlgorithmInputError("rollout: prompts given as records or strings need tokenizer=")
        records = [{"prompt": p} if isinstance(p, str) else p for p in prompts]
        missing = [i for i, r in enumerate(records) if not isinstance(r, Mapping) or "prompt" not in r]
        if missing:
            raise AlgorithmInputError(f"rollout: prompt record {missing[0]} has no 'prompt' field (records are "
                                      "dicts {'prompt': ..., other fields go to the reward functions})")
        data = tokenize(records, tokenizer, "prompt", max_prompt_length=max_prompt_length)
        return collate_prompts(data.examples, pad_id=tokenizer.pad_token_id)
    raise AlgorithmInputError(f"rollout: prompts must be a PromptBatch, a (prompt_ids [B, P], prompt_mask [B, P]) "
                              f"tuple, or a non-empty list of records / strings; got {type(prompts).__name__}")


def rollout(model, params, prompts, rng, config=None, *, tokenizer=None, reward_funcs=None, reward_names=None,
            ref_params=None,
            ref_model=None, reward_model=None, reward_params=None, stop_token_ids=None, mesh=None,
            max_prompt_length=None, values_fn=None, value_params=None, host_score_fn=None,
            zero_std_over_batch: bool = False) -> Rollout:
    """Samples completions of ``prompts``, scores them, and returns the :class:`RolloutBatch` the update consumes.

    Args:
      model: the policy (``lm`` or ``lm+value``; sampling and log-probs use its LM head).
      params: the policy's params (placed however training placed them; sharded params stay sharded).
      prompts: a :class:`jrlhf.data.PromptBatch`; or ``(prompt_ids [B, P], prompt_mask [B, P])`` int arrays
        (left-padded); or a list of records (dicts with ``prompt`` plus fields the reward functions read, e.g.
        ``answer``) or of prompt strings, tokenised with ``tokenizer`` (its chat template when it has one).
      rng: a PRNG key (the same key and arguments give the same rollout).
      config: the sampling and reward settings: a :class:`RolloutConfig` or any algorithm config (``grpo.Config``
        ...): ``num_generations``, ``max_completion_length`` (``None``: 512, TRL), ``min_new_tokens``,
        ``temperature``, ``top_p``, ``top_k``, ``stop_token_ids``, ``mask_truncated_completions``,
        ``reward_funcs``, ``reward_weights``, ``logprob_chunk_size``. ``None``: the defaults.
      tokenizer: decodes the completions for the reward functions (required with reward functions or records).
      reward_funcs: reward functions overriding ``config.reward_funcs``: Python callables
        ``(prompts, completions, completion_ids, **record_fields) -> list[float | None]``, registered names or
        ``module:function`` paths (:func:`jrlhf.rewards.resolve_reward_funcs`). ``reward_names``: their metric
        names (default: the entry strings, else the functions' ``__name__``).
      ref_params: the reference's params: ``ref_logps`` is computed here when given (``None``: left out, for an
        update that computes it from ``frozen.ref_params``, or for no KL term). ``ref_model``: its model
        (default: ``model``).
      reward_model, reward_params: a score model (``head="score"``) and its params: one more reward source, after
        the reward functions (weights: ``config.reward_weights``).
      stop_token_ids: ids that end a completion (``None``: the tokenizer's EOS and ``config.stop_token_ids``).
      mesh: the mesh to run on (``None``: that of the params' shardings, else no sharding constraints).
      max_prompt_length: prompt truncation (keep the end) when tokenising records.
      values_fn: ``(value_params, input_ids, attention_mask, N) -> [R, N]`` old values (PPO), or ``None``;
        ``value_params`` default to ``params``.
      host_score_fn: ``(scores [R] np, truncated [R] np) -> scores`` applied on the host after the rewards
        (PPO's missing-EOS penalty); the metrics keep the unmodified scores.
      zero_std_over_batch: ``frac_reward_zero_std`` asks whether the whole batch's rewards have zero std.

    Returns:
      A :class:`Rollout` ``(batch, metrics, prompts, completions, scores, rewards)``.

    Raises:
      ConfigError: invalid sampling settings (the key named). AlgorithmInputError: prompts of a wrong form, no
      tokenizer, or no reward source. RewardError: a reward function raised, or returned NaN/inf or a non-number
      (the message shows the sample).
    """
    from jrlhf.rewards import resolve_reward_funcs

    config = RolloutConfig() if config is None else config
    n_tokens = DEFAULT_MAX_COMPLETION_LENGTH if config.max_completion_length is None else config.max_completion_length
    check_rollout_settings(config, max_completion_length=n_tokens)
    funcs, names = resolve_reward_funcs(config.reward_funcs if reward_funcs is None else reward_funcs)
    if reward_names is not None:
        names = list(reward_names)
    if not funcs and reward_params is None:
        raise AlgorithmInputError("rollout: no reward source: pass reward_funcs (Python callables, registered names "
                                  "or module:function paths) or set config.reward_funcs, and/or reward_model + "
                                  "reward_params")
    if funcs and tokenizer is None:
        raise AlgorithmInputError("rollout: reward functions read decoded completions: pass tokenizer=")
    sources = len(funcs) + (1 if reward_params is not None else 0)
    weights = (np.ones(sources, np.float32) if config.reward_weights is None
               else np.asarray(config.reward_weights, np.float32))
    if weights.shape != (sources,):
        raise ConfigError(f"reward_weights has {weights.size} entries for {sources} reward source(s) (the "
                          "reward_funcs in order, then the reward model)")
    if stop_token_ids is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        stop_token_ids = tuple(dict.fromkeys(([eos] if eos is not None else []) + list(config.stop_token_ids)))
    if mesh is None:
        mesh = sampling._mesh_of(params)
    n_gen = int(config.num_generations)
    temperature = float(config.temperature)
    prompt_batch = _prompt_batch(prompts, tokenizer, max_prompt_length)
    lm = lm_view(model)

    prompt_ids, prompt_mask = _global_prompts(prompt_batch, mesh)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    sample = sampling.generate(lm, params, prompt_ids, prompt_mask, rng, max_new_tokens=int(n_tokens),
                               num_samples=n_gen, min_new_tokens=int(config.min_new_tokens),
                               temperature=temperature, top_k=int(config.top_k), top_p=float(config.top_p),
                               eos_token_id=tuple(stop_token_ids), pad_token_id=0 if pad_id is None else int(pad_id),
                               mesh=mesh)
    rows = sample.tokens.shape[0]
    spec = _ForwardSpec(n_gen=n_gen, n_tokens=int(n_tokens), temperature=temperature,
                        chunk_size=config.logprob_chunk_size,
                        mask_truncated=bool(config.mask_truncated_completions),
                        ref_model=_Key(lm_view(ref_model) if ref_model is not None else lm),
                        reward_model=_Key(reward_model), values_fn=_Key(values_fn), mesh=_Key(mesh),
                        policy_model=_Key(lm), correction=correction_of(config),
                        mismatch=bool(getattr(config, "log_rollout_mismatch", False)))
    device, rm_scores, trainer_logps, sampling_metrics = _forward_jit(
        spec, params, params if value_params is None else value_params, ref_params, reward_params, prompt_ids,
        prompt_mask, sample.tokens, sample.mask, sample.truncated, sample.logps)
    host = distributed.process_allgather({"tokens": sample.tokens, "mask": sample.mask, "truncated": sample.truncated,
                                          **({"rm": rm_scores} if rm_scores is not None else {})})
    local = _local_rows(mesh, prompt_batch, n_gen, rows)
    tokens, mask, truncated = host["tokens"][local], host["mask"][local], host["truncated"][local]

    records = [r for r in prompt_batch.records for _ in range(n_gen)]
    prompt_texts = [r.get("prompt") for r in records]
    completion_ids = [[int(t) for t, m in zip(row, mrow) if m] for row, mrow in zip(tokens, mask)]
    completions = (tokenizer.batch_decode(completion_ids, skip_special_tokens=True) if tokenizer is not None
                   else [None] * len(completion_ids))
    rewards = RewardSources(funcs=funcs, names=names, weights=weights, model=reward_model, params=reward_params)
    rm_weight = float(weights[-1]) if reward_params is not None else 0.0
    scores, per_source = _score(rewards, weights[: len(funcs)], rm_weight, prompt_texts, completions, completion_ids,
                                records, None if rm_scores is None else host["rm"][local])
    logged_scores = scores.copy()
    if host_score_fn is not None:
        scores = np.asarray(host_score_fn(scores, truncated), np.float32)
    device["scores"] = _global_rows(scores, mesh, rows)
    metrics = _rollout_metrics(logged_scores, per_source, mask, truncated, n_gen, prompt_batch, zero_std_over_batch)
    metrics.update({k: float(v) for k, v in jax.device_get(sampling_metrics).items()})
    return Rollout(batch=RolloutBatch(**device), metrics=metrics, prompts=prompt_texts, completions=completions,
                   scores=logged_scores, rewards=per_source, trainer_logps=trainer_logps, sampler_logps=sample.logps)


def groups_with_signal(scores: np.ndarray, group_size: int) -> np.ndarray:
    """``[R / group_size]`` bool: the groups whose rewards can give a non-zero group-relative advantage (at least
    two scorable rewards and a non-zero std; DAPO's dynamic-sampling filter, verl's ``filter_groups`` on the
    sequence score)."""
    grouped = np.asarray(scores, np.float64).reshape(-1, group_size)
    out = np.zeros(grouped.shape[0], bool)
    for i, row in enumerate(grouped):
        row = row[~np.isnan(row)]
        out[i] = row.size > 1 and not np.isclose(np.std(row, ddof=1), 0.0)
    return out


_ROW_FIELDS = tuple(_FIELD_ORDER)
_WIDE_FIELDS = ("input_ids", "attention_mask", "loss_mask")  # [R, P + N]: left-padded to a common P


def dynamic_rollout(model, params, prompts, rng, config, *, next_prompts: Callable, **kwargs) -> Rollout:
    """DAPO's dynamic sampling (arXiv 2503.14476, Sec. 3.2) over :func:`rollout`: generates a prompt batch of ``B``
    prompts, drops the groups with no reward signal (:func:`groups_with_signal`), and generates further prompt
    batches (``next_prompts()``) until ``B`` groups with signal are collected or ``config.max_num_gen_batches``
    rounds were run. Extra groups of the last round are discarded (as verl does); slots still empty after the last
    round are filled with dropped groups whose scores are set to NaN, so they carry no loss and enter no count
    (:func:`drop_unscorable`) and the batch keeps its shape (no recompilation). Prompt widths that differ between
    rounds are left-padded to the widest (positions come from the attention mask, so the logits are unchanged).

    Args:
      model, params, prompts, rng, config, kwargs: as for :func:`rollout` (``config.dynamic_sampling`` is not read).
      next_prompts: ``() -> prompts`` of the next batch (``B`` prompts, any form :func:`rollout` takes).

    Returns:
      A :class:`Rollout` of ``B x num_generations`` rows. Its metrics are those of the assembled batch plus
      ``dynamic_sampling/gen_rounds`` (generation rounds run), ``dynamic_sampling/groups_dropped`` (groups without
      signal, all rounds), ``dynamic_sampling/groups_filled`` (slots filled with a no-loss group) and
      ``frac_reward_zero_std`` of the first round (before filtering); ``_num_tokens`` counts every round's tokens.

    Raises:
      ConfigError: ``num_generations < 2``, ``max_num_gen_batches < 1``, or several processes (not supported).
    """
    n_gen = int(config.num_generations)
    limit = int(config.max_num_gen_batches)
    if n_gen < 2:
        raise ConfigError(f"dynamic sampling needs groups: num_generations={n_gen} (>= 2)")
    if limit < 1:
        raise ConfigError(f"max_num_gen_batches={limit}: must be >= 1")
    if jax.process_count() > 1:
        raise ConfigError("algo.dynamic_sampling is not supported on several processes yet (set it to false)")
    rounds, kept, dropped, first = [], [], [], None
    groups_needed = None
    tokens = 0
    while True:
        batch_prompts = prompts if not rounds else next_prompts()
        out = rollout(model, params, batch_prompts, jax.random.fold_in(rng, len(rounds)), config, **kwargs)
        index = len(rounds)
        rounds.append(out)
        tokens += int(out.metrics["_num_tokens"])
        if first is None:
            first = out.metrics
            groups_needed = out.scores.shape[0] // n_gen
        signal = groups_with_signal(out.scores, n_gen)
        kept += [(index, g) for g in np.flatnonzero(signal)]
        dropped += [(index, g) for g in np.flatnonzero(~signal)]
        if len(kept) >= groups_needed or len(rounds) >= limit:
            break
    chosen = [(i, g, False) for i, g in kept[:groups_needed]]
    filled = groups_needed - len(chosen)
    chosen += [(i, g, True) for i, g in dropped[:filled]]

    host = [{name: np.asarray(jax.device_get(value)) for name, value in out.batch.items()} for out in rounds]
    with_trainer = rounds[0].trainer_logps is not None
    for part, out in zip(host, rounds):
        if with_trainer:
            part["_trainer_logps"] = np.asarray(jax.device_get(out.trainer_logps))
        part["_sampler_logps"] = np.asarray(jax.device_get(out.sampler_logps))
    width = max(part["input_ids"].shape[1] for part in host)
    for part in host:
        pad = width - part["input_ids"].shape[1]
        if pad:
            for name in _WIDE_FIELDS:
                part[name] = np.pad(part[name], ((0, 0), (pad, 0)))
    rows = {name: [] for name in host[0]}
    prompts_out, completions, scores, rewards = [], [], [], {k: [] for k in rounds[0].rewards}
    for i, g, no_loss in chosen:
        sl = slice(g * n_gen, (g + 1) * n_gen)
        for name in rows:
            value = host[i][name][sl]
            if name == "scores" and no_loss:
                value = np.full_like(value, np.nan)
            rows[name].append(value)
        prompts_out += rounds[i].prompts[sl]
        completions += rounds[i].completions[sl]
        scores.append(rounds[i].scores[sl] if not no_loss else np.full(n_gen, np.nan, np.float32))
        for k in rewards:
            rewards[k].append(rounds[i].rewards[k][sl])
    arrays = {name: np.concatenate(values) for name, values in rows.items()}
    trainer_logps, sampler_logps = arrays.pop("_trainer_logps", None), arrays.pop("_sampler_logps")
    mesh = kwargs.get("mesh") or sampling._mesh_of(params)
    total = arrays["scores"].shape[0]

    def place(x):
        return jnp.asarray(x) if mesh is None else put_global(x, _batch_constraint(mesh, total))

    device = {name: place(value) for name, value in arrays.items()}
    scores = np.concatenate(scores)
    rewards = {k: np.concatenate(v) for k, v in rewards.items()}
    n = arrays["old_logps"].shape[1]
    completion_mask = arrays["attention_mask"][:, -n:]
    metrics = _rollout_metrics(scores, rewards, completion_mask, arrays["truncated"], n_gen, None)
    trained = arrays["loss_mask"][:, -n:] > 0
    if trainer_logps is not None:
        sampling_metrics = mismatch_metrics(jnp.asarray(trainer_logps), jnp.asarray(sampler_logps),
                                            jnp.asarray(trained), correction_of(config))
        metrics.update({k: float(v) for k, v in jax.device_get(sampling_metrics).items()})
    metrics["_num_tokens"] = tokens
    metrics["frac_reward_zero_std"] = first.get("frac_reward_zero_std", 0.0)
    metrics["dynamic_sampling/gen_rounds"] = float(len(rounds))
    metrics["dynamic_sampling/groups_dropped"] = float(len(dropped))
    metrics["dynamic_sampling/groups_filled"] = float(filled)
    return Rollout(batch=RolloutBatch(**device), metrics=metrics, prompts=prompts_out, completions=completions,
                   scores=scores, rewards=rewards,
                   trainer_logps=None if trainer_logps is None else place(trainer_logps),
                   sampler_logps=place(sampler_logps))


@dataclasses.dataclass
class Collector:
    """What :func:`make_collect` needs to know about one algorithm.

    Attributes:
      policy_params: ``state.params -> the policy's params`` (identity unless the trained params also hold a
        separate critic).
      need_ref: the algorithm uses a reference (its ``ref_logps`` come from ``frozen.ref_params``: in the rollout
        with ``reference_logps: rollout``, else inside the update).
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
    """Builds the loop's ``collect(state, prompt_batch, frozen, rng) -> (RolloutBatch, host metrics, samples
    text)``: :func:`rollout` with the run's model, mesh, tokenizer, stop ids and reward sources.

    Generation and every forward pass run on the mesh of the sharded params (nothing is gathered to one device);
    only the completion tokens (and the reward model's scores) come to the host, for the reward functions.

    Raises (from ``collect``):
      RewardError: a reward function raised, or returned NaN/inf or a non-number; the message shows the sample.
    """
    algo = run.cfg.algo
    if getattr(algo, "env", None) is not None:
        from jrlhf.algorithms.multiturn import make_env_collect

        return make_env_collect(run, collector)
    config = dataclasses.replace(algo, max_completion_length=completion_length(run))
    stop_ids = run_stop_token_ids(run, algo.stop_token_ids)
    ref_in_rollout = collector.need_ref and algo.reference_logps == "rollout"
    if collector.need_ref:
        check_lora_reference(run.model, algo, run.cfg.algorithm)

    def collect(state, prompt_batch, frozen, rng, next_prompts=None):
        if config.dynamic_sampling:
            if next_prompts is None:
                raise AlgorithmInputError("algo.dynamic_sampling: collect needs next_prompts (the loop passes it)")
            sample_fn = functools.partial(dynamic_rollout, next_prompts=next_prompts)
        else:
            sample_fn = rollout
        policy = collector.policy_params(state.params)
        ref_model, ref_params = reference_for(run.model, policy,
                                              frozen.ref_params if ref_in_rollout and frozen is not None else None)
        out = sample_fn(run.model, policy, prompt_batch, rng, config,
                      tokenizer=run.tokenizer, reward_funcs=rewards.funcs, reward_names=rewards.names,
                      ref_params=ref_params if ref_in_rollout else None, ref_model=ref_model,
                      reward_model=rewards.model, reward_params=None if frozen is None else frozen.reward_params,
                      stop_token_ids=stop_ids, mesh=run.mesh, values_fn=collector.values_fn,
                      value_params=state.params, host_score_fn=collector.host_score_fn,
                      zero_std_over_batch=collector.zero_std_over_batch)
        samples = _samples_text(out.prompts, out.completions, out.scores, int(algo.num_completions_to_print))
        return out.batch, out.metrics, samples

    return collect


def snapshot_params(params):
    """A device copy of ``params`` (same shardings, dispatched asynchronously) that an update donating the train
    state's buffers cannot invalidate: what a rollout running beside the update reads."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), params)


class _Pending(NamedTuple):
    behaviour_step: int
    params: Any
    future: Any


class AsyncRollouts:
    """Off-policy rollouts made ahead of the update in one background thread (``algo.max_staleness``).

    The rollout trained at step ``k`` is made with the params of step ``max(0, k - max_staleness)``: at step ``k``
    :meth:`fill` snapshots the current params (:func:`snapshot_params`, before the update donates them) and submits
    the rollouts of steps up to ``k + max_staleness``; :meth:`take` then waits for the rollout of step ``k``. While
    the worker decodes, scores (host reward functions) and detokenises rollout ``k + 1``, the main thread's update of
    step ``k`` runs (JAX dispatch is asynchronous and the worker's host work releases the GIL around device waits).
    Rollouts run one at a time, in step order, so each is a pure function of (its behaviour params, its prompts, its
    rng): the same numbers as a synchronous rollout with those params (bit for bit on one backend).

    ``rollout_fn(params, *args)`` is called in the worker thread with the snapshot; ``args`` are made in the calling
    thread by ``make_args(step)`` (draw the prompts there, so the data order is the synchronous loop's). With
    ``max_staleness = 0`` everything runs in the calling thread, in order (the synchronous loop).

    Use by hand (``algo = grpo.make(...)``)::

        pipe = AsyncRollouts(lambda params, prompts, rng: algo.rollout(params, prompts, rng, tokenizer=tok),
                             max_staleness=1, num_steps=steps)
        for step in range(steps):
            pipe.fill(step, state.params, lambda j: (next(batches), jax.random.fold_in(rng, j)))
            out, behaviour_step = pipe.take(step)       # out.batch.old_logps: the behaviour policy's log-probs
            state, metrics = update(state, out.batch, frozen)
        pipe.close()

    Checkpointing (what ``jrlhf train`` does): :meth:`pending` lists the submitted rollouts not yet taken with
    their behaviour params; saving those params with the train state and calling :meth:`submit` for each on resume
    (prompts re-drawn from the data position before them) regenerates them exactly.
    """

    def __init__(self, rollout_fn: Callable, max_staleness: int, num_steps: int | None = None):
        import concurrent.futures

        if isinstance(max_staleness, bool) or not isinstance(max_staleness, int) or max_staleness < 0:
            raise ConfigError(f"max_staleness={max_staleness!r}: must be an int >= 0")
        self.rollout_fn = rollout_fn
        self.max_staleness = max_staleness
        self.num_steps = num_steps
        self._pending: dict[int, _Pending] = {}
        self._next = 0  # the next step to submit
        self._executor = (concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jrlhf-rollout")
                          if max_staleness > 0 else None)

    def submit(self, step: int, params, *args, behaviour_step: int | None = None) -> None:
        """Starts the rollout of ``step`` with (a snapshot of) ``params``, the params of ``behaviour_step``."""
        if step in self._pending:
            raise ValueError(f"AsyncRollouts: the rollout of step {step} is already submitted")
        snapshot = snapshot_params(params) if self._executor is not None else params
        self._submit(step, snapshot, args, step if behaviour_step is None else behaviour_step)

    def _submit(self, step, snapshot, args, behaviour_step):
        import concurrent.futures

        if self._executor is None:
            future = concurrent.futures.Future()
            try:
                future.set_result(self.rollout_fn(snapshot, *args))
            except BaseException as error:  # noqa: BLE001 - re-raised by take()
                future.set_exception(error)
        else:
            future = self._executor.submit(self.rollout_fn, snapshot, *args)
        self._pending[step] = _Pending(int(behaviour_step), snapshot, future)
        self._next = max(self._next, step + 1)

    def fill(self, step: int, params, make_args: Callable) -> None:
        """Submits the rollouts of steps ``next .. step + max_staleness`` (not past ``num_steps - 1``) with the
        current ``params`` (one snapshot shared by all of them), the params of ``step``."""
        last = step + self.max_staleness
        if self.num_steps is not None:
            last = min(last, self.num_steps - 1)
        todo = list(range(max(self._next, step), last + 1))
        if not todo:
            return
        snapshot = snapshot_params(params) if self._executor is not None else params
        for j in todo:
            self._submit(j, snapshot, make_args(j), step)

    def take(self, step: int):
        """``(result of rollout_fn, behaviour step)`` of ``step`` (waits for it; re-raises its exception)."""
        if step not in self._pending:
            raise ValueError(f"AsyncRollouts: no rollout submitted for step {step} (call fill first)")
        pending = self._pending.pop(step)
        return pending.future.result(), pending.behaviour_step

    def pending(self) -> list:
        """``[(step, behaviour_step, params)]`` of the submitted rollouts not taken yet, in step order."""
        return [(j, p.behaviour_step, p.params) for j, p in sorted(self._pending.items())]

    def close(self) -> None:
        """Drops the rollouts not taken (a running one is finished first; queued ones are cancelled)."""
        for pending in self._pending.values():
            pending.future.cancel()
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _global_prompts(prompt_batch, mesh):
    """The prompt arrays as global arrays on the mesh (batch-sharded when the batch divides the batch axes)."""
    ids, mask = np.asarray(prompt_batch.prompt_ids), np.asarray(prompt_batch.prompt_mask)
    if mesh is None:
        return jnp.asarray(ids), jnp.asarray(mask)
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
    if mesh is None:
        return jnp.asarray(values)
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
    prompt_tokens = 0 if prompt_batch is None else int(np.sum(prompt_batch.prompt_mask)) * n_gen
    metrics["_num_tokens"] = prompt_tokens + int(lengths.sum())
    return metrics


def _samples_text(prompts, completions, scores, count: int) -> str:
    lines = []
    for prompt, completion, score in list(zip(prompts, completions, scores))[: max(count, 0)]:
        lines.append(f"{prompt!r} -> {completion!r}  reward={score:.4g}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ evaluation


def make_evaluate(run, policy_params: Callable = lambda params: params, reward_model=None):
    """Held-out exact match of greedy completions of ``data.eval_prompts`` (``data.max_eval_examples`` of them)
    scored by ``data.eval_reward``; ``None`` without eval prompts. With ``reward_model`` (the run's learned reward
    model, its params in ``frozen.reward_params``) also ``reward_model``: its mean score of the same completions,
    the held-out proxy signal (:func:`jrlhf.evaluation.reward_model_scorer`; e.g. ``train.metric_for_best_model:
    reward_model``)."""
    from jrlhf.algorithms.base import generation_eval, load_eval_records
    from jrlhf.evaluation import reward_model_scorer

    cfg = run.cfg
    if getattr(cfg.algo, "env", None) is not None:
        from jrlhf.algorithms.multiturn import make_env_evaluate

        return make_env_evaluate(run, policy_params)
    if not cfg.data.eval_prompts:
        return None
    records = load_eval_records(cfg.data.eval_prompts, cfg.data.max_eval_examples, key="data.eval_prompts")
    inner = generation_eval(run, records, model=lm_view(run.model), stop_token_ids=run.cfg.algo.stop_token_ids)
    scorers = {}

    def evaluate(params, frozen):
        extra = ()
        if reward_model is not None and frozen is not None and frozen.reward_params is not None:
            if "rm" not in scorers:
                scorers["rm"] = reward_model_scorer(reward_model, frozen.reward_params, run.tokenizer,
                                                    batch_size=cfg.data.eval_batch_size,
                                                    max_tokens=cfg.data.eval_max_tokens)
            extra = (scorers["rm"],)
        return inner(policy_params(params), frozen, scorers=extra)

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


# ------------------------------------------------------------------------------------------------ the contract


@dataclasses.dataclass(frozen=True)
class OnPolicyAlgorithm(Algorithm):
    """An on-policy algorithm as plain functions (``grpo.make(model, config)`` ...): the
    :class:`jrlhf.algorithms.base.Algorithm` fields (``loss_fn``, ``prepare_batch``, ``batch_fields`` = the
    :class:`RolloutBatch` fields it reads, ``frozen_type`` = :class:`Frozen`, ``init_frozen``...) plus the rollout
    settings and the shape of the update. One iteration composed by hand::

        algo = grpo.make(model, grpo.Config(num_generations=4, beta=0.04, reward_funcs=(my_reward,)))
        state, shardings = init_train_state(params, optimizer, rng, mesh=mesh, param_specs=logical_axes(model))
        frozen = algo.init_frozen(state.params)                   # Frozen(ref_params=<copy>) when beta > 0
        update = algo.update(optimizer, mesh, state_shardings=shardings)
        out = algo.rollout(state.params, records, rollout_rng, tokenizer=tokenizer, frozen=frozen)
        state, metrics = update(state, out.batch, frozen)

    Attributes (besides :class:`Algorithm`'s):
      config: the algorithm's config (also the rollout settings of :func:`rollout`).
      model: the trained model.
      num_epochs: passes over each rollout batch (GRPO's ``num_iterations``, PPO's ``ppo_epochs``).
      num_minibatches: optimizer steps per pass (``steps_per_generation`` / ``num_mini_batches``).
      uses_reference: whether the loss reads ``ref_logps`` (then ``init_frozen`` holds ``ref_params``).
      values_fn: ``(params, input_ids, attention_mask, N) -> [R, N]`` old values the rollout computes (PPO).
      policy_params: ``params -> the policy's params`` (PPO with a separate critic trains ``{"policy", "critic"}``).
      host_score_fn: host-side score transform applied by the rollout (PPO's ``missing_eos_penalty``).
    """

    config: Any = None
    model: Any = None
    num_epochs: int = 1
    num_minibatches: int = 1
    uses_reference: bool = False
    values_fn: Callable | None = None
    policy_params: Callable = lambda params: params
    host_score_fn: Callable | None = None

    def rollout(self, params, prompts, rng, *, tokenizer=None, frozen=None, next_prompts=None,
                **kwargs) -> Rollout:
        """:func:`rollout` with this algorithm's model and settings: ``params`` are the trained params
        (``state.params``), ``frozen`` (``init_frozen(params)``) supplies the reference (computed here with
        ``config.reference_logps: rollout``) and the reward model's params; ``kwargs`` go to :func:`rollout`.
        With ``config.dynamic_sampling`` it is :func:`dynamic_rollout` and ``next_prompts`` (``() -> the next
        prompt batch``) is required."""
        ref, ref_model = None, None
        if self.uses_reference and self.config.reference_logps == "rollout" and has_adapters(self.model):
            ref_model, ref = reference_for(self.model, self.policy_params(params), None)
        elif self.uses_reference and self.config.reference_logps == "rollout":
            if frozen is None or frozen.ref_params is None:
                raise AlgorithmInputError(f"{self.name}: the rollout computes ref_logps from frozen.ref_params "
                                          "(reference_logps='rollout'): pass frozen=algorithm.init_frozen(params)")
            ref = frozen.ref_params
        if getattr(self.config, "env", None) is not None or "env" in kwargs:
            from jrlhf.algorithms.multiturn import multiturn_rollout

            if self.values_fn is not None:
                raise AlgorithmInputError(f"{self.name}: multi-turn rollouts are not supported yet (grpo, rloo "
                                          "and reinforce_pp are)")
            kwargs.setdefault("ref_model", ref_model)
            return multiturn_rollout(self.model, self.policy_params(params), prompts, rng, self.config,
                                     tokenizer=tokenizer, ref_params=ref, host_score_fn=self.host_score_fn, **kwargs)
        kwargs.setdefault("reward_params", None if frozen is None else frozen.reward_params)
        kwargs.setdefault("ref_model", ref_model)
        sample_fn = rollout
        if getattr(self.config, "dynamic_sampling", False):
            if next_prompts is None:
                raise AlgorithmInputError(f"{self.name}: dynamic_sampling needs next_prompts= (a callable giving the "
                                          "next prompt batch, for the extra generation rounds)")
            sample_fn = functools.partial(dynamic_rollout, next_prompts=next_prompts)
        return sample_fn(self.model, self.policy_params(params), prompts, rng, self.config, tokenizer=tokenizer,
                       ref_params=ref, values_fn=self.values_fn, value_params=params,
                       host_score_fn=self.host_score_fn, **kwargs)

    def update(self, optimizer, mesh, *, state_shardings, **kwargs):
        """:func:`jrlhf.step.make_onpolicy_update` of this algorithm: ``update(state, RolloutBatch, frozen) ->
        (state, metrics)``; ``kwargs`` go to it unchanged (``num_microbatches``, ``shuffle``, ...)."""
        from jrlhf.step import make_onpolicy_update

        return make_onpolicy_update(self.loss_fn, optimizer, mesh, state_shardings=state_shardings,
                                    num_epochs=self.num_epochs, num_minibatches=self.num_minibatches,
                                    prepare_batch=self.prepare_batch, update_algo_state=self.update_algo_state,
                                    **kwargs)


def make_algorithm(name: str, model, config, *, loss_fn, prepare_batch, uses_reference: bool, num_epochs: int,
                   num_minibatches: int, **extra) -> OnPolicyAlgorithm:
    """The :class:`OnPolicyAlgorithm` of one algorithm module's ``make`` (the shared fields filled in)."""
    reads = dict(ROLLOUT_FIELDS)
    reads.pop("truncated")
    optional = {"ref_logps": OPTIONAL_ROLLOUT_FIELDS["ref_logps"]} if uses_reference else {}
    if extra.get("values_fn") is not None:
        reads["old_values"] = OPTIONAL_ROLLOUT_FIELDS["old_values"]
    if correction_of(config)[0]:
        if name != "grpo":
            raise ConfigError(f"algo.vllm_importance_sampling_correction: {name} does not apply the correction yet "
                              "(grpo does); the sampling/* mismatch metrics are logged without it")
        reads["sampler_logps"] = OPTIONAL_ROLLOUT_FIELDS["sampler_logps"]
    policy_params = extra.get("policy_params") or (lambda params: params)
    inner_prepare = prepare_batch
    if uses_reference:
        check_lora_reference(model, config, name)
    # LoRA: the reference is the base model on the policy params (reference_for): nothing to hold in frozen
    holds_ref = uses_reference and not has_adapters(model)

    def prepare_batch(batch, frozen, algo_state):
        """The algorithm's ``prepare_batch`` after checking that the rollout batch has the fields it reads."""
        check_fields(name, batch, reads)
        return inner_prepare(batch, frozen, algo_state)

    def init_frozen(params):
        """``Frozen(ref_params=<a copy of the policy part of params>)`` when the loss uses a reference, else
        ``None``. Pass the placed train state's params (``state.params``): the copy keeps their sharding and never
        aliases the donated state."""
        if not holds_ref:
            return None
        return Frozen(ref_params=jax.tree.map(lambda x: jnp.array(x, copy=True), policy_params(params)))

    return OnPolicyAlgorithm(
        name=name, loss_fn=loss_fn, batch_fields=reads, optional_batch_fields=optional, prepare_batch=prepare_batch,
        frozen_type=Frozen if holds_ref else None, init_frozen=init_frozen,
        frozen_specs=Frozen(ref_params=logical_axes(model)) if holds_ref else None,
        config=config, model=model, num_epochs=int(num_epochs), num_minibatches=int(num_minibatches),
        uses_reference=uses_reference, **extra)
