"""A custom DPO variant, trained with make_train_step: a sigmoid loss on per-token mean log-ratios with a margin.

DPO's parts (dpo.make) give the batch-global counts (prepare_batch) and the reference (frozen); the loss is new.
"""
import jax, jax.numpy as jnp, numpy as np
import jrlhf.models as M
from jrlhf import losses, sharding, step as S
from jrlhf.algorithms import base, dpo

def make_loss_fn(model, beta=0.5, gamma=0.2):
    def loss_fn(params, batch, frozen, ctx):  # batch: dpo.make(...).batch_fields ([B, T] int32); frozen: dpo.Frozen
        ids, attn, mask = base.concat_pairs(batch)  # [2B, T]: the chosen rows, then the rejected ones
        _, token_logps, targets = base.completion_logps(model, params, ids, attn, mask)  # [2B, T-1] f32, bool
        ref = jax.lax.stop_gradient(base.completion_logps(model, frozen.ref_params, ids, attn, mask)[1])
        ratio = losses.masked_mean(token_logps - ref, targets, axis=-1)  # [2B] per-token mean log-ratio
        chosen, rejected = jnp.split(ratio, 2)
        per_pair = -jax.nn.log_sigmoid(beta * (chosen - rejected) - gamma)
        return jnp.sum(per_pair) / ctx.globals["num_sequences"], {"margin": jnp.mean(chosen - rejected)}
    return loss_fn

model, params = M.init_model(M.tiny_config("llama", vocab_size=64), jax.random.key(0))
rng, batch = np.random.default_rng(0), {}
for side in ("chosen", "rejected"):  # 8 pairs of 12 tokens: a 4-token prompt, then the completion
    batch[f"{side}_input_ids"] = rng.integers(1, 64, (8, 12), dtype=np.int32)
    batch[f"{side}_attention_mask"] = np.ones((8, 12), np.int32)
    batch[f"{side}_loss_mask"] = np.repeat((np.arange(12) >= 4)[None], 8, 0).astype(np.int32)
algorithm = dpo.make(model, dpo.Config())  # reuse DPO's prepare_batch and frozen type
mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
optimizer = S.make_optimizer(S.OptimizerConfig(learning_rate=1e-3))
state, shardings = S.init_train_state(params, optimizer, 0, mesh=mesh, param_specs=M.logical_axes(model))
step = S.make_train_step(make_loss_fn(model), optimizer, mesh, state_shardings=shardings,
                         prepare_batch=algorithm.prepare_batch)
frozen = algorithm.init_frozen(params)  # dpo.Frozen(ref_params=params): the initial policy
for i in range(20):
    state, metrics = step(state, batch, frozen)
    if i % 5 == 0 or i == 19:
        print(f"step {i + 1}: loss {float(metrics['loss']):.4f} margin {float(metrics['margin']):.4f}")
