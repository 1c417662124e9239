"""Reward model with the hidden-state (next-token) regulariser: loss against numpy, export as a score model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jrlhf
from jrlhf.algorithms import reward
from jrlhf.algorithms.base import preference_globals
from jrlhf.data import collate_preference, load_records, write_jsonl
from jrlhf.models import init_model, tiny_config
from jrlhf.step import StepContext

TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
              "max_position_embeddings": 64}


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_lm_regularised_loss_is_bradley_terry_plus_chosen_token_nll():
    config = tiny_config("llama", vocab_size=40, **TINY_MODEL)
    model, params = init_model(config, jax.random.PRNGKey(0), head="lm+value")
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(3):
        prompt = list(rng.integers(1, 40, int(rng.integers(2, 6))))
        chosen = list(rng.integers(1, 40, int(rng.integers(1, 5))))
        rejected = list(rng.integers(1, 40, int(rng.integers(1, 5))))
        examples.append({"chosen_input_ids": prompt + chosen, "chosen_loss_mask": [0] * len(prompt) + [1] * len(chosen),
                         "rejected_input_ids": prompt + rejected,
                         "rejected_loss_mask": [0] * len(prompt) + [1] * len(rejected)})
    batch = {k: jnp.asarray(v) for k, v in collate_preference(examples, pad_id=0).items()}
    coefficient = 0.7
    loss_fn = reward.make_loss_fn(model, reward.Config(lm_loss_coefficient=coefficient))
    batch, globals_ = preference_globals(batch, None, {})
    loss, metrics = jax.jit(loss_fn)(params, batch, None, StepContext(jax.random.PRNGKey(1), jnp.int32(0), {}, globals_))

    # reference: numpy over the raw model outputs, one side at a time
    bt, nll, tokens, scores = 0.0, 0.0, 0, {}
    for side in ("chosen", "rejected"):
        ids, attn = np.asarray(batch[f"{side}_input_ids"]), np.asarray(batch[f"{side}_attention_mask"])
        logits, values = (np.asarray(a) for a in jax.jit(model.apply)(params, jnp.asarray(ids), jnp.asarray(attn)))
        last = attn.sum(-1) - 1  # right padded
        scores[side] = values[np.arange(len(ids)), last]
        if side == "chosen":
            logp = _log_softmax(logits[:, :-1].astype(np.float64))
            target = np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
            mask = np.asarray(batch["chosen_loss_mask"])[:, 1:] > 0
            nll, tokens = -(target * mask).sum(), mask.sum()
    diff = scores["chosen"].astype(np.float64) - scores["rejected"]
    bt = np.mean(np.log1p(np.exp(-diff)))
    expected = bt + coefficient * nll / tokens
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["lm_loss"]), nll / tokens, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(diff > 0))

    # coefficient 0 is the plain score model (no LM head, no lm_loss metric)
    class Cfg:
        algo = reward.Config()
    assert reward.head(Cfg) == "score"
    Cfg.algo = reward.Config(lm_loss_coefficient=coefficient)
    assert reward.head(Cfg) == "lm+value"


@pytest.mark.torch
def test_lm_regularised_run_exports_a_score_model_transformers_loads(tmp_path):
    train = tmp_path / "pref.jsonl"
    write_jsonl(str(train), load_records("builtin:addition/preference_train.jsonl")[:64])
    summary = jrlhf.train({
        "algorithm": "reward",
        "model": {"family": "llama", "overrides": dict(TINY_MODEL)},
        "data": {"train": str(train), "eval": str(train), "batch_size": 16, "max_length": 32},
        "algo": {"lm_loss_coefficient": 1.0},
        "optim": {"learning_rate": 1e-3},
        "train": {"output_dir": str(tmp_path / "rm"), "steps": 3, "log_every": 1, "progress_bar": False,
                  "tensorboard": False},
    })
    import torch
    import transformers

    from jrlhf.data import load_tokenizer, tokenize_preference

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(summary["hf_dir"]).eval()
    data = tokenize_preference(load_records(str(train)), load_tokenizer("char"), max_length=32)
    scores = {}
    for side in ("chosen", "rejected"):
        with torch.no_grad():  # one unpadded sequence at a time: the score at its last token
            scores[side] = np.asarray([float(hf(torch.tensor([list(e[f"{side}_input_ids"])])).logits[0, 0])
                                       for e in data.examples])
    # the loop's final held-out evaluation ran our lm+value model on the same pairs: the exported score model agrees
    assert summary["eval"]["num_examples"] == len(data.examples) == 64
    np.testing.assert_allclose(summary["eval"]["margin"], np.mean(scores["chosen"] - scores["rejected"]), atol=1e-4)
    assert summary["eval"]["accuracy"] == np.mean(scores["chosen"] > scores["rejected"])


def test_negative_lm_loss_coefficient_is_a_config_error():
    from jrlhf.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="algo.lm_loss_coefficient"):
        load_config("builtin:reward", ["algo.lm_loss_coefficient=-1"], algorithm="reward")
