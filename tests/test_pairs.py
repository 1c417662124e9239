"""On-policy preference pairs (jrlhf.pairs, ``jrlhf pairs``): the labeller's best against its worst."""

import json
import os

import jax
import numpy as np
import pytest

from jrlhf import cli
from jrlhf.config import ConfigError
from jrlhf.data import load_records, tokenize_preference, write_jsonl
from jrlhf.data.tokenizer import load_tokenizer
from jrlhf.models import init_model, tiny_config
from jrlhf.models.checkpoint import save_pretrained
from jrlhf.pairs import _pairs_of_prompt, mix_records, ranking_metrics, sample_preference_pairs


def test_binary_labels_pair_the_one_correct_answer_against_each_wrong_one_lowest_first():
    cands = [("12", 0.0, "policy"), ("21", 1.0, "policy"), ("13", 0.0, "policy"), ("9", 0.0, "policy")]
    pairs = _pairs_of_prompt(cands, max_pairs=2, min_margin=0.0)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("21", "12"), ("21", "13")]
    assert all(p["kind"] == "policy" and p["chosen_reward"] == 1.0 and p["rejected_reward"] == 0.0 for p in pairs)


def test_graded_labels_take_the_top_tier_in_turn_against_the_lowest_scored():
    cands = [("a", 0.5, "policy"), ("b", 2.0, "policy"), ("c", -1.0, "policy"), ("d", 2.0, "policy"),
             ("e", 1.9, "policy")]
    pairs = _pairs_of_prompt(cands, max_pairs=3, min_margin=0.0)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("b", "c"), ("d", "a"), ("b", "e")]
    # a margin of 0.2 leaves "e" (0.1 below the top) out
    pairs = _pairs_of_prompt(cands, max_pairs=3, min_margin=0.2)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("b", "c"), ("d", "a")]


def test_the_reference_is_chosen_only_when_no_sample_reaches_its_score_and_is_never_rejected():
    wrong = [("12", 0.0, "policy"), ("13", 0.0, "policy")]
    pairs = _pairs_of_prompt(wrong + [("21", 1.0, "reference")], max_pairs=2, min_margin=0.0)
    assert [(p["chosen"], p["rejected"], p["kind"]) for p in pairs] == [("21", "12", "reference"),
                                                                         ("21", "13", "reference")]
    # a sample as good as the reference is chosen first
    pairs = _pairs_of_prompt([("ref", 1.0, "reference")] + wrong + [("21 ", 1.0, "policy")], 2, 0.0)
    assert [(p["chosen"], p["kind"]) for p in pairs] == [("21 ", "policy"), ("ref", "reference")]
    # all samples equal and no reference: nothing to prefer
    assert _pairs_of_prompt(wrong, 2, 0.0) == []
    # a reference scored below the samples is not made a rejected answer
    assert _pairs_of_prompt([("21", 1.0, "policy"), ("x", 0.0, "reference")], 2, 0.0) == []


def test_ranking_metrics_hand_computed():
    # prompt 0: labels 1, 0, 0 scored 2, 3, 1 -> pairs (a>b) wrong, (a>c) right; best-of-n picks b (label 0)
    # prompt 1: labels 1, 1, 0 scored 5, 5, 5 -> two tied pairs (1/2 each); best-of-n picks the first (label 1)
    # prompt 2: one sample whose score is NaN (empty completion): left out; prompt 3: labels 0, 0: no pair
    index = [0, 0, 0, 1, 1, 1, 2, 3, 3]
    labels = [1, 0, 0, 1, 1, 0, 1, 0, 0]
    scores = [2, 3, 1, 5, 5, 5, float("nan"), 1, 2]
    m = ranking_metrics(index, labels, scores)
    assert m["ranked_pairs"] == 4 and m["pair_accuracy"] == (0 + 1 + 0.5 + 0.5) / 4
    assert m["best_of_n"] == (0 + 1 + 0) / 3 and m["oracle_best_of_n"] == (1 + 1 + 0) / 3
    assert m["mean_label"] == 3 / 8
    assert np.isnan(ranking_metrics([0, 0], [1, 1], [0, 1])["pair_accuracy"])


def _count_ones(prompts, completions, completion_ids=None, **kwargs):
    return [float(c.count("1")) for c in completions]


@pytest.fixture(scope="module")
def policy():
    tokenizer = load_tokenizer()
    model, params = init_model(tiny_config("llama", vocab_size=len(tokenizer)), jax.random.PRNGKey(3))
    return model, params, tokenizer


def test_sampled_pairs_carry_the_labellers_scores_and_each_prompts_best_against_its_worst(policy):
    model, params, tokenizer = policy
    records = [{"prompt": f"{i}{i}+1=", "answer": "1" * (i % 3 + 1)} for i in range(6)]
    pairs, stats = sample_preference_pairs(model, params, tokenizer, records, _count_ones, max_new_tokens=4,
                                           num_generations=6, max_pairs_per_prompt=3, reference_field="answer",
                                           rng=jax.random.PRNGKey(1))
    assert stats["prompts"] == 6 and stats["samples"] == 36 and stats["pairs"] == len(pairs) > 0
    assert stats["reference_pairs"] == sum(p["kind"] == "reference" for p in pairs)
    by_prompt = {}
    for p in pairs:
        # the labeller's scores, recomputed here
        assert p["chosen_reward"] == p["chosen"].count("1") and p["rejected_reward"] == p["rejected"].count("1")
        assert p["chosen_reward"] > p["rejected_reward"] and p["rejected"].strip() and p["chosen"].strip()
        assert p["answer"] == next(r["answer"] for r in records if r["prompt"] == p["prompt"])
        if p["kind"] == "reference":
            assert p["chosen"] == p["answer"]
        by_prompt.setdefault(p["prompt"], []).append(p)
    assert stats["prompts_with_pairs"] == len(by_prompt)
    for own in by_prompt.values():
        assert len(own) <= 3 and len({p["rejected"] for p in own}) == len(own)
        assert len({p["chosen_reward"] for p in own}) == 1  # the top tier only
        assert [p["rejected_reward"] for p in own] == sorted(p["rejected_reward"] for p in own)
    # the pairs are valid preference records
    assert len(tokenize_preference(pairs, tokenizer, max_length=32).examples) == len(pairs)
    # a scorer that agrees with the labeller ranks every pair right and picks the best sample
    _, ranked = sample_preference_pairs(model, params, tokenizer, records, _count_ones, max_new_tokens=4,
                                        num_generations=6, rng=jax.random.PRNGKey(1),
                                        scorer=lambda p, c: np.array(_count_ones(p, c), np.float32))
    assert ranked["scorer/pair_accuracy"] == 1.0 and ranked["scorer/ranked_pairs"] > 0
    assert ranked["scorer/best_of_n"] == ranked["scorer/oracle_best_of_n"] > ranked["scorer/mean_label"]


def test_pair_arguments_are_checked(policy):
    model, params, tokenizer = policy
    records = [{"prompt": "1+1=", "answer": "2"}]
    for kwargs, needle in (({"num_generations": 0}, "num_generations"), ({"temperature": 0.0}, "temperature"),
                           ({"max_pairs_per_prompt": 0}, "max_pairs_per_prompt"), ({"min_margin": -1}, "min_margin"),
                           ({"reference_field": "gold"}, "reference_field 'gold'")):
        with pytest.raises(ConfigError, match=needle):
            sample_preference_pairs(model, params, tokenizer, records, _count_ones, max_new_tokens=2, **kwargs)


def test_mix_records_keeps_every_record_and_shuffles_by_seed():
    a, b = [{"i": i} for i in range(20)], [{"i": i} for i in range(20, 30)]
    mixed = mix_records(a, b, seed=0)
    assert sorted(r["i"] for r in mixed) == list(range(30)) and mixed != a + b
    assert mix_records(a, b, seed=0) == mixed and mix_records(a, b, seed=1) != mixed


def _saved(policy, tmp_path) -> str:
    """The policy written as a Hugging Face directory with its tokenizer."""
    model, params, tokenizer = policy
    model_dir = str(tmp_path / "policy")
    save_pretrained(model, params, model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def test_cli_writes_pairs_after_the_included_records(tmp_path, policy, capsys):
    model_dir = _saved(policy, tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(str(prompts), [{"prompt": f"{i}+{i}=", "answer": "1"} for i in range(8)])
    original = tmp_path / "original.jsonl"
    write_jsonl(str(original), [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}] * 5)
    out = tmp_path / "pairs.jsonl"
    status = cli.main(["pairs", "--model", model_dir, "--prompts", str(prompts), "--reward", "tests.test_pairs:_count_ones",
                       "--out", str(out), "--max-new-tokens", "4", "--num-generations", "4",
                       "--reference-field", "answer", "--include", str(original), "--seed", "2"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    written = load_records(str(out))
    made = [r for r in written if "kind" in r]
    assert len(written) == 5 + len(made) and len(made) > 0
    assert f"wrote {len(written)} records" in printed and "(5 from" in printed
    assert all(r["chosen_reward"] > r["rejected_reward"] for r in made)
    assert json.loads(out.read_text().splitlines()[0])  # JSONL
    # with a reward model and no --out: the ranking is printed, nothing written
    score_model, score_params = init_model(tiny_config("llama", vocab_size=len(policy[2])), jax.random.PRNGKey(4),
                                           head="score")
    rm_dir = str(tmp_path / "rm")
    save_pretrained(score_model, score_params, rm_dir)
    status = cli.main(["pairs", "--model", model_dir, "--prompts", str(prompts), "--reward", "tests.test_pairs:_count_ones",
                       "--max-new-tokens", "4", "--num-generations", "4", "--reward-model", rm_dir])
    printed = capsys.readouterr().out
    assert status == 0 and "wrote" not in printed and f"{rm_dir} ranks the samples: pair accuracy" in printed, printed


def test_cli_unknown_labeller_is_a_one_line_error(tmp_path, policy, capsys):
    model_dir = _saved(policy, tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(str(prompts), [{"prompt": "1+1="}])
    status = cli.main(["pairs", "--model", model_dir, "--prompts", str(prompts), "--reward", "no_such_reward",
                       "--out", str(tmp_path / "o.jsonl"), "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("jrlhf: error: ") and "no_such_reward" in err and "\n" not in err


def test_cli_model_folders_are_checked_with_one_line_errors(tmp_path, policy, capsys):
    model_dir = _saved(policy, tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(str(prompts), [{"prompt": "1+1="}])
    base = ["pairs", "--prompts", str(prompts), "--reward", "tests.test_pairs:_count_ones", "--max-new-tokens", "2"]
    # a run folder instead of its exported model: the hint names hf_model/
    os.rename(model_dir, tmp_path / "policy_hf")
    os.makedirs(tmp_path / "run")
    os.rename(tmp_path / "policy_hf", tmp_path / "run" / "hf_model")
    for extra, needles in (
            (["--model", str(tmp_path / "run")], ["--model", "no config.json", f"{tmp_path / 'run' / 'hf_model'}"]),
            (["--model", str(tmp_path / "missing")], ["--model", "not a Hugging Face model folder"]),
            (["--model", str(tmp_path / "run" / "hf_model"), "--reward-model", str(tmp_path / "run" / "hf_model")],
             ["--reward-model", "is not a reward model", "score"])):
        status = cli.main(base + extra)
        err = capsys.readouterr().err.strip()
        assert status == 2 and err.startswith("jrlhf: error: ") and "\n" not in err, err
        for needle in needles:
            assert needle in err, (needle, err)
