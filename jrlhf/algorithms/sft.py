"""Supervised fine-tuning: next-token NLL on the completion tokens, with optional sequence packing."""

from __future__ import annotations

import dataclasses

from jrlhf import losses
from jrlhf.algorithms.base import (AlgorithmSetup, check_chunk_setting, completion_logps, generation_eval,
                                   load_eval_records, tokenize_train)

DATA_KIND = "sft"


@dataclasses.dataclass
class Config:
    """SFT settings.

    Attributes:
      logprob_chunk_size: vocabulary chunk for the log-softmax: ``"auto"`` (full logits while ``[B, T, V]`` float32
        fits :data:`jrlhf.algorithms.base.LOGITS_BUDGET_BYTES`, chunks sized to it otherwise), ``None`` (full
        logits) or an int.
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
        return loss, {"nll": metrics["nll"], "num_tokens": metrics["num_tokens"]}

    return loss_fn


def setup(run) -> AlgorithmSetup:
    """Builds the SFT parts for the loop."""
    cfg = run.cfg
    check_chunk_setting(cfg.algo.logprob_chunk_size)
    train_data = tokenize_train(run, DATA_KIND)
    eval_records = load_eval_records(cfg.data.eval_prompts, cfg.data.max_eval_examples)
    return AlgorithmSetup(
        loss_fn=make_loss_fn(run.model, cfg.algo),
        train_data=train_data,
        evaluate=generation_eval(run, eval_records) if eval_records else None,
    )
