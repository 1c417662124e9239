"""The real-data recipes' config: shipped recipe files, the held-out split of one data file, the system prompt."""

import json

import pytest

from jrlhf.algorithms.base import _holdout_split, preference_eval_records, with_system_prompt
from jrlhf.config import ConfigError, load_config
from jrlhf.data import load_records

PREFERENCE = "builtin:addition/preference_eval.jsonl"


@pytest.mark.parametrize("recipe, algorithm", [("dpo_hh", "dpo"), ("grpo_gsm8k", "grpo")])
def test_recipes_need_only_the_model_and_data_paths(recipe, algorithm, tmp_path):
    cfg = load_config(f"builtin:{recipe}", algorithm=algorithm)
    # the two settings a user gives are placeholders that say how to set them
    assert cfg.model.path.startswith("<set model.path=") and cfg.data.train.startswith("<set data.train=")
    assert cfg.data.tokenizer is None  # the model folder's own tokenizer
    given = load_config(f"builtin:{recipe}", [f"model.path={tmp_path}", "data.train=/data/train.jsonl"],
                        algorithm=algorithm)
    assert given.model.path == str(tmp_path) and given.data.train == "/data/train.jsonl"


def test_dpo_recipe_holds_out_at_least_256_pairs_and_drops_invalid_records():
    cfg = load_config("builtin:dpo_hh", algorithm="dpo")
    assert cfg.data.eval_holdout >= 256 and cfg.data.eval is None
    assert cfg.data.invalid_records == "drop"


def test_grpo_recipe_reward_and_prompt():
    from jrlhf.rewards import ANSWER_INSTRUCTION

    cfg = load_config("builtin:grpo_gsm8k", algorithm="grpo")
    assert list(cfg.algo.reward_funcs) == ["gsm8k_answer", "gsm8k_format"]
    assert cfg.data.system_prompt == ANSWER_INSTRUCTION
    assert cfg.data.eval_reward == "gsm8k_shaped"


def test_holdout_takes_the_last_records(tmp_path):
    records = load_records(PREFERENCE)
    cfg = load_config(None, [f"data.train={PREFERENCE}", "data.eval_holdout=7"], algorithm="dpo")
    train, held_out = _holdout_split(cfg.data)
    assert train == records[:-7] and held_out == records[-7:]
    assert preference_eval_records(cfg.data) == records[-7:]
    cfg.data.max_eval_examples = 3
    assert preference_eval_records(cfg.data) == records[-7:-4]


@pytest.mark.parametrize("overrides, message", [
    (["data.eval_holdout=5", f"data.eval={PREFERENCE}"], "both give the eval set"),
    (["data.eval_holdout=-1"], "must be >= 0"),
    (["data.eval_holdout=100000"], "would hold out all"),
])
def test_holdout_errors_name_the_key(overrides, message):
    cfg = load_config(None, [f"data.train={PREFERENCE}"] + overrides, algorithm="dpo")
    with pytest.raises(ConfigError, match=message) as error:
        _holdout_split(cfg.data)
    assert "data.eval_holdout" in str(error.value)


def test_system_prompt_by_hand():
    records = [
        {"prompt": "2+2?", "answer": "4"},
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "x"}]},
        {"prompt": [{"role": "system", "content": "own"}, {"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ]
    before = json.dumps(records)
    out = with_system_prompt(records, "Be brief.")
    system = {"role": "system", "content": "Be brief."}
    assert out[0] == {"prompt": [system, {"role": "user", "content": "2+2?"}], "answer": "4"}
    assert out[1]["prompt"] == [system, {"role": "user", "content": "hi"}] and out[1]["chosen"] == records[1]["chosen"]
    assert out[2] == records[2]  # has its own system message
    assert out[3]["messages"][0] == system and len(out[3]["messages"]) == 3
    assert json.dumps(records) == before  # the input is not changed
    assert with_system_prompt(records, None) is records


def test_dpo_trains_and_evaluates_on_the_held_out_pairs(tmp_path):
    import jrlhf

    overrides = [f"data.train={PREFERENCE}", "data.eval_holdout=24", "data.tokenizer=char", "data.batch_size=8",
                 "data.max_length=32", "train.steps=2", f"train.output_dir={tmp_path}", "train.log_every=1",
                 "train.progress_bar=false", "train.export_hf=false", "train.tensorboard=false",
                 "model.overrides={hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 2, "
                 "num_kv_heads: 1, max_position_embeddings: 32}"]
    summary = jrlhf.train(load_config(None, overrides, algorithm="dpo"))
    assert summary["eval"]["num_examples"] == 24
    assert 0.0 <= summary["eval"]["rewards/accuracies"] <= 1.0
    log = (tmp_path / "metrics.jsonl").read_text()
    assert log.count('"split": "train"') == 2
