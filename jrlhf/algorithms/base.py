"""The algorithm contract (:class:`Algorithm`), what an algorithm hands to the training loop, and the forward-pass
helpers the algorithms share."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jrlhf import losses
from jrlhf.errors import JrlhfError
from jrlhf.models import model_token_logprobs, selected_token_logprobs, sequence_scores, unembedding_matrix


class AlgorithmInputError(JrlhfError, ValueError):
    """A batch or ``frozen`` passed to an algorithm's loss lacks a field it reads, or ``frozen`` is of the wrong
    type; the message names the field, the algorithm and what to pass."""


def _no_frozen(params):
    return None


def _no_algo_state():
    return {}


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One algorithm's update as plain functions, built by ``<module>.make(model, config, ...)`` (e.g.
    :func:`jrlhf.algorithms.dpo.make`) without a run config; ``setup(run)`` of each module is one user of it.

    Compose a step with :meth:`train_step` (or pass the fields to :func:`jrlhf.step.make_train_step` yourself)::

        algo = dpo.make(model, dpo.Config(beta=0.1))
        frozen = algo.init_frozen(params)          # dpo.Frozen(ref_params=params)
        step = algo.train_step(optimizer, mesh, state_shardings=shardings)
        state, metrics = step(state, batch, frozen)

    Attributes:
      name: the algorithm's name (``"dpo"``), used in error messages.
      loss_fn: ``loss_fn(params, batch, frozen, ctx: StepContext) -> (scalar loss, metrics dict)`` on one
        micro-batch (:mod:`jrlhf.step`'s contract: normalised by the batch-global counts in ``ctx.globals``). It
        checks, at trace time, that ``batch`` holds every field of ``batch_fields`` and that ``frozen`` is a
        ``frozen_type`` (raising :class:`AlgorithmInputError`).
      prepare_batch: ``prepare_batch(batch, frozen, algo_state) -> (batch, globals)`` run once on the whole batch
        (the counts the loss divides by), or ``None`` (:func:`jrlhf.step.default_globals` alone).
      batch_fields: ``{name: "shape dtype: meaning"}`` of the batch fields ``loss_fn`` reads (``B`` rows, ``T``
        tokens). ``optional_batch_fields``: those it reads when present.
      frozen_type: the class of ``frozen`` (a ``flax.struct`` dataclass: a pytree with named fields that jit,
        donation, sharding and orbax checkpoints take as they take a dict), or ``None`` when nothing is frozen.
      init_frozen: ``init_frozen(params) -> frozen`` (e.g. the reference as a copy of the initial policy);
        returns ``None`` when the algorithm reads nothing frozen.
      frozen_specs: logical ``PartitionSpec`` pytree of ``frozen`` (same structure), or ``None``.
      init_algo_state: ``() -> algo_state`` pytree (``{}`` for none); pass it to
        :func:`jrlhf.step.init_train_state`.
      update_algo_state: ``update_algo_state(algo_state, metrics) -> algo_state`` run in-graph after each step, or
        ``None``.
      after_step: ``after_step(step, state, frozen) -> frozen`` to run on the host after each step (TR-DPO's
        reference sync: call it with the number of steps done), or ``None``.
    """

    name: str
    loss_fn: Callable
    batch_fields: dict
    prepare_batch: Callable | None = None
    optional_batch_fields: dict = dataclasses.field(default_factory=dict)
    frozen_type: type | None = None
    init_frozen: Callable = _no_frozen
    frozen_specs: Any = None
    init_algo_state: Callable = _no_algo_state
    update_algo_state: Callable | None = None
    after_step: Callable | None = None

    def check_batch(self, batch) -> None:
        """Raises :class:`AlgorithmInputError` naming the first field of ``batch_fields`` that ``batch`` lacks."""
        check_fields(self.name, batch, self.batch_fields)

    def check_frozen(self, frozen) -> None:
        """Raises :class:`AlgorithmInputError` unless ``frozen`` is a ``frozen_type`` (``None`` when that is)."""
        check_frozen(self.name, frozen, self.frozen_type)

    def train_step(self, optimizer, mesh, *, state_shardings, **kwargs):
        """:func:`jrlhf.step.make_train_step` of this algorithm's ``loss_fn``, ``prepare_batch`` and
        ``update_algo_state``; ``kwargs`` go to it unchanged (``num_microbatches``, ``frozen_shardings``...). Every
        call checks ``frozen`` first (:meth:`check_frozen`: :class:`AlgorithmInputError` naming the type to pass)."""
        from jrlhf.step import make_train_step

        step = make_train_step(self.loss_fn, optimizer, mesh, state_shardings=state_shardings,
                               prepare_batch=self.prepare_batch, update_algo_state=self.update_algo_state, **kwargs)
        step.frozen_check = self.check_frozen
        return step


def with_input_checks(name: str, loss_fn, prepare_batch, fields, frozen_type=None):
    """``(loss_fn, prepare_batch)`` that first run :func:`check_fields` on the batch (and :func:`check_frozen` on
    ``frozen`` when ``frozen_type`` is given), at trace time, so a wrong input is a one-line
    :class:`AlgorithmInputError` naming the field rather than a ``KeyError`` deep in a trace."""

    def checked_loss(params, batch, frozen, ctx):
        check_fields(name, batch, fields)
        check_frozen(name, frozen, frozen_type)
        return loss_fn(params, batch, frozen, ctx)

    def checked_prepare(batch, frozen, algo_state):
        check_fields(name, batch, fields)
        check_frozen(name, frozen, frozen_type)
        return prepare_batch(batch, frozen, algo_state)

    return checked_loss, (None if prepare_batch is None else checked_prepare)


def check_fields(name: str, batch, fields) -> None:
    """Raises :class:`AlgorithmInputError` naming the first of ``fields`` missing from the mapping ``batch``."""
    if not hasattr(batch, "keys"):
        raise AlgorithmInputError(f"{name}: the batch must be a dict of arrays with fields "
                                  f"{', '.join(fields)}; got {type(batch).__name__}")
    for field in fields:
        if field not in batch:
            raise AlgorithmInputError(f"{name}: the batch has no field '{field}' ({fields[field]}); it has "
                                      f"{', '.join(sorted(batch)) or 'none'}")


def check_frozen(name: str, frozen, frozen_type) -> None:
    """Raises :class:`AlgorithmInputError` unless ``frozen`` is an instance of ``frozen_type`` (or ``None`` when
    ``frozen_type`` is ``None``), naming the type to pass."""
    if frozen_type is None:
        return
    if not isinstance(frozen, frozen_type):
        fields = ", ".join(f.name for f in dataclasses.fields(frozen_type))
        where = frozen_type.__module__.replace("jrlhf.algorithms.", "")
        raise AlgorithmInputError(f"{name}: frozen must be {where}.{frozen_type.__name__}({fields}=...) "
                                  f"(see Algorithm.init_frozen); got {type(frozen).__name__}")


@dataclasses.dataclass
class RunContext:
    """What :func:`setup` of an algorithm receives from the loop.

    Attributes:
      cfg: the :class:`jrlhf.config.RunConfig`.
      model: the trained module (its head chosen by the algorithm's ``head(cfg)``).
      params: its initial parameters (host or device arrays; the loop places them on the mesh).
      tokenizer: the Hugging Face tokenizer.
      mesh: the device mesh.
      rng: a PRNG key for the algorithm's own initialisation.
      load_model: ``load_model(path, head) -> (model, params)`` for extra models (reward model, critic).
    """

    cfg: Any
    model: Any
    params: Any
    tokenizer: Any
    mesh: Any
    rng: Any
    load_model: Callable


@dataclasses.dataclass
class OnPolicy:
    """The on-policy part: how one iteration collects a rollout batch.

    ``collect(state, prompt_batch, frozen, rng) -> (rollout_batch dict of arrays, host metrics dict, samples)``
    runs generation and rewards (with ``algo.dynamic_sampling`` the loop also passes ``next_prompts``, a callable
    giving the next prompt batch of the data stream, so the data position after the step counts them); the loop then runs the compiled update
    (``num_epochs`` x ``num_minibatches``) on the rollout batch.
    """

    collect: Callable
    num_epochs: int = 1
    num_minibatches: int = 1


@dataclasses.dataclass
class AlgorithmSetup:
    """The parts of one algorithm, consumed by :func:`jrlhf.train_loop.train`.

    Attributes:
      loss_fn: ``loss_fn(params, batch, frozen, ctx) -> (loss, metrics)`` (see :mod:`jrlhf.step`).
      frozen: pytree of what is not trained (reference params, reward model), or ``None``.
      frozen_specs: logical ``PartitionSpec`` pytree of ``frozen`` (``None``: replicated).
      prepare_batch: batch-global preparation (see :func:`jrlhf.step.make_train_step`).
      update_algo_state: in-graph algorithm-state update after each step.
      algo_state: initial algorithm state pytree (``{}`` for none).
      trainable: trainable-subset mask for :func:`jrlhf.step.make_optimizer`.
      evaluate: ``evaluate(params, frozen) -> dict`` of held-out metrics (host floats), or ``None``.
      after_step: ``after_step(step, state, frozen) -> frozen`` run by the loop after each step (TR-DPO's
        reference sync), or ``None``. A frozen that changes is checkpointed with the state.
      onpolicy: the :class:`OnPolicy` part for on-policy algorithms, else ``None``.
      train_data: tokenised training data (:class:`jrlhf.data.TokenizedData`).
      collate: optional replacement collate function for the training batches.
      params: a replacement for the trained params pytree (PPO's ``{"policy": ..., "critic": ...}`` with a separate
        critic), or ``None`` to train the model's own params.
      param_specs: logical ``PartitionSpec`` pytree of ``params`` (required with ``params``).
      export_params: ``params -> the model's params`` for the Hugging Face export (with ``params``).
      export_head: the head the Hugging Face export writes (``None``: the model's own; "score" exports only the
        score model of an ``lm+value`` model).
    """

    loss_fn: Callable
    train_data: Any
    frozen: Any = None
    frozen_specs: Any = None
    prepare_batch: Callable | None = None
    update_algo_state: Callable | None = None
    algo_state: Any = dataclasses.field(default_factory=dict)
    trainable: Any = None
    evaluate: Callable | None = None
    after_step: Callable | None = None
    onpolicy: OnPolicy | None = None
    collate: Callable | None = None
    params: Any = None
    param_specs: Any = None
    export_params: Callable | None = None
    export_head: str | None = None

    @classmethod
    def from_algorithm(cls, algorithm: Algorithm, params, train_data, **kwargs) -> "AlgorithmSetup":
        """The loop's parts of ``algorithm``: its loss, ``prepare_batch``, algorithm state, ``after_step`` and
        ``frozen`` built from the initial ``params`` (``algorithm.init_frozen(params)``); ``kwargs`` set the rest
        (``evaluate``, ``collate``...)."""
        frozen = algorithm.init_frozen(params)
        parts = dict(loss_fn=algorithm.loss_fn, train_data=train_data, frozen=frozen,
                     frozen_specs=algorithm.frozen_specs if frozen is not None else None,
                     prepare_batch=algorithm.prepare_batch, update_algo_state=algorithm.update_algo_state,
                     algo_state=algorithm.init_algo_state(), after_step=algorithm.after_step)
        parts.update(kwargs)
        return cls(**parts)


LOGITS_BUDGET_BYTES = 256 * 2**20
"""Largest float32 logits block ``"auto"`` lets a scoring pass build: 256 MiB (e.g. 8 x 128 tokens of a 64k
vocabulary). Backward passes hold a few blocks of this size (logits, softmax, their cotangents)."""

MIN_CHUNK = 128

SELECTION_TILE = 256
"""Largest position tile of the ``"auto"`` completion-only log-prob pass (:func:`selection_tile`)."""


def check_chunk_setting(value, key: str = "algo.logprob_chunk_size") -> None:
    """Raises :class:`jrlhf.config.ConfigError` unless ``value`` is ``"auto"``, ``None`` or a positive int."""
    from jrlhf.config import ConfigError

    if value is None or value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return
    raise ConfigError(f"{key}={value!r}: use 'auto' (vocabulary chunks when the logits would exceed "
                      f"{LOGITS_BUDGET_BYTES >> 20} MiB), null (full logits) or a positive chunk size")


def resolve_chunk_size(setting, num_tokens: int, vocab_size: int, budget_bytes: int | None = None):
    """The vocabulary chunk of one log-prob pass (``None``: full ``[B, T, V]`` logits).

    Args:
      setting: ``"auto"``, ``None`` (full logits) or an int chunk size (returned as is).
      num_tokens: positions that need log-probs, ``B * T`` (static shapes, so this runs at trace time).
      vocab_size: ``V``.
      budget_bytes: the largest float32 logits block ``"auto"`` allows (``None``: :data:`LOGITS_BUDGET_BYTES`).

    Returns:
      ``"auto"``: ``None`` when ``num_tokens * V * 4`` bytes fit the budget (small vocabularies: the fused full
      softmax is fastest), else the largest multiple of 128 (at least 128) whose ``[B, T, chunk]`` float32 block
      fits, so memory stays ``O(B * T * chunk)`` whatever the vocabulary.
    """
    check_chunk_setting(setting)
    if setting != "auto":
        return setting
    budget_bytes = LOGITS_BUDGET_BYTES if budget_bytes is None else int(budget_bytes)
    per_column = max(1, int(num_tokens)) * 4
    if per_column * int(vocab_size) <= budget_bytes:
        return None
    chunk = (budget_bytes // per_column) // MIN_CHUNK * MIN_CHUNK
    return int(min(max(MIN_CHUNK, chunk), vocab_size))


def completion_logps(model, params, input_ids, attention_mask, loss_mask, *, chunk_size="auto", positions=None,
                     segment_ids=None, score_mask=None):
    """Summed and per-token log-probs of the target tokens of a right- or left-padded batch.

    Args:
      model, params: an LM-head model and its params.
      input_ids, attention_mask, loss_mask: ``[B, T]`` int (``loss_mask`` marks target tokens).
      chunk_size: how the log-softmax over the vocabulary is computed: ``"auto"`` (default): full ``[B, T - 1, V]``
        float32 logits while they fit :data:`LOGITS_BUDGET_BYTES`, otherwise only the positions ``score_mask``
        marks, gathered into tiles of ``[tile, V]`` logits within the same budget
        (:func:`jrlhf.models.selected_token_logprobs`: the vocabulary projection then costs what the completion
        tokens need, not the prompt's); ``None``: full logits; an int: every position in vocabulary chunks of that
        size (:func:`jrlhf.models.token_logprobs_from_hidden`).
      score_mask: ``[B, T]`` the target tokens whose log-prob the caller reads (default ``loss_mask``); with
        ``"auto"`` over the budget, ``token_logps`` is 0.0 at the other positions.

    Returns:
      ``(summed [B] f32, token_logps [B, T-1] f32, target_mask [B, T-1] bool)``; with an ``lm+value`` model also
      ``values [B, T]`` as a fourth element.
    """
    batch, length = input_ids.shape
    setting = chunk_size
    chunk_size = resolve_chunk_size(chunk_size, batch * (length - 1), model.config.vocab_size)
    if setting == "auto" and chunk_size is not None:
        score = loss_mask if score_mask is None else score_mask
        hidden = model.apply(params, input_ids, attention_mask, positions=positions, segment_ids=segment_ids,
                             return_hidden=True)
        hidden, values = hidden if model.head == "lm+value" else (hidden, None)
        token_logps = selected_token_logprobs(hidden[:, :-1], unembedding_matrix(model, params), input_ids[:, 1:],
                                              score[:, 1:] > 0, tile=selection_tile(model.config.vocab_size))
    else:
        out = model_token_logprobs(model, params, input_ids, attention_mask, positions=positions,
                                   segment_ids=segment_ids, chunk_size=chunk_size)
        token_logps, values = (out if isinstance(out, tuple) else (out, None))
    mask = loss_mask[:, 1:] > 0
    summed = losses.masked_sum(token_logps, mask, axis=-1)
    if values is None:
        return summed, token_logps, mask
    return summed, token_logps, mask, values


def selection_tile(vocab_size: int, budget_bytes: int | None = None) -> int:
    """Positions per tile of :func:`jrlhf.models.selected_token_logprobs` under ``"auto"``: the most whose
    ``[tile, V]`` float32 logits fit ``budget_bytes`` (default :data:`LOGITS_BUDGET_BYTES`), at most
    :data:`SELECTION_TILE` (the last tile is part-empty, so larger tiles waste work), at least 8."""
    budget_bytes = LOGITS_BUDGET_BYTES if budget_bytes is None else int(budget_bytes)
    return int(max(8, min(SELECTION_TILE, budget_bytes // (4 * int(vocab_size)))))


def concat_pairs(batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Stacks the chosen rows over the rejected rows: ``[2B, T]`` ids, attention mask and loss mask."""
    cat = lambda key: jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], axis=0)
    return cat("input_ids"), cat("attention_mask"), cat("loss_mask")


def pair_scores(model, params, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Reward-model scores of a preference batch in one concatenated forward: ``(chosen [B], rejected [B])``."""
    ids, attn, _ = concat_pairs(batch)
    scores = sequence_scores(model.apply(params, ids, attn), attn)
    half = ids.shape[0] // 2
    return scores[:half], scores[half:]


PREFERENCE_FIELDS = {
    f"{side}_{key}": f"[B, T] int32: {what} of the {side} sequences (prompt + completion, right-padded)"
    for side in ("chosen", "rejected")
    for key, what in (("input_ids", "token ids"), ("attention_mask", "1 on real tokens"),
                      ("loss_mask", "1 on the completion tokens"))
}
"""The batch fields of preference data (:func:`jrlhf.data.collate_preference`); chosen and rejected share ``T``."""


def preference_globals(batch: dict, frozen, algo_state) -> tuple[dict, dict]:
    """``prepare_batch`` for preference data: the global pair count, chosen completion-token count and chosen
    sequence-token count (every real token after the first: ORPO's NLL, as TRL takes it)."""
    chosen_tokens = jnp.sum(batch["chosen_loss_mask"][:, 1:].astype(jnp.float32))
    chosen_seq_tokens = jnp.sum(batch["chosen_attention_mask"][:, 1:].astype(jnp.float32))
    return batch, {"num_sequences": jnp.float32(batch["chosen_input_ids"].shape[0]),
                   "num_chosen_tokens": chosen_tokens, "num_chosen_sequence_tokens": chosen_seq_tokens}


# ------------------------------------------------------------------------------------------ host-side glue


def length_limits(data_cfg) -> dict:
    """The tokenisation limits and record policies of a :class:`jrlhf.config.DataSection`
    (:class:`jrlhf.data.LengthLimits` fields): the one set used for the training and the held-out records."""
    return dict(max_length=data_cfg.max_length, max_prompt_length=data_cfg.max_prompt_length,
                max_completion_length=data_cfg.max_completion_length, truncation_mode=data_cfg.truncation_mode,
                overlong=data_cfg.overlong, invalid_records=data_cfg.invalid_records)


# The record fields each data kind is built from (prompt records go whole to the reward functions).
KIND_FIELDS = {"sft": ("prompt", "completion", "messages"), "preference": ("prompt", "chosen", "rejected"),
               "kto": ("prompt", "completion", "messages", "label", "chosen", "rejected")}


def ignored_fields(records, kind: str, fields=()) -> list[str]:
    """Sorted names of the record fields that neither tokenisation (:data:`KIND_FIELDS`) nor the algorithm
    (``fields``) reads; empty for ``prompt`` records, which reach the reward functions whole."""
    if kind not in KIND_FIELDS:
        return []
    seen = set()
    for record in records:
        if isinstance(record, dict):
            seen.update(record)
    return sorted(seen - set(KIND_FIELDS[kind]) - set(fields))


def record_location(records, message: str) -> str:
    """Rewrites a tokenisation error's leading ``record N`` (1-based position) as ``file:line`` of a JSONL source
    (1-based, counting blank lines), so the message points at the line to fix."""
    import re

    match = re.match(r"record (\d+)(: .*)", message, flags=re.S)
    where = getattr(records, "where", None)
    if match is None or where is None:
        return message
    return f"{where(int(match.group(1)) - 1)}{match.group(2)}"


def _holdout_split(data_cfg) -> tuple[list, list]:
    """``(train_records, held_out_records)`` of ``data.train`` with ``data.eval_holdout`` > 0: the last
    ``eval_holdout`` records are held out.

    Raises:
      ConfigError: ``eval_holdout`` negative, combined with ``data.eval``, or not smaller than the record count.
    """
    from jrlhf.config import ConfigError
    from jrlhf.data import load_records

    count = data_cfg.eval_holdout
    if count < 0:
        raise ConfigError(f"data.eval_holdout must be >= 0 (records held out of data.train), got {count}")
    if data_cfg.eval:
        raise ConfigError(f"data.eval_holdout={count} and data.eval='{data_cfg.eval}' both give the eval set; "
                          "set one of them")
    records = load_records(data_cfg.train, key="data.train")
    if count >= len(records):
        raise ConfigError(f"data.eval_holdout={count} would hold out all {len(records)} records of "
                          f"data.train='{data_cfg.train}'; hold out fewer")
    return records[:-count], records[-count:]


def with_system_prompt(records, system_prompt: str | None):
    """``records`` whose ``prompt`` (a string or a message list) and ``messages`` fields start with a system message
    ``system_prompt``; those that have one already, and every record when ``system_prompt`` is ``None``, are
    returned unchanged. A string prompt becomes ``[system, user]`` messages."""
    if not system_prompt or records is None:
        return records
    system = {"role": "system", "content": system_prompt}

    def add(value):
        if isinstance(value, str):
            return [system, {"role": "user", "content": value}]
        if isinstance(value, list) and not (value and isinstance(value[0], dict) and value[0].get("role") == "system"):
            return [system] + list(value)
        return value

    out = []
    for record in records:
        if isinstance(record, dict):
            record = dict(record)
            for key in ("prompt", "messages"):
                if key in record:
                    record[key] = add(record[key])
        out.append(record)
    return out


def preference_eval_records(data_cfg):
    """The held-out preference records: the last ``data.eval_holdout`` records of ``data.train`` when set, else
    ``data.eval`` (``None`` when neither); at most ``data.max_eval_examples`` of them."""
    if data_cfg.eval_holdout:
        held_out = _holdout_split(data_cfg)[1]
        held_out = held_out[: data_cfg.max_eval_examples] if data_cfg.max_eval_examples else held_out
    else:
        held_out = load_eval_records(data_cfg.eval, data_cfg.max_eval_examples, key="data.eval")
    return with_system_prompt(held_out, data_cfg.system_prompt)


def tokenize_train(run: RunContext, kind: str, source: str | None = None, fields=(), tokenize_fn=None):
    """Loads and tokenises the training records of kind ``sft``, ``preference`` or ``prompt`` under
    :func:`length_limits` (prompt records use only the prompt limits), without the ``data.eval_holdout`` records and
    with ``data.system_prompt`` prepended; prints the report.

    ``fields``: the optional per-record fields the algorithm reads (its ``RECORD_FIELDS``, e.g. the reward model's
    ``margin``), carried into every batch. Fields that nothing reads are reported once, naming them.
    ``tokenize_fn(records, tokenizer, **limits)``: the algorithm's own tokenisation of ``kind`` (e.g.
    :func:`jrlhf.algorithms.kto.tokenize_kto`) instead of :func:`jrlhf.data.tokenize`.

    Raises:
      DataError: a record that cannot be used, named as ``data.train: FILE:LINE: ...``.
    """
    from jrlhf.data import DataError, load_records, tokenize

    if source is None and run.cfg.data.eval_holdout:
        records = _holdout_split(run.cfg.data)[0]
    else:
        records = load_records(source or run.cfg.data.train, key="data.train")
    located = records
    records = with_system_prompt(records, run.cfg.data.system_prompt)
    # The report is printed below, once: the tokenisers' own log warning (for library callers) would repeat it.
    data_logger = logging.getLogger("jrlhf.data")
    level = data_logger.level
    data_logger.setLevel(logging.ERROR)
    try:
        if tokenize_fn is not None:
            data = tokenize_fn(records, run.tokenizer, **length_limits(run.cfg.data))
        else:
            data = tokenize(records, run.tokenizer, kind, fields=tuple(fields), **length_limits(run.cfg.data))
    except DataError as error:
        raise DataError(f"data.train: {record_location(located, str(error))}") from None
    finally:
        data_logger.setLevel(level)
    if jax.process_index() == 0:
        print(f"[data] {data.report.summary()}", flush=True)
        ignored = ignored_fields(records, kind, fields)
        if ignored:
            print(f"[data] the records' field(s) {', '.join(repr(f) for f in ignored)} are ignored: "
                  f"{run.cfg.algorithm} reads {', '.join(KIND_FIELDS[kind] + tuple(fields))}", flush=True)
    return data


def load_eval_records(source: str | None, limit: int | None = None, key: str | None = None):
    """Held-out records from ``source`` (``None`` -> ``None``); ``key`` (e.g. ``"data.eval"``) names the config key
    in the error for a source without records."""
    if not source:
        return None
    from jrlhf.data import load_records

    return load_records(source, limit=limit, key=key)


def implicit_reward_eval(run: RunContext, records, score_policy, score_reference, beta: float, *,
                         rescore_reference: bool = False):
    """``evaluate(params, ref) -> {"rewards/accuracies", "rewards/margins", "num_examples"}`` on held-out pairs.

    The implicit reward of a completion is ``beta * (log pi(y|x) - log pi_ref(y|x))`` (summed log-probs; Rafailov et
    al. 2023, eq. 5); accuracy is the share of pairs whose chosen reward is strictly greater (a tie counts as wrong,
    as TRL's ``rewards/accuracies``), the margin the mean of chosen minus rejected. ``ref=None`` compares the policy's
    log-probs alone (no reference). The reference's scores are computed once and reused (the reference does not
    move) unless ``rescore_reference`` (TR-DPO's moving reference).

    Args:
      records: the held-out ``{prompt, chosen, rejected}`` records, tokenised under the training limits
        (:func:`length_limits`) in batches of ``data.eval_batch_size`` within ``data.eval_max_tokens``.
      score_policy / score_reference: ``(params, batch) -> (chosen [B], rejected [B])`` summed log-probs.
    """
    from jrlhf.evaluation import preference_scores

    data_cfg = run.cfg.data
    cache = {}

    def scores(fn):
        return preference_scores(fn, run.tokenizer, records, batch_size=data_cfg.eval_batch_size,
                                 limits=length_limits(data_cfg), max_tokens=data_cfg.eval_max_tokens)

    def evaluate(params, ref) -> dict:
        chosen, rejected = scores(lambda b: score_policy(params, b))
        if ref is not None:
            if rescore_reference or "scores" not in cache:
                cache["scores"] = scores(lambda b: score_reference(ref, b))
            ref_chosen, ref_rejected = cache["scores"]
            chosen, rejected = chosen - ref_chosen, rejected - ref_rejected
        chosen, rejected = beta * chosen, beta * rejected
        return {"rewards/accuracies": float((chosen > rejected).mean()),
                "rewards/margins": float((chosen - rejected).mean()), "num_examples": int(len(chosen))}

    return evaluate


def generation_eval(run: RunContext, records, model=None, stop_token_ids=()):
    """An ``evaluate(params, frozen, scorers=())`` that scores greedy completions of ``records`` with
    ``data.eval_reward`` (and ``scorers``, see :func:`jrlhf.evaluation.reward_accuracy`);
    a completion ends at any id of :func:`jrlhf.evaluation.run_stop_token_ids` (the model's EOS ids,
    ``data.eval_stop_token_ids`` and ``stop_token_ids``)."""
    from jrlhf.evaluation import reward_accuracy, run_stop_token_ids
    from jrlhf.rewards import get_reward_fn

    cfg = run.cfg
    reward_fn = get_reward_fn(cfg.data.eval_reward)
    stop_ids = run_stop_token_ids(run, tuple(cfg.data.eval_stop_token_ids) + tuple(stop_token_ids))
    model = model or run.model
    records = with_system_prompt(records, cfg.data.system_prompt)

    def evaluate(params, frozen, scorers=()):
        return reward_accuracy(model, params, run.tokenizer, records, reward_fn,
                               max_new_tokens=cfg.data.eval_max_new_tokens, batch_size=cfg.data.eval_batch_size,
                               limits=length_limits(cfg.data), max_tokens=cfg.data.eval_max_tokens,
                               eos_token_id=stop_ids, scorers=scorers)

    return evaluate
