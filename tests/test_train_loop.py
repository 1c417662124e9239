"""The training loop, config system, CLI errors and plots, on a tiny model and a slice of the shipped task."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

import jrlhf
from jrlhf import cli
from jrlhf.checkpoint import CheckpointError
from jrlhf.config import ConfigError, build_config, load_config, parse_overrides
from jrlhf.data import load_records, write_jsonl

TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
              "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    write_jsonl(str(path), load_records("builtin:addition/sft_train.jsonl")[:256])
    return str(path)


def tiny_config(out_dir, train_file, **train):
    return {
        "algorithm": "sft",
        "model": {"family": "llama", "overrides": dict(TINY_MODEL)},
        "data": {"train": train_file, "batch_size": 16, "max_length": 32},
        "optim": {"learning_rate": 3e-3},
        "train": {"output_dir": str(out_dir), "steps": 6, "log_every": 1, "progress_bar": False,
                  "tensorboard": False, **train},
    }


def final_params(run_dir):
    return load_file(os.path.join(run_dir, "hf_model", "model.safetensors"))


def test_run_writes_metrics_checkpoints_and_hf_export(tmp_path, sft_file, require):
    summary = jrlhf.train(tiny_config(tmp_path / "run", sft_file, save_every=3))
    run_dir = summary["run_dir"]
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    first = records[0]
    for key in ("loss", "nll", "grad_norm", "tokens_per_second", "learning_rate"):
        assert key in first and np.isfinite(first[key]), key
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["3", "6"]
    assert os.path.exists(os.path.join(run_dir, "config.yaml"))
    require("torch")  # transformers loads the export
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(summary["hf_dir"])
    assert hf.config.hidden_size == 32


def test_same_seed_same_params(tmp_path, sft_file):
    a = final_params(jrlhf.train(tiny_config(tmp_path / "a", sft_file))["run_dir"])
    b = final_params(jrlhf.train(tiny_config(tmp_path / "b", sft_file))["run_dir"])
    c = final_params(jrlhf.train(tiny_config(tmp_path / "c", sft_file, seed=1))["run_dir"])
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_planted_nan_stops_at_that_step_and_keeps_last_good_checkpoint(tmp_path, sft_file, monkeypatch, capsys):
    import jax.numpy as jnp
    import yaml

    from jrlhf.algorithms import sft

    make = sft.make_loss_fn

    def poisoned(model, algo):
        loss_fn = make(model, algo)

        def wrapped(params, batch, frozen, ctx):
            loss, metrics = loss_fn(params, batch, frozen, ctx)
            return jnp.where(ctx.step == 4, jnp.nan, loss), metrics

        return wrapped

    monkeypatch.setattr(sft, "make_loss_fn", poisoned)
    config = tmp_path / "nan.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path / "nan", sft_file, steps=10, save_every=2)))
    assert cli.main(["train", "sft", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    # the update of state step 4 is the loop's (and metrics.jsonl's) step 5; the advice names a key that exists
    assert "non-finite loss or gradients at step 5:" in err and "last good checkpoint: step 4" in err, err
    assert "raise train.max_nonfinite" in err and hasattr(build_config({}).train, "max_nonfinite")
    logged = [json.loads(line) for line in open(tmp_path / "nan" / "metrics.jsonl")]
    assert [r["nonfinite_count"] for r in logged if r["step"] == 5] == [1]
    assert [r["nonfinite_count"] for r in logged if r["step"] == 4] == [0]
    assert sorted(os.listdir(tmp_path / "nan" / "checkpoints")) == ["2", "4"]
    assert not (tmp_path / "nan" / "hf_model").exists()


def test_resume_continues_from_the_latest_checkpoint(tmp_path, sft_file):
    run = tmp_path / "resume"
    jrlhf.train(tiny_config(run, sft_file, steps=4))
    summary = jrlhf.train(tiny_config(run, sft_file, steps=6))
    assert summary["step"] == 6
    steps = [json.loads(l)["step"] for l in open(run / "metrics.jsonl") if '"train"' in l]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_checkpoint_from_another_model_is_a_one_line_error(tmp_path, sft_file):
    run = tmp_path / "other"
    jrlhf.train(tiny_config(run, sft_file, steps=2))
    cfg = tiny_config(run, sft_file, steps=4)
    cfg["model"]["overrides"]["hidden_size"] = 64
    with pytest.raises(CheckpointError, match="hidden_size.*32.*64"):
        jrlhf.train(cfg)


def test_unknown_config_key_names_the_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz' \(did you mean 'steps'\?\)"):
        build_config({"train": {"stepz": 3}})
    with pytest.raises(ConfigError, match="algo.betta.*'beta'"):
        load_config(None, ["algo.betta=0.2"], algorithm="dpo")
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config(None, ["train.steps=abc"], algorithm="sft")
    with pytest.raises(ConfigError, match="unknown algorithm 'dpoo'.*'dpo'"):
        build_config({"algorithm": "dpoo"})
    assert parse_overrides(["a.b=1", "c=x", "d=[1, 2]"]) == {"a": {"b": 1}, "c": "x", "d": [1, 2]}


def test_builtin_configs_load():
    for name in ("sft", "reward", "dpo"):
        cfg = load_config(f"builtin:{name}", algorithm=name)
        assert cfg.algorithm == name


def test_cli_errors_are_one_line(tmp_path, capsys, sft_file):
    assert cli.main(["train", "sft", "--set", "train.stepz=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'steps'" in err
    assert cli.main(["train", "sft", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["train", "dpo", "--set", f"train.init_from={tmp_path / 'no_such_model'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no_such_model" in err and "does not exist" in err


def test_plot_makes_a_png_from_a_run_directory(tmp_path, sft_file):
    summary = jrlhf.train(tiny_config(tmp_path / "plot", sft_file, steps=3))
    assert cli.main(["plot", summary["run_dir"]]) == 0
    png = os.path.join(summary["run_dir"], "curves.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["plot", str(tmp_path / "not_a_run")]) == 2


@pytest.mark.slow
def test_demo_quick_runs_every_stage_and_writes_the_table(tmp_path, capsys, require):
    from jrlhf import demo

    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--quick"]) == 0
    rows = json.load(open(out / "results.json"))
    assert [r["stage"] for r in rows] == ["sft", "reward model", "reward model (on-policy pairs)", "dpo", "grpo",
                                          "rloo", "reinforce++", "ppo (exact-match reward)",
                                          "ppo (learned reward model)"]
    assert 0.0 <= rows[1]["eval"]["accuracy"] <= 1.0 and 0.0 <= rows[2]["eval"]["accuracy"] <= 1.0
    for r in rows[4:]:
        assert 0.0 <= r["eval"]["exact_match"] <= 1.0
    printed = capsys.readouterr().out
    assert "| reward model |" in printed
    # each stage's printed command names the folder it writes, so it can be rerun by hand
    commands = [line for line in printed.splitlines() if line.startswith("=== ")]
    assert len(commands) == 10 and all(f"--set train.output_dir={out}/" in c for c in commands[:2] + commands[3:])
    # the second-round reward model starts from the first and reads the on-policy pairs, which hold the originals
    assert commands[2].startswith("=== on-policy pairs: jrlhf pairs ") and f"--out {out}/pairs.jsonl" in commands[2]
    pairs = load_records(str(out / "pairs.jsonl"))
    assert 5000 < len(pairs) and sum("chosen_reward" in r for r in pairs) > 0
    assert f"train.init_from={out}/reward/hf_model" in commands[3] and f"data.train={out}/pairs.jsonl" in commands[3]
    assert f"algo.reward_model={out}/reward_onpolicy/hf_model" in commands[-1]
    # the reward model is a score model transformers loads; PPO used it
    require("torch")
    import transformers

    transformers.AutoModelForSequenceClassification.from_pretrained(out / "reward" / "hf_model")


def test_demo_refuses_to_reuse_a_finished_stage_of_another_config(tmp_path, capsys):
    """A finished stage is reused only when its saved config matches the stage's (e.g. a demo folder made before
    ``ppo_rm`` switched reward models would otherwise report a stale result); new config fields do not count."""
    import yaml

    from jrlhf import demo
    from jrlhf.config import to_dict

    out = tmp_path / "demo"
    name, dirname, algorithm, overrides = demo.stages(str(out), quick=False)[0]
    run_dir = out / dirname
    cfg = load_config(f"builtin:{algorithm}", overrides + [f"train.output_dir={run_dir}"], algorithm=algorithm)
    saved = to_dict(cfg)
    saved["train"]["seed"] = 7  # trained with another seed
    del saved["train"]["log_every"]  # and before a field existed: not a difference
    os.makedirs(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    (run_dir / "summary.json").write_text(json.dumps({"step": cfg.train.steps, "eval": {"exact_match": 0.5}}))
    assert demo.main(["--out", str(out)]) == 2  # refused before any training
    err = capsys.readouterr().err.strip()
    assert err.startswith("jrlhf demo: error: ") and "\n" not in err and "(train.seed differ)" in err, err
    assert demo.changed_settings(str(run_dir), cfg) == ["train.seed"]
    saved["train"]["seed"] = cfg.train.seed
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert demo.changed_settings(str(run_dir), cfg) == []
