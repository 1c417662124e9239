"""Supervised fine-tuning: next-token NLL on the completion tokens, with optional sequence packing.

:func:`make` gives the update as plain functions (:class:`jrlhf.algorithms.base.Algorithm`): nothing frozen, the
batch fields :data:`BATCH_FIELDS` (and :data:`OPTIONAL_BATCH_FIELDS` for packed rows).
"""

from __future__ import annotations

import dataclasses

from jrlhf import losses
from jrlhf.algorithms.base import (Algorithm, AlgorithmSetup, check_chunk_setting, completion_logps, generation_eval,
                                   load_eval_records, tokenize_train, with_input_checks)
from jrlhf.step import microbatch_share

DATA_KIND = "sft"
BATCH_FIELDS = {
    "input_ids": "[B, T] int32: token ids (prompt + completion, right-padded)",
    "attention_mask": "[B, T] int32: 1 on real tokens",
    "loss_mask": "[B, T] int32: 1 on the completion tokens the NLL covers (the step counts them for the mean)",
}
OPTIONAL_BATCH_FIELDS = {
    "segment_ids": "[B, T] int32: packed rows: the sequence each token belongs to (attention stays inside it)",
    "positions": "[B, T] int32: packed rows: each token's position within its own sequence",
}


@dataclasses.dataclass
class Config:
    """SFT settings.

    Attributes:
      logprob_chunk_size: how the log-softmax over the vocabulary is computed: ``"auto"`` (full logits while
        ``[B, T, V]`` float32 fits :data:`jrlhf.algorithms.base.LOGITS_BUDGET_BYTES`, otherwise the loss-mask
        tokens only, in position tiles within that budget), ``None`` (full logits) or an int (every position, in
        vocabulary chunks of that size).
    """

    logprob_chunk_size: int | str | None = "auto"


def head(cfg) -> str:
    """The trained model's head."""
    return "lm"


def make_loss_fn(model, algo: Config):
    """``loss_fn(params, batch, frozen, ctx)``: token-mean NLL over ``loss_mask`` normalised by the global token
    count (``ctx.globals["num_tokens"]``), so micro-batch losses sum to the batch loss."""

    def loss_fn(params, batch, frozen, ctx):
        _, token_logps, mask = completion_logps(model, params, batch["input_ids"], batch["attention_mask"],
                                                batch["loss_mask"], chunk_size=algo.logprob_chunk_size,
                                                positions=batch.get("positions"),
                                                segment_ids=batch.get("segment_ids"))
        loss, metrics = losses.sft_loss(token_logps, mask, normalizer=ctx.globals["num_tokens"])
        # batch-level metrics, exact under accumulation: the token-mean NLL and the step's token count
        share = microbatch_share(metrics["num_tokens"], ctx)
        return loss, {"nll": metrics["nll"] * share, "num_tokens": ctx.globals["num_tokens"]}

    return loss_fn


def make(model, config: Config) -> Algorithm:
    """SFT as plain functions: ``loss_fn`` (:func:`make_loss_fn`, checking :data:`BATCH_FIELDS`), no
    ``prepare_batch`` (the step's default ``num_tokens`` count of ``loss_mask[:, 1:]`` is the normaliser), nothing
    frozen.

    Args:
      model: an LM-head model (:func:`jrlhf.models.load_model` with head ``"lm"``).
      config: a :class:`Config`.

    Raises:
      ConfigError: ``config.logprob_chunk_size`` is not ``"auto"``, ``None`` or a positive int.
    """
    check_chunk_setting(config.logprob_chunk_size)
    loss_fn, _ = with_input_checks("sft", make_loss_fn(model, config), None, BATCH_FIELDS)
    return Algorithm(name="sft", loss_fn=loss_fn, batch_fields=BATCH_FIELDS,
                     optional_batch_fields=OPTIONAL_BATCH_FIELDS)


def setup(run) -> AlgorithmSetup:
    """Builds the SFT parts for the loop: :func:`make` plus the tokenised data and the generation evaluation."""
    cfg = run.cfg
    algorithm = make(run.model, cfg.algo)
    train_data = tokenize_train(run, DATA_KIND)
    eval_records = load_eval_records(cfg.data.eval_prompts, cfg.data.max_eval_examples, key="data.eval_prompts")
    return AlgorithmSetup.from_algorithm(algorithm, run.params, train_data,
                                         evaluate=generation_eval(run, eval_records) if eval_records else None)
