"""Step-level parity with TRL 1.16's trainers: same tiny weights, same batch -> same loss, metrics and gradients.

TRL side: the real trainers (``DPOTrainer``, ``RewardTrainer``, ``SFTTrainer``, and the experimental ``CPOTrainer``
for SimPO / CPO and ``ORPOTrainer``), built offline in float32 on tiny random Llama checkpoints written with
``save_pretrained``. One batch comes from the trainer's own dataloader (its tokenisation, EOS handling and padding);
``compute_loss`` then ``backward`` give the loss and gradients, ``trainer._metrics`` (``_stored_metrics`` for
CPO/ORPO) the metrics.

jrlhf side: the same checkpoints through :func:`jrlhf.models.from_pretrained`, TRL's collated tensors converted to
jrlhf's batch contracts (identical token ids and masks, so the comparison is of the math, not of the tokenisation),
the algorithm's own ``loss_fn`` under ``jax.value_and_grad``, and the gradient pytree mapped to HF tensor names with
:func:`jrlhf.models.hf_state_dict`. All jrlhf cases run in one compiled function (one XLA compilation instead of one
per case). Separate tests check that jrlhf's own tokenise + collate gives TRL's arrays.

Tolerance: 1e-4 on every loss and metric; on gradients 1e-4 times ``max(1, max |grad|)`` of each tensor.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
import pytest

_EXTRA = "install the `test` extra, pip install -e '.[test]'"
torch = pytest.importorskip("torch", reason=f"needs PyTorch (torch): {_EXTRA}")
trl = pytest.importorskip("trl", minversion="1.16", reason=f"needs TRL>=1.16: {_EXTRA}")
pytest.importorskip("datasets", reason=f"needs datasets: {_EXTRA}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jrlhf import data, models  # noqa: E402
from jrlhf.algorithms import dpo, reward, sft  # noqa: E402
from jrlhf.algorithms.base import preference_globals  # noqa: E402
from jrlhf.step import StepContext, default_globals  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning:transformers.*")

TOL = 1e-4
# Records of the shipped task: 7 "digit_off" pairs (chosen and rejected of equal length) and record 13, a
# "dropped_carry" pair whose rejected completion is one token shorter (exercises padding, IPO's and LD-DPO's lengths).
RECORD_INDICES = (0, 1, 2, 3, 4, 5, 6, 13)
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")
RM_METRICS = ("accuracy", "margin", "min_reward", "mean_reward", "max_reward")


# ------------------------------------------------------------------------------------------------------------ cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One parity case: the TRL trainer and its config arguments, and the equivalent jrlhf algorithm config."""

    trainer: str  # "dpo", "cpo", "orpo", "reward" or "sft"
    trl_args: dict
    algo: Any
    dataset: str = "preference"  # "margin": preference records with a per-pair margin; "sft": prompt-completion


DPO_CASES = {
    "sigmoid": Case("dpo", dict(beta=0.1, loss_type=["sigmoid"]), dpo.Config(beta=0.1, loss_type="sigmoid")),
    "ipo": Case("dpo", dict(beta=0.1, loss_type=["ipo"]), dpo.Config(beta=0.1, loss_type="ipo")),
    "hinge": Case("dpo", dict(beta=0.1, loss_type=["hinge"]), dpo.Config(beta=0.1, loss_type="hinge")),
    "robust": Case("dpo", dict(beta=0.1, loss_type=["robust"], label_smoothing=0.1),
                   dpo.Config(beta=0.1, loss_type="robust", label_smoothing=0.1)),
    "sigmoid_norm": Case("dpo", dict(beta=0.5, loss_type=["sigmoid_norm"]),
                         dpo.Config(beta=0.5, loss_type="sigmoid_norm")),
    # RPO: TRL 1.16 spells it as the weighted pair (sigmoid, sft); jrlhf as rpo_alpha.
    "rpo": Case("dpo", dict(beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
                dpo.Config(beta=0.1, loss_type="sigmoid", rpo_alpha=0.5)),
    "ld_dpo": Case("dpo", dict(beta=0.1, loss_type=["sigmoid"], ld_alpha=0.5),
                   dpo.Config(beta=0.1, loss_type="sigmoid", ld_alpha=0.5)),
    # jrlhf's vocabulary-chunked log-softmax (4 chunks of the 104-token vocabulary) against TRL's fused LM head.
    "sigmoid_chunked": Case("dpo", dict(beta=0.1, loss_type=["sigmoid"]),
                            dpo.Config(beta=0.1, loss_type="sigmoid", logprob_chunk_size=32)),
}
CPO_CASES = {
    # SimPO is CPOTrainer(loss_type="simpo", cpo_alpha=0).
    "simpo": Case("cpo", dict(beta=2.0, loss_type="simpo", simpo_gamma=0.5, cpo_alpha=0.0),
                  dpo.Config(beta=2.0, loss_type="simpo", simpo_gamma=0.5)),
    # CPO proper: reference-free sigmoid on summed log-probs plus the chosen NLL (cpo_alpha = 1).
    "cpo": Case("cpo", dict(beta=0.1, loss_type="sigmoid", cpo_alpha=1.0),
                dpo.Config(beta=0.1, loss_type="sigmoid", reference_free=True, rpo_alpha=1.0)),
}
ORPO_CASE = Case("orpo", dict(beta=0.1), dpo.Config(beta=0.1, loss_type="orpo"))
RM_CASES = {
    "rm": Case("reward", {}, reward.Config()),
    # The centring penalty and a per-pair margin column together.
    "rm_centered_margin": Case("reward", dict(center_rewards_coefficient=0.01),
                               reward.Config(center_rewards_coefficient=0.01), dataset="margin"),
}
# Completion-only next-token NLL, averaged over the batch's completion tokens.
SFT_CASE = Case("sft", {}, sft.Config(), dataset="sft")
CASES = {**DPO_CASES, **CPO_CASES, "orpo": ORPO_CASE, **RM_CASES, "sft": SFT_CASE}


# --------------------------------------------------------------------------------------------------------- fixtures


def _tokenizer():
    return data.load_tokenizer("char")


@pytest.fixture(scope="module")
def records():
    rows = data.load_records("builtin:addition/preference_train.jsonl", limit=max(RECORD_INDICES) + 1)
    return [{k: rows[i][k] for k in ("prompt", "chosen", "rejected")} for i in RECORD_INDICES]


@pytest.fixture(scope="module")
def sft_records():
    rows = data.load_records("builtin:addition/sft_train.jsonl", limit=6)
    return [{k: row[k] for k in ("prompt", "completion")} for row in rows]


def _llama_config(tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                       rms_norm_eps=1e-6, initializer_range=0.2, tie_word_embeddings=False,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, attention_dropout=0.0, **extra)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Three tiny random float32 Llama checkpoints: policy, a different reference (so rewards are not all zero) and
    a reward model (``LlamaForSequenceClassification``, one label)."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = _tokenizer()
    root = tmp_path_factory.mktemp("trl_parity")
    dirs = {}
    for seed, (name, cls, extra) in enumerate([("policy", LlamaForCausalLM, {}),
                                               ("reference", LlamaForCausalLM, {}),
                                               ("reward", LlamaForSequenceClassification, {"num_labels": 1})]):
        torch.manual_seed(seed)
        model = cls(_llama_config(tokenizer, **extra)).to(torch.float32)
        dirs[name] = str(root / name)
        model.save_pretrained(dirs[name])
    dirs["output"] = str(root / "trainer_output")
    return dirs


@dataclasses.dataclass
class TrlStep:
    """Loss, metrics and HF-named gradients of one TRL training batch, and that batch in jrlhf's contract."""

    loss: float
    metrics: dict
    grads: dict
    batch: dict
    ordered_batch: dict | None = None  # the collator's output for the records in order (tokenisation checks)


def _common_args(output_dir: str, batch_size: int) -> dict:
    return dict(output_dir=output_dir, report_to=[], use_cpu=True, bf16=False, fp16=False, seed=0,
                per_device_train_batch_size=batch_size, dataloader_num_workers=0, save_strategy="no")


def _as_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def _halves(tensor) -> tuple[np.ndarray, np.ndarray]:
    array = _as_numpy(tensor).astype(np.int32)
    half = array.shape[0] // 2
    return array[:half], array[half:]


def _from_concatenated(batch: dict, loss_mask_key: str | None) -> dict:
    """TRL's ``[2B, T]`` chosen-over-rejected batch -> jrlhf's ``{chosen,rejected}_*`` ``[B, T]`` arrays."""
    out = {}
    ids, attention = _halves(batch["input_ids"]), _halves(batch["attention_mask"])
    # The reward model reads no loss mask; its rows get the attention mask (only the chosen-token count uses it).
    loss = _halves(batch[loss_mask_key]) if loss_mask_key else attention
    for i, side in enumerate(("chosen", "rejected")):
        out[f"{side}_input_ids"] = ids[i]
        out[f"{side}_attention_mask"] = attention[i]
        out[f"{side}_loss_mask"] = loss[i]
    if "margin" in batch:
        out["margin"] = _as_numpy(batch["margin"]).astype(np.float32)
    return out


def _from_paired(batch: dict, pad_id: int) -> dict:
    """CPO/ORPO's separately padded ``{chosen,rejected}_{input_ids,attention_mask,labels}`` -> one common ``T``;
    the loss mask is where the labels are not -100 (TRL's ``get_batch_logps``)."""
    length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    out = {}
    for side in ("chosen", "rejected"):
        fills = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
        arrays = {}
        for key, fill in fills.items():
            array = _as_numpy(batch[f"{side}_{key}"]).astype(np.int64)
            arrays[key] = np.pad(array, ((0, 0), (0, length - array.shape[1])), constant_values=fill)
        out[f"{side}_input_ids"] = arrays["input_ids"].astype(np.int32)
        out[f"{side}_attention_mask"] = arrays["attention_mask"].astype(np.int32)
        out[f"{side}_loss_mask"] = (arrays["labels"] != -100).astype(np.int32)
    return out


def _backward(trainer, batch) -> tuple[float, dict]:
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {name: _as_numpy(p.grad).copy() for name, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _last(metric_store: dict) -> dict:
    return {key: float(values[-1]) for key, values in metric_store.items() if len(values)}


def _from_labels(batch: dict) -> dict:
    """TRL's SFT batch -> jrlhf's ``input_ids``, ``attention_mask``, ``loss_mask`` (where labels are not -100)."""
    return {"input_ids": _as_numpy(batch["input_ids"]).astype(np.int32),
            "attention_mask": _as_numpy(batch["attention_mask"]).astype(np.int32),
            "loss_mask": (_as_numpy(batch["labels"]) != -100).astype(np.int32)}


def _trl_step(case: Case, checkpoints: dict, records: list, sft_records: list) -> TrlStep:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer = _tokenizer()
    rows = sft_records if case.dataset == "sft" else records
    if case.dataset == "margin":
        rows = [{**r, "margin": float(m)} for r, m in zip(records, np.linspace(0.0, 1.5, len(records)))]
    dataset = Dataset.from_list(rows)
    common = _common_args(checkpoints["output"], len(rows))
    if case.trainer != "sft":  # SFTConfig has no disable_dropout (the checkpoints have no dropout anyway)
        common["disable_dropout"] = True
    load = dict(dtype=torch.float32)

    if case.trainer == "reward":
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(checkpoints["reward"], num_labels=1, **load)
        trainer = RewardTrainer(model=model, args=RewardConfig(**common, **case.trl_args), train_dataset=dataset,
                                processing_class=tokenizer)
    elif case.trainer == "dpo":
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(checkpoints["policy"], **load),
                             ref_model=AutoModelForCausalLM.from_pretrained(checkpoints["reference"], **load),
                             args=DPOConfig(**common, **case.trl_args), train_dataset=dataset,
                             processing_class=tokenizer)
    elif case.trainer == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(checkpoints["policy"], **load),
                             args=SFTConfig(**common, **case.trl_args), train_dataset=dataset,
                             processing_class=tokenizer)
    elif case.trainer in ("cpo", "orpo"):
        if case.trainer == "cpo":
            from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer
        else:
            from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(checkpoints["policy"], **load),
                              args=Config(**common, max_length=64, **case.trl_args), train_dataset=dataset,
                              processing_class=tokenizer)
    else:
        raise ValueError(case.trainer)

    batch = next(iter(trainer.get_train_dataloader()))
    loss, grads = _backward(trainer, batch)
    if case.trainer in ("cpo", "orpo"):
        metrics = _last(trainer._stored_metrics["train"])
        jrlhf_batch = _from_paired(batch, tokenizer.pad_token_id)
        ordered = None
    else:
        metrics = _last(trainer._metrics["train"])
        if case.trainer == "sft":
            jrlhf_batch = _from_labels(batch)
        else:
            jrlhf_batch = _from_concatenated(batch, "completion_mask" if case.trainer == "dpo" else None)
        ordered = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
        ordered = {k: _as_numpy(v) for k, v in ordered.items()}
    return TrlStep(loss=loss, metrics=metrics, grads=grads, batch=jrlhf_batch, ordered_batch=ordered)


@pytest.fixture(scope="module")
def trl_steps(checkpoints, records, sft_records):
    return {name: _trl_step(case, checkpoints, records, sft_records) for name, case in CASES.items()}


@pytest.fixture(scope="module")
def jrlhf_models(checkpoints):
    lm, policy_params = models.from_pretrained(checkpoints["policy"])
    _, reference_params = models.from_pretrained(checkpoints["reference"])
    rm, rm_params = models.from_pretrained(checkpoints["reward"], head="score")
    return {"lm": lm, "rm": rm, "policy": policy_params, "reference": reference_params, "reward": rm_params}


@pytest.fixture(scope="module")
def jrlhf_steps(jrlhf_models, trl_steps):
    """Loss, metrics and HF-named gradients of every case from jrlhf's loss functions, in one compiled function."""
    lm, rm = jrlhf_models["lm"], jrlhf_models["rm"]
    loss_fns = {}
    for name, case in CASES.items():
        module = {"reward": reward, "sft": sft}.get(case.trainer, dpo)
        loss_fns[name] = module.make_loss_fn(rm if case.trainer == "reward" else lm, case.algo)

    def run_all(policy, reference, reward_params, batches):
        out = {}
        for name, case in CASES.items():
            batch = batches[name]
            # As the step builder does: its default normalisers plus the algorithm's prepare_batch globals.
            batch_globals = default_globals(batch)
            if case.trainer != "sft":
                batch_globals.update(preference_globals(batch, None, {})[1])
            ctx = StepContext(rng=jax.random.key(0), step=jnp.int32(0), algo_state={}, globals=batch_globals)
            if case.trainer == "reward":
                params, frozen = reward_params, None
            elif case.trainer == "sft":
                params, frozen = policy, None
            else:
                params, frozen = policy, (dpo.Frozen(ref_params=reference) if dpo.uses_reference(case.algo) else None)
            (loss, metrics), grads = jax.value_and_grad(loss_fns[name], has_aux=True)(params, batch, frozen, ctx)
            out[name] = (loss, metrics, grads)
        return out

    batches = {name: {k: jnp.asarray(v) for k, v in step.batch.items()} for name, step in trl_steps.items()}
    # Unoptimised XLA code generation: compiles about twice as fast, and the few-millisecond run does not matter.
    compiled = jax.jit(run_all, compiler_options={"xla_backend_optimization_level": 0})
    results = jax.device_get(compiled(jrlhf_models["policy"], jrlhf_models["reference"],
                                              jrlhf_models["reward"], batches))
    steps = {}
    for name, (loss, metrics, grads) in results.items():
        model = rm if CASES[name].trainer == "reward" else lm
        steps[name] = (float(loss), {k: float(v) for k, v in metrics.items()}, models.hf_state_dict(model, grads))
    return steps


# ---------------------------------------------------------------------------------------------------------- checks


def _check_close(name: str, got: float, expected: float):
    assert abs(got - expected) <= TOL, f"{name}: jrlhf {got!r} vs TRL {expected!r} (diff {abs(got - expected):.3g})"


def _check_grads(got: dict, expected: dict):
    assert set(got) == set(expected), f"parameter names differ: {sorted(set(got) ^ set(expected))}"
    largest = max(float(np.abs(g).max()) for g in expected.values())
    assert largest > 1e-2, "the TRL gradient is too small for the comparison to mean anything"
    for name, reference in expected.items():
        scale = max(1.0, float(np.abs(reference).max()))
        error = float(np.abs(got[name] - reference).max())
        assert error <= TOL * scale, f"grad {name}: max |jrlhf - TRL| = {error:.3g} (max |TRL| = {scale:.3g})"


def _check_metrics(got: dict, expected: dict, names):
    for key in names:
        assert key in expected, f"TRL logged no {key!r}: {sorted(expected)}"
        assert key in got, f"jrlhf logged no {key!r}: {sorted(got)}"
        _check_close(key, got[key], expected[key])


def test_batch_is_nontrivial(trl_steps):
    """The shared DPO batch has padding, unequal chosen/rejected lengths and rewards that are neither all 0 nor tied."""
    step = trl_steps["sigmoid"]
    batch = step.batch
    assert (batch["chosen_attention_mask"] == 0).any() and (batch["rejected_attention_mask"] == 0).any()
    assert (batch["chosen_loss_mask"].sum(1) != batch["rejected_loss_mask"].sum(1)).any()
    assert abs(step.metrics["rewards/chosen"]) > 1e-3 and abs(step.metrics["rewards/margins"]) > 1e-3
    assert 0.0 < step.metrics["rewards/accuracies"] < 1.0


@pytest.mark.parametrize("name", list(DPO_CASES))
def test_dpo_matches_trl_dpo_trainer(name, trl_steps, jrlhf_steps):
    expected, (loss, metrics, grads) = trl_steps[name], jrlhf_steps[name]
    _check_close("loss", loss, expected.loss)
    _check_metrics(metrics, expected.metrics, DPO_METRICS)
    _check_grads(grads, expected.grads)


@pytest.mark.parametrize("name", list(CPO_CASES))
def test_simpo_and_cpo_match_trl_cpo_trainer(name, trl_steps, jrlhf_steps):
    expected, (loss, metrics, grads) = trl_steps[name], jrlhf_steps[name]
    _check_close("loss", loss, expected.loss)
    names = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]
    if CASES[name].algo.loss_type != "simpo":  # CPO logs length-averaged logps/* for SimPO (checked further down)
        names += ["logps/chosen", "logps/rejected"]
    if CASES[name].algo.rpo_alpha:
        names.append("nll_loss")
    _check_metrics(metrics, expected.metrics, names)
    _check_grads(grads, expected.grads)


def test_orpo_odds_ratio_term_matches_trl_orpo_trainer(trl_steps, jrlhf_steps):
    """ORPO's preference term (loss minus the NLL term), rewards and odds-ratio metrics equal TRL's ORPOTrainer."""
    expected, (loss, metrics, _) = trl_steps["orpo"], jrlhf_steps["orpo"]
    _check_close("loss - nll_loss", loss - metrics["nll_loss"], expected.loss - expected.metrics["nll_loss"])
    _check_metrics(metrics, expected.metrics, ("rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                               "rewards/margins", "log_odds_ratio", "log_odds_chosen"))


def test_orpo_nll_term_and_gradients_match_trl_orpo_trainer(trl_steps, jrlhf_steps):
    expected, (loss, metrics, grads) = trl_steps["orpo"], jrlhf_steps["orpo"]
    _check_close("nll_loss", metrics["nll_loss"], expected.metrics["nll_loss"])
    _check_close("loss", loss, expected.loss)
    _check_grads(grads, expected.grads)


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_length_normalised_logps_metrics_match_trl(name, trl_steps, jrlhf_steps):
    expected, (_, metrics, _) = trl_steps[name], jrlhf_steps[name]
    _check_metrics(metrics, expected.metrics, ("logps/chosen", "logps/rejected"))


@pytest.mark.parametrize("name", list(RM_CASES))
def test_reward_model_matches_trl_reward_trainer(name, trl_steps, jrlhf_steps):
    expected, (loss, metrics, grads) = trl_steps[name], jrlhf_steps[name]
    _check_close("loss", loss, expected.loss)
    _check_metrics(metrics, expected.metrics, RM_METRICS)
    _check_grads(grads, expected.grads)


def test_sft_matches_trl_sft_trainer(trl_steps, jrlhf_steps):
    expected, (loss, metrics, grads) = trl_steps["sft"], jrlhf_steps["sft"]
    _check_close("loss", loss, expected.loss)
    _check_close("nll", metrics["nll"], expected.loss)
    _check_grads(grads, expected.grads)


# ------------------------------------------------------------------------------------------- tokenisation parity


def test_jrlhf_preference_tokenisation_matches_trl_dpo_collator(trl_steps, records):
    """jrlhf's tokenise + collate of the records gives the arrays of TRL's DPO preprocessing + collator: BOS from
    the tokenizer's template, EOS appended to each completion, right padding, completion mask from lengths."""
    ordered = trl_steps["sigmoid"].ordered_batch
    tokenizer = _tokenizer()
    tokenized = data.tokenize_preference(records, tokenizer)
    assert len(tokenized.examples) == len(records)
    batch = data.collate_preference(tokenized.examples, pad_id=tokenizer.pad_token_id,
                                    length=ordered["input_ids"].shape[1])
    expected = _from_concatenated({k: torch.as_tensor(v) for k, v in ordered.items()}, "completion_mask")
    for key, value in expected.items():
        np.testing.assert_array_equal(batch[key], value, err_msg=key)


def test_jrlhf_preference_tokenisation_matches_trl_reward_collator(trl_steps, records):
    """Reward-model sequences are prompt + completion + EOS, right-padded, as TRL's RewardTrainer builds them."""
    ordered = trl_steps["rm"].ordered_batch
    tokenizer = _tokenizer()
    tokenized = data.tokenize_preference(records, tokenizer)
    batch = data.collate_preference(tokenized.examples, pad_id=tokenizer.pad_token_id,
                                    length=ordered["input_ids"].shape[1])
    expected = _from_concatenated({k: torch.as_tensor(v) for k, v in ordered.items()}, None)
    for side in ("chosen", "rejected"):
        for key in ("input_ids", "attention_mask"):
            np.testing.assert_array_equal(batch[f"{side}_{key}"], expected[f"{side}_{key}"], err_msg=f"{side}_{key}")


def test_jrlhf_sft_tokenisation_matches_trl_sft_collator(trl_steps, sft_records):
    """SFT sequences are prompt + completion + EOS with the loss on the completion and EOS, as TRL's SFTTrainer
    (prompt-completion data, completion-only loss) builds them."""
    ordered = trl_steps["sft"].ordered_batch
    tokenizer = _tokenizer()
    tokenized = data.tokenize_sft(sft_records, tokenizer)
    batch = data.collate_sft(tokenized.examples, pad_id=tokenizer.pad_token_id, length=ordered["input_ids"].shape[1])
    expected = _from_labels({k: torch.as_tensor(v) for k, v in ordered.items()})
    for key, value in expected.items():
        np.testing.assert_array_equal(batch[key], value, err_msg=key)
