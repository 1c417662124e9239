"""Real-input traps, each fixed as a class: the tokenizer defaults to the model's own (and must fit its embedding),
an invalid-record policy, one set of limits for training and held-out records, scoring passes bounded in memory."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jrlhf
from jrlhf import data
from jrlhf.config import ConfigError, build_config
from jrlhf.data.sources import DataError
from jrlhf.models import init_model, save_pretrained, tiny_config
from jrlhf.train_loop import build_model, resolve_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_CHECKPOINT = os.path.expanduser("~/.cache/jrlhf/smollm2-135m-instruct-test")


def real_data_dir():
    """``$JRLHF_REAL_DATA``, else ``<repo>/../shared/real_data``; the test skips when neither exists."""
    path = os.environ.get("JRLHF_REAL_DATA") or os.path.join(REPO, "..", "shared", "real_data")
    if not os.path.isdir(path):
        pytest.skip(f"real data not found at {path} (set JRLHF_REAL_DATA)")
    return path


def hh_path():
    path = os.path.join(real_data_dir(), "hh_rlhf_harmless_base_test.jsonl")
    if not os.path.isfile(path):
        pytest.skip(f"{path} is missing")
    return path


def real_tokenizer_dir(tmp_path):
    """A folder with only the tokenizer files of the real checkpoint (skips when it is absent)."""
    if not os.path.isdir(REAL_CHECKPOINT):
        pytest.skip(f"real checkpoint not found at {REAL_CHECKPOINT}")
    folder = tmp_path / "real_tokenizer"
    folder.mkdir()
    for name in os.listdir(REAL_CHECKPOINT):
        if name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(os.path.join(REAL_CHECKPOINT, name), folder / name)
    return str(folder)


TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
        "max_position_embeddings": 64}


def run_config(model=None, train=None, data_section=None, algorithm="sft"):
    return build_config({"algorithm": algorithm, "model": model or {"family": "llama", "overrides": dict(TINY)},
                         "data": data_section or {}, "train": train or {}})


def saved_model(folder, vocab_size, tokenizer=None):
    """A tiny random Llama of ``vocab_size`` saved as a Hugging Face folder, with ``tokenizer``'s files if given."""
    model, params = init_model(tiny_config("llama", vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                           num_heads=2, num_kv_heads=1, head_dim=16), jax.random.PRNGKey(0))
    save_pretrained(model, jax.tree.map(np.asarray, params), str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return str(folder)


def char_plus_one_token(folder):
    """The char tokenizer with one more special token, saved in ``folder``: a tokenizer that is not ``char``."""
    tok = data.load_tokenizer("char")
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tok.save_pretrained(str(folder))
    return tok


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_defaults_to_the_pretrained_models_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    own = char_plus_one_token(folder)
    for section in ({"model": {"path": str(folder)}}, {"train": {"init_from": str(folder)}}):
        cfg = run_config(model=section.get("model"), train=section.get("train"))
        assert cfg.data.tokenizer is None
        tok = resolve_tokenizer(cfg)
        assert len(tok) == len(own) == 105
        assert tok.convert_tokens_to_ids("<|tool|>") == 104
    # a fresh random model (no path) keeps the shipped character tokenizer
    assert len(resolve_tokenizer(run_config())) == 104


def test_real_checkpoint_tokenizer_is_picked_up(tmp_path):
    from transformers import AutoTokenizer

    folder = real_tokenizer_dir(tmp_path)
    tok = resolve_tokenizer(run_config(model={"path": folder}))
    reference = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    text = "Human: How do I bake bread?"
    assert len(tok) == len(reference) > 49000
    assert tok(text)["input_ids"] == reference(text)["input_ids"]


def test_explicit_tokenizer_that_is_not_the_models_own_is_an_error(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    char_plus_one_token(folder)
    with pytest.raises(ConfigError) as error:
        resolve_tokenizer(run_config(model={"path": str(folder)}, data_section={"tokenizer": "char"}))
    message = str(error.value)
    assert "\n" not in message and "104 tokens" in message and "105 tokens" in message
    assert "leave data.tokenizer unset" in message
    # the same tokenizer, named explicitly, is fine
    data.load_tokenizer("char").save_pretrained(str(tmp_path / "charmodel"))
    assert len(resolve_tokenizer(run_config(model={"path": str(tmp_path / "charmodel")},
                                            data_section={"tokenizer": "char"}))) == 104


def test_model_folder_without_tokenizer_files_is_an_error(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"^model.path='.*' has no tokenizer files .*set data.tokenizer"):
        resolve_tokenizer(run_config(model={"path": str(folder)}))


def test_tokenizer_larger_than_the_embedding_is_an_error_naming_both_sizes(tmp_path):
    tok = data.load_tokenizer("char")  # 104 tokens
    folder = saved_model(tmp_path / "model", vocab_size=64, tokenizer=tok)
    cfg = run_config(model={"path": folder})
    with pytest.raises(ConfigError, match=r"^the tokenizer has 104 tokens but the model in .* vocab_size=64: "):
        build_model(cfg, resolve_tokenizer(cfg), "lm", jax.random.PRNGKey(0))
    fresh = run_config(model={"family": "llama", "overrides": {**TINY, "vocab_size": 100}})
    with pytest.raises(ConfigError, match=r"104 tokens but the fresh model .* vocab_size=100"):
        build_model(fresh, tok, "lm", jax.random.PRNGKey(0))
    # a padded embedding (more rows than tokens) is fine
    bigger = saved_model(tmp_path / "bigger", vocab_size=128, tokenizer=tok)
    model, _ = build_model(run_config(model={"path": bigger}), tok, "lm", jax.random.PRNGKey(0))
    assert model.config.vocab_size == 128


# ------------------------------------------------------------------------------------------- invalid records


def empty_answer_lines(path):
    """1-based line numbers of the records with an empty (whitespace-only) message, read with json alone."""
    lines = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            record = json.loads(line)
            if any(not m["content"].strip() for key in ("prompt", "chosen", "rejected") for m in record[key]):
                lines.append(number)
    return lines


def test_invalid_records_error_or_drop_on_the_real_hh_pairs(caplog):
    path = hh_path()
    expected = empty_answer_lines(path)
    assert len(expected) == 4  # the README of the data names 4 pairs with an empty assistant answer
    records = data.load_records(path)
    tok = data.load_tokenizer("char")
    with pytest.raises(data.InvalidRecordError) as error:
        data.tokenize_preference(records, tok)
    message = str(error.value)
    assert message.startswith(f"record {expected[0]}: field 'chosen' message 0 has empty content; ")
    assert "data.invalid_records='drop'" in message and "\n" not in message

    with caplog.at_level("WARNING", logger="jrlhf.data"):
        out = data.tokenize_preference(records, tok, invalid_records="drop")
    assert [i + 1 for i, _ in out.report.invalid] == expected
    assert len(out) == len(records) - 4 and out.report.dropped == []
    assert expected[0] - 1 not in {e["record_index"] for e in out.examples}
    numbers = ", ".join(map(str, expected))
    assert f"4 invalid records dropped (records {numbers}; record {expected[0]}: field 'chosen'" in caplog.text
    assert caplog.text.count("invalid records dropped") == 1


@pytest.mark.parametrize("kind, bad, good", [
    ("sft", {"prompt": "1+1=", "completion": " "}, {"prompt": "1+1=", "completion": "2"}),
    ("sft", {"messages": [{"role": "user", "content": "hi"}]}, {"prompt": "2+2=", "completion": "4"}),
    ("preference", {"prompt": "1+1=", "chosen": "2"}, {"prompt": "1+1=", "chosen": "2", "rejected": "3"}),
    ("prompt", {"answer": "2"}, {"prompt": "1+1="}),
])
def test_invalid_record_policy_for_every_record_kind(kind, bad, good):
    tok = data.load_tokenizer("char")
    with pytest.raises(data.InvalidRecordError, match=r"^record 2: "):
        data.tokenize([good, bad, good], tok, kind)
    out = data.tokenize([good, bad, good], tok, kind, invalid_records="drop")
    assert [e["record_index"] for e in out.examples] == [0, 2]
    assert [i for i, _ in out.report.invalid] == [1]
    assert "1 invalid records dropped (records 2; record 2: " in out.report.summary()
    with pytest.raises(DataError, match="no example is left after tokenisation"):
        data.tokenize([bad], tok, kind, invalid_records="drop")


def test_record_policies_are_checked_config_keys():
    with pytest.raises(ConfigError, match=r"^data.invalid_records='skip' is not one of error, drop"):
        run_config(data_section={"invalid_records": "skip"})
    with pytest.raises(ConfigError, match=r"^data.overlong='cut' is not one of truncate, drop, error"):
        run_config(data_section={"overlong": "cut"})
    assert run_config().data.invalid_records == "error"


# ----------------------------------------------------------------------------- one set of limits, train and eval


def long_hh_records(count=6):
    """The HH pair with the longest prompt and the next ``count - 1`` records without an empty answer."""
    records = data.load_records(hh_path())
    longest = max(range(len(records)), key=lambda i: sum(len(m["content"]) for m in records[i]["prompt"]))
    chosen = [records[longest]]
    for record in records:
        if len(chosen) == count:
            break
        if record is not records[longest] and all(m["content"].strip() for m in record["chosen"] + record["rejected"]):
            chosen.append(record)
    return chosen


def test_held_out_pairs_are_cut_under_the_training_limits():
    from jrlhf.algorithms.base import length_limits
    from jrlhf.evaluation import preference_scores

    records = long_hh_records()
    tok = data.load_tokenizer("char")
    cfg = run_config(data_section={"max_length": 128, "max_prompt_length": 96}, algorithm="dpo")
    limits = length_limits(cfg.data)
    train = data.tokenize_preference(records, tok, **limits)
    assert len(train) == len(records) and train.report.truncated_prompts  # training keeps every pair (keep_end)
    lengths = lambda b: (np.asarray(b["chosen_attention_mask"]).sum(1), np.asarray(b["rejected_attention_mask"]).sum(1))
    chosen, rejected = preference_scores(lengths, tok, records, batch_size=4, limits=limits)
    np.testing.assert_array_equal(chosen, [len(e["chosen_input_ids"]) for e in train.examples])
    np.testing.assert_array_equal(rejected, [len(e["rejected_input_ids"]) for e in train.examples])
    # the longest prompt keeps its end: the generation prompt of the chat template closes the kept tokens
    prompt_text = tok.apply_chat_template(records[0]["prompt"], tokenize=False, add_generation_prompt=True)
    expected = tok(prompt_text, add_special_tokens=False)["input_ids"][-96:]
    np.testing.assert_array_equal(train.examples[0]["chosen_input_ids"][:96], expected)
    # a scoring batch holds at most max_tokens padded tokens (2 rows per pair); pairs are grouped by length into
    # at most three padded lengths, and the scores still come back in the records' order
    calls = []
    chosen_capped, _ = preference_scores(lambda b: (calls.append(b["chosen_input_ids"].shape),) and lengths(b), tok,
                                         records, batch_size=4, limits=limits, max_tokens=300)
    assert all(2 * rows * length <= 300 for rows, length in calls), calls
    assert len({length for _, length in calls}) <= 3 and max(length for _, length in calls) == 128
    np.testing.assert_array_equal(chosen_capped, chosen)


def test_dpo_run_evaluates_every_held_out_pair_that_training_keeps(tmp_path):
    records = long_hh_records(8)
    path = str(tmp_path / "hh.jsonl")
    data.write_jsonl(path, records)
    summary = jrlhf.train({
        "algorithm": "dpo",
        "model": {"family": "llama", "overrides": {**TINY, "max_position_embeddings": 128}},
        "data": {"train": path, "eval": path, "batch_size": 8, "eval_batch_size": 3, "max_length": 128, "max_prompt_length": 96},
        "train": {"output_dir": str(tmp_path / "run"), "steps": 1, "progress_bar": False, "tensorboard": False,
                  "export_hf": False},
    })
    assert summary["eval"]["num_examples"] == len(records)


def test_generation_eval_batches_hold_at_most_max_tokens_positions(monkeypatch):
    from types import SimpleNamespace

    from jrlhf import evaluation

    rows = []

    def fake_generate(model, params, prompt_ids, prompt_mask, rng, *, max_new_tokens, **kwargs):
        rows.append(prompt_ids.shape)
        return SimpleNamespace(tokens=np.zeros((len(prompt_ids), max_new_tokens), np.int32),
                               mask=np.zeros((len(prompt_ids), max_new_tokens), np.int32))

    monkeypatch.setattr(evaluation.sampling, "generate", fake_generate)
    tok = data.load_tokenizer("char")
    records = [{"prompt": "1+1="} for _ in range(5)]  # 5 prompt tokens with BOS, + 3 new = 8 positions
    texts, kept = evaluation.generate_completions(None, None, tok, records, max_new_tokens=3, batch_size=4,
                                                  max_tokens=16)
    assert rows == [(2, 5)] * 3 and len(texts) == len(kept) == 5
    rows.clear()
    evaluation.generate_completions(None, None, tok, records, max_new_tokens=3, batch_size=4)
    assert rows == [(4, 5)] * 2
