"""Data layer: tokenizer, sources, tokenisation and its errors, batches, buckets, iterator, the shipped task."""

import json
import os
import re
import sys

import numpy as np
import pytest

from jrlhf import data
from jrlhf.data import addition
from jrlhf.data.sources import DataError
from jrlhf.data.tokenizer import TokenizerError


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer("char")


def ids_of(tok, text):
    """Independent char -> id mapping through the vocabulary (not through the tokenizer's encode path)."""
    return [tok.convert_tokens_to_ids(c) for c in text]


# ----------------------------------------------------------------------------------------------- tokenizer


def test_char_tokenizer_loads_with_autotokenizer_and_round_trips(tok):
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(data.char_tokenizer_dir(), local_files_only=True)
    assert len(loaded) < 128
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert len({loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id}) == 3
    text = "Hello, World! 0123456789 +-*/=?\n\tx_y~"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert ids == ids_of(loaded, text)
    assert loaded.decode(ids) == text
    assert loaded(text)["input_ids"][0] == loaded.bos_token_id
    assert loaded.decode(loaded("é", add_special_tokens=False)["input_ids"]) == "<|unk|>"


def test_shipped_tokenizer_files_match_the_builder(tmp_path):
    data.save_char_tokenizer(str(tmp_path))
    shipped = data.char_tokenizer_dir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(shipped, name)) as f, open(tmp_path / name) as g:
            assert json.load(f) == json.load(g), name


def test_tokenizer_without_pad_is_a_one_line_error_with_the_fix(tmp_path, tok):
    from transformers import AutoTokenizer

    no_pad = AutoTokenizer.from_pretrained(data.char_tokenizer_dir())
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path)
    for call in (
        lambda: data.load_tokenizer(str(tmp_path)),
        lambda: data.tokenize_sft([{"prompt": "1+1=", "completion": "2"}], no_pad),
    ):
        with pytest.raises(TokenizerError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and "pad token" in message and "pad_token" in message
    fixed = data.load_tokenizer(str(tmp_path), pad_token="eos")
    assert fixed.pad_token_id == fixed.eos_token_id == tok.eos_token_id


def test_unknown_tokenizer_folder():
    with pytest.raises(FileNotFoundError, match="never downloads"):
        data.load_tokenizer("/no/such/tokenizer")


# ------------------------------------------------------------------------------------------------- sources


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b",}\n')
    with pytest.raises(DataError) as info:
        data.load_records(str(path))
    message = str(info.value)
    assert f"{path}:3:" in message and "\n" not in message and "malformed JSON" in message
    path.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a JSON object"):
        data.load_records(str(path))


def test_jsonl_and_builtin_sources(tmp_path):
    records = [{"prompt": "1+2=", "answer": "3", "extra": [1, 2]}, {"prompt": "π", "answer": "x"}]
    path = tmp_path / "r.jsonl"
    data.write_jsonl(str(path), records)
    assert data.load_records(str(path)) == records
    assert data.load_records(f"jsonl:{path}", limit=1) == records[:1]
    shipped = data.load_records("builtin:addition/eval.jsonl")
    assert shipped == addition.load_split("eval")
    with pytest.raises(FileNotFoundError, match="eval.jsonl"):
        data.load_records("builtin:addition/nope.jsonl")
    with pytest.raises(DataError, match="unknown data source"):
        data.load_records("nowhere")


def test_hf_source_reads_local_json_and_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(5)]
    path = tmp_path / "d.jsonl"
    data.write_jsonl(str(path), records)
    assert data.load_records(f"hf:{path}") == records
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "d.parquet"))
    assert data.load_records(f"hf:{tmp_path / 'd.parquet'}", limit=3) == records[:3]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "saved"))
    assert data.load_records(f"hf:{tmp_path / 'saved'}", split="test") == records
    with pytest.raises(FileNotFoundError, match="local"):
        data.load_records("hf:some/hub_name")


def test_missing_optional_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'jrlhf\[tfds\]'"):
        data.load_records("tfds:mnist", split="train")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'jrlhf\[hf\]'"):
        data.load_records("hf:/tmp")


def test_tfds_source_reads_array_record_without_tensorflow(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets", reason="the tfds extra (tensorflow-datasets) is not installed")
    pytest.importorskip("array_record", reason="the tfds extra (array_record) is not installed")

    class TinyAddition(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({"prompt": tfds.features.Text(), "answer": tfds.features.Text()}),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(4)}

        def _generate_examples(self, count):
            for i in range(count):
                yield i, {"prompt": f"{i}+1=", "answer": str(i + 1)}

    builder = TinyAddition(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    records = data.load_records(f"tfds:{builder.data_dir}", split="train")
    assert sorted(records, key=lambda r: r["prompt"]) == [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(4)]
    with pytest.raises(DataError, match="split"):
        data.load_records(f"tfds:{builder.data_dir}")


# ------------------------------------------------------------------------------------------- tokenisation


def test_sft_tokens_and_masks_by_hand(tok):
    out = data.tokenize_sft([{"prompt": "12+3=", "completion": "51"}], tok)
    (example,) = out.examples
    expected = [tok.bos_token_id] + ids_of(tok, "12+3=") + ids_of(tok, "51") + [tok.eos_token_id]
    np.testing.assert_array_equal(example["input_ids"], expected)
    np.testing.assert_array_equal(example["loss_mask"], [0] * 6 + [1, 1, 1])
    assert example["input_ids"].dtype == np.int32 and example["prompt_length"] == 6


def test_missing_and_empty_fields_name_the_record_and_field(tok):
    good = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
    cases = [
        (data.tokenize_preference, [good, {"prompt": "1+2=", "chosen": "3"}], r"^record 2: missing field 'rejected'"),
        (data.tokenize_preference, [good, good, {"prompt": "a", "chosen": " ", "rejected": "b"}],
         r"^record 3: field 'chosen' is empty"),
        (data.tokenize_preference, [{"prompt": "", "chosen": "1", "rejected": "2"}],
         r"^record 1: field 'prompt' is empty"),
        (data.tokenize_sft, [{"prompt": "1+1=", "completion": ""}], r"^record 1: field 'completion' is empty"),
        (data.tokenize_sft, [{"prompt": "1+1="}], r"^record 1: missing field 'completion'"),
        (data.tokenize_prompts, [{"answer": "2"}], r"^record 1: missing field 'prompt'"),
        (data.tokenize_sft, [{"prompt": 5, "completion": "2"}], r"^record 1: field 'prompt' must be a string"),
        (data.tokenize_sft, [{"messages": [{"role": "user", "content": "hi"}]}],
         r"^record 1: field 'messages' has no assistant"),
    ]
    for function, records, pattern in cases:
        with pytest.raises(DataError) as info:
            function(records, tok)
        assert re.search(pattern, str(info.value)), str(info.value)
        assert "\n" not in str(info.value)


def test_overlong_prompt_error_drop_and_truncate_are_counted(tok, caplog):
    records = [
        {"prompt": "1+1=", "completion": "2"},
        {"prompt": "123456789+987654321=", "completion": "0"},  # 21 prompt tokens with BOS
        {"prompt": "5+5=", "completion": "01"},
    ]
    with pytest.raises(DataError) as info:
        data.tokenize_sft(records, tok, max_prompt_length=10, overlong="error")
    message = str(info.value)
    assert message.startswith("record 2: field 'prompt' has 21 tokens > max_prompt_length=10")
    assert "overlong='truncate'" in message and "\n" not in message

    dropped = data.tokenize_sft(records, tok, max_prompt_length=10, overlong="drop")
    assert [e["record_index"] for e in dropped.examples] == [0, 2]
    assert [i for i, _ in dropped.report.dropped] == [1]
    assert "1 records dropped" in dropped.report.summary()

    with caplog.at_level("WARNING", logger="jrlhf.data"):
        kept_end = data.tokenize_sft(records, tok, max_prompt_length=10)
    assert "1 prompts truncated" in caplog.text
    assert kept_end.report.truncated_prompts == [1] and len(kept_end) == 3
    prompt_ids = [tok.bos_token_id] + ids_of(tok, records[1]["prompt"])
    np.testing.assert_array_equal(kept_end.examples[1]["input_ids"][:10], prompt_ids[-10:])
    kept_start = data.tokenize_sft(records, tok, max_prompt_length=10, truncation_mode="keep_start")
    np.testing.assert_array_equal(kept_start.examples[1]["input_ids"][:10], prompt_ids[:10])

    # No max_prompt_length: a prompt that fills max_length cannot fit and is dropped, counted, never silently.
    no_room = data.tokenize_sft(records, tok, max_length=12)
    assert [i for i, _ in no_room.report.dropped] == [1] and "leaves no room" in no_room.report.dropped[0][1]
    with pytest.raises(DataError, match=r"^record 2: the prompt has 21 tokens"):
        data.tokenize_sft(records, tok, max_length=12, overlong="error")


def test_completion_truncation_keeps_the_start_and_loses_eos(tok):
    out = data.tokenize_sft([{"prompt": "1=", "completion": "abcdef"}], tok, max_completion_length=4)
    np.testing.assert_array_equal(out.examples[0]["input_ids"][3:], ids_of(tok, "abcd"))
    assert out.report.truncated_completions == [0]
    out = data.tokenize_sft([{"prompt": "1=", "completion": "abcdef"}], tok, max_length=5)
    np.testing.assert_array_equal(out.examples[0]["input_ids"], [1] + ids_of(tok, "1=ab"))
    pref = data.tokenize_preference([{"prompt": "1=", "chosen": "a", "rejected": "abcdef"}], tok, max_length=6)
    assert pref.report.truncated_completions == [0]
    assert len(pref.examples[0]["chosen_input_ids"]) == 5 and len(pref.examples[0]["rejected_input_ids"]) == 6


def test_bad_limits_are_rejected(tok):
    with pytest.raises(DataError, match="truncation_mode"):
        data.tokenize_sft([], tok, truncation_mode="left")
    with pytest.raises(DataError, match="overlong"):
        data.tokenize_sft([], tok, overlong="skip")
    with pytest.raises(DataError, match="max_length"):
        data.tokenize_sft([], tok, max_length=0)


def test_chat_template_path(tok):
    bos, eos = tok.bos_token_id, tok.eos_token_id
    user, assistant = tok.convert_tokens_to_ids("<|user|>"), tok.convert_tokens_to_ids("<|assistant|>")
    messages = [
        {"role": "user", "content": "1+1="},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2="},
        {"role": "assistant", "content": "4"},
    ]
    (example,) = data.tokenize_sft([{"messages": messages}], tok).examples
    expected_ids = [bos, user, *ids_of(tok, "1+1="), eos, assistant, *ids_of(tok, "2"), eos,
                    user, *ids_of(tok, "2+2="), eos, assistant, *ids_of(tok, "4"), eos]
    expected_mask = [0] * 8 + [1, 1] + [0] * 7 + [1, 1]
    np.testing.assert_array_equal(example["input_ids"], expected_ids)
    np.testing.assert_array_equal(example["loss_mask"], expected_mask)
    assert example["prompt_length"] == 8

    record = {"prompt": [{"role": "user", "content": "1+1="}], "chosen": [{"role": "assistant", "content": "2"}],
              "rejected": "3"}
    (pair,) = data.tokenize_preference([record], tok).examples
    prompt = [bos, user, *ids_of(tok, "1+1="), eos, assistant]
    np.testing.assert_array_equal(pair["chosen_input_ids"], prompt + ids_of(tok, "2") + [eos])
    np.testing.assert_array_equal(pair["rejected_input_ids"], prompt + ids_of(tok, "3") + [eos])
    np.testing.assert_array_equal(pair["rejected_loss_mask"], [0] * len(prompt) + [1, 1])

    (prompt_example,) = data.tokenize_prompts([{"prompt": record["prompt"], "answer": "2"}], tok).examples
    np.testing.assert_array_equal(prompt_example["prompt_ids"], prompt)
    assert prompt_example["record"]["answer"] == "2"


def test_chat_messages_without_template_is_an_error(tok):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(data.char_tokenizer_dir())
    plain.chat_template = None
    with pytest.raises(TokenizerError, match="record 1: chat messages need a tokenizer with a chat template"):
        data.tokenize_prompts([{"prompt": [{"role": "user", "content": "hi"}]}], plain)


# ------------------------------------------------------------------------------------------------- batches


@pytest.fixture
def eos_pad_tok():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(data.char_tokenizer_dir())
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def test_sft_masks_are_right_when_pad_equals_eos(eos_pad_tok):
    tok = eos_pad_tok
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    records = [{"prompt": "12+3=", "completion": "51"}, {"prompt": "1+1=", "completion": "2"}]
    out = data.tokenize_sft(records, tok)
    batch = data.collate_sft(out.examples, pad_id=tok.pad_token_id, buckets=data.length_buckets(64))
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}
    assert all(v.dtype == np.int32 and v.shape == (2, 16) for v in batch.values())
    lengths = [9, 7]
    for row, (length, prompt_length) in enumerate(zip(lengths, [6, 5])):
        expected_attention = np.arange(16) < length
        np.testing.assert_array_equal(batch["attention_mask"][row], expected_attention)
        np.testing.assert_array_equal(batch["loss_mask"][row], (np.arange(16) >= prompt_length) & expected_attention)
        assert batch["input_ids"][row, length - 1] == eos and batch["loss_mask"][row, length - 1] == 1
        assert (batch["input_ids"][row, length:] == eos).all()  # padding is EOS, yet masked out by length


def test_preference_batch_shares_length(tok):
    records = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3" * 20},
        {"prompt": "9+9=", "chosen": "81", "rejected": "71"},
    ]
    out = data.tokenize_preference(records, tok)
    batch = data.collate_preference(out.examples, pad_id=tok.pad_token_id, buckets=data.length_buckets(64))
    keys = {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "loss_mask")}
    assert set(batch) == keys
    assert {v.shape for v in batch.values()} == {(2, 32)}
    np.testing.assert_array_equal(batch["chosen_attention_mask"].sum(1), [7, 8])
    np.testing.assert_array_equal(batch["rejected_attention_mask"].sum(1), [26, 8])
    np.testing.assert_array_equal(batch["rejected_loss_mask"].sum(1), [21, 3])


def test_prompt_batch_is_left_padded(tok):
    records = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "123+456=", "answer": "975", "id": 7}]
    out = data.tokenize_prompts(records, tok)
    batch = data.collate_prompts(out.examples, pad_id=tok.pad_token_id, buckets=data.length_buckets(32))
    assert batch.prompt_ids.shape == (2, 16) and batch.prompt_ids.dtype == np.int32
    np.testing.assert_array_equal(batch.prompt_mask[0], np.arange(16) >= 11)
    np.testing.assert_array_equal(batch.prompt_ids[0, 11:], [tok.bos_token_id] + ids_of(tok, "1+1="))
    assert (batch.prompt_ids[0, :11] == tok.pad_token_id).all()
    assert batch.records == records and set(batch.arrays()) == {"prompt_ids", "prompt_mask"}


def test_buckets_bound_the_compiled_shapes(tok):
    assert data.length_buckets(100) == (16, 32, 64, 100)
    assert data.length_buckets(64, [8, 24, 200]) == (8, 24, 64)
    assert data.bucket_length(17, (16, 32)) == 32 and data.bucket_length(5, ()) == 8
    with pytest.raises(DataError, match="largest length bucket"):
        data.bucket_length(33, (16, 32))
    rng = np.random.default_rng(0)
    records = [{"prompt": "1=", "completion": "x" * int(n)} for n in rng.integers(1, 95, size=200)]
    out = data.tokenize_sft(records, tok, max_length=100)
    iterator = data.make_batch_iterator(out, 8, pad_id=0, max_length=100, seed=1, process_index=0, process_count=1)
    shapes = {next(iterator)["input_ids"].shape for _ in range(3 * len(iterator))}
    assert {t for _, t in shapes} <= {16, 32, 64, 100} and len(shapes) <= 4


def test_pad_to_multiple_of_buckets(tok):
    # written out: powers of two below 64, then 64, 128, ..., 448 below max_length, then max_length
    assert data.length_buckets(512, pad_to_multiple_of=64) == (16, 32, 64, 128, 192, 256, 320, 384, 448, 512)
    assert data.length_buckets(500, pad_to_multiple_of=100) == (16, 32, 64, 100, 200, 300, 400, 500)
    assert data.length_buckets(40, pad_to_multiple_of=8) == (16, 24, 32, 40)
    assert data.length_buckets(512) == (16, 32, 64, 128, 256, 512)  # the default is unchanged
    assert data.bucket_length(411, data.length_buckets(512, pad_to_multiple_of=64)) == 448
    for bad in (0, -64):
        with pytest.raises(DataError, match="pad_to_multiple_of"):
            data.length_buckets(512, pad_to_multiple_of=bad)
    rng = np.random.default_rng(0)
    records = [{"prompt": "1=", "completion": "x" * int(n)} for n in rng.integers(1, 95, size=200)]
    out = data.tokenize_sft(records, tok, max_length=100)
    iterator = data.make_batch_iterator(out, 8, pad_id=0, max_length=100, seed=1, process_index=0,
                                        process_count=1, pad_to_multiple_of=24)
    lengths = {next(iterator)["input_ids"].shape[1] for _ in range(3 * len(iterator))}
    assert lengths <= {16, 24, 48, 72, 96, 100} and lengths & {72, 96}


def test_pad_to_multiple_of_config_errors():
    from jrlhf.config import ConfigError, DataSection

    assert DataSection(pad_to_multiple_of=64).pad_to_multiple_of == 64
    for bad in (0, 2.5, True):
        with pytest.raises(ConfigError, match=r"^data.pad_to_multiple_of="):
            DataSection(pad_to_multiple_of=bad)
    with pytest.raises(ConfigError, match="both set"):
        DataSection(pad_to_multiple_of=64, buckets=(128, 256))


def _sft_data(tok, count=23):
    records = [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(count)]
    return data.tokenize_sft(records, tok)


def test_iterator_resumes_at_the_exact_next_batch(tok):
    sft = _sft_data(tok)
    kwargs = dict(pad_id=0, max_length=16, seed=3, process_index=0, process_count=1)
    reference = data.make_batch_iterator(sft, 5, **kwargs)
    expected = [next(reference) for _ in range(12)]  # crosses two epoch boundaries (4 batches per epoch)
    first = data.make_batch_iterator(sft, 5, **kwargs)
    for _ in range(6):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["epoch"] == 1 and state["batch_index"] == 2
    resumed = data.make_batch_iterator(sft, 5, **kwargs)
    resumed.load_state_dict(state)
    for want in expected[6:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    with pytest.raises(DataError, match="batch_size"):
        data.make_batch_iterator(sft, 4, **kwargs).load_state_dict(state)


def test_epochs_reshuffle_and_cover_every_example_once(tok):
    sft = _sft_data(tok, 20)
    iterator = data.make_batch_iterator(sft, 5, pad_id=0, seed=0, num_epochs=2, process_index=0, process_count=1)
    batches = list(iterator)
    assert len(batches) == 8
    decoded = [tuple(row[row > 0]) for b in batches for row in b["input_ids"]]
    epoch0, epoch1 = decoded[:20], decoded[20:]
    every = {tuple(e["input_ids"]) for e in sft.examples}
    assert set(epoch0) == set(epoch1) == every and len(set(epoch0)) == 20
    assert epoch0 != epoch1  # a new order each epoch


def test_last_partial_batch_is_filled_and_flagged(tok):
    sft = _sft_data(tok, 7)
    iterator = data.make_batch_iterator(
        sft, 4, pad_id=0, drop_remainder=False, num_epochs=1, process_index=0, process_count=1
    )
    batches = list(iterator)
    assert len(batches) == 2 and all(b["input_ids"].shape[0] == 4 for b in batches)
    np.testing.assert_array_equal(batches[0]["example_mask"], [1, 1, 1, 1])
    np.testing.assert_array_equal(batches[1]["example_mask"], [1, 1, 1, 0])
    real = [tuple(r) for b in batches for r, m in zip(b["input_ids"], b["example_mask"]) if m]
    width = batches[0]["input_ids"].shape[1]
    assert sorted(real) == sorted(tuple(np.pad(e["input_ids"], (0, width - len(e["input_ids"])))) for e in sft.examples)
    with pytest.raises(DataError, match="fewer than batch_size"):
        data.make_batch_iterator(sft, 8, pad_id=0, process_index=0, process_count=1)


def test_process_slices_are_disjoint_and_cover_the_global_batch(tok):
    sft = _sft_data(tok, 40)
    prompts = data.tokenize_prompts([{"prompt": f"{i}+1=", "i": i} for i in range(40)], tok)
    for dataset in (sft, prompts):
        whole = data.make_batch_iterator(dataset, 8, pad_id=0, seed=5, process_index=0, process_count=1)
        parts = [
            data.make_batch_iterator(dataset, 8, pad_id=0, seed=5, process_index=p, process_count=4) for p in range(4)
        ]
        for _ in range(7):
            global_batch = next(whole)
            local = [next(p) for p in parts]
            if dataset is sft:
                for key in global_batch:
                    np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), global_batch[key])
            else:
                np.testing.assert_array_equal(np.concatenate([b.prompt_ids for b in local]), global_batch.prompt_ids)
                ids = [[r["i"] for r in b.records] for b in local]
                assert all(len(x) == 2 for x in ids)
                assert sum(ids, []) == [r["i"] for r in global_batch.records]
                assert len(set(sum(ids, []))) == 8
    with pytest.raises(DataError, match="multiple of the process count"):
        data.make_batch_iterator(sft, 6, pad_id=0, process_index=0, process_count=4)


def test_packing_builds_block_diagonal_segments(tok):
    sft = _sft_data(tok, 30)
    rows = data.pack_examples(sft.examples, 32)
    assert sum(len(r["record_index"]) for r in rows) == 30
    assert sorted(i for r in rows for i in r["record_index"]) == list(range(30))
    for row in rows:
        assert len(row["input_ids"]) <= 32
        start = 0
        for segment, index in enumerate(row["record_index"], start=1):
            example = sft.examples[index]
            length = len(example["input_ids"])
            np.testing.assert_array_equal(row["input_ids"][start : start + length], example["input_ids"])
            np.testing.assert_array_equal(row["loss_mask"][start : start + length], example["loss_mask"])
            np.testing.assert_array_equal(row["positions"][start : start + length], np.arange(length))
            assert (row["segment_ids"][start : start + length] == segment).all()
            start += length
    iterator = data.make_batch_iterator(sft, 2, pad_id=0, max_length=32, packing=True, process_index=0, process_count=1)
    batch = next(iterator)
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask", "segment_ids", "positions"}
    assert batch["input_ids"].shape == (2, 32)
    np.testing.assert_array_equal(batch["attention_mask"], batch["segment_ids"] > 0)
    with pytest.raises(DataError, match="packing row length"):
        data.pack_examples(sft.examples, 4)


# ----------------------------------------------------------------------------------------------- the task


def _operands(prompt):
    """The operands of a shipped prompt: fixed-width, least significant digit first ("321+540=" is 123 + 45)."""
    match = re.fullmatch(r"(\d+)\+(\d+)=", prompt)
    assert match and len(match.group(1)) == len(match.group(2)), prompt
    return int(match.group(1)[::-1]), int(match.group(2)[::-1])


def test_shipped_task_files_are_correct_and_disjoint():
    splits = {name: addition.load_split(name) for name in addition.DEFAULT_SIZES}
    assert {n: len(r) for n, r in splits.items()} == addition.DEFAULT_SIZES
    assert len(splits["eval"]) >= 500
    prompts = [r["prompt"] for records in splits.values() for r in records]
    assert len(prompts) == len(set(prompts))
    for record in splits["sft_train"]:
        a, b = _operands(record["prompt"])
        assert int(record["completion"][::-1]) == a + b
    for record in splits["eval"] + splits["rl_prompts"]:
        a, b = _operands(record["prompt"])
        assert int(record["answer"][::-1]) == a + b
    total_size = sum(os.path.getsize(os.path.join(addition.files_dir(), f)) for f in os.listdir(addition.files_dir()))
    assert total_size < 3_000_000


def test_rejected_answers_are_near_misses():
    kinds = set()
    for record in addition.load_split("preference_train") + addition.load_split("preference_eval"):
        a, b = _operands(record["prompt"])
        chosen, rejected = record["chosen"], record["rejected"]
        assert int(chosen[::-1]) == a + b and rejected != chosen and rejected.isdigit()
        assert len(rejected) == 1 or rejected[-1] != "0"  # no leading zero (reversed: last char)
        kinds.add(record["kind"])
        if len(rejected) == len(chosen):
            diff = [i for i in range(len(chosen)) if chosen[i] != rejected[i]]
            assert len(diff) == 1
            step = (int(chosen[diff[0]]) - int(rejected[diff[0]])) % 10
            assert step in (1, 9)
            if record["kind"] == "dropped_carry":
                # The column received a carry: the column below overflowed.
                column = diff[0]
                low_a, low_b = a % 10**column, b % 10**column
                assert low_a + low_b >= 10**column and step == 1
        else:
            # The final carry was dropped: the leading 1 (last char when reversed) is missing.
            assert record["kind"] == "dropped_carry" and chosen == rejected + "1"
            assert len(str(a + b)) > max(len(str(a)), len(str(b)))
    assert kinds == {"digit_off", "dropped_carry"}


def test_task_generation_is_deterministic_and_matches_shipped_files(tmp_path):
    sizes = {"sft_train": 50, "preference_train": 20, "preference_eval": 10, "eval": 30, "rl_prompts": 10}
    assert addition.generate(seed=7, sizes=sizes) == addition.generate(seed=7, sizes=sizes)
    assert addition.generate(seed=7, sizes=sizes) != addition.generate(seed=8, sizes=sizes)
    with open(os.path.join(addition.files_dir(), "meta.json")) as f:
        meta = json.load(f)
    argv = ["--out", str(tmp_path), "--seed", str(meta["seed"]), "--digits", str(meta["digits"]),
            "--min-digits", str(meta["min_digits"])]
    argv += [a for name, size in meta["sizes"].items() for a in (f"--{name.replace('_', '-')}", str(size))]
    assert addition.main(argv) == 0
    # sft_tool.jsonl (the calculator environment's warm start) is written by `python -m jrlhf.envs` from sft_train
    from jrlhf.envs import calculator_sft_records

    data.write_jsonl(str(tmp_path / "sft_tool.jsonl"),
                calculator_sft_records(addition.load_split("sft_train"), 0.1, 0))
    for name in os.listdir(addition.files_dir()):
        with open(os.path.join(addition.files_dir(), name), "rb") as f, open(tmp_path / name, "rb") as g:
            assert f.read() == g.read(), f"shipped {name} differs from the generator's output"


def test_digits_knob_and_exact_match():
    hard = addition.generate(seed=0, digits=5, min_digits=5, sizes={"eval": 20})
    for record in hard["eval"]:
        a, b = _operands(record["prompt"])
        assert len(str(a)) == len(str(b)) == 5
    assert addition.exact_match(" 975\n", "975") and not addition.exact_match("9750", "975")
    assert addition.exact_match_rate(["1", "2", "3"], ["1", "2", "4"]) == pytest.approx(2 / 3)
    assert addition.parse_answer("975") == 579 and addition.parse_answer("9a") is None
    with pytest.raises(ValueError, match="distinct"):
        addition.generate(digits=1, sizes={"eval": 100})
