"""jrlhf: pure-JAX, functional RLHF (PPO, DPO, GRPO and relatives) over Flax causal LMs."""

__version__ = "0.1.0"


def train(config):
    """Runs one training job described by ``config`` (see :func:`jrlhf.train_loop.train`)."""
    from jrlhf.train_loop import train as _train

    return _train(config)
