"""Side-by-side throughput benchmarks of jrlhf against the PyTorch stacks (TRL trainers, transformers).

``python -m benchmarks.run`` (or ``make bench``) times, in one process and on the same model, batch and sequence
lengths, jrlhf's compiled steps and the PyTorch reference for DPO, GRPO (update and whole step), PPO, SFT, reward
modelling and generation, alternating the two systems, and writes a JSON file, a markdown table and a plot.
See ``benchmarks/README.md`` for what is measured and how.

Nothing heavy is imported here: :mod:`benchmarks.env` must set the thread environment before jax or torch load.
"""
