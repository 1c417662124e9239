"""The family checklist: every family registered in ``jrlhf.models.FAMILIES`` passes the same checks.

Checked in the model test files, parametrised over every family (the first test here fails when a registered family
is missing from them):

* parity with ``transformers`` both ways: a random tiny HF model loads with logits within 1e-4 on a left-padded
  batch, the export reloads in ``transformers`` with the same logits and the config round-trips
  (``tests/test_models_hf.py::test_causal_lm_parity_and_export``, ``CAUSAL_CASES``);
* the score head against ``...ForSequenceClassification`` (``test_sequence_classification_score_parity``);
* KV-cache prefill + decode equals the full forward, and left vs right padding give the same real logits
  (``tests/test_models.py``, ``FAMILIES``).

Here: a DPO step sharded over 8 simulated devices (mesh data 2 x fsdp 2 x tensor 2, from the logical axes) gives
DPO's loss written out in numpy and a gradient for every parameter, for every family; and SFT, DPO and GRPO runs
of ``jrlhf.train`` (GRPO samples with
the KV cache) on tiny random Qwen3 and Gemma 3 configs, whose exported model ``transformers`` reloads with the same
logits. The 8 devices are set up by ``tests/conftest.py`` (``XLA_FLAGS`` before jax is imported).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jrlhf
import jrlhf.models as M
import test_models
import test_models_hf
from jrlhf.data import load_records, write_jsonl
from test_step import _dpo_batch, _mesh, _np_dpo_loss, _perturbed, _run_dpo


def test_every_registered_family_is_in_the_parity_and_model_checklists():
    families = set(M.FAMILIES)
    assert {family for family, _ in test_models_hf.CAUSAL_CASES.values()} == families
    assert set(test_models.FAMILIES) == families and set(test_models_hf.FAMILIES) == families
    assert set(M.FAMILY_WEIGHTS) == families
    for family in M.FAMILIES:  # a tiny config of each family exists and round-trips through config.json
        config = M.tiny_config(family)
        assert M.ModelConfig.from_hf_dict(config.to_hf_dict()) == config


def _family_config(family):
    overrides = dict(hidden_size=32, intermediate_size=64, head_dim=8, vocab_size=64)
    if family in ("qwen2", "qwen3", "mistral"):  # windows shorter than the 12-token batches
        overrides.update(sliding_window=5, sliding_window_layers=None if family == "mistral" else (True, False))
    return M.tiny_config(family, **overrides)


@pytest.mark.parametrize("family", M.FAMILIES)
def test_sharded_dpo_step_on_8_devices(family):
    """The step on mesh (2, 2, 2) gives DPO's loss written out in numpy from the unsharded model's logits, and a
    finite, nonzero gradient for every parameter (that sharded and single-device gradients agree is
    tests/test_step.py's check; here each family's parameter layout is what is new)."""
    assert jax.device_count() >= 8
    model, params = M.init_model(_family_config(family), jax.random.PRNGKey(0))
    params = _perturbed(jax.tree.map(np.asarray, params), seed=3, scale=0.05)  # norms away from their init too
    ref_params = _perturbed(params, seed=1)
    batch = _dpo_batch(0)
    losses, grads, _, state, _, _ = _run_dpo(model, params, M.logical_axes(model), _mesh((2, 2, 2)), [batch],
                                             ref_params, 0.5)
    assert losses[0] == pytest.approx(_np_dpo_loss(model, params, ref_params, batch), abs=1e-5)
    flat = jax.tree_util.tree_flatten_with_path(grads[0])[0]
    assert all(np.isfinite(g).all() for _, g in flat)
    # a key bias adds the same q.b to every score of a query: softmax-invariant, its gradient is 0 in exact math
    zero = [jax.tree_util.keystr(path) for path, g in flat if not np.any(g != 0) and path[-1].key != "bk"]
    assert not zero, f"{family}: zero gradient for {zero}"
    wq = state.params["params"]["layers"]["attn"]["wq"]
    assert len(wq.sharding.device_set) == 8


# ------------------------------------------------------------------------- training runs of the new families

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16,
        "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_data")
    files = {}
    for key, source, count in (("sft", "sft_train", 32), ("dpo", "preference_train", 32), ("grpo", "rl_prompts", 8)):
        files[key] = str(root / f"{key}.jsonl")
        write_jsonl(files[key], load_records(f"builtin:addition/{source}.jsonl")[:count])
    return files


def _run_config(algorithm, family, out_dir, train_file):
    config = {
        "algorithm": algorithm,
        "model": {"family": family, "overrides": dict(TINY)},
        "data": {"train": train_file, "batch_size": 8, "max_length": 32},
        "optim": {"learning_rate": 1e-3},
        "train": {"output_dir": str(out_dir), "steps": 1, "log_every": 1, "progress_bar": False,
                  "tensorboard": False},
    }
    if algorithm == "grpo":
        config["data"] = {"train": train_file, "batch_size": 4, "max_prompt_length": 12}
        config["algo"] = {"num_generations": 2, "max_completion_length": 4, "reward_funcs": ["addition_exact_match"]}
    return config


@pytest.mark.slow  # whole runs (compile-bound): leg 1 of CI runs them, the newest-releases leg skips them
@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
@pytest.mark.parametrize("algorithm", ["sft", "dpo", "grpo"])
def test_training_step_and_export_of_new_families(algorithm, family, data_files, tmp_path, require):
    import json
    import os

    summary = jrlhf.train(_run_config(algorithm, family, tmp_path / "run", data_files[algorithm]))
    with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
        train = [r for r in map(json.loads, f) if r["split"] == "train"]
    assert [r["step"] for r in train] == [1]
    assert np.isfinite(train[0]["loss"]) and np.isfinite(train[0]["grad_norm"])
    if algorithm != "grpo":  # a random policy's GRPO group rewards are all 0 here: zero advantages, zero gradient
        assert train[0]["grad_norm"] > 0
    else:
        assert train[0]["completions/mean_length"] > 0
    model, params = M.from_pretrained(summary["hf_dir"])
    assert model.config.family == family
    require("torch")
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(summary["hf_dir"], attn_implementation="eager").eval()
    assert type(hf).__name__ == {"qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}[family]
    ids = np.arange(3, 15)[None] % model.config.vocab_size
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model.apply(params, ids)), want, atol=1e-4, rtol=0)
