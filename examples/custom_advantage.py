"""A custom advantage estimator in the on-policy update: GRPO's loss with rank-based group advantages.

GRPO's ``prepare_batch`` runs once per rollout inside the compiled update (unscorable rows, reference log-probs,
token counts, then ``advantages [R]``); here a wrapper replaces the advantages and everything else stays GRPO's.

    python examples/custom_advantage.py --steps 2
"""
import argparse
import dataclasses

import jax
import jax.numpy as jnp

from jrlhf.algorithms import grpo
from jrlhf.data import load_records, load_tokenizer
from jrlhf.models import init_model, logical_axes, tiny_config
from jrlhf.sharding import make_mesh
from jrlhf.step import OptimizerConfig, init_train_state, make_optimizer


def rank_advantages(scores, group_size):
    """``[R]`` scores -> ``[R]`` advantages in [-1, 1]: each sample's rank within its group of ``group_size``
    (ties share their mean rank), centred and scaled; unscorable (NaN) scores get 0 (they get no loss anyway)."""
    groups = scores.reshape(-1, group_size)
    valid = ~jnp.isnan(groups)
    below = jnp.sum((groups[:, None, :] < groups[:, :, None]) & valid[:, None, :], axis=-1)
    ties = jnp.sum((groups[:, None, :] == groups[:, :, None]) & valid[:, None, :], axis=-1)
    count = jnp.sum(valid, axis=-1, keepdims=True)
    rank = below + (ties - 1) / 2.0  # 0 .. count - 1
    adv = jnp.where(valid & (count > 1), 2.0 * rank / jnp.maximum(count - 1, 1) - 1.0, 0.0)
    return adv.reshape(-1)


def with_rank_advantages(algo):
    """``algo`` (an OnPolicyAlgorithm) whose ``prepare_batch`` puts rank advantages in ``batch["advantages"]``."""
    def prepare_batch(batch, frozen, algo_state):
        batch, counts = algo.prepare_batch(batch, frozen, algo_state)
        batch["advantages"] = rank_advantages(batch["scores"], algo.config.num_generations)
        return batch, counts

    return dataclasses.replace(algo, prepare_batch=prepare_batch)


def digits_reward(prompts, completions, completion_ids, **record_fields):
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def main(steps=2, prompts_per_step=4, seed=0):
    tokenizer = load_tokenizer("char")
    model, params = init_model(tiny_config("llama", num_layers=1), jax.random.key(seed))
    config = grpo.Config(num_generations=4, max_completion_length=6, beta=0.0, reward_funcs=(digits_reward,))
    algo = with_rank_advantages(grpo.make(model, config))
    mesh = make_mesh()
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3), params)
    state, shardings = init_train_state(params, optimizer, jax.random.key(seed + 1), mesh=mesh,
                                        param_specs=logical_axes(model))
    update = algo.update(optimizer, mesh, state_shardings=shardings)
    records = load_records("builtin:addition/rl_prompts.jsonl")
    for step in range(steps):
        batch = records[step * prompts_per_step:(step + 1) * prompts_per_step]
        out = algo.rollout(state.params, batch, jax.random.key(1000 + step), tokenizer=tokenizer)
        state, metrics = update(state, out.batch, None)
        print(f"step {step + 1}: mean digits {out.metrics['reward']:.2f} loss {float(metrics['loss']):.4f}",
              flush=True)
    return state, out, metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    main(parser.parse_args().steps)
