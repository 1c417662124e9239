"""The benchmark harness (``benchmarks/``): dry run, FLOP counts, identical inputs for both systems, alternation,
reporting. Nothing here asserts a time."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import cases, report, timing
from benchmarks import data as bdata
from benchmarks.sizes import BenchSize, Shape, forward_flops, generation_flops, get_size, train_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A size small enough to build TRL trainers in a test: Llama, hidden 32, 1 layer, vocab 64.
MINI = BenchSize(
    name="mini", hf_config=dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-6,
                                tie_word_embeddings=False),
    batch_size=4, prompt_length=6, completion_length=5, num_generations=2, dtype="float32", accelerator=False,
    description="test size")


@pytest.mark.torch  # benchmarks.run sets PyTorch's threads even for --dry-run
def test_dry_run_tiny_writes_plan_and_traces_every_step(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--dry-run", "--size", "tiny", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    (json_path,) = tmp_path.glob("*.json")
    result = json.loads(json_path.read_text())
    plan = result["plan"]
    # hand count: embeddings + LM head 2 * 512 * 128; per layer q/o 2 * 128^2, k/v 2 * 128 * 64, MLP 3 * 128 * 384,
    # two norms 2 * 128; the final norm 128.
    expected = 2 * 512 * 128 + 4 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 384 + 2 * 128) + 128
    assert plan["jrlhf_parameters"] == expected
    assert plan["transformers_parameters"] == expected
    assert set(plan["abstract"]) == set(cases.BENCHMARKS)
    assert plan["abstract"]["generate_greedy"]["outputs"]["tokens"] == [8, 64]
    assert plan["abstract"]["grpo_whole_step"]["sampler_outputs"]["tokens"] == [8, 64]  # 2 prompts x 4 samples
    assert {"loss", "grad_norm"} <= set(plan["abstract"]["dpo_step"]["metrics"])
    assert result["benchmarks"] == []  # nothing timed
    markdown = json_path.with_suffix(".md").read_text()
    assert "Dry run" in markdown and "TRL DPOTrainer" in markdown


@pytest.mark.torch
def test_accelerator_size_traces_abstractly_and_matches_transformers_parameter_count():
    pytest.importorskip("transformers")
    from benchmarks import plan

    size = get_size("qwen2-0.5b")
    assert plan.jrlhf_parameter_count(size) == plan.torch_parameter_count(size) == 494_032_768
    traced = plan.abstract_check(size, ["dpo_step", "generate_sampled"])
    assert traced["generate_sampled"]["outputs"]["tokens"] == [16, 512]
    assert "loss" in traced["dpo_step"]["metrics"]


def test_forward_flops_match_xla_cost_analysis():
    import jax
    import jax.numpy as jnp

    from jrlhf.models import init_model

    config = bdata.model_config(MINI)
    model, params = init_model(config, jax.random.key(0))
    ids = jnp.zeros((3, 16), jnp.int32)
    # nn.scan compiles to a while loop, whose body XLA's cost analysis counts once: count a 1-layer model.
    assert config.num_layers == 1
    cost = jax.jit(lambda p, i: model.apply(p, i)).lower(params, ids).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    ours = forward_flops(Shape.of(config), 3, 16)
    # XLA also counts the elementwise work (norms, rotary, softmax, SiLU): a few percent on top of the matmuls.
    assert ours <= cost["flops"] <= 1.15 * ours


def test_training_and_generation_flops_by_hand():
    shape = Shape(vocab_size=10, hidden_size=4, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                  head_dim=2, gated_mlp=True)
    weights = (4 * 4 + 2 * 4 * 2 + 4 * 4) + 3 * 4 * 8 + 10 * 4  # attention q,k,v,o + gated MLP + LM head = 168
    assert forward_flops(shape, 2, 3) == 2 * weights * 6 + 4 * 1 * 2 * 2 * 2 * 3 * 3
    assert train_flops(shape, 2, 3, frozen_forwards=1) == 4 * forward_flops(shape, 2, 3)
    # prefill of 1 prompt of 3 tokens, then 2 single-token steps for 2 rows attending to 4 and 5 keys
    expected = forward_flops(shape, 1, 3) + forward_flops(shape, 2, 1, 4) + forward_flops(shape, 2, 1, 5)
    assert generation_flops(shape, 2, 3, 3, prefill_rows=1) == expected


def test_xla_flags_replace_only_the_device_count():
    from benchmarks.env import xla_flags

    existing = "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8"
    assert xla_flags(None, existing) == "--xla_dump_to=/tmp/x"
    assert xla_flags(4, existing) == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4"


def test_unknown_size_and_benchmark_are_named_in_the_error():
    with pytest.raises(ValueError, match="--size 'huge'"):
        get_size("huge")
    with pytest.raises(ValueError, match="dpo"):
        cases.parse_benchmarks("dpo_step,dpo")


def test_scan_unroll_per_size_and_override():
    assert get_size("tiny").scan_unroll == 4 and get_size("small").scan_unroll == 8
    assert get_size("qwen2-0.5b").scan_unroll == 1
    assert get_size("tiny", scan_unroll=1).scan_unroll == 1
    from benchmarks.run import parse_args

    assert parse_args(["--scan-unroll", "2"]).scan_unroll == 2
    with pytest.raises(SystemExit):
        parse_args(["--scan-unroll", "0"])


def test_tokenizer_round_trips_the_word_text():
    tokenizer = bdata.build_tokenizer(64)
    ids = [5, 63, 4, 17]
    assert tokenizer(bdata.words(ids))["input_ids"] == ids
    assert tokenizer(bdata.words(ids) + " " + bdata.words([9]) + "<eos>")["input_ids"] == ids + [9, bdata.EOS]


def test_sequences_lengths_and_rollout_layout():
    seqs = bdata.make_sequences(MINI, seed=3)
    assert len(seqs.prompts[0]) == MINI.prompt_length and len(seqs.chosen[0]) == MINI.completion_length
    for p, c in zip(seqs.prompts, seqs.chosen):
        assert 3 <= len(p) <= 6 and 3 <= len(c) <= 5 and c[-1] == bdata.EOS and min(p) >= bdata.FIRST_WORD
    rollout = cases.make_rollout(MINI, seqs)
    row = 3  # group 1 (prompt of row 2), completion of row 3
    prompt, completion = seqs.prompts[2], seqs.chosen[3]
    np.testing.assert_array_equal(rollout["input_ids"][row], [0] * (6 - len(prompt)) + prompt + completion
                                  + [0] * (5 - len(completion)))
    np.testing.assert_array_equal(rollout["loss_mask"][row], [0] * 6 + [1] * len(completion)
                                  + [0] * (5 - len(completion)))
    scores = rollout["scores"][2:4]
    expected = (scores - scores.mean()) / (scores.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(rollout["advantages"][2:4], expected, rtol=1e-6)


def _rows(ids, mask):
    return sorted(tuple(int(t) for t, m in zip(r, mr) if m) for r, mr in zip(np.asarray(ids), np.asarray(mask)))


@pytest.mark.trl
def test_trl_trainers_see_the_tokens_jrlhf_sees(tmp_path):
    pytest.importorskip("trl")
    from benchmarks import jrlhf_side, torch_side
    from benchmarks.env import configure_torch

    configure_torch(2)
    paths = bdata.write_checkpoint(MINI, str(tmp_path))
    seqs = bdata.make_sequences(MINI, seed=1)
    length = MINI.sequence_length

    dpo = torch_side.dpo(MINI, paths, seqs, flops=0.0)
    trl_batch = next(iter(dpo.trainer.get_train_dataloader()))
    ours = jrlhf_side.preference_batch(seqs, length)
    ours_rows = (_rows(ours["chosen_input_ids"], ours["chosen_attention_mask"])
                 + _rows(ours["rejected_input_ids"], ours["rejected_attention_mask"]))
    assert _rows(trl_batch["input_ids"], trl_batch["attention_mask"]) == sorted(ours_rows)
    assert tuple(trl_batch["input_ids"].shape) == (2 * MINI.batch_size, length)
    completion_tokens = int(ours["chosen_loss_mask"].sum() + ours["rejected_loss_mask"].sum())
    assert int(trl_batch["completion_mask"].sum()) == completion_tokens
    dpo.close()

    sft = torch_side.sft(MINI, paths, seqs, flops=0.0)
    trl_batch = next(iter(sft.trainer.get_train_dataloader()))
    ours = jrlhf_side.sft_batch(seqs, length)
    assert _rows(trl_batch["input_ids"], trl_batch["attention_mask"]) == _rows(ours["input_ids"],
                                                                                  ours["attention_mask"])
    assert int((np.asarray(trl_batch["labels"]) != -100).sum()) == int(ours["loss_mask"].sum())
    sft.close()

    reward = torch_side.reward(MINI, paths, seqs, flops=0.0)
    trl_batch = next(iter(reward.trainer.get_train_dataloader()))
    ours = jrlhf_side.preference_batch(seqs, length)
    assert _rows(trl_batch["input_ids"], trl_batch["attention_mask"]) == sorted(ours_rows)
    reward.close()


class _Recorder(timing.Runner):
    def __init__(self, label, calls, tokens):
        super().__init__("fake", label, flops=100.0)
        self.calls, self.tokens = calls, tokens

    def step(self):
        self.calls.append(self.label)
        return self.tokens


def test_alternate_interleaves_the_systems_and_drops_the_warmup():
    calls = []
    a, b = _Recorder("A", calls, 5), _Recorder("B", calls, 7)
    first, second = timing.alternate(a, b, warmup=2, repeats=3, log=lambda text: None)
    assert calls == ["A", "B"] * 5
    assert first.tokens == [5, 5, 5] and second.tokens == [7, 7, 7]
    assert len(first.seconds) == len(second.seconds) == 3
    with pytest.raises(ValueError, match="warmup"):
        timing.alternate(a, b, warmup=0, repeats=3)


def test_summary_and_speedup_use_medians_of_tokens_per_second():
    def measurement(seconds, tokens):
        return timing.Measurement(name="x", label="x", system="x", seconds=seconds, tokens=tokens,
                                  cpu_seconds=list(seconds), flops=20.0)

    reference = measurement([1.0, 2.0, 4.0], [10, 10, 10])   # 10, 5, 2.5 tok/s -> median 5
    jrlhf = measurement([0.5, 0.5, 1.0], [10, 10, 10])       # 20, 20, 10 tok/s -> median 20
    assert reference.summary()["median_tokens_per_s"] == 5.0
    assert reference.summary()["achieved_flops_per_s"] == 10.0  # 20 FLOPs / median 2 s
    assert timing.speedup(jrlhf, reference) == 4.0


def test_markdown_table_shows_both_systems_and_the_ratio():
    def side(label, rate):
        return {"label": label, "median_tokens_per_s": rate, "tokens_per_step": 100, "compile_s": 3.0,
                "compile_cpu_s": 2.0, "compiles": 1, "achieved_flops_per_s": 5e9, "recompiles": 0}

    result = {"meta": {"command": "python -m benchmarks.run", "threads": 2, "warmup": 2, "repeats": 10},
              "size": {"name": "tiny", "description": "d", "dtype": "float32", "batch_size": 8,
                       "num_generations": 4, "prompt_length": 64, "completion_length": 64},
              "peak": {"source": "measured", "flops_per_s": 1e10, "xla": {"512": 1e10}, "torch": {"512": 9e9}},
              "benchmarks": [{"name": "dpo_step", "reference": side("TRL DPOTrainer", 1000.0),
                              "jrlhf": side("jrlhf", 2500.0), "speedup": 2.5, "speedup_cpu": 2.4},
                             {"name": "sft_step", "error": "RuntimeError: boom"}]}
    text = report.markdown(result)
    assert "| DPO step (sigmoid, reference forward per batch) | TRL DPOTrainer | 100 | 1000 | 2500 | **2.50x**" in text
    assert "5.0 G (50%)" in text and "error: RuntimeError: boom" in text
