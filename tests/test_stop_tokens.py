"""Every EOS id of a checkpoint (``config.json`` and ``generation_config.json``) and ``stop_token_ids`` end
completions: in :func:`jrlhf.sampling.generate` as in ``transformers.generate``, in on-policy rollouts and in
held-out evaluation.

The checkpoints are tiny random Llamas over the shipped character tokenizer (EOS id 2) whose
``generation_config.json`` declares a second EOS id, as Qwen2/Qwen3-Instruct, Gemma 3 and Phi checkpoints do.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jrlhf import sampling  # noqa: E402
from jrlhf.algorithms import get_algorithm  # noqa: E402
from jrlhf.algorithms.base import RunContext  # noqa: E402
from jrlhf.config import ConfigError, build_config  # noqa: E402
from jrlhf.data import collate_prompts, load_records, load_tokenizer, tokenize  # noqa: E402
from jrlhf.data.tokenizer import save_char_tokenizer  # noqa: E402
from jrlhf.evaluation import run_stop_token_ids  # noqa: E402
from jrlhf.models import from_pretrained  # noqa: E402
from jrlhf.models.checkpoint import eos_token_ids  # noqa: E402
from jrlhf.rewards import register_reward_fn, reward_fn_names  # noqa: E402
from jrlhf.sharding import MeshConfig, make_mesh, put_global, logical_to_shardings  # noqa: E402
from jrlhf.step import OptimizerConfig, init_train_state, make_optimizer  # noqa: E402
from jrlhf.train_loop import build_model  # noqa: E402

VOCAB = 104          # the shipped character tokenizer
TOKENIZER_EOS = 2    # its <|eos|>
END_OF_TURN = 12     # "#": the second EOS id the generation config declares (an end-of-turn token)
PROMPT_LEN = 12
COMPLETION = 6


def _llama_config():
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    initializer_range=0.3, tie_word_embeddings=False, bos_token_id=1,
                                    eos_token_id=TOKENIZER_EOS, pad_token_id=0)


def _write_folder(model, path, generation_eos):
    model.save_pretrained(path)
    save_char_tokenizer(str(path))
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": generation_eos, "pad_token_id": 0}, f)
    return str(path)


def _hf_generate(path, ids, mask, new_tokens):
    """``transformers.generate`` greedy with the folder's own generation config (its EOS ids): tokens [B, N]."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=new_tokens, pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()


# ------------------------------------------------------------------------------------------ collecting the ids


def test_eos_ids_are_collected_from_both_files_the_tokenizer_and_extra(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"eos_token_id": 2}, f)
    assert eos_token_ids(str(tmp_path)) == (2,)
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [2, 7, 9]}, f)
    tokenizer = type("Tok", (), {"eos_token_id": 11})()
    assert eos_token_ids(str(tmp_path), tokenizer=tokenizer, extra=[9, 13]) == (2, 7, 9, 11, 13)
    assert eos_token_ids(None) == ()
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": ["<|im_end|>"]}, f)
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id must be a token id"):
        eos_token_ids(str(tmp_path))


# ------------------------------------------------------------------------------------------ the sampler


@pytest.fixture(scope="module")
def emit_later(tmp_path_factory):
    """A random Llama whose generation config adds, as second EOS id, a token greedy decoding first emits at a
    later step (>= 2) of prompt 0: ``(folder, ids, mask, step, token)``."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config()).eval()
    rng = np.random.RandomState(0)
    ids = rng.randint(7, VOCAB, (3, 8))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    ids[mask == 0] = 0
    base = _write_folder(model, tmp_path_factory.mktemp("base"), TOKENIZER_EOS)
    free = _hf_generate(base, ids, mask, 12)[0]
    step = next(t for t in range(2, 12) if free[t] != TOKENIZER_EOS and free[t] not in free[:t])
    token = int(free[step])
    folder = _write_folder(model, tmp_path_factory.mktemp("two_eos"), [TOKENIZER_EOS, token])
    return folder, ids, mask, step, token


def test_generation_stops_at_the_second_eos_like_transformers(emit_later):
    folder, ids, mask, step, token = emit_later
    want = _hf_generate(folder, ids, mask, 12)
    assert want[0, step] == token and np.all(want[0, step + 1:] == 0)  # transformers stops there
    model, params = from_pretrained(folder)
    eos = eos_token_ids(folder)
    assert eos == (TOKENIZER_EOS, token)
    out = sampling.generate(model, params, ids, mask, jax.random.key(0), max_new_tokens=12, temperature=0.0,
                            eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    assert int(out.lengths[0]) == step + 1 and not bool(out.truncated[0])
    np.testing.assert_array_equal(np.asarray(out.mask)[0], np.arange(12) <= step)
    # with the tokenizer's EOS alone (the old behaviour) the row runs on past the end-of-turn token
    only_tokenizer = sampling.generate(model, params, ids, mask, jax.random.key(0), max_new_tokens=12,
                                       temperature=0.0, eos_token_id=TOKENIZER_EOS, pad_token_id=0)
    assert int(only_tokenizer.lengths[0]) > step + 1


# ------------------------------------------------------------------------------------------ rollouts and evaluation


@pytest.fixture(scope="module")
def end_of_turn_emitter(tmp_path_factory):
    """Folders of a random Llama made to emit END_OF_TURN at every step (probability ~1 even at temperature 1):
    ``{"two_eos": generation config [2, 12], "one_eos": generation config 2}``."""
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(_llama_config())
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 50.0  # a constant direction in the residual stream...
        for layer in model.model.layers:  # ...that the blocks barely move
            layer.self_attn.o_proj.weight.mul_(0.01)
            layer.mlp.down_proj.weight.mul_(0.01)
        model.lm_head.weight[END_OF_TURN, 0] = 40.0  # ...and the LM head reads as END_OF_TURN
    return {"two_eos": _write_folder(model, tmp_path_factory.mktemp("eot2"), [TOKENIZER_EOS, END_OF_TURN]),
            "one_eos": _write_folder(model, tmp_path_factory.mktemp("eot1"), TOKENIZER_EOS)}


SEEN: dict = {"rollout": [], "eval": []}


def _recording_reward(kind):
    def reward(prompts, completions, completion_ids, **kwargs):
        # evaluation passes no ids: the decoded text shows where the completion ended
        SEEN[kind].append(list(completions) if kind == "eval" else [list(map(int, ids)) for ids in completion_ids])
        return [0.0] * len(completions)

    reward.__name__ = f"stop_test_{kind}"
    return reward


for _kind in ("rollout", "eval"):
    if f"stop_test_{_kind}" not in reward_fn_names():
        register_reward_fn(f"stop_test_{_kind}", _recording_reward(_kind))


def _grpo_parts(folder, tmp_path, algo=None, data=None):
    records = load_records("builtin:addition/rl_prompts.jsonl")[:8]
    from jrlhf.data import write_jsonl

    prompts = str(tmp_path / "prompts.jsonl")
    write_jsonl(prompts, records)
    cfg = build_config({
        "algorithm": "grpo",
        "model": {"path": folder},
        "data": {"train": prompts, "eval_prompts": prompts, "eval_reward": "stop_test_eval", "tokenizer": folder,
                 "batch_size": 4, "eval_batch_size": 8, "max_prompt_length": PROMPT_LEN, "eval_max_new_tokens": 5,
                 **(data or {})},
        "train": {"output_dir": str(tmp_path / "run"), "progress_bar": False, "tensorboard": False},
        "algo": {"num_generations": 2, "max_completion_length": COMPLETION, "reward_funcs": ["stop_test_rollout"],
                 **(algo or {})},
    })
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    mesh = make_mesh(MeshConfig())
    mod = get_algorithm("grpo")
    model, params = build_model(cfg, tokenizer, mod.head(cfg), jax.random.PRNGKey(0))
    run = RunContext(cfg=cfg, model=model, params=params, tokenizer=tokenizer, mesh=mesh, rng=jax.random.PRNGKey(1),
                     load_model=lambda path, head: build_model(cfg, tokenizer, head, jax.random.PRNGKey(2), path))
    setup = mod.setup(run)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3), params)
    from jrlhf.models import logical_axes

    state, _ = init_train_state(params, optimizer, jax.random.PRNGKey(3), mesh=mesh, param_specs=logical_axes(model),
                                algo_state=setup.algo_state)
    frozen = put_global(setup.frozen, logical_to_shardings(setup.frozen_specs, mesh, shapes=setup.frozen), copy=True)
    data_ = tokenize(records[:4], tokenizer, "prompt", max_prompt_length=PROMPT_LEN)
    prompt_batch = collate_prompts(data_.examples, pad_id=tokenizer.pad_token_id, length=PROMPT_LEN)
    return run, setup, state, frozen, prompt_batch


def _rollout_and_eval(folder, tmp_path, **options):
    run, setup, state, frozen, prompt_batch = _grpo_parts(folder, tmp_path, **options)
    SEEN["rollout"].clear()
    SEEN["eval"].clear()
    batch, metrics, _ = setup.onpolicy.collect(state, prompt_batch, frozen, jax.random.PRNGKey(7))
    setup.evaluate(state.params, frozen)
    return run, batch, metrics, SEEN["rollout"][-1], SEEN["eval"][-1]


@pytest.mark.parametrize("source", ["generation_config", "stop_token_ids"])
def test_rollout_and_eval_stop_at_the_second_id(end_of_turn_emitter, tmp_path, source):
    if source == "generation_config":
        folder, options = end_of_turn_emitter["two_eos"], {}
    else:  # a checkpoint declaring one EOS id, the end-of-turn token given as an option
        folder = end_of_turn_emitter["one_eos"]
        options = {"algo": {"stop_token_ids": [END_OF_TURN]}, "data": {"eval_stop_token_ids": [END_OF_TURN]}}
    run, batch, metrics, rollout_ids, eval_ids = _rollout_and_eval(folder, tmp_path, **options)
    assert run_stop_token_ids(run, run.cfg.algo.stop_token_ids) == (TOKENIZER_EOS, END_OF_TURN)
    rows = 8
    # every completion is the single end-of-turn token: ended, not truncated
    assert rollout_ids == [[END_OF_TURN]] * rows
    assert eval_ids == ["#"] * 8
    np.testing.assert_array_equal(np.asarray(batch["truncated"]), np.zeros(rows))
    assert metrics["completions/clipped_ratio"] == 0.0 and metrics["completions/mean_length"] == 1.0
    # the masks end at it: one completion token attended to and trained on, then padding
    completion_mask = np.asarray(batch["attention_mask"])[:, PROMPT_LEN:]
    np.testing.assert_array_equal(completion_mask, np.tile(np.arange(COMPLETION) == 0, (rows, 1)))
    np.testing.assert_array_equal(np.asarray(batch["loss_mask"])[:, PROMPT_LEN:], completion_mask)
    np.testing.assert_array_equal(np.asarray(batch["input_ids"])[:, PROMPT_LEN], np.full(rows, END_OF_TURN))


def test_without_the_second_id_completions_run_to_the_limit(end_of_turn_emitter, tmp_path):
    """The same model with only the tokenizer's EOS: what every checkpoint with two EOS ids got before."""
    _, batch, metrics, rollout_ids, eval_ids = _rollout_and_eval(end_of_turn_emitter["one_eos"], tmp_path)
    assert rollout_ids == [[END_OF_TURN] * COMPLETION] * 8
    assert eval_ids == ["#####"] * 8
    assert metrics["completions/clipped_ratio"] == 1.0


def test_stop_token_ids_outside_the_vocabulary_is_a_config_error(end_of_turn_emitter, tmp_path):
    with pytest.raises(ConfigError, match="outside the model's vocabulary of 104"):
        _grpo_parts(end_of_turn_emitter["one_eos"], tmp_path, algo={"stop_token_ids": [VOCAB]})
    with pytest.raises(ConfigError, match="stop_token_ids"):
        _grpo_parts(end_of_turn_emitter["one_eos"], tmp_path, data={"eval_stop_token_ids": ["<|im_end|>"]})


def test_export_keeps_every_eos_id_of_the_starting_checkpoint(end_of_turn_emitter, tmp_path):
    """``hf_model/`` carries the starting folder's generation_config.json: a policy trained from a checkpoint that
    declares two EOS ids and reloaded from its export still stops at both."""
    import jrlhf

    folder = end_of_turn_emitter["two_eos"]
    assert END_OF_TURN not in eos_token_ids(None, model_config=from_pretrained(folder)[0].config)
    summary = jrlhf.train({
        "algorithm": "sft",
        "model": {"path": folder},
        "data": {"tokenizer": folder, "batch_size": 8, "max_length": 16},
        "train": {"output_dir": str(tmp_path / "run"), "steps": 1, "progress_bar": False, "tensorboard": False},
    })
    assert END_OF_TURN in eos_token_ids(summary["hf_dir"])
