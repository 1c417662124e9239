"""Environments for multi-turn, tool-using rollouts: the protocol, a registry and the shipped calculator.

An environment is a host-side Python object that plays the other side of a conversation with the policy. The
multi-turn rollout (:func:`jrlhf.algorithms.multiturn.multiturn_rollout`) makes one environment per episode and
drives it between compiled decode calls::

    observation = env.reset(record)                   # the first turn(s): chat messages or raw text
    while True:
        ... the policy samples one assistant turn ...
        observation, reward, done = env.step(assistant_text)
        if done: break                                # else ``observation`` is rendered and appended

* ``reset(record) -> observation``: ``record`` is one prompt record of the data (a dict: ``prompt``, ``answer``,
  ...). The observation is a list of chat messages (``{"role", "content"}`` dicts, rendered with the tokenizer's
  chat template plus the generation prompt) or a string (appended as raw text, no template).
* ``step(assistant_text) -> (observation, reward, done)``: ``assistant_text`` is the sampled turn decoded without
  special tokens. ``reward`` is this turn's reward (a float; the episode's return is the sum over its turns, so a
  final reward is simply the reward of the last step). With ``done`` false, ``observation`` (messages, usually one
  ``user`` or ``tool`` turn, or text) is appended and the policy answers again.
* optional ``episode_metrics() -> dict[str, float]``: numbers describing the finished episode (logged as
  ``env/{name}``, averaged over episodes).

The rollout, not the environment, enforces the turn limit (``max_turns``) and the token budget of the episode
(``max_episode_tokens``): an episode cut by either ends ``truncated`` with the rewards it earned so far.

Environments are named in configs by a registered name (``calculator``) or a ``module:Class`` import path (a class
or factory of your own module on ``PYTHONPATH``), with keyword arguments from ``algo.env_args``.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Callable, Mapping, NamedTuple, Protocol, runtime_checkable

from jrlhf.errors import JrlhfError

__all__ = ["Env", "EnvError", "StepResult", "CalculatorEnv", "register_env", "env_names", "make_env_factory"]


class EnvError(JrlhfError, ValueError):
    """An environment is misconfigured or misbehaved (unknown name, wrong return type); the message says the fix."""


class StepResult(NamedTuple):
    """What :meth:`Env.step` returns (a plain 3-tuple works as well).

    Attributes:
      observation: the next turn(s) to show the policy (chat messages or text); ignored when ``done``.
      reward: this turn's reward, a finite float.
      done: whether the episode ended.
    """

    observation: Any
    reward: float
    done: bool


@runtime_checkable
class Env(Protocol):
    """The environment protocol (see the module docstring). One instance plays one episode at a time."""

    def reset(self, record: Mapping[str, Any]) -> Any:
        """Starts an episode for prompt ``record``; returns the first observation (messages or text)."""
        ...

    def step(self, assistant_text: str) -> tuple[Any, float, bool]:
        """Takes the policy's turn; returns ``(observation, reward, done)``."""
        ...


# ------------------------------------------------------------------------------------------------ calculator


def reversed_sum(a: str, b: str) -> str:
    """Sum of two numbers written least significant digit first, written the same way (the shipped addition task:
    ``reversed_sum("321", "954") == "285"``, i.e. 123 + 459 = 582)."""
    return str(int(a[::-1]) + int(b[::-1]))[::-1]


class CalculatorEnv:
    """A calculator tool for the shipped addition task (numbers written least significant digit first).

    The policy may call the tool by answering ``<calc>A+B</calc>`` (``A``, ``B``: 1-``max_digits`` digits, in the
    task's reversed notation); the environment then answers with a ``user`` turn holding the sum in the same
    notation, and the policy takes another turn. Any turn without ``<calc>`` is the final answer, compared with the
    record's ``answer`` (surrounding whitespace ignored). A turn with ``<calc>`` that does not parse gets the
    observation ``error`` and no bonus.

    Rewards: ``correct_reward`` (1.0) at the final turn when the answer matches exactly; ``call_bonus`` (0.1) at the
    first well-formed call of the episode (one bonus per episode, so repeated calls earn nothing more); 0 otherwise.
    So a direct correct answer returns 1.0, a call then a correct answer 1.1, a call then a wrong answer 0.1.

    ``episode_metrics()``: ``tool_call`` (1 when the episode made a well-formed call), ``exact_match`` (1 when the
    final answer matched), ``tool_call_and_correct`` and ``turns``.

    Args:
      correct_reward: reward of an exactly matching final answer.
      call_bonus: reward of the first well-formed call of an episode.
      max_digits: the most digits an operand may have.
      role: the chat role of the tool's answer (``user`` for templates without a ``tool`` role).
    """

    CALL = re.compile(r"<calc>\s*(\d+)\s*\+\s*(\d+)\s*</calc>")

    def __init__(self, correct_reward: float = 1.0, call_bonus: float = 0.1, max_digits: int = 6,
                 role: str = "user"):
        self.correct_reward = float(correct_reward)
        self.call_bonus = float(call_bonus)
        self.max_digits = int(max_digits)
        self.role = role
        self._answer = None

    def reset(self, record):
        if "prompt" not in record or "answer" not in record:
            raise EnvError("calculator: each record needs 'prompt' and 'answer' fields (the shipped "
                           "builtin:addition/rl_prompts.jsonl has both)")
        self._answer = str(record["answer"]).strip()
        self._called = False
        self._correct = False
        self._turns = 0
        prompt = record["prompt"]
        return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]

    def step(self, assistant_text: str):
        if self._answer is None:
            raise EnvError("calculator: step() before reset()")
        self._turns += 1
        if "<calc>" in assistant_text:
            match = self.CALL.search(assistant_text)
            if match is None or max(len(match.group(1)), len(match.group(2))) > self.max_digits:
                return StepResult([{"role": self.role, "content": "error"}], 0.0, False)
            reward = 0.0 if self._called else self.call_bonus
            self._called = True
            return StepResult([{"role": self.role, "content": reversed_sum(match.group(1), match.group(2))}],
                              reward, False)
        self._correct = assistant_text.strip() == self._answer
        return StepResult(None, self.correct_reward if self._correct else 0.0, True)

    def episode_metrics(self) -> dict:
        return {"tool_call": float(self._called), "exact_match": float(self._correct),
                "tool_call_and_correct": float(self._called and self._correct), "turns": float(self._turns)}


# ------------------------------------------------------------------------------------------------ registry


_ENVS: dict[str, Callable[..., Any]] = {"calculator": CalculatorEnv}


def register_env(name: str, factory: Callable[..., Any]) -> None:
    """Registers ``factory`` (a class or a function ``(**env_args) -> env``) under ``name``.

    Raises:
      EnvError: ``name`` is taken by a different factory.
    """
    if name in _ENVS and _ENVS[name] is not factory:
        raise EnvError(f"environment name '{name}' is taken by {_ENVS[name]!r}; pick another name")
    _ENVS[name] = factory


def env_names() -> list[str]:
    """The registered environment names."""
    return sorted(_ENVS)


def make_env_factory(spec: Any, env_args: Mapping[str, Any] | None = None) -> Callable[[], Any]:
    """A zero-argument function making a fresh environment per episode.

    Args:
      spec: a registered name (``"calculator"``), a ``"module:Class"`` import path, or a class / factory.
      env_args: keyword arguments of the class / factory.

    Raises:
      EnvError: an unknown name, an import path that does not resolve, an instance instead of a class, or an object without
        ``reset``/``step``.
    """
    env_args = dict(env_args or {})
    if isinstance(spec, str):
        if spec in _ENVS:
            factory = _ENVS[spec]
        elif ":" in spec:
            module_name, _, attr = spec.partition(":")
            try:
                factory = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as error:
                raise EnvError(f"algo.env '{spec}': cannot import it ({error}); use a registered name "
                               f"({', '.join(env_names())}) or module:Class on PYTHONPATH") from None
        else:
            raise EnvError(f"algo.env '{spec}' is not a registered environment ({', '.join(env_names())}) nor a "
                           "module:Class import path")
    elif isinstance(spec, Env) and not isinstance(spec, type):
        raise EnvError(f"algo.env: got the environment instance {spec!r}; every episode needs its own, so pass its "
                       "class or a factory function")
    else:
        factory = spec
    if not callable(factory):
        raise EnvError(f"algo.env {spec!r}: expected a class or factory, got {type(factory).__name__}")

    def make():
        env = factory(**env_args)
        if not isinstance(env, Env):
            raise EnvError(f"algo.env {spec!r} made a {type(env).__name__} without reset(record) and "
                           "step(assistant_text) methods")
        return env

    return make


# ------------------------------------------------------------------------------------------------ SFT warm start


def calculator_sft_records(records, tool_fraction: float = 0.1, seed: int = 0) -> list[dict]:
    """SFT conversations for the calculator: ``{messages}`` records made from ``{prompt, completion}`` addition
    records, a ``tool_fraction`` of them (chosen with ``numpy.random.default_rng(seed)``) as a tool call, the
    tool's answer and the final answer (``user: 787+509=``, ``assistant: <calc>787+509</calc>``, ``user: 2961``,
    ``assistant: 2961``), the rest as a direct answer. The shipped ``addition/sft_tool.jsonl`` is
    ``calculator_sft_records(sft_train, 0.1, 0)`` (``python -m jrlhf.envs``), the warm start of the multi-turn
    GRPO recipe (``builtin:sft_tool``, then ``builtin:grpo_multiturn``)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    use_tool = rng.random(len(records)) < tool_fraction
    out = []
    for record, tool in zip(records, use_tool):
        prompt, answer = record["prompt"], record["completion"]
        messages = [{"role": "user", "content": prompt}]
        if tool:
            a, b = prompt.rstrip("=").split("+")
            messages += [{"role": "assistant", "content": f"<calc>{a}+{b}</calc>"},
                         {"role": "user", "content": reversed_sum(a, b)}]
        messages.append({"role": "assistant", "content": answer})
        out.append({"messages": messages})
    return out


def main(argv=None) -> int:
    """Writes ``jrlhf/data/files/addition/sft_tool.jsonl`` (see :func:`calculator_sft_records`)."""
    import os

    from jrlhf.data.addition import files_dir, load_split
    from jrlhf.data.sources import write_jsonl

    path = os.path.join(files_dir(), "sft_tool.jsonl")
    write_jsonl(path, calculator_sft_records(load_split("sft_train"), 0.1, 0))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
