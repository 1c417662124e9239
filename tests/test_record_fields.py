"""Per-record fields an algorithm reads reach its loss (tokenisation, bucketing, packing, collation); fields that
nothing reads are reported once. The values are checked against the formula written out in numpy from the
model's own scores (through ``transformers`` for the trained run)."""

import json
import os

import jax
import numpy as np
import pytest

import jrlhf
import jrlhf.models as M
from jrlhf import step as ST
from jrlhf.algorithms import base, reward
from jrlhf.data import (DataError, collate_preference, collate_sft, load_records, load_tokenizer,
                        make_batch_iterator, pack_examples, tokenize_preference, tokenize_sft, write_jsonl)

TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
              "max_position_embeddings": 64}


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


@pytest.fixture(scope="module")
def records():
    return load_records("builtin:addition/preference_train.jsonl")[:16]


@pytest.mark.torch
def test_margin_of_the_records_reaches_the_reward_loss_in_training(tmp_path, records, capsys):
    """All records carry margin 5.0; one step at learning rate 0 from a fresh score head logs
    mean(-log σ(r_c - r_r - 5)) of the model's scores (≈ 5.0067 as the scores are near 0), not log 2."""
    path = tmp_path / "pref.jsonl"
    write_jsonl(str(path), [dict(r, margin=5.0, source="addition") for r in records])
    cfg = {
        "algorithm": "reward",
        "model": {"family": "llama", "overrides": dict(TINY_MODEL)},
        "data": {"train": str(path), "batch_size": 16, "max_length": 32},
        "optim": {"learning_rate": 0.0},
        "train": {"output_dir": str(tmp_path / "run"), "steps": 1, "log_every": 1, "progress_bar": False,
                  "tensorboard": False},
    }
    summary = jrlhf.train(cfg)
    out = capsys.readouterr().out
    assert "field(s) 'kind', 'source' are ignored: reward reads prompt, chosen, rejected, margin" in out
    logged = [json.loads(line) for line in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    loss = next(r["loss"] for r in logged if r["split"] == "train")

    import torch
    import transformers

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(summary["hf_dir"]).eval()
    data = tokenize_preference(records, load_tokenizer("char"), max_length=32)
    assert len(data) == 16

    def score(ids):
        with torch.no_grad():
            return float(hf(torch.tensor(ids[None].astype(np.int64))).logits[0, 0])

    chosen = np.array([score(e["chosen_input_ids"]) for e in data.examples])
    rejected = np.array([score(e["rejected_input_ids"]) for e in data.examples])
    expected = float(np.mean(-_log_sigmoid(chosen - rejected - 5.0)))
    assert loss == pytest.approx(expected, abs=1e-4)
    assert expected == pytest.approx(5.0067, abs=0.05)  # scores of a fresh head are near 0


def test_per_record_margins_change_the_loss_as_the_formula_says(records):
    """Different margins per record, through tokenisation, buckets and collation into the reward loss, against
    numpy; the same records without margins give the plain Bradley-Terry loss."""
    tokenizer = load_tokenizer("char")
    margins = np.linspace(-2.0, 3.0, 8)
    with_margin = [dict(r, margin=float(m)) for r, m in zip(records[:8], margins)]
    data = tokenize_preference(with_margin, tokenizer, max_length=32, fields=reward.RECORD_FIELDS)
    it = make_batch_iterator(data, 8, pad_id=tokenizer.pad_token_id, max_length=32, shuffle=False,
                             process_index=0, process_count=1)
    batch = next(it)
    assert batch["margin"].dtype == np.float32 and np.allclose(batch["margin"], margins)
    plain = collate_preference(tokenize_preference(records[:8], tokenizer, max_length=32).examples,
                               pad_id=tokenizer.pad_token_id, buckets=(16, 32))
    assert "margin" not in plain

    config = M.tiny_config("llama", vocab_size=len(tokenizer), **TINY_MODEL)
    model, params = M.init_model(config, jax.random.PRNGKey(1), head="score")
    ctx = ST.StepContext(rng=jax.random.PRNGKey(0), step=0, algo_state={}, globals={"num_sequences": 8.0})
    loss_fn = reward.make_loss_fn(model, reward.Config())
    got, _ = loss_fn(params, batch, None, ctx)
    got_plain, _ = loss_fn(params, plain, None, ctx)
    chosen, rejected = (np.asarray(x, np.float64) for x in base.pair_scores(model, params, batch))
    assert float(got) == pytest.approx(np.mean(-_log_sigmoid(chosen - rejected - margins)), abs=1e-5)
    assert float(got_plain) == pytest.approx(np.mean(-_log_sigmoid(chosen - rejected)), abs=1e-5)
    assert abs(float(got) - float(got_plain)) > 0.1


def test_fields_survive_packing_and_sft_collation():
    tokenizer = load_tokenizer("char")
    recs = [{"prompt": "1+2=", "completion": "3", "weight": 0.5}, {"prompt": "12+3=", "completion": "51", "weight": 2.0},
            {"prompt": "4+4=", "completion": "8", "weight": 1.5}]
    data = tokenize_sft(recs, tokenizer, fields=("weight",))
    batch = collate_sft(data.examples, pad_id=tokenizer.pad_token_id, buckets=(16,))
    assert np.allclose(batch["weight"], [0.5, 2.0, 1.5])
    rows = pack_examples(data.examples, 32)
    packed = collate_sft(rows, pad_id=tokenizer.pad_token_id, length=32)
    # every token carries the value of the example it belongs to; padding 0
    for row in range(packed["weight"].shape[0]):
        for segment, index in enumerate(rows[row]["record_index"], start=1):
            on = packed["segment_ids"][row] == segment
            assert np.all(packed["weight"][row][on] == recs[index]["weight"])
        assert np.all(packed["weight"][row][packed["segment_ids"][row] == 0] == 0)


def test_bad_or_partial_fields_are_one_line_errors(records):
    tokenizer = load_tokenizer("char")
    partial = [dict(records[0], margin=1.0), dict(records[1])]
    with pytest.raises(DataError, match="record 2: field 'margin' is missing"):
        tokenize_preference(partial, tokenizer, fields=("margin",))
    with pytest.raises(DataError, match="record 1: field 'margin' must be a finite number"):
        tokenize_preference([dict(records[0], margin="big")], tokenizer, fields=("margin",))
    with pytest.raises(DataError, match="finite"):
        tokenize_preference([dict(records[0], margin=float("nan"))], tokenizer, fields=("margin",))


def test_ignored_fields_are_named():
    recs = [{"prompt": "a", "chosen": "b", "rejected": "c", "margin": 1.0, "id": 3}]
    assert base.ignored_fields(recs, "preference") == ["id", "margin"]  # DPO does not read margin
    assert base.ignored_fields(recs, "preference", reward.RECORD_FIELDS) == ["id"]
    assert base.ignored_fields([{"prompt": "a", "answer": "1"}], "prompt") == []  # reward functions get them all
