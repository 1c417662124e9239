"""A GRPO loop by hand: a tiny random Llama, the shipped addition prompts and a reward written in plain Python.

    python examples/grpo_loop.py --steps 3
"""
import argparse

import jax

from jrlhf.algorithms import grpo
from jrlhf.data import load_records, load_tokenizer
from jrlhf.models import init_model, logical_axes, tiny_config
from jrlhf.sharding import make_mesh
from jrlhf.step import OptimizerConfig, init_train_state, make_optimizer


def sum_reward(prompts, completions, completion_ids, answer, **record_fields):
    """TRL's reward signature: 1 for the right answer, else the share of digits; None (no loss) without an answer."""
    return [None if a is None else 1.0 if c.strip() == a else sum(ch.isdigit() for ch in c) / max(len(c), 1)
            for c, a in zip(completions, answer)]


def main(steps=3, prompts_per_step=4, seed=0):
    tokenizer = load_tokenizer("char")  # the shipped character tokenizer (chat template, EOS)
    model, params = init_model(tiny_config("llama", num_layers=1), jax.random.key(seed))
    config = grpo.Config(num_generations=4, max_completion_length=6, min_new_tokens=1, temperature=1.0, beta=0.04,
                         loss_type="dapo", reward_funcs=(sum_reward,))
    algo = grpo.make(model, config)  # loss_fn, prepare_batch, init_frozen, rollout, update
    mesh = make_mesh()  # every local device on the data axis
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3), params)
    state, shardings = init_train_state(params, optimizer, jax.random.key(seed + 1), mesh=mesh,
                                        param_specs=logical_axes(model))
    frozen = algo.init_frozen(state.params)  # Frozen(ref_params=<copy of the initial policy>) since beta > 0
    update = algo.update(optimizer, mesh, state_shardings=shardings)  # one compiled program per rollout
    records = load_records("builtin:addition/rl_prompts.jsonl")  # {"prompt": "3+4=", "answer": "7"}, ...
    history = []
    for step in range(steps):
        batch = records[step * prompts_per_step:(step + 1) * prompts_per_step]
        out = algo.rollout(state.params, batch, jax.random.key(1000 + step), tokenizer=tokenizer, frozen=frozen)
        state, metrics = update(state, out.batch, frozen)  # out.batch: a RolloutBatch (old/ref log-probs, scores)
        history.append({"reward": out.metrics["reward"], "loss": float(metrics["loss"]), "kl": float(metrics["kl"])})
        print(f"step {step + 1}: reward {history[-1]['reward']:.3f} loss {history[-1]['loss']:.4f} "
              f"kl {history[-1]['kl']:.5f}  {out.prompts[0]!r} -> {out.completions[0]!r}", flush=True)
    return state, history, out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    main(parser.parse_args().steps)
