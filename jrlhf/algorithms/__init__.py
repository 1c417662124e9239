"""Algorithms: one short module each, with a ``Config`` dataclass, ``make(model, config)`` returning the update as
plain functions (:class:`jrlhf.algorithms.base.Algorithm`) and a ``setup(run)`` that adds the run's data for the loop.

Offline: ``sft``, ``reward``, ``dpo`` (SimPO, ORPO and every DPO loss type through ``algo.loss_type``), ``kto``
(unpaired desirable / undesirable completions).
On-policy: ``grpo``, ``ppo``, ``rloo``, ``reinforce_pp``, ``online_dpo``.
"""

from __future__ import annotations

import difflib
import importlib

ALGORITHMS = {
    "sft": "jrlhf.algorithms.sft",
    "reward": "jrlhf.algorithms.reward",
    "dpo": "jrlhf.algorithms.dpo",
    "kto": "jrlhf.algorithms.kto",
    "grpo": "jrlhf.algorithms.grpo",
    "ppo": "jrlhf.algorithms.ppo",
    "rloo": "jrlhf.algorithms.rloo",
    "reinforce_pp": "jrlhf.algorithms.reinforce_pp",
    "online_dpo": "jrlhf.algorithms.online_dpo",
}


def get_algorithm(name: str):
    """The algorithm module called ``name``; an unknown name is an error naming the nearest valid one."""
    if name not in ALGORITHMS:
        from jrlhf.config import ConfigError

        near = difflib.get_close_matches(name, ALGORITHMS, n=1, cutoff=0.0)
        raise ConfigError(f"unknown algorithm '{name}'" + (f" (did you mean '{near[0]}'?)" if near else "")
                          + f"; choose one of {', '.join(ALGORITHMS)}")
    return importlib.import_module(ALGORITHMS[name])
