"""Multi-turn, tool-using rollouts (``jrlhf.envs``, ``jrlhf.algorithms.multiturn``).

* the environment protocol and the calculator, from Python, against hand-computed episodes;
* token-in/token-out: the episode's ids equal the whole conversation re-tokenised where the template is stable
  (the shipped character tokenizer), and differ where re-tokenising would change them (a template that strips
  earlier reasoning; a BPE tokenizer given a non-canonical sampled split);
* environment tokens carry no gradient in the GRPO, RLOO and REINFORCE++ losses (exact zeros) and the sampler's
  old log-probs at assistant tokens equal the trainer's forward;
* the turn limit, the token budget and per-turn reward accounting against hand-computed cases;
* GRPO / RLOO / REINFORCE++ updates on multi-turn rollouts from ``make`` (no config system), and one ``jrlhf
  train grpo`` step with ``algo.env``.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf import envs
from jrlhf.algorithms import grpo, multiturn, onpolicy, reinforce_pp, rloo
from jrlhf.config import ConfigError
from jrlhf.data import load_tokenizer
from jrlhf.models import init_model, logical_axes, tiny_config
from jrlhf.sharding import make_mesh
from jrlhf.step import OptimizerConfig, StepContext, default_globals, init_train_state, make_optimizer

TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
              "head_dim": 16, "max_position_embeddings": 128}
RECORDS = [{"prompt": "787+509=", "answer": "2961"}, {"prompt": "316+200=", "answer": "516"}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("char")


@pytest.fixture(scope="module")
def policy(tokenizer):
    config = tiny_config("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **TINY_MODEL)
    return init_model(config, jax.random.PRNGKey(3))


# ------------------------------------------------------------------------------------------------ the protocol


def test_calculator_episode_by_hand():
    env = envs.CalculatorEnv()
    assert isinstance(env, envs.Env)
    assert env.reset(RECORDS[0]) == [{"role": "user", "content": "787+509="}]
    # 787 + 509 written least significant digit first is 787 + 905 = 1692, written back "2961"
    assert envs.reversed_sum("787", "509") == "2961" and envs.reversed_sum("321", "954") == "285"
    assert env.step("<calc>787+509</calc>") == ([{"role": "user", "content": "2961"}], 0.1, False)
    assert env.step("<calc>787+509</calc>") == ([{"role": "user", "content": "2961"}], 0.0, False)  # one bonus
    assert env.step("<calc>78x</calc>") == ([{"role": "user", "content": "error"}], 0.0, False)
    assert env.step(" 2961 ") == (None, 1.0, True)
    assert env.episode_metrics() == {"tool_call": 1.0, "exact_match": 1.0, "tool_call_and_correct": 1.0,
                                     "turns": 4.0}
    env.reset(RECORDS[1])
    assert env.step("615") == (None, 0.0, True)
    assert env.episode_metrics()["tool_call"] == 0.0 and env.episode_metrics()["exact_match"] == 0.0


def test_env_factory_names_and_errors():
    assert isinstance(envs.make_env_factory("calculator", {"call_bonus": 0.5})(), envs.CalculatorEnv)
    assert envs.make_env_factory("calculator", {"call_bonus": 0.5})().call_bonus == 0.5
    assert isinstance(envs.make_env_factory("jrlhf.envs:CalculatorEnv")(), envs.CalculatorEnv)
    with pytest.raises(envs.EnvError, match="not a registered environment"):
        envs.make_env_factory("calculater")
    with pytest.raises(envs.EnvError, match="cannot import"):
        envs.make_env_factory("nowhere_module:Env")
    with pytest.raises(envs.EnvError, match="pass its class or a factory"):
        envs.make_env_factory(envs.CalculatorEnv())
    with pytest.raises(envs.EnvError, match="without reset"):
        envs.make_env_factory(lambda: object())()
    with pytest.raises(envs.EnvError, match="'prompt' and 'answer'"):
        envs.CalculatorEnv().reset({"prompt": "1+2="})


# ------------------------------------------------------------------------------------------------ token-in/token-out


def _conversation_ids(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _episode_by_hand(renderer, tokenizer, first, turns):
    """Token-in/token-out ids of a conversation: the prompt, then each assistant turn's ids (its text's ids + EOS,
    as the sampler emits them) and the rendered observation after it."""
    ids = renderer.first(first)
    for assistant_ids, observation in turns:
        ids += list(assistant_ids) + [tokenizer.eos_token_id]
        ids += renderer.turn(observation, tokenizer.eos_token_id)
    return ids


def test_token_in_token_out_equals_retokenising_a_stable_template(tokenizer):
    renderer = multiturn.TurnRenderer(tokenizer)
    first = [{"role": "user", "content": "787+509="}]
    turns = [("<calc>787+509</calc>", [{"role": "user", "content": "2961"}]),
             ("<calc>1+2</calc>", [{"role": "user", "content": "3"}, {"role": "user", "content": "again"}])]
    ids = _episode_by_hand(renderer, tokenizer, first,
                           [(tokenizer(a, add_special_tokens=False)["input_ids"], o) for a, o in turns])
    messages = list(first)
    for assistant, observation in turns:
        messages += [{"role": "assistant", "content": assistant}] + observation
    assert ids == _conversation_ids(tokenizer, messages)
    assert tokenizer.decode(ids).endswith("<|user|>3<|eos|><|user|>again<|eos|><|assistant|>")


def test_retokenising_differs_when_the_template_strips_earlier_reasoning(tokenizer):
    """A Qwen3-style template drops the reasoning of earlier assistant turns when the conversation is rendered
    again; the policy was conditioned on (and is trained on) the reasoning it sampled, so only token-in/token-out
    keeps the sequence the log-probs belong to."""
    stripping = load_tokenizer("char")  # a fresh copy: the fixture's template stays
    stripping.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>"
        "{% if m['role'] == 'assistant' and '</think>' in m['content'] %}"
        "{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}{% endif %}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    renderer = multiturn.TurnRenderer(stripping)
    sampled = "<think>9+7=16</think><calc>787+509</calc>"
    observation = [{"role": "user", "content": "2961"}]
    first = [{"role": "user", "content": "787+509="}]
    ids = _episode_by_hand(renderer, stripping, first, [(stripping(sampled, add_special_tokens=False)["input_ids"],
                                                         observation)])
    whole = _conversation_ids(stripping, first + [{"role": "assistant", "content": sampled}] + observation)
    assert ids != whole and len(ids) - len(whole) == len("<think>9+7=16</think>")
    assert "<think>" in stripping.decode(ids) and "<think>" not in stripping.decode(whole)
    # the observation's own tokens are the same in both: only the earlier turn differs
    tail = renderer.turn(observation, stripping.eos_token_id)
    assert ids[-len(tail):] == whole[-len(tail):]


def test_retokenising_differs_for_a_non_canonical_bpe_split():
    """A BPE tokenizer merges ``a b`` into ``ab``. A policy may sample ``a`` then ``b`` (two tokens); decoding and
    re-tokenising gives the one token ``ab``, so the re-tokenised sequence is not the sampled one (and its log-probs
    would be those of a different sequence). Token-in/token-out keeps the sampled ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<u>": 2, "<a>": 3, "a": 4, "b": 5, "ab": 6, "c": 7}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.Split("|", behavior="isolated")
    backend.decoder = decoders.Fuse()
    bpe = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                  additional_special_tokens=["<u>", "<a>"])
    bpe.chat_template = ("{% for m in messages %}{{ '<u>' if m['role'] == 'user' else '<a>' }}{{ m['content'] }}"
                         "<eos>{% endfor %}{% if add_generation_prompt %}<a>{% endif %}")
    renderer = multiturn.TurnRenderer(bpe)
    first = [{"role": "user", "content": "c"}]
    sampled = [4, 5]  # "a", "b": the model's own (non-canonical) split of "ab"
    ids = _episode_by_hand(renderer, bpe, first, [(sampled, [{"role": "user", "content": "abc"}])])
    assert ids == [2, 7, 1, 3, 4, 5, 1, 2, 6, 7, 1, 3]
    text = bpe.decode(sampled)
    whole = _conversation_ids(bpe, first + [{"role": "assistant", "content": text},
                                            {"role": "user", "content": "abc"}])
    assert whole == [2, 7, 1, 3, 6, 1, 2, 6, 7, 1, 3] and whole != ids


# ------------------------------------------------------------------------------------------------ episodes


class ScriptedEnv:
    """Rewards 0.5, -0.25, then 2.0 at the third step (done). Observations: ``obs_len`` characters ``x`` in a user
    turn, as raw text ``<|user|>xx<|eos|><|assistant|>`` (``obs_len + 3`` tokens whatever the turn ended with) or,
    with ``messages``, as a chat message rendered by the template."""

    REWARDS = (0.5, -0.25, 2.0)

    def __init__(self, obs_len: int = 2, never_done: bool = False, messages: bool = False, bonus: float = 0.0):
        self.obs_len, self.never_done, self.messages, self.bonus = obs_len, never_done, messages, bonus

    def reset(self, record):
        self.turn = 0
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, text):
        reward = self.REWARDS[min(self.turn, 2)] + self.bonus * (ord(text[0]) % 3 if text else 0)
        self.turn += 1
        done = self.turn == 3 and not self.never_done
        if self.messages:
            return [{"role": "user", "content": "x" * self.obs_len}], reward, done
        return "<|user|>" + "x" * self.obs_len + "<|eos|><|assistant|>", reward, done

    def episode_metrics(self):
        return {"steps": float(self.turn)}


class CharEnv:
    """One turn; reward: the first character's code / 128 (signal for a random policy)."""

    def reset(self, record):
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, text):
        return None, (ord(text[0]) / 128 if text else 0.0), True


ALL_STOP = tuple(range(104))  # every id of the character tokenizer ends a turn: one-token assistant turns


def _one_token_turns(policy, tokenizer, env_factory, max_turns, budget, records=RECORDS):
    """Episodes whose every assistant turn is one sampled token (every id is a stop id)."""
    model, params = policy
    return multiturn.run_episodes(model, params, records, jax.random.PRNGKey(0), env_factory=env_factory,
                                  tokenizer=tokenizer, max_turns=max_turns, max_new_tokens=4,
                                  max_episode_tokens=budget, stop_token_ids=ALL_STOP)


def test_per_turn_rewards_turn_limit_and_layout(policy, tokenizer):
    # <|user|> x x <|eos|> <|assistant|>: 5 observation tokens after each one-token assistant turn
    episodes = _one_token_turns(policy, tokenizer, lambda: ScriptedEnv(2), max_turns=5, budget=64)
    for r in range(2):
        assert episodes.turn_rewards[r] == [0.5, -0.25, 2.0] and episodes.end_reason[r] == "done"
        assert episodes.turn_spans[r] == [(0, 1), (6, 7), (12, 13)]
        assert episodes.assistant_mask[r] == [1, 0, 0, 0, 0, 0] * 2 + [1]
        assert tokenizer.decode(episodes.tokens[r][1:6]) == "<|user|>xx<|eos|><|assistant|>"
    np.testing.assert_allclose(episodes.returns, [2.25, 2.25])
    assert not episodes.truncated.any() and episodes.metrics == [{"steps": 3.0}] * 2
    # the turn limit: two turns, then cut (truncated) with the rewards earned so far
    cut = _one_token_turns(policy, tokenizer, lambda: ScriptedEnv(2), max_turns=2, budget=64)
    assert [len(s) for s in cut.turn_spans] == [2, 2] and cut.end_reason == ["max_turns"] * 2
    np.testing.assert_allclose(cut.returns, [0.25, 0.25])
    assert cut.truncated.all() and len(cut.tokens[0]) == 7  # no observation after the last allowed turn
    # the batch: prompt left-padded to 16 columns, then the episode; loss only on the assistant tokens
    arrays = multiturn.episode_arrays(episodes, 20, pad_id=tokenizer.pad_token_id, prompt_width=16)
    prompt = multiturn.TurnRenderer(tokenizer).first([{"role": "user", "content": "787+509="}])
    assert len(prompt) == 12
    np.testing.assert_array_equal(arrays["input_ids"][0, 4:16], prompt)
    np.testing.assert_array_equal(arrays["attention_mask"][0], [0] * 4 + [1] * 25 + [0] * 7)
    expected = np.zeros(36, np.int32)
    expected[[16, 22, 28]] = 1
    np.testing.assert_array_equal(arrays["loss_mask"][0], expected)
    assert (arrays["old_logps"][0][expected[16:] == 0] == 0).all() and (arrays["old_logps"][0][[0, 6, 12]] < 0).all()
    np.testing.assert_allclose(arrays["scores"], [2.25, 2.25])


def test_token_budget_is_honoured(policy, tokenizer):
    # observations of 10 characters (13 tokens); budget 20: one turn (1) + one observation (13) + one turn (1) fit,
    # the second observation does not and is cut at the budget
    episodes = _one_token_turns(policy, tokenizer, lambda: ScriptedEnv(10, never_done=True), max_turns=6,
                                budget=20)
    for r in range(2):
        assert len(episodes.tokens[r]) == 20 and episodes.end_reason[r] == "max_episode_tokens"
        assert episodes.turn_spans[r] == [(0, 1), (14, 15)] and episodes.turn_rewards[r] == [0.5, -0.25]
        assert sum(episodes.assistant_mask[r]) == 2
    assert episodes.truncated.all()
    # a turn longer than the room left is cut at the budget too (no env step for it)
    model, params = policy
    long_turns = multiturn.run_episodes(model, params, RECORDS, jax.random.PRNGKey(1),
                                        env_factory=lambda: ScriptedEnv(2, never_done=True), tokenizer=tokenizer,
                                        max_turns=4, max_new_tokens=16, max_episode_tokens=9, stop_token_ids=())
    assert [len(t) for t in long_turns.tokens] == [9, 9] and long_turns.turn_rewards == [[], []]
    assert long_turns.end_reason == ["max_episode_tokens"] * 2
    with pytest.raises(envs.EnvError, match="over the budget"):
        multiturn.episode_arrays(episodes, 19, pad_id=0)


# ------------------------------------------------------------------------------------------------ losses


def _rollout(policy, tokenizer, config, rng=0):
    model, params = policy
    return multiturn.multiturn_rollout(model, params, RECORDS, jax.random.PRNGKey(rng), config,
                                       tokenizer=tokenizer, env=lambda: ScriptedEnv(2, messages=True, bonus=0.1),
                                       ref_params=params, stop_token_ids=ALL_STOP)


CONFIG = {"num_generations": 2, "max_completion_length": 3, "max_turns": 3, "max_episode_tokens": 24}


@pytest.mark.parametrize("module, extra", [(grpo, {"beta": 0.04, "loss_type": "grpo"}),
                                           (grpo, {"loss_type": "dapo"}),
                                           (rloo, {"beta": 0.05}),
                                           (reinforce_pp, {"kl_coef": 0.01})])
def test_environment_tokens_carry_no_gradient(policy, tokenizer, monkeypatch, module, extra):
    config = module.Config(**CONFIG, **extra)
    out = _rollout(policy, tokenizer, config)
    batch = dict(out.batch)
    n = batch["old_logps"].shape[1]
    assistant = np.asarray(batch["loss_mask"])[:, -n:] > 0
    env_tokens = (np.asarray(batch["attention_mask"])[:, -n:] > 0) & ~assistant
    assert assistant.any() and env_tokens.sum() > assistant.sum()
    algo = module.make(policy[0], config)
    prepared, globals_ = jax.jit(algo.prepare_batch)(batch, None, {})
    globals_ = {**default_globals(prepared), **globals_, "num_microbatches": jnp.float32(1)}
    ctx = StepContext(rng=jax.random.PRNGKey(0), step=jnp.int32(0), algo_state={}, globals=globals_)
    # the loss as a function of the policy's token log-probs [R, N] (the forward replaced by the identity)
    monkeypatch.setattr(onpolicy, "rollout_forward",
                        lambda model, params, b, cfg: (onpolicy.completion_part(b)[1], params, None, None))
    logps = jnp.asarray(batch["old_logps"]) - 0.3 * jnp.asarray(env_tokens)  # env positions: arbitrary values

    def loss(x):
        return algo.loss_fn(x, prepared, None, ctx)[0]

    grad = np.asarray(jax.grad(loss)(logps))
    assert (grad[env_tokens] == 0.0).all() and (grad[~assistant] == 0.0).all()
    assert np.abs(grad[assistant]).max() > 1e-4  # the assistant tokens do get a gradient
    # perturbing the environment tokens' log-probs leaves the loss unchanged, bit for bit
    noise = jax.random.normal(jax.random.PRNGKey(1), logps.shape) * jnp.asarray(env_tokens)
    assert float(loss(logps)) == float(loss(logps + 5.0 * noise))


def test_sampler_logps_equal_the_trainer_forward_at_assistant_tokens(policy, tokenizer):
    """Token-in/token-out end to end: the sampler's log-probs (each turn prefilled from ids) equal a full forward
    over the assembled batch at every assistant token, so the batch is the sequence that was sampled."""
    out = _rollout(policy, tokenizer, grpo.Config(**CONFIG))
    batch = out.batch
    n = batch.old_logps.shape[1]
    model, params = policy
    logps, _, _ = onpolicy.completion_forward(model, params, batch.input_ids, batch.attention_mask, n,
                                              temperature=1.0)
    mask = np.asarray(batch.loss_mask)[:, -n:] > 0
    assert mask.sum() >= 8
    np.testing.assert_allclose(np.asarray(batch.old_logps)[mask], np.asarray(logps)[mask], atol=2e-5)
    np.testing.assert_allclose(np.asarray(batch.ref_logps)[mask], np.asarray(logps)[mask], atol=2e-5)
    assert out.episodes is not None and out.metrics["env/steps"] > 0 and out.metrics["env/turns"] >= 1


# ------------------------------------------------------------------------------------------------ updates


@pytest.mark.parametrize("module, extra", [(grpo, {"beta": 0.04}), (rloo, {}), (reinforce_pp, {})])
def test_update_on_a_multiturn_rollout_from_python(policy, tokenizer, module, extra):
    """``make`` + ``rollout`` + ``update`` with an environment class in the config (no config system)."""
    model, params = policy
    config = module.Config(**CONFIG, **extra, env=CharEnv)
    algo = module.make(model, config)
    mesh = make_mesh()
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2), params)
    state, shardings = init_train_state(params, optimizer, jax.random.PRNGKey(0), mesh=mesh,
                                        param_specs=logical_axes(model))
    frozen = algo.init_frozen(state.params)
    out = algo.rollout(state.params, RECORDS * 2, jax.random.PRNGKey(2), tokenizer=tokenizer, frozen=frozen,
                       stop_token_ids=ALL_STOP)  # 8 episodes: the rows divide the 8 devices of the mesh
    assert out.batch.input_ids.shape == (8, 16 + 24)
    assert set(out.metrics) >= {"reward", "env/turns", "env/end_done"} and out.metrics["env/end_done"] > 0
    assert np.asarray(out.batch.scores).std() > 0
    before = np.asarray(state.params["params"]["embed"]["embedding"]).copy()
    state, metrics = algo.update(optimizer, mesh, state_shardings=shardings)(state, out.batch, frozen)
    assert np.isfinite(float(metrics["loss"]))
    assert np.abs(np.asarray(state.params["params"]["embed"]["embedding"]) - before).max() > 0


def test_config_errors():
    with pytest.raises(ConfigError, match="max_turns"):
        grpo.make(None, grpo.Config(env="calculator", max_turns=0))
    with pytest.raises(ConfigError, match="reward_funcs"):
        multiturn.check_env_settings(grpo.Config(env="calculator", reward_funcs=("addition_exact_match",)))


def test_jrlhf_train_grpo_with_an_environment(tmp_path):
    from jrlhf.train_loop import train

    config = {"algorithm": "grpo", "model": {"family": "llama", "overrides": dict(TINY_MODEL)},
              "data": {"train": "builtin:addition/rl_prompts.jsonl", "batch_size": 4, "max_prompt_length": 16,
                       "eval_prompts": "builtin:addition/eval.jsonl", "max_eval_examples": 4, "eval_batch_size": 4},
              "train": {"output_dir": str(tmp_path / "run"), "steps": 1, "seed": 0, "log_every": 1,
                        "progress_bar": False, "tensorboard": False, "save_every": 0},
              "algo": {"env": "calculator", "env_args": {"call_bonus": 0.2}, "num_generations": 2,
                       "max_completion_length": 4, "max_turns": 2, "max_episode_tokens": 16}}
    summary = train(config)
    assert summary["eval"]["num_examples"] == 4 and "env/tool_call" in summary["eval"]
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    train_rows = [r for r in logged if r["split"] == "train"]
    assert train_rows and "env/turns" in train_rows[0]
