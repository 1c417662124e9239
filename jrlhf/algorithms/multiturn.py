"""Multi-turn, tool-using rollouts: episodes against an environment (:mod:`jrlhf.envs`), token-in/token-out.

:func:`multiturn_rollout` plays ``B x num_generations`` episodes at once and returns the same
:class:`jrlhf.algorithms.onpolicy.RolloutBatch` as the single-turn :func:`jrlhf.algorithms.onpolicy.rollout`, so
GRPO, RLOO and REINFORCE++ train on it unchanged (``algo.env`` switches their rollout to this one):

* **Token-in/token-out.** An episode is one token sequence: the prompt (the first observation rendered with the
  chat template and its generation prompt), then for each turn the *sampled* assistant tokens (up to and with the
  stop token) followed by the template-rendered tokens of the next observation turn (:class:`TurnRenderer`). Earlier
  turns are never re-tokenised: the policy is trained on exactly the ids it sampled and was conditioned on.
* **Loss mask.** In the ``[R, P + N]`` batch, the completion region ``N = max_episode_tokens`` holds every turn of
  the episode after the prompt; ``loss_mask`` is 1 only on assistant tokens (observation tokens and padding: 0) and
  ``old_logps [R, N]`` holds the sampler's log-probs at assistant tokens (0 elsewhere), so the environment's tokens
  carry no loss and no gradient, and every count the losses divide by counts assistant tokens only.
* **Rewards.** Each ``env.step`` returns that turn's reward; the episode's score is their sum (per-turn rewards
  are kept in :attr:`Episodes.turn_rewards`).
* **Limits.** ``max_turns`` assistant turns and ``max_episode_tokens`` tokens after the prompt (assistant and
  observation tokens together); each assistant turn is at most ``max_completion_length`` tokens. An episode cut by
  either limit, or whose turn hit ``max_completion_length`` without a stop token, ends with ``truncated = 1`` and the
  rewards earned so far (``mask_truncated_completions`` then drops its loss).

**Compiled shapes.** The environments run on the host between calls of the compiled sampler
(:func:`jrlhf.sampling.generate`); each turn prefills the episodes still running (prompt + all earlier turns,
left-padded) and decodes their next turn. The number of rows and the context width are rounded up to powers of two
(rows at most the next power of two of ``R``; width at least 16), so a run compiles a handful of sampler programs,
not one per turn. Each turn re-prefills the whole context (no KV cache is carried across turns).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jrlhf import sampling
from jrlhf.algorithms import onpolicy
from jrlhf.algorithms.base import AlgorithmInputError
from jrlhf.config import ConfigError
from jrlhf.envs import EnvError, make_env_factory
from jrlhf.sharding import put_global

__all__ = ["TurnRenderer", "Episodes", "run_episodes", "multiturn_rollout", "episode_budget", "check_env_settings"]

_SENTINEL = "\u2063jrlhf-turn\u2063"


def episode_budget(config) -> int:
    """``N``: ``config.max_episode_tokens``, else ``2 * max_turns * max_completion_length`` (room for as many
    observation tokens as assistant tokens)."""
    if getattr(config, "max_episode_tokens", None) is not None:
        return int(config.max_episode_tokens)
    per_turn = onpolicy.DEFAULT_MAX_COMPLETION_LENGTH if config.max_completion_length is None \
        else int(config.max_completion_length)
    return 2 * int(config.max_turns) * per_turn


def check_env_settings(config, algorithm: str = "this algorithm") -> None:
    """Rejects multi-turn settings that cannot work (:class:`jrlhf.config.ConfigError` naming the key)."""
    if not isinstance(config.max_turns, int) or config.max_turns < 1:
        raise ConfigError(f"algo.max_turns={config.max_turns!r}: must be an int >= 1 (assistant turns per episode)")
    budget = config.max_episode_tokens
    if budget is not None and (not isinstance(budget, int) or budget < 1):
        raise ConfigError(f"algo.max_episode_tokens={budget!r}: must be an int >= 1 (tokens after the prompt)")
    if config.env_args is not None and not isinstance(config.env_args, Mapping):
        raise ConfigError(f"algo.env_args={config.env_args!r}: must be a mapping of keyword arguments")
    if config.dynamic_sampling:
        raise ConfigError("algo.dynamic_sampling is not supported with algo.env yet (set it to false)")
    if onpolicy.correction_of(config)[0] or getattr(config, "log_rollout_mismatch", False):
        raise ConfigError("algo.vllm_importance_sampling_correction / log_rollout_mismatch are not supported with "
                          "algo.env yet (set them to false)")
    if config.reward_funcs or config.reward_model:
        raise ConfigError(f"{algorithm} with algo.env: the environment gives the rewards; leave algo.reward_funcs "
                          "and algo.reward_model empty")


# ------------------------------------------------------------------------------------------------ rendering


class TurnRenderer:
    """Token ids of observation turns, rendered with the tokenizer's chat template without re-tokenising what came
    before.

    * :meth:`first`: the first observation: messages -> ``apply_chat_template(messages, add_generation_prompt=True)``
      tokenised as one text without added special tokens (the template writes BOS), exactly as jrlhf tokenises chat
      prompts; a string is tokenised as it is (with the tokenizer's special tokens, e.g. BOS).
    * :meth:`turn`: a later observation, appended after an assistant turn that ended with ``stop_token``: the text
      the template puts after an assistant message (``<|im_end|>\\n``, ``<|eos|>``, ...) minus the stop token the
      policy sampled, then the observation messages and the generation prompt. That text is the difference of the
      template rendered on a fixed conversation with and without the observation (``user`` ``x``, ``assistant``
      ``<sentinel>``), tokenised on its own; a string observation is tokenised as it is, without special tokens.

    Raises:
      EnvError: the template is not prefix-stable for appended turns (rendering with the observation does not
      extend the rendering without it), or the observation is neither messages nor a string.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self._bridges: dict[int, str] = {}
        if self.has_template:
            base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}]
            self._base = base
            rendered = self._render(base, False)
            at = rendered.rfind(_SENTINEL)
            if at < 0:
                raise EnvError("the chat template drops the assistant's content from the conversation; multi-turn "
                               "rollouts need a template that keeps earlier assistant turns")
            self._base_text = rendered
            self._tail = rendered[at + len(_SENTINEL):]  # what follows an assistant message's content

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _encode(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    @staticmethod
    def _check(observation):
        if isinstance(observation, str):
            return
        if (not isinstance(observation, (list, tuple)) or not observation
                or not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in observation)):
            raise EnvError(f"an environment returned the observation {observation!r}: expected a string or a "
                           "non-empty list of {'role', 'content'} messages")

    def first(self, observation) -> list[int]:
        """Token ids of the episode's prompt."""
        self._check(observation)
        if isinstance(observation, str):
            return self._encode(observation, True)
        if not self.has_template:
            raise EnvError("the environment returned chat messages but the tokenizer has no chat template; return a "
                           "string, or set data.tokenizer to one with a template")
        return self._encode(self._render(list(observation), True), False)

    def turn(self, observation, stop_token: int | None) -> list[int]:
        """Token ids appended after an assistant turn whose last sampled token is ``stop_token``."""
        self._check(observation)
        if isinstance(observation, str):
            return self._encode(observation, False)
        if not self.has_template:
            raise EnvError("the environment returned chat messages but the tokenizer has no chat template")
        full = self._render(self._base + list(observation), True)
        if not full.startswith(self._base_text):
            raise EnvError("the chat template re-renders earlier turns when a turn is appended (not prefix-stable); "
                           "token-in/token-out multi-turn rollouts cannot append observations to it")
        return self._encode(self._bridge(stop_token) + full[len(self._base_text):], False)

    def _bridge(self, stop_token: int | None) -> str:
        """The template's text after an assistant message's content, less the stop token the policy sampled."""
        key = -1 if stop_token is None else int(stop_token)
        if key not in self._bridges:
            text = "" if stop_token is None else self.tokenizer.decode([int(stop_token)])
            self._bridges[key] = self._tail[len(text):] if text and self._tail.startswith(text) else self._tail
        return self._bridges[key]


# ------------------------------------------------------------------------------------------------ episodes


@dataclasses.dataclass
class Episodes:
    """Host-side record of a batch of finished episodes (row ``r`` = episode ``r``).

    Attributes:
      prompt_ids: per episode, the prompt's token ids (the rendered first observation).
      tokens: per episode, the token ids after the prompt: assistant and observation turns in order.
      assistant_mask: per episode, 1 at sampled assistant tokens, 0 at observation tokens (same length as ``tokens``).
      logps: per episode, the sampler's log-prob of each token (0 at observation tokens).
      turn_rewards: per episode, the reward of each ``env.step`` (one per assistant turn that reached the env).
      turn_spans: per episode, ``(start, end)`` of each assistant turn in ``tokens``.
      truncated: ``[R]`` bool: the episode was cut by ``max_turns``, ``max_episode_tokens`` or a turn without a stop
        token, not ended by the environment.
      end_reason: per episode, ``done`` / ``max_turns`` / ``max_episode_tokens`` / ``max_completion_length``.
      metrics: per episode, ``env.episode_metrics()`` (empty without that method).
    """

    prompt_ids: list
    tokens: list
    assistant_mask: list
    logps: list
    turn_rewards: list
    turn_spans: list
    truncated: np.ndarray
    end_reason: list
    metrics: list

    @property
    def returns(self) -> np.ndarray:
        """``[R]`` float32: the sum of each episode's turn rewards."""
        return np.asarray([float(np.sum(r)) if r else 0.0 for r in self.turn_rewards], np.float32)

    @property
    def num_turns(self) -> np.ndarray:
        """``[R]`` int: assistant turns sampled per episode."""
        return np.asarray([len(s) for s in self.turn_spans], np.int32)


def _pow2(value: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, int(value) - 1).bit_length())


def _check_reward(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
        raise EnvError(f"{where} returned the reward {value!r}: expected a finite number")
    return float(value)


def run_episodes(model, params, records, rng, *, env_factory: Callable[[], Any], tokenizer, max_turns: int,
                 max_new_tokens: int, max_episode_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, stop_token_ids=None, mesh=None, renderer: TurnRenderer | None = None,
                 max_rows: int | None = None) -> Episodes:
    """Plays one episode per record with the policy sampled by :func:`jrlhf.sampling.generate` (host loop over turns).

    Args:
      model, params: the policy (an ``lm`` model; params placed however training placed them).
      records: ``R`` prompt records (dicts), one episode each (repeat a record for several samples).
      rng: PRNG key; turn ``t`` samples with ``fold_in(rng, t)``.
      env_factory: ``() -> env`` (:func:`jrlhf.envs.make_env_factory`), called once per episode.
      tokenizer: renders observations (:class:`TurnRenderer`) and decodes assistant turns for the environment
        (``skip_special_tokens=True``).
      max_turns: the most assistant turns per episode.
      max_new_tokens: the most tokens per assistant turn (static in the sampler).
      max_episode_tokens: the most tokens after the prompt, assistant and observation tokens together.
      temperature, top_p, top_k: sampling settings (``temperature = 0``: greedy).
      stop_token_ids: ids ending an assistant turn (default: the tokenizer's EOS).
      mesh: the mesh the sampler runs on (default: that of ``params``).
      renderer: a :class:`TurnRenderer` to reuse (default: a new one for ``tokenizer``).
      max_rows: the row bucket's cap (default: the next power of two of ``R``).

    Returns:
      :class:`Episodes`.

    Raises:
      EnvError: an environment returned something that is not an observation, a finite reward or a 3-tuple, or a
        first observation rendered to no tokens (prompts are never cut).
    """
    renderer = renderer or TurnRenderer(tokenizer)
    if stop_token_ids is None:
        stop_token_ids = (tokenizer.eos_token_id,)
    stop_ids = tuple(int(i) for i in stop_token_ids)
    stop_set = set(stop_ids)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    count = len(records)
    envs = [env_factory() for _ in range(count)]
    prompts, tokens, amask, logps = [], [[] for _ in range(count)], [[] for _ in range(count)], \
        [[] for _ in range(count)]
    for index, (env, record) in enumerate(zip(envs, records)):
        ids = renderer.first(env.reset(record))
        if not ids:
            raise EnvError(f"record {index}: the environment's first observation renders to no tokens")
        prompts.append(ids)
    rewards = [[] for _ in range(count)]
    spans = [[] for _ in range(count)]
    reason = [None] * count
    active = list(range(count))
    cap = max_rows or _pow2(count)
    lm = onpolicy.lm_view(model)
    for turn in range(max_turns):
        if not active:
            break
        key = jax.random.fold_in(rng, turn)
        for start in range(0, len(active), cap):
            chunk = active[start:start + cap]
            contexts = [prompts[r] + tokens[r] for r in chunk]
            width = _pow2(max(len(c) for c in contexts), 16)
            rows = min(_pow2(len(chunk)), cap)
            ids = np.full((rows, width), pad_id, np.int32)
            mask = np.zeros((rows, width), np.int32)
            for i in range(rows):
                context = contexts[min(i, len(chunk) - 1)]  # padding rows repeat the last real one
                ids[i, width - len(context):] = context
                mask[i, width - len(context):] = 1
            out = sampling.generate(lm, params, ids, mask, jax.random.fold_in(key, start), max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=stop_ids,
                                    pad_token_id=pad_id, mesh=mesh)
            out = jax.device_get((out.tokens, out.lengths, out.logps, out.truncated))
            new_tokens, lengths, new_logps, cut = (np.asarray(x) for x in out)
            for i, r in enumerate(chunk):
                length = int(lengths[i])
                room = max_episode_tokens - len(tokens[r])
                turn_ids = [int(t) for t in new_tokens[i, :length]]
                turn_logps = [float(x) for x in new_logps[i, :length]]
                over_budget = length > room
                if over_budget:
                    turn_ids, turn_logps = turn_ids[:room], turn_logps[:room]
                begin = len(tokens[r])
                tokens[r] += turn_ids
                amask[r] += [1] * len(turn_ids)
                logps[r] += turn_logps
                spans[r].append((begin, len(tokens[r])))
                if over_budget:
                    reason[r] = "max_episode_tokens"
                    continue
                if bool(cut[i]) or not turn_ids or turn_ids[-1] not in stop_set:
                    reason[r] = "max_completion_length"
                    continue
                text = tokenizer.decode(turn_ids, skip_special_tokens=True)
                result = envs[r].step(text)
                if not isinstance(result, tuple) or len(result) != 3:
                    raise EnvError(f"{type(envs[r]).__name__}.step returned {result!r}: expected (observation, "
                                   "reward, done)")
                observation, reward, done = result
                rewards[r].append(_check_reward(reward, f"{type(envs[r]).__name__}.step"))
                if done:
                    reason[r] = "done"
                    continue
                if turn + 1 >= max_turns:
                    reason[r] = "max_turns"
                    continue
                obs_ids = renderer.turn(observation, turn_ids[-1])
                if len(tokens[r]) + len(obs_ids) >= max_episode_tokens:  # no room left for an assistant token
                    keep = max(0, max_episode_tokens - len(tokens[r]))
                    tokens[r] += obs_ids[:keep]
                    amask[r] += [0] * keep
                    logps[r] += [0.0] * keep
                    reason[r] = "max_episode_tokens"
                    continue
                tokens[r] += obs_ids
                amask[r] += [0] * len(obs_ids)
                logps[r] += [0.0] * len(obs_ids)
        active = [r for r in active if reason[r] is None]
    for r in active:  # pragma: no cover - the loop always ends every episode by its last turn
        reason[r] = "max_turns"
    metrics = []
    for env in envs:
        get = getattr(env, "episode_metrics", None)
        metrics.append({k: float(v) for k, v in (get() if callable(get) else {}).items()})
    return Episodes(prompt_ids=prompts, tokens=tokens, assistant_mask=amask, logps=logps, turn_rewards=rewards,
                    turn_spans=spans, truncated=np.asarray([x != "done" for x in reason]), end_reason=reason,
                    metrics=metrics)


def episode_arrays(episodes: Episodes, n_tokens: int, *, pad_id: int, prompt_width: int | None = None,
                   mask_truncated: bool = False) -> dict:
    """The :class:`~jrlhf.algorithms.onpolicy.RolloutBatch` arrays (numpy) of finished episodes.

    Prompts are left-padded to ``prompt_width`` (default: the longest prompt rounded up to a power of two, at least
    8, so that the update compiles once per bucket); the ``N = n_tokens`` columns after them hold every turn of the
    episode, right-padded. ``loss_mask`` is 1 at assistant tokens only (0 on a truncated episode with
    ``mask_truncated``); ``old_logps`` are the sampler's at assistant tokens and 0 elsewhere.

    Returns:
      ``{"input_ids", "attention_mask", "loss_mask": [R, P + N] int32, "old_logps": [R, N] float32, "scores": [R]
      float32, "truncated": [R] int32}``.
    """
    rows = len(episodes.tokens)
    longest = max(len(p) for p in episodes.prompt_ids)
    width = _pow2(longest, 8) if prompt_width is None else int(prompt_width)
    if longest > width:
        raise EnvError(f"a prompt of {longest} tokens does not fit prompt_width={width}")
    ids = np.full((rows, width + n_tokens), pad_id, np.int32)
    attention = np.zeros_like(ids)
    loss_mask = np.zeros_like(ids)
    old = np.zeros((rows, n_tokens), np.float32)
    for r in range(rows):
        prompt, seq = episodes.prompt_ids[r], episodes.tokens[r]
        if len(seq) > n_tokens:
            raise EnvError(f"episode {r} holds {len(seq)} tokens after its prompt, over the budget {n_tokens}")
        ids[r, width - len(prompt):width] = prompt
        attention[r, width - len(prompt):width + len(seq)] = 1
        ids[r, width:width + len(seq)] = seq
        train = not (mask_truncated and episodes.truncated[r])
        loss_mask[r, width:width + len(seq)] = np.asarray(episodes.assistant_mask[r], np.int32) * int(train)
        old[r, :len(seq)] = np.asarray(episodes.logps[r], np.float32) * np.asarray(episodes.assistant_mask[r])
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask, "old_logps": old,
            "scores": episodes.returns, "truncated": episodes.truncated.astype(np.int32)}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _reference_jit(ref_model, ref_params, batch, config_key):
    temperature, chunk_size = config_key
    n = batch["old_logps"].shape[1]
    logps, _, _ = onpolicy.completion_forward(ref_model, ref_params, batch["input_ids"], batch["attention_mask"], n,
                                              temperature=temperature, chunk_size=chunk_size, with_entropy=False)
    return logps


def _records_of(prompts) -> list:
    from jrlhf.data import PromptBatch

    if isinstance(prompts, PromptBatch):
        return [r for r, keep in zip(prompts.records, prompts.example_mask) if keep] or list(prompts.records)
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, (str, Mapping)) for p in prompts):
        return [{"prompt": p} if isinstance(p, str) else dict(p) for p in prompts]
    raise AlgorithmInputError("multi-turn rollout: prompts must be a PromptBatch or a non-empty list of records / "
                              f"strings (the environment renders them); got {type(prompts).__name__}")


def episode_metrics(episodes: Episodes, n_gen: int, zero_std_over_batch: bool = False) -> dict:
    """TRL-named rollout metrics of finished episodes plus ``env/*``: ``env/turns`` (mean assistant turns),
    ``env/episode_tokens`` (mean tokens after the prompt), ``env/end_{reason}`` (share of episodes ending so), and
    the mean of every ``episode_metrics()`` entry as ``env/{name}``."""
    scores = episodes.returns
    lengths = np.asarray([sum(m) for m in episodes.assistant_mask], np.int64)  # assistant tokens per episode
    mask = np.arange(max(1, int(lengths.max())))[None, :] < lengths[:, None]
    metrics = onpolicy._rollout_metrics(scores, {"env": scores}, mask, episodes.truncated, n_gen, None,
                                        zero_std_over_batch)
    metrics["env/turns"] = float(episodes.num_turns.mean())
    metrics["env/episode_tokens"] = float(np.mean([len(t) for t in episodes.tokens]))
    for name in ("done", "max_turns", "max_episode_tokens", "max_completion_length"):
        metrics[f"env/end_{name}"] = float(np.mean([x == name for x in episodes.end_reason]))
    names = sorted({k for m in episodes.metrics for k in m})
    for name in names:
        metrics[f"env/{name}"] = float(np.mean([m.get(name, np.nan) for m in episodes.metrics]))
    metrics["_num_tokens"] = int(sum(len(p) + len(t) for p, t in zip(episodes.prompt_ids, episodes.tokens)))
    return metrics


def multiturn_rollout(model, params, prompts, rng, config, *, tokenizer, env=None, env_args=None, ref_params=None,
                      ref_model=None, stop_token_ids=None, mesh=None, host_score_fn=None,
                      zero_std_over_batch: bool = False, prompt_width: int | None = None) -> onpolicy.Rollout:
    """Plays ``num_generations`` episodes per prompt record against an environment and returns the
    :class:`~jrlhf.algorithms.onpolicy.Rollout` the on-policy update consumes (see the module docstring).

    Args:
      model, params: the policy and its params.
      prompts: a :class:`jrlhf.data.PromptBatch` (its records are used; the environment renders the prompt) or a
        list of records / strings.
      rng: PRNG key.
      config: an algorithm config / :class:`~jrlhf.algorithms.onpolicy.RolloutConfig` with ``num_generations``,
        ``max_completion_length`` (tokens per assistant turn), ``max_turns``, ``max_episode_tokens``,
        ``temperature``, ``top_p``, ``top_k``, ``stop_token_ids``, ``mask_truncated_completions``,
        ``logprob_chunk_size``, and ``env`` / ``env_args`` unless ``env`` is given.
      tokenizer: the policy's tokenizer (with a chat template for message observations).
      env: overrides ``config.env``: a registered name, ``module:Class``, or a class / factory
        (:func:`jrlhf.envs.make_env_factory`); ``env_args`` overrides ``config.env_args``.
      ref_params, ref_model: the reference (``ref_logps`` is computed when ``ref_params`` is given).
      stop_token_ids: ids ending an assistant turn (default: the tokenizer's EOS and ``config.stop_token_ids``).
      mesh: the mesh (default: that of ``params``).
      host_score_fn: ``(scores [R], truncated [R]) -> scores`` applied after the rewards (metrics keep the raw ones).
      zero_std_over_batch: see :func:`jrlhf.algorithms.onpolicy.rollout`.
      prompt_width: the prompt columns ``P`` (default: a power of two >= the longest prompt, at least 8).

    Returns:
      A :class:`~jrlhf.algorithms.onpolicy.Rollout` whose ``batch`` has ``R = records x num_generations`` rows,
      ``P`` prompt and ``N = max_episode_tokens`` columns, ``completions`` the episodes' text after the prompt
      (special tokens kept), and ``episodes`` the :class:`Episodes`.

    Raises:
      ConfigError: invalid settings (the key named). EnvError: a bad environment name or a misbehaving environment.
    """
    n_turn = onpolicy.DEFAULT_MAX_COMPLETION_LENGTH if config.max_completion_length is None \
        else int(config.max_completion_length)
    spec = config.env if env is None else env
    if spec is None:
        raise ConfigError("multi-turn rollout: no environment (set algo.env or pass env=)")
    if process_count() > 1:
        raise ConfigError("algo.env is not supported on several processes yet")
    check_env_settings(dataclasses.replace(config, reward_funcs=(), reward_model=None))
    factory = make_env_factory(spec, config.env_args if env_args is None else env_args)
    if tokenizer is None:
        raise AlgorithmInputError("multi-turn rollout: pass tokenizer= (it renders the environment's turns)")
    n_gen = int(config.num_generations)
    n_tokens = episode_budget(config)
    if stop_token_ids is None:
        eos = tokenizer.eos_token_id
        stop_token_ids = tuple(dict.fromkeys(([eos] if eos is not None else []) + list(config.stop_token_ids)))
    if mesh is None:
        mesh = sampling._mesh_of(params)
    records = [r for r in _records_of(prompts) for _ in range(n_gen)]
    episodes = run_episodes(model, params, records, rng, env_factory=factory, tokenizer=tokenizer,
                            max_turns=int(config.max_turns), max_new_tokens=n_turn, max_episode_tokens=n_tokens,
                            temperature=float(config.temperature), top_p=float(config.top_p), top_k=int(config.top_k),
                            stop_token_ids=stop_token_ids, mesh=mesh)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    arrays = episode_arrays(episodes, n_tokens, pad_id=pad_id, prompt_width=prompt_width,
                            mask_truncated=bool(config.mask_truncated_completions))
    logged = arrays["scores"].copy()
    if host_score_fn is not None:
        arrays["scores"] = np.asarray(host_score_fn(arrays["scores"], arrays["truncated"]), np.float32)
    rows = arrays["scores"].shape[0]

    def place(x):
        return jnp.asarray(x) if mesh is None else put_global(x, onpolicy._batch_constraint(mesh, rows))

    device = {name: place(value) for name, value in arrays.items()}
    if ref_params is not None:
        ref = onpolicy.lm_view(ref_model if ref_model is not None else model)
        device["ref_logps"] = _reference_jit(ref, ref_params, {k: device[k] for k in
                                                               ("input_ids", "attention_mask", "old_logps")},
                                             (float(config.temperature), config.logprob_chunk_size))
    metrics = episode_metrics(episodes, n_gen, zero_std_over_batch)
    texts = tokenizer.batch_decode(episodes.tokens, skip_special_tokens=False)
    prompt_texts = [r.get("prompt") for r in records]
    return onpolicy.Rollout(batch=onpolicy.RolloutBatch(**device), metrics=metrics, prompts=prompt_texts,
                            completions=texts, scores=logged, rewards={"env": logged},
                            sampler_logps=device["old_logps"], episodes=episodes)


def process_count() -> int:
    return jax.process_count()


# ------------------------------------------------------------------------------------------------ the loop


def make_env_collect(run, collector) -> Callable:
    """The loop's ``collect(state, prompt_batch, frozen, rng)`` for ``algo.env``: :func:`multiturn_rollout` with the
    run's model, mesh, tokenizer and stop ids (see :func:`jrlhf.algorithms.onpolicy.make_collect`)."""
    from jrlhf.evaluation import run_stop_token_ids

    algo = run.cfg.algo
    if collector.values_fn is not None:
        raise ConfigError(f"algo.env: {run.cfg.algorithm} is not supported with environments yet (grpo, rloo and "
                          "reinforce_pp are)")
    config = dataclasses.replace(algo, max_completion_length=onpolicy.completion_length(run))
    stop_ids = run_stop_token_ids(run, algo.stop_token_ids)
    ref_in_rollout = collector.need_ref and algo.reference_logps == "rollout"
    make_env_factory(algo.env, algo.env_args)  # a bad name fails at set-up, not at the first step
    if collector.need_ref:
        onpolicy.check_lora_reference(run.model, algo, run.cfg.algorithm)
    width = _pow2(int(run.cfg.data.max_prompt_length), 8) if run.cfg.data.max_prompt_length else None

    def collect(state, prompt_batch, frozen, rng, next_prompts=None):
        policy = collector.policy_params(state.params)
        ref_model, ref_params = onpolicy.reference_for(
            run.model, policy, frozen.ref_params if ref_in_rollout and frozen is not None else None)
        out = multiturn_rollout(run.model, policy, prompt_batch, rng, config, tokenizer=run.tokenizer,
                                ref_params=ref_params if ref_in_rollout else None, ref_model=ref_model,
                                stop_token_ids=stop_ids, mesh=run.mesh, host_score_fn=collector.host_score_fn,
                                zero_std_over_batch=collector.zero_std_over_batch, prompt_width=width)
        samples = onpolicy._samples_text(out.prompts, out.completions, out.scores,
                                         int(algo.num_completions_to_print))
        return out.batch, out.metrics, samples

    return collect


def make_env_evaluate(run, policy_params: Callable = lambda params: params):
    """Held-out greedy episodes of ``data.eval_prompts`` (``data.max_eval_examples`` of them) against ``algo.env``:
    ``exact_match`` (the environment's ``exact_match`` episode metric when it reports one, else the mean return),
    ``env/return`` and the mean of every episode metric as ``env/{name}``; ``None`` without eval prompts."""
    from jrlhf.algorithms.base import load_eval_records
    from jrlhf.evaluation import run_stop_token_ids

    cfg = run.cfg
    if not cfg.data.eval_prompts:
        return None
    algo = cfg.algo
    records = load_eval_records(cfg.data.eval_prompts, cfg.data.max_eval_examples, key="data.eval_prompts")
    factory = make_env_factory(algo.env, algo.env_args)
    stop_ids = run_stop_token_ids(run, tuple(cfg.data.eval_stop_token_ids) + tuple(algo.stop_token_ids))
    n_turn = onpolicy.completion_length(run)
    config = dataclasses.replace(algo, max_completion_length=n_turn)
    budget = episode_budget(config)
    batch = max(1, int(cfg.data.eval_batch_size))
    renderer = TurnRenderer(run.tokenizer)

    def evaluate(params, frozen):
        parts = []
        for start in range(0, len(records), batch):
            parts.append(run_episodes(run.model, policy_params(params), records[start:start + batch],
                                      jax.random.key(0), env_factory=factory, tokenizer=run.tokenizer,
                                      max_turns=int(algo.max_turns), max_new_tokens=n_turn,
                                      max_episode_tokens=budget, temperature=0.0, stop_token_ids=stop_ids,
                                      mesh=run.mesh, renderer=renderer, max_rows=_pow2(batch)))
        returns = np.concatenate([p.returns for p in parts])
        per_episode = [m for p in parts for m in p.metrics]
        out = {"env/return": float(returns.mean()), "num_examples": len(returns),
               "env/turns": float(np.mean(np.concatenate([p.num_turns for p in parts])))}
        for name in sorted({k for m in per_episode for k in m}):
            out[f"env/{name}"] = float(np.mean([m.get(name, np.nan) for m in per_episode]))
        out["exact_match"] = out.get("env/exact_match", out["env/return"])
        return out

    return evaluate
