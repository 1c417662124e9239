"""Reward modelling: Bradley-Terry loss on a scalar head, scored at the last real token."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jrlhf import losses
from jrlhf.algorithms.base import (AlgorithmSetup, load_eval_records, pair_scores, preference_globals,
                                   tokenize_train)

DATA_KIND = "preference"


@dataclasses.dataclass
class Config:
    """Reward-model settings (TRL 1.16 ``RewardConfig`` names).

    Attributes:
      center_rewards_coefficient: weight of the ``(r_c + r_r)^2`` centring penalty (``None``: off; TRL suggests 0.01).
    """

    center_rewards_coefficient: float | None = None


def head(cfg) -> str:
    """The trained model's head: a scalar score."""
    return "score"


def make_loss_fn(model, algo: Config):
    """``loss_fn(params, batch, frozen, ctx)``: mean Bradley-Terry loss over the global pair count; metrics as TRL
    1.16's ``RewardTrainer`` (``accuracy``, ``margin``, ``min_reward``, ``mean_reward``, ``max_reward``). A batch
    field ``margin [B]`` is used as the required margin when present."""

    def loss_fn(params, batch, frozen, ctx):
        chosen, rejected = pair_scores(model, params, batch)
        per_example = losses.bradley_terry_loss(chosen, rejected, margin=batch.get("margin"),
                                                center_rewards_coefficient=algo.center_rewards_coefficient)
        loss = jnp.sum(per_example) / ctx.globals["num_sequences"]
        both = jnp.concatenate([chosen, rejected])
        metrics = {
            "accuracy": jnp.mean((chosen > rejected).astype(jnp.float32)),
            "margin": jnp.mean(chosen - rejected),
            "min_reward": jnp.min(both),
            "mean_reward": jnp.mean(both),
            "max_reward": jnp.max(both),
        }
        return loss, metrics

    return loss_fn


def setup(run) -> AlgorithmSetup:
    """Builds the reward-model parts for the loop; evaluation is held-out preference accuracy."""
    from jrlhf.evaluation import preference_scores

    cfg = run.cfg
    eval_records = load_eval_records(cfg.data.eval, cfg.data.max_eval_examples)
    score = jax.jit(lambda params, batch: pair_scores(run.model, params, batch))

    def evaluate(params, frozen):
        chosen, rejected = preference_scores(lambda b: score(params, b), run.tokenizer, eval_records,
                                             batch_size=cfg.data.eval_batch_size, max_length=cfg.data.max_length)
        return {"accuracy": float((chosen > rejected).mean()), "margin": float((chosen - rejected).mean()),
                "num_examples": int(len(chosen))}

    return AlgorithmSetup(
        loss_fn=make_loss_fn(run.model, cfg.algo),
        train_data=tokenize_train(run, DATA_KIND),
        prepare_batch=preference_globals,
        evaluate=evaluate if eval_records else None,
    )
