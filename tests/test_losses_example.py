"""The README's composition example (DPO + an SFT NLL term, RPO-style) stays runnable and correct."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np

import jrlhf.losses as L

EXAMPLE = textwrap.dedent(
    """
    import jax, jax.numpy as jnp
    from jrlhf.losses import dpo_loss, logprobs_from_logits, masked_sum, sft_loss

    def rpo_loss(logits, tokens, mask, ref_logps, alpha=1.0):  # [2B,T,V], [2B,T], [2B,T], [2B]: chosen rows first
        token_logps = logprobs_from_logits(logits, tokens)
        chosen, rejected = jnp.split(masked_sum(token_logps, mask, axis=-1), 2)
        dpo, _, _ = dpo_loss(chosen, rejected, *jnp.split(ref_logps, 2), beta=0.1)
        nll, _ = sft_loss(token_logps[: len(mask) // 2], mask[: len(mask) // 2])  # NLL of the chosen completions
        return dpo.mean() + alpha * nll

    logits, mask = jax.random.normal(jax.random.key(0), (4, 6, 32)), jnp.arange(6) < jnp.array([[6], [4], [5], [3]])
    loss, grads = jax.value_and_grad(rpo_loss)(logits, logits.argmax(-1), mask, jnp.array([-9.0, -8.0, -7.0, -9.5]))
    """
)


def test_example_is_short_and_runs():
    lines = [line for line in EXAMPLE.strip().splitlines() if line.strip()]
    assert len(lines) <= 10
    assert all(len(line) <= 120 for line in lines)
    namespace = {}
    exec(compile(EXAMPLE, "<readme example>", "exec"), namespace)  # noqa: S102
    loss, grads = namespace["loss"], namespace["grads"]
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grads)))

    # The same number through TRL 1.16's RPO formulation: loss_type ("sigmoid", "sft") with weights (1, alpha).
    logits = jax.random.normal(jax.random.key(0), (4, 6, 32))
    mask = jnp.arange(6) < jnp.array([[6], [4], [5], [3]])
    seq = L.masked_sum(L.logprobs_from_logits(logits, logits.argmax(-1)), mask, axis=-1)
    ref = jnp.array([-9.0, -8.0, -7.0, -9.5])
    per_example, _, _ = L.dpo_loss(seq[:2], seq[2:], ref[:2], ref[2:], beta=0.1, loss_type=("sigmoid", "sft"),
                                   loss_weights=(1.0, 1.0), chosen_lengths=mask[:2].sum(-1))
    np.testing.assert_allclose(float(loss), float(per_example.mean()), rtol=1e-5)
