"""Preemption in a separate process: SIGTERM mid-run saves a checkpoint and exits with status 3; the resumed run ends
with the same params, bit for bit. (tests/test_run_safety.py interrupts every other way, in-process.)"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from jrlhf.data import load_records, write_jsonl

STEPS = 400  # long enough that SIGTERM always lands mid-run, however fast the machine


def _config(tmp_path, name):
    data = tmp_path / "sft.jsonl"
    if not data.exists():
        write_jsonl(str(data), load_records("builtin:addition/sft_train.jsonl")[:512])
    cfg = {
        "algorithm": "sft",
        "model": {"family": "llama", "overrides": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
                                                   "num_heads": 2, "num_kv_heads": 1,
                                                   "max_position_embeddings": 64}},
        "data": {"train": str(data), "batch_size": 16, "max_length": 32},
        "optim": {"learning_rate": 3e-3, "schedule": "cosine", "warmup_steps": 2},
        "train": {"output_dir": str(tmp_path / name), "steps": STEPS, "log_every": 1, "progress_bar": False,
                  "tensorboard": False, "save_every": 0},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path), tmp_path / name


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _train(config_path, **kw):
    return subprocess.Popen([sys.executable, "-m", "jrlhf.cli", "train", "sft", "--config", config_path],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _logged_steps(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"train"' in line]


@pytest.mark.slow
def test_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path):
    ref_cfg, ref_dir = _config(tmp_path, "uninterrupted")
    cut_cfg, cut_dir = _config(tmp_path, "preempted")
    reference = _train(ref_cfg)
    preempted = _train(cut_cfg)
    deadline = time.time() + 240
    while time.time() < deadline and (not _logged_steps(cut_dir) or max(_logged_steps(cut_dir)) < 4):
        assert preempted.poll() is None, preempted.communicate()[0]
        time.sleep(0.05)
    preempted.send_signal(signal.SIGTERM)
    out, _ = preempted.communicate(timeout=240)
    assert preempted.returncode == 3, out  # stopped by a signal, the latest state saved
    assert "[preempted]" in out
    saved = sorted(int(s) for s in os.listdir(cut_dir / "checkpoints"))
    assert len(saved) == 1 and 4 <= saved[0] < STEPS, (saved, out)

    resumed = _train(cut_cfg)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"[resume] from step {saved[0]}" in out
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out

    a = load_file(str(ref_dir / "hf_model" / "model.safetensors"))
    b = load_file(str(cut_dir / "hf_model" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert _logged_steps(cut_dir) == list(range(1, STEPS + 1))


def test_a_checkpoint_from_before_a_model_field_existed_still_matches():
    """Resuming after an upgrade that added a ModelConfig field: the old checkpoint's model config lacks the key,
    which stands for the field's default; a real difference is still refused, naming the key."""
    import dataclasses

    from jrlhf.checkpoint import CheckpointError, check_same_model
    from jrlhf.models import tiny_config

    current = json.loads(json.dumps(dataclasses.asdict(tiny_config("llama")), default=str))  # as the loop saves it
    older = {k: v for k, v in current.items() if k not in ("embed_scale", "qk_norm", "sandwich_norm")}
    check_same_model(older, current, "runs/x/checkpoints")
    gemma = json.loads(json.dumps(dataclasses.asdict(tiny_config("gemma3_text")), default=str))
    with pytest.raises(CheckpointError, match="from another model: 'embed_scale'"):
        check_same_model({k: v for k, v in gemma.items() if k != "embed_scale"}, gemma, "runs/x/checkpoints")
