"""SFT then DPO on the shipped task through the step builder and the loop: held-out preference accuracy rises."""

import json
import os

import numpy as np
import pytest

import jrlhf
from jrlhf.config import load_config
from jrlhf.data import load_records, write_jsonl


@pytest.mark.slow
def test_sft_then_dpo_raises_held_out_preference_accuracy(tmp_path):
    pref_eval = tmp_path / "pref_eval.jsonl"
    write_jsonl(str(pref_eval), load_records("builtin:addition/preference_eval.jsonl")[:256])
    common_train = {"log_every": 10, "progress_bar": False, "tensorboard": False}
    # the shipped SFT config (a tiny Llama to ~50% held-out exact match), without its generation eval
    sft = jrlhf.train(load_config("builtin:sft", [f"train.output_dir={tmp_path / 'sft'}", "train.eval_every=0",
                                                  "data.eval_prompts=null", "train.progress_bar=false",
                                                  "train.tensorboard=false"], algorithm="sft"))
    dpo = jrlhf.train({
        "algorithm": "dpo",
        "data": {"train": "builtin:addition/preference_train.jsonl", "eval": str(pref_eval), "batch_size": 32,
                 "max_length": 24, "eval_batch_size": 128},
        "algo": {"beta": 0.1, "loss_type": "sigmoid"},
        "optim": {"learning_rate": 2e-4},
        "train": {"output_dir": str(tmp_path / "dpo"), "steps": 60, "eval_every": 20, "init_from": sft["hf_dir"],
                  **common_train},
    })
    records = [json.loads(line) for line in open(os.path.join(dpo["run_dir"], "metrics.jsonl"))]
    accuracy = [r["rewards/accuracies"] for r in records if r["split"] == "eval"]
    train_loss = [r["loss"] for r in records if r["split"] == "train"]
    assert len(accuracy) == 3  # steps 20, 40 and the final evaluation at 60
    assert accuracy[-1] > accuracy[0] and accuracy[-1] >= 0.75, accuracy
    assert max(train_loss[-2:]) < np.log(2.0), train_loss  # DPO starts at log 2 (policy = reference)
