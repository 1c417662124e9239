"""KTO (jrlhf.algorithms.kto): a step against TRL 1.16's ``KTOTrainer`` (loss, rewards, KL and gradients), the loss
with its KL reference point against numpy written out, exact gradient accumulation, TRL's unpairing of preference
records, precomputed reference log-probs and the data errors."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from accumulation_cases import VOCAB, _max_abs, _mesh, _model, _perturbed
from jrlhf import data
from jrlhf import step as ST
from jrlhf.algorithms import get_algorithm, kto
from jrlhf.config import ConfigError, load_config
from jrlhf.data import DataError
from jrlhf.step import StepContext, default_globals

_EXTRA = "install the `test` extra, pip install -e '.[test]'"
BETA, DESIRABLE, UNDESIRABLE = 0.2, 1.0, 1.5


# ------------------------------------------------------------------------------------------ numpy, accumulation


def _examples(seed=0):
    """8 unpaired examples of uneven prompt and completion lengths, 5 desirable and 3 undesirable."""
    rng = np.random.default_rng(seed)
    prompts, completions = [3, 5, 2, 4, 6, 3, 2, 5], [2, 9, 4, 12, 3, 7, 1, 6]
    labels = [True, False, True, True, False, True, False, True]
    out = []
    for p, c, label in zip(prompts, completions, labels):
        ids = rng.integers(1, VOCAB, size=p + c).astype(np.int32)
        out.append({"input_ids": ids, "loss_mask": np.array([0] * p + [1] * c, np.int32), "prompt_length": p,
                    "label": label})
    return out


def _np_summed_logps(model, params, ids, attention, loss_mask):
    logits = np.asarray(jax.jit(model.apply)(params, ids, attention), np.float64)[:, :-1]
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    token = np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    return (token * loss_mask[:, 1:]).sum(-1)


def _step(params, specs, algorithm, batch, frozen, num_microbatches):
    opt = ST.make_optimizer(ST.OptimizerConfig(name="sgd", learning_rate=0.1, max_grad_norm=None))
    state, shardings = ST.init_train_state(params, opt, jax.random.PRNGKey(0), mesh=_mesh(), param_specs=specs)
    step = algorithm.train_step(opt, _mesh(), state_shardings=shardings, num_microbatches=num_microbatches)
    new_state, metrics = step(state, batch, frozen)
    update = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), new_state.params,
                          params)
    return {k: float(v) for k, v in metrics.items()}, update


def test_step_equals_numpy_loss_with_kl_and_is_exact_over_two_microbatches():
    """The loss of one step, written out in numpy from the model's logits: KL rows are row i's prompt with row
    (i-1)'s completion, z = max(mean(policy - reference), 0) over all 8 rows; 1 and 2 micro-batches give the same
    loss, metrics and update."""
    model, params, specs = _model("lm")
    policy, reference = _perturbed(params, 3), _perturbed(params, 4)
    examples = _examples()
    batch = kto.collate_kto(examples, pad_id=0, max_length=None)
    # the KL rows as TRL builds them: completions rotated by one within the batch
    for i, e in enumerate(examples):
        prev = examples[i - 1]
        expected = np.concatenate([e["input_ids"][:e["prompt_length"]], prev["input_ids"][prev["prompt_length"]:]])
        assert list(batch["kl_input_ids"][i][batch["kl_attention_mask"][i] > 0]) == list(expected)
        assert batch["kl_loss_mask"][i].sum() == len(prev["input_ids"]) - prev["prompt_length"]

    logps = {name: _np_summed_logps(model, p, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
             for name, p in (("policy", policy), ("reference", reference))}
    kl_logps = {name: _np_summed_logps(model, p, batch["kl_input_ids"], batch["kl_attention_mask"],
                                       batch["kl_loss_mask"])
                for name, p in (("policy", policy), ("reference", reference))}
    z_raw = float(np.mean(kl_logps["policy"] - kl_logps["reference"]))
    z = max(z_raw, 0.0)
    x = logps["policy"] - logps["reference"]
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
    desirable = batch["label"] > 0
    per = np.where(desirable, DESIRABLE * (1 - sig(BETA * (x - z))), UNDESIRABLE * (1 - sig(BETA * (z - x))))
    expected_loss = per.mean()
    assert z > 0.0, f"the KL estimate is clamped ({z_raw}): the case does not exercise it"

    algo = kto.Config(beta=BETA, desirable_weight=DESIRABLE, undesirable_weight=UNDESIRABLE)
    algorithm = kto.make(model, algo)
    frozen = algorithm.init_frozen(reference)
    metrics1, update1 = _step(policy, specs, algorithm, batch, frozen, 1)
    assert metrics1["loss"] == pytest.approx(expected_loss, abs=1e-6)
    assert metrics1["kl"] == pytest.approx(z, abs=1e-5)
    assert metrics1["rewards/chosen"] == pytest.approx(BETA * x[desirable].mean(), abs=1e-5)
    assert metrics1["rewards/rejected"] == pytest.approx(BETA * x[~desirable].mean(), abs=1e-5)
    assert metrics1["logps/chosen"] == pytest.approx(logps["policy"][desirable].mean(), abs=1e-4)
    assert metrics1["logps/rejected"] == pytest.approx(logps["policy"][~desirable].mean(), abs=1e-4)
    assert _max_abs(update1) > 1e-6
    # micro-batch k holds rows k, k+2, ...: rows 0, 2, 4, 6 are 2 desirable + 2 undesirable, rows 1, 3, 5, 7 are
    # 3 + 1, so per-micro-batch means and a per-micro-batch KL would both differ from the batch's
    metrics2, update2 = _step(policy, specs, algorithm, batch, frozen, 2)
    assert metrics2["loss"] == pytest.approx(metrics1["loss"], abs=1e-6)
    assert _max_abs(jax.tree.map(lambda a, b: a - b, update2, update1)) <= 1e-6 * (1.0 + _max_abs(update1))
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert metrics2[key] == pytest.approx(metrics1[key], abs=2e-5), key


def test_precomputed_reference_logps_give_the_same_loss_and_refuse_shuffled_batches():
    model, params, _ = _model("lm")
    policy, reference = _perturbed(params, 4), _perturbed(params, 3)
    examples = _examples(1)
    collate = functools.partial(kto.collate_kto, pad_id=0)
    results = {}
    for precompute in (False, True):
        algo = kto.Config(beta=BETA, precompute_ref_log_probs=precompute)
        algorithm = kto.make(model, algo)
        rows = [dict(e) for e in examples]
        if precompute:
            kto.precompute_reference(model, reference, rows, collate, algo, batch_size=4)
        frozen = algorithm.init_frozen(reference)
        assert (frozen is None) == precompute
        batch = {k: jnp.asarray(v) for k, v in collate(rows[4:]).items()}
        prepared, globals_ = algorithm.prepare_batch(batch, frozen, {}, params=policy)
        ctx = StepContext(rng=jax.random.key(0), step=jnp.int32(0), algo_state={},
                          globals={**default_globals(prepared), **globals_})
        loss, metrics = algorithm.loss_fn(policy, prepared, frozen, ctx)
        results[precompute] = (float(loss), float(metrics["kl"]))
    assert results[True] == pytest.approx(results[False], abs=1e-5)
    with pytest.raises(DataError, match="data.shuffle: false"):
        collate([rows[1], rows[0], rows[2], rows[3]])


# ------------------------------------------------------------------------------------------ data


PAIRS = [{"prompt": "p1", "chosen": "c1", "rejected": "r1", "source": "a"},
         {"prompt": "p2", "chosen": "c2", "rejected": "r2", "source": "b"},
         {"prompt": "p3", "chosen": "c3", "rejected": "r3", "source": "c"}]


def test_unpairing_matches_trl_unpair_preference_dataset():
    datasets = pytest.importorskip("datasets", reason=f"needs datasets: {_EXTRA}")
    pytest.importorskip("trl", minversion="1.16", reason=f"needs TRL>=1.16: {_EXTRA}")
    from trl.data_utils import unpair_preference_dataset

    expected = list(unpair_preference_dataset(datasets.Dataset.from_list(PAIRS)))
    got = kto.unpair_preference_records(PAIRS)
    assert got == [{k: row[k] for k in ("prompt", "completion", "label", "source")} for row in expected]
    assert [r["label"] for r in got] == [True, True, True, False, False, False]
    # chunks of map batches: desirable first within each chunk
    chunked = kto.unpair_preference_records(PAIRS, chunk=2)
    assert [r["completion"] for r in chunked] == ["c1", "c2", "r1", "r2", "c3", "r3"]


def test_paired_records_tokenise_as_their_unpaired_form():
    tokenizer = data.load_tokenizer("char")
    records = data.load_records("builtin:addition/preference_train.jsonl", limit=5)
    paired = kto.tokenize_kto(records, tokenizer, max_length=32)
    unpaired = kto.tokenize_kto(kto.unpair_preference_records(records), tokenizer, max_length=32)
    assert len(paired.examples) == len(unpaired.examples) == 10
    for a, b in zip(paired.examples, unpaired.examples):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])
        assert a["label"] == b["label"] and a["prompt_length"] == b["prompt_length"]
    # a pair with an empty answer follows data.invalid_records: raised, or dropped whole and counted
    bad = [dict(r) for r in records]
    bad[2]["rejected"] = " "
    with pytest.raises(DataError, match="record 3: field 'rejected' is empty"):
        kto.tokenize_kto(bad, tokenizer, max_length=32)
    dropped = kto.tokenize_kto(bad, tokenizer, max_length=32, invalid_records="drop")
    assert len(dropped.examples) == 8 and [i for i, _ in dropped.report.invalid] == [2]
    assert 2 not in {e["record_index"] for e in dropped.examples}


def test_conversational_unpaired_records_use_the_chat_template():
    tokenizer = data.load_tokenizer("char")
    records = [{"prompt": [{"role": "user", "content": "12+34="}],
                "completion": [{"role": "assistant", "content": "46"}], "label": True},
               {"prompt": [{"role": "user", "content": "12+34="}],
                "completion": [{"role": "assistant", "content": "47"}], "label": False}]
    out = kto.tokenize_kto(records, tokenizer)
    sft = data.tokenize_sft([{k: r[k] for k in ("prompt", "completion")} for r in records], tokenizer)
    for a, b in zip(out.examples, sft.examples):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])
    assert [e["label"] for e in out.examples] == [True, False]


@pytest.mark.parametrize("label, message", [
    ("yes", "record 2: field 'label' must be a bool (true = desirable, false = undesirable), got 'yes'"),
    (1, "record 2: field 'label' must be a bool"),
    (None, "record 2: missing field 'label'"),
])
def test_a_bad_label_is_a_one_line_error_naming_the_field(label, message):
    tokenizer = data.load_tokenizer("char")
    records = [{"prompt": "1+1=", "completion": "2", "label": True},
               {"prompt": "1+2=", "completion": "3", "label": label},
               {"prompt": "1+3=", "completion": "4", "label": False}]
    with pytest.raises(DataError) as error:
        kto.tokenize_kto(records, tokenizer)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert "data.invalid_records='drop'" in str(error.value)
    kept = kto.tokenize_kto(records, tokenizer, invalid_records="drop")
    assert [e["record_index"] for e in kept.examples] == [0, 2]
    assert "1 invalid records dropped (records 2;" in kept.report.summary()


def test_registered_with_a_builtin_config_and_config_errors():
    assert get_algorithm("kto") is kto
    cfg = load_config("builtin:kto", algorithm="kto")
    assert isinstance(cfg.algo, kto.Config) and cfg.algo.loss_type == "kto" and cfg.data.batch_size > 1
    with pytest.raises(ConfigError, match="algo.loss_type 'sigmoid' is not one of kto, apo_zero_unpaired"):
        kto.make(_model("lm")[0], kto.Config(loss_type="sigmoid"))
    with pytest.raises(ConfigError, match="unknown config key 'algo.desirable_weigth'"):
        load_config("builtin:kto", ["algo.desirable_weigth=2"], algorithm="kto")


# ------------------------------------------------------------------------------------------ TRL 1.16 KTOTrainer


def _trl_parity():
    pytest.importorskip("torch", reason=f"needs PyTorch (torch): {_EXTRA}")
    pytest.importorskip("trl", minversion="1.16", reason=f"needs TRL>=1.16: {_EXTRA}")
    pytest.importorskip("datasets", reason=f"needs datasets: {_EXTRA}")
    import test_trl_parity

    return test_trl_parity


def _unpaired_records():
    """8 unpaired records of the shipped task, 5 desirable (chosen answers) and 3 undesirable (rejected ones); row
    7 is the 'dropped carry' pair whose rejected answer is one token shorter."""
    rows = data.load_records("builtin:addition/preference_train.jsonl", limit=14)
    picks = [(0, True), (1, False), (2, True), (3, True), (4, False), (5, True), (6, True), (13, False)]
    return [{"prompt": rows[i]["prompt"], "completion": rows[i]["chosen" if good else "rejected"], "label": good}
            for i, good in picks]


def _paired_records():
    rows = data.load_records("builtin:addition/preference_train.jsonl", limit=14)
    return [{k: rows[i][k] for k in ("prompt", "chosen", "rejected")} for i in (0, 1, 2, 13)]


CASES = {
    "kto": (_unpaired_records, dict(beta=BETA, desirable_weight=DESIRABLE, undesirable_weight=UNDESIRABLE,
                                     loss_type="kto")),
    "apo_zero_unpaired_paired": (_paired_records, dict(beta=0.1, loss_type="apo_zero_unpaired")),
}


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """TRL's loss, metrics and gradients of its first batch for each case, that batch as jrlhf arrays, and jrlhf's
    own tokenise + collate of the same records."""
    P = _trl_parity()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    from trl import KTOConfig, KTOTrainer

    from jrlhf import models

    tokenizer = P._tokenizer()
    root = tmp_path_factory.mktemp("kto_parity")
    for seed, name in ((0, "policy"), (1, "reference")):
        torch.manual_seed(seed)
        LlamaForCausalLM(P._llama_config(tokenizer)).to(torch.float32).save_pretrained(root / name)
    out = {}
    for case, (make_records, args) in CASES.items():
        records = make_records()
        load = dict(dtype=torch.float32)
        # The KL rows' mean log-ratio of (A, B) is minus that of (B, A): with the roles swapped when TRL's clamp
        # max(., 0) holds the estimate at 0, the "kto" case always exercises a nonzero reference point.
        for roles in (("policy", "reference"), ("reference", "policy")):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer = KTOTrainer(model=AutoModelForCausalLM.from_pretrained(root / roles[0], **load),
                                     ref_model=AutoModelForCausalLM.from_pretrained(root / roles[1], **load),
                                     args=KTOConfig(**P._common_args(str(root / "out"), 8), disable_dropout=True,
                                                    **args),
                                     train_dataset=Dataset.from_list(records), processing_class=tokenizer)
            batch = next(iter(trainer.get_train_dataloader()))
            loss, grads = P._backward(trainer, batch)
            if args["loss_type"] != "kto" or P._last(trainer._metrics["train"])["kl"] > 0:
                break
        arrays = {k: P._as_numpy(v) for k, v in batch.items()}
        length = max(arrays[k].shape[1] for k in arrays if k.endswith("input_ids"))
        fills = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "completion_mask": 0}
        converted = {}
        for prefix, ours in (("", ""), ("KL_", "kl_")):
            for key, fill in fills.items():
                if prefix + key not in arrays:
                    continue
                a = arrays[prefix + key]
                a = np.pad(a, ((0, 0), (0, length - a.shape[1])), constant_values=fill).astype(np.int32)
                converted[ours + ("loss_mask" if key == "completion_mask" else key)] = a
        converted["label"] = arrays["label"].astype(np.int32)
        algo = kto.Config(**args)
        ours = kto.tokenize_kto(records, tokenizer)
        collated = kto.collate_kto(ours.examples, pad_id=tokenizer.pad_token_id, kl=kto.uses_kl(algo))
        out[case] = dict(loss=loss, metrics=P._last(trainer._metrics["train"]), grads=grads, batch=converted,
                         collated=collated, algo=algo, roles=roles)
    lm, first = models.from_pretrained(str(root / "policy"))
    _, second = models.from_pretrained(str(root / "reference"))

    def run_all(first, second, batches):
        results = {}
        for case, batch in batches.items():
            params = {"policy": first, "reference": second}
            policy, reference = (params[name] for name in out[case]["roles"])
            algorithm = kto.make(lm, out[case]["algo"])
            frozen = algorithm.init_frozen(reference)
            prepared, globals_ = algorithm.prepare_batch(batch, frozen, {}, params=policy)
            ctx = StepContext(rng=jax.random.key(0), step=jnp.int32(0), algo_state={},
                              globals={**default_globals(prepared), **globals_})
            (loss, metrics), grads = jax.value_and_grad(algorithm.loss_fn, has_aux=True)(policy, prepared, frozen,
                                                                                          ctx)
            results[case] = (loss, metrics, grads)
        return results

    batches = {case: {k: jnp.asarray(v) for k, v in o["batch"].items()} for case, o in out.items()}
    compiled = jax.jit(run_all, compiler_options={"xla_backend_optimization_level": 0})
    for case, (loss, metrics, grads) in jax.device_get(compiled(first, second, batches)).items():
        out[case]["jrlhf"] = (float(loss), {k: float(v) for k, v in metrics.items()},
                              models.hf_state_dict(lm, grads))
    return P, out


@pytest.mark.parametrize("case", list(CASES))
def test_step_matches_trl_kto_trainer(case, parity):
    P, out = parity
    o = out[case]
    loss, metrics, grads = o["jrlhf"]
    P._check_close("loss", loss, o["loss"])
    names = ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"]
    P._check_metrics(metrics, o["metrics"], names)
    if o["algo"].loss_type == "kto":
        assert o["metrics"]["kl"] > 1e-3, "TRL's KL estimate is clamped to 0: the case does not test it"
    assert 0 < o["batch"]["label"].sum() < len(o["batch"]["label"])
    P._check_grads(grads, o["grads"])


@pytest.mark.parametrize("case", list(CASES))
def test_tokenise_and_collate_match_trl_kto_batches(case, parity):
    """jrlhf's own tokenisation (paired records unpaired as TRL does) and KL rows equal TRL's first batch."""
    _, out = parity
    theirs, ours = out[case]["batch"], out[case]["collated"]
    assert sorted(ours) == sorted(theirs)
    np.testing.assert_array_equal(ours["label"], theirs["label"])
    for prefix in ("", "kl_") if "kl_input_ids" in theirs else ("",):
        for row in range(len(theirs["label"])):
            for key in ("input_ids", "loss_mask"):
                mine = ours[prefix + key][row][ours[prefix + "attention_mask"][row] > 0]
                trl = theirs[prefix + key][row][theirs[prefix + "attention_mask"][row] > 0]
                np.testing.assert_array_equal(mine, trl, err_msg=f"{prefix}{key} row {row}")
