"""Ordinary user mistakes on the command line: each is accepted (numbers like 1e-4, a byte-order mark) or ends in one
line (status 2, no traceback) that names the file or key and the fix."""

import os

import pytest
import yaml

from jrlhf.data import load_records, write_jsonl

from cli_helpers import assert_one_line_error, run_cli

TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
              "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def records():
    return load_records("builtin:addition/sft_train.jsonl")[:64]


def config_file(tmp_path, train_file, **data):
    cfg = {"algorithm": "sft", "model": {"family": "llama", "overrides": dict(TINY_MODEL)},
           "data": {"train": str(train_file), "batch_size": 16, "max_length": 32, **data},
           "train": {"output_dir": str(tmp_path / "run"), "steps": 2, "progress_bar": False, "tensorboard": False}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


# ------------------------------------------------------------------------------------------------------- config


def test_exponent_numbers_are_read_as_numbers(tmp_path, capsys):
    path = tmp_path / "lr.yaml"
    path.write_text("optim:\n  learning_rate: 1e-4\n  eps: 1E-8\ntrain:\n  steps: 2e3\n")
    status, out, err = run_cli(capsys, "--config", str(path), "--set", "optim.weight_decay=1e-2", "--print-config")
    assert status == 0, err
    printed = yaml.safe_load(out)
    assert printed["optim"]["learning_rate"] == 1e-4 and printed["optim"]["eps"] == 1e-8
    assert printed["optim"]["weight_decay"] == 0.01 and printed["train"]["steps"] == 2000
    status, out, err = run_cli(capsys, "--set", "optim.learning_rate=x1e-4", "--print-config")
    assert_one_line_error(status, err, "optim.learning_rate", "must be a number")


def test_malformed_yaml_and_set_values_are_one_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  steps: 3\n  output_dir: [runs/a\n")
    status, out, err = run_cli(capsys, "--config", str(path))
    assert_one_line_error(status, err, str(path), "is not valid YAML", "line 4")
    status, out, err = run_cli(capsys, "--set", "data.buckets=[16, 32")
    assert_one_line_error(status, err, "--set 'data.buckets=[16, 32'", "is not valid YAML")


def test_model_override_typo_names_the_nearest_key(capsys):
    status, out, err = run_cli(capsys, "--set", "model.overrides.hiden_size=64")
    assert_one_line_error(status, err, "model.overrides.hiden_size", "did you mean 'hidden_size'")


def test_unknown_key_far_from_every_valid_one_lists_the_valid_keys(capsys):
    status, out, err = run_cli(capsys, "--set", "algo.betaa=2")  # SFT's algo section has no beta of any spelling
    assert_one_line_error(status, err, "algo.betaa", "valid keys: ")
    assert "did you mean" not in err
    status, out, err = run_cli(capsys, "--set", "train.step=3")
    assert_one_line_error(status, err, "train.step", "did you mean 'steps'")


@pytest.mark.parametrize("recipe, algorithm, given, missing", [
    ("dpo_hh", "dpo", [], "model.path"),
    ("dpo_hh", "dpo", ["model.path=/m"], "data.train"),
    ("grpo_gsm8k", "grpo", ["model.path=/m", "data.train=/d.jsonl"], "data.eval_prompts"),
])
def test_a_recipe_setting_left_out_stops_before_any_work(capsys, monkeypatch, recipe, algorithm, given, missing):
    import jrlhf.train_loop

    def never(*args, **kwargs):
        raise AssertionError("train() was reached")

    monkeypatch.setattr(jrlhf.train_loop, "train", never)
    argv = ["train", algorithm, "--config", f"builtin:{recipe}"] + [a for g in given for a in ("--set", g)]
    from jrlhf import cli

    status = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert_one_line_error(status, err, f"{missing} is not set", f"--set {missing}=")


# --------------------------------------------------------------------------------------------------------- data


def test_data_file_errors_name_the_file_line_and_key(tmp_path, capsys, records):
    bad_byte = tmp_path / "latin1.jsonl"
    write_jsonl(str(bad_byte), records[:3])
    with open(bad_byte, "ab") as f:
        f.write(b'{"prompt": "caf\xe9", "completion": "1"}\n')
    status, out, err = run_cli(capsys, "--config", config_file(tmp_path, bad_byte))
    assert_one_line_error(status, err, f"{bad_byte}:4: not UTF-8 text (byte 0xe9 at column 16)")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    status, out, err = run_cli(capsys, "--config", config_file(tmp_path, empty))
    assert_one_line_error(status, err, "data.train", str(empty), "holds no records")

    gap = tmp_path / "gap.jsonl"  # record 3 (position 2) sits on line 4 after a blank line
    write_jsonl(str(gap), records[:2])
    with open(gap, "a") as f:
        f.write('\n{"prompt": "1+1="}\n')
    status, out, err = run_cli(capsys, "--config", config_file(tmp_path, gap))
    assert_one_line_error(status, err, f"data.train: {gap}:4: ", "completion")


def test_byte_order_mark_is_accepted_and_indivisible_batch_is_caught_before_sharding(tmp_path, capsys, records):
    bom = tmp_path / "bom.jsonl"
    write_jsonl(str(bom), records)
    bom.write_bytes(b"\xef\xbb\xbf" + bom.read_bytes())
    assert load_records(str(bom)) == records
    # 8 test devices: 12 rows cannot be split; the file with the BOM was read and tokenised before this check
    status, out, err = run_cli(capsys, "--config", config_file(tmp_path, bom, batch_size=12))
    assert_one_line_error(status, err, "data.batch_size=12 is not divisible by the 8 devices", "multiple of 8")
    assert "[data] sft: 64 records" in out


def test_the_data_report_is_shown_once(tmp_path, capsys, caplog, records):
    dropping = tmp_path / "dropping.jsonl"
    write_jsonl(str(dropping), records[:15] + [{"prompt": "1+1=", "completion": ""}])
    # 16 records, one empty answer dropped; the batch of 12 stops the run after tokenisation
    with caplog.at_level("WARNING", logger="jrlhf.data"):
        status, out, err = run_cli(capsys, "--config", config_file(tmp_path, dropping, batch_size=12,
                                                                   invalid_records="drop"))
    assert_one_line_error(status, err, "data.batch_size=12")
    shown = out + err + caplog.text
    assert shown.count("1 invalid records dropped") == 1, shown
    assert "[data] sft: 16 records" in out


# --------------------------------------------------------------------------------------------------- model files


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import jax

    from jrlhf.data.tokenizer import save_char_tokenizer
    from jrlhf.models import init_model, save_pretrained, tiny_config

    model, params = init_model(tiny_config("llama", **TINY_MODEL), jax.random.PRNGKey(0))
    path = tmp_path_factory.mktemp("hf") / "model"
    save_pretrained(model, params, str(path))
    save_char_tokenizer(str(path))  # a model folder carries its tokenizer, which a run then uses by default
    return path


def copy_model(hf_dir, target):
    import shutil

    shutil.copytree(hf_dir, target)
    return target


def test_damaged_model_files_in_init_from_name_the_file(tmp_path, capsys, records, hf_dir):
    data = tmp_path / "sft.jsonl"
    write_jsonl(str(data), records)
    cfg = config_file(tmp_path, data)

    cut = copy_model(hf_dir, tmp_path / "cut")
    weights = cut / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    status, out, err = run_cli(capsys, "--config", cfg, "--set", f"train.init_from={cut}")
    assert_one_line_error(status, err, str(weights), "truncated")

    header = copy_model(hf_dir, tmp_path / "header")
    with open(header / "model.safetensors", "r+b") as f:
        f.truncate(6)
    status, out, err = run_cli(capsys, "--config", cfg, "--set", f"train.init_from={header}")
    assert_one_line_error(status, err, str(header / "model.safetensors"), "not a readable safetensors file")

    malformed = copy_model(hf_dir, tmp_path / "malformed")
    text = (malformed / "config.json").read_text()
    (malformed / "config.json").write_text(text.replace('"hidden_size": 32,', '"hidden_size": 32'))
    status, out, err = run_cli(capsys, "--config", cfg, "--set", f"train.init_from={malformed}")
    assert_one_line_error(status, err, str(malformed / "config.json"), "malformed JSON", "line")


def test_pickle_with_code_is_refused_in_one_line(tmp_path, capsys, records, hf_dir):
    torch = pytest.importorskip("torch")
    from jrlhf.data.tokenizer import save_char_tokenizer

    data = tmp_path / "sft.jsonl"
    write_jsonl(str(data), records)
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((hf_dir / "config.json").read_text())
    save_char_tokenizer(str(evil))
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "payload": os.getcwd}, str(evil / "pytorch_model.bin"))
    status, out, err = run_cli(capsys, "--config", config_file(tmp_path, data), "--set", f"train.init_from={evil}")
    assert_one_line_error(status, err, str(evil / "pytorch_model.bin"), "was refused", "safetensors")


def test_warmup_as_long_as_the_run_names_the_config_keys(tmp_path, capsys):
    # a short run of a recipe with warmup (e.g. builtin:reward_onpolicy's 20 warm-up steps at train.steps=20)
    status, out, err = run_cli(capsys, "--set", "train.steps=20", "--set", "optim.warmup_steps=20",
                               "--set", "optim.schedule=cosine", "--set", f"train.output_dir={tmp_path / 'run'}")
    assert_one_line_error(status, err, "optim.warmup_steps=20 must be below train.steps=20", "optim.schedule=constant")
