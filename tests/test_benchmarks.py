"""The benchmark harness (``benchmarks/``): dry run, FLOP counts, identical inputs and losses for every system, the
worker protocol and block interleaving, reporting. Nothing here asserts a time."""

import io
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
MINI = get_size("mini")


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
    assert traced["generate_sampled"]["outputs"]["tokens"] == [64, 512]  # generation: 64 rows x 512 new tokens
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


def test_remat_per_size_and_override_reach_the_worker():
    from benchmarks.run import parse_args, worker_argv

    assert get_size("tiny").remat == "none" and get_size("qwen2-1.5b").remat == "full"
    assert get_size("tiny", remat="full").remat == "full" and get_size("tiny", remat="full").scan_unroll == 4
    args = parse_args(["--size", "tiny", "--remat", "full"])
    argv = worker_argv(args, get_size("tiny", remat=args.remat), None, "serve", "jrlhf")
    assert argv[argv.index("--remat") + 1] == "full"


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


@pytest.mark.torch
def test_plain_loops_compute_jrlhf_losses_on_the_same_weights(tmp_path):
    """The plain PyTorch loops are the same losses as jrlhf's: first-step losses agree on identical weights and
    batches (DPO at initialisation is log 2 for both: policy = reference)."""
    pytest.importorskip("transformers")
    import jax

    from benchmarks import jrlhf_side, torch_side
    from jrlhf.sharding import make_mesh

    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    paths = bdata.write_checkpoint(MINI, str(tmp_path))
    seqs = bdata.make_sequences(MINI, seed=2)
    rollout = cases.make_rollout(MINI, seqs, seed=2)
    length = MINI.sequence_length
    pairs = [
        (jrlhf_side.sft(MINI, paths, seqs, 0.0, mesh=mesh),
         torch_side.plain_sft(MINI, paths, jrlhf_side.sft_batch(seqs, length), 0.0)),
        (jrlhf_side.dpo(MINI, paths, seqs, 0.0, mesh=mesh),
         torch_side.plain_dpo(MINI, paths, jrlhf_side.preference_batch(seqs, length), 0.0)),
        (jrlhf_side.grpo_update(MINI, paths, rollout, 0.0, mesh=mesh),
         torch_side.plain_grpo_update(MINI, paths, rollout, 0.0)),
    ]
    for ours, plain in pairs:
        assert ours.step() == plain.step()  # the same token count
        mine = float(np.asarray(ours.info["metrics"]["loss"]))
        theirs = float(plain.metrics["loss"])
        assert mine == pytest.approx(theirs, rel=2e-4, abs=1e-6), ours.name
    assert float(pairs[1][1].metrics["loss"]) == pytest.approx(np.log(2.0), rel=1e-6)


class _Recorder(timing.Runner):
    def __init__(self, label, calls, tokens):
        super().__init__("fake", label, flops=100.0)
        self.calls, self.tokens = calls, tokens

    def step(self):
        self.calls.append(self.label)
        return self.tokens


def test_serve_runs_the_blocks_asked_for_and_answers_each():
    calls = []
    runner = _Recorder("A", calls, 5)
    commands = io.StringIO("".join(json.dumps(c) + "\n" for c in
                                   ({"cmd": "run", "steps": 2}, {"cmd": "run", "steps": 3}, {"cmd": "quit"})))
    replies = io.StringIO()
    timing.serve(runner, 5, commands, replies, ready={"label": "A"})
    answers = [json.loads(line) for line in replies.getvalue().splitlines()]
    assert [a["event"] for a in answers] == ["ready", "block", "block"]
    assert answers[0]["label"] == "A"
    assert answers[1]["tokens"] == [5, 5] and answers[2]["tokens"] == [5, 5, 5] and len(calls) == 5
    assert all(len(a["seconds"]) == len(a["cpu_seconds"]) == len(a["tokens"]) for a in answers[1:])
    # asking for more steps than announced is an error naming both numbers
    with pytest.raises(RuntimeError, match="3 more steps asked, 2 left"):
        timing.serve(_Recorder("B", [], 1), 2, io.StringIO(json.dumps({"cmd": "run", "steps": 3}) + "\n"),
                     io.StringIO())


def test_block_order_reverses_every_round():
    assert timing.block_order(["jrlhf", "trl", "plain"], 3) == ["jrlhf", "trl", "plain", "plain", "trl", "jrlhf",
                                                                "jrlhf", "trl", "plain"]


@pytest.mark.torch
def _run_mini(benchmark: str, systems: tuple, rounds: int, tmp_path):
    """The orchestrator's ``run_benchmark`` on the 1-layer size (1 warm-up step, ``rounds`` rounds of 1 step):
    ``(row, log lines)``."""
    from benchmarks import run

    class Args:
        pass

    checkpoint = str(tmp_path / "ckpt")
    bdata.write_checkpoint(MINI, checkpoint)
    args = Args()
    args.size, args.model_path, args.shrink, args.seed, args.torch_threads, args.cpus = "mini", None, False, 0, None, None
    args.warmup, args.rounds, args.block, args.worker_timeout = 1, rounds, 1, 600
    args.system_list = systems
    log = []
    return run.run_benchmark(benchmark, args, MINI, checkpoint, log.append, str(tmp_path)), log


def test_workers_in_their_own_processes_interleave_blocks(tmp_path):
    """A real run of the orchestrator on the 1-layer size: every system in its own worker, blocks interleaved, the
    report has every system's rate and the ratios; no thread setting is added to the workers' environment."""
    row, log = _run_mini("sft_step", ("jrlhf", "trl", "plain"), 2, tmp_path)
    assert "error" not in row, "\n".join(log)
    assert set(row["systems"]) == {"jrlhf", "trl", "plain"}
    pids = {record["ready"]["pid"] for record in row["systems"].values()}
    assert len(pids) == 3  # three processes
    for record in row["systems"].values():
        assert record["summary"]["steps"] == 2 and len(record["warmup_seconds"]) == 1
        assert "OMP_WAIT_POLICY" not in record["ready"]["settings"]
    assert row["systems"]["trl"]["summary"]["tokens_per_step"] == row["systems"]["jrlhf"]["summary"][
        "tokens_per_step"] == row["systems"]["plain"]["summary"]["tokens_per_step"]
    assert set(row["ratios"]) == {"trl", "plain"}


def test_summary_and_ratios_use_medians_of_tokens_per_second():
    def block(seconds, tokens):
        return {"seconds": seconds, "tokens": tokens, "cpu_seconds": list(seconds), "recompiles": 0}

    reference = timing.summarize([block([1.0, 2.0], [10, 10]), block([4.0], [10])], flops=20.0)
    jrlhf = timing.summarize([block([0.5, 0.5], [10, 10]), block([1.0], [10])], flops=20.0)
    assert reference["median_tokens_per_s"] == 5.0  # 10, 5, 2.5 tok/s
    assert reference["achieved_flops_per_s"] == 10.0  # 20 FLOPs / median 2 s
    assert reference["block_tokens_per_s"] == [7.5, 2.5]
    ratio = timing.ratios(jrlhf, reference)
    assert ratio["ratio"] == 4.0 and ratio["rounds"] == [20.0 / 7.5, 4.0]


def test_markdown_table_shows_every_system_the_ratios_the_load_and_the_command():
    def system(label, rate, compile_s=None):
        return {"ready": {"label": label, "compile_s": compile_s, "compiles": 1, "compile_and_first_call_s": 4.0,
                          "settings": {"torch_threads": 2}},
                "warmup_seconds": [1.5],
                "summary": {"median_tokens_per_s": rate, "tokens_per_step": 100, "achieved_flops_per_s": 5e9,
                            "recompiles": 0}}

    result = {"meta": {"command": "python -m benchmarks.run", "warmup": 2, "rounds": 3, "block": 5,
                       "uptime_before": "load average: 1.00, 1.00, 1.00",
                       "uptime_after": "load average: 2.00, 1.00, 1.00"},
              "size": {"name": "tiny", "description": "d", "dtype": "float32", "batch_size": 8,
                       "num_generations": 4, "prompt_length": 64, "completion_length": 64},
              "peak": {"source": "measured", "flops_per_s": 1e10, "stacks": {"xla": 1e10, "torch": 9e9}},
              "benchmarks": [{"name": "dpo_step",
                              "systems": {"jrlhf": system("jrlhf", 2500.0, 3.0), "trl": system("TRL DPOTrainer", 1000.0),
                                          "plain": system("plain PyTorch DPO loop", 2000.0)},
                              "ratios": {"trl": {"ratio": 2.5, "round_min": 2.4, "round_max": 2.6},
                                         "plain": {"ratio": 1.25, "round_min": 1.2, "round_max": 1.3}}},
                             {"name": "sft_step", "error": "RuntimeError: boom"}]}
    text = report.markdown(result)
    assert ("| DPO step (sigmoid, reference forward per batch) | 100 | 2500 | 1000 | 2000 | **2.50x** (2.40-2.60) "
            "| **1.25x** (1.20-1.30) | 3.0 | 4.0 / 1.5 / 1.5 | 50% / 50% / 50% |") in text
    assert "error: RuntimeError: boom" in text
    assert "`python -m benchmarks.run`" in text and "load average: 2.00" in text
    assert "TRL DPOTrainer" in text and "plain PyTorch DPO loop" in text



def test_grpo_whole_step_runs_the_training_loops_collect_in_a_worker(tmp_path):
    """jrlhf's whole GRPO step (the loop's ``collect``: sampling, rollout forward, host reward; then the update) in
    its own worker on the 1-layer size: built, compiled and timed without an error."""
    row, log = _run_mini("grpo_whole_step", ("jrlhf",), 1, tmp_path)
    assert "error" not in row, "\n".join(log)
    assert row["systems"]["jrlhf"]["summary"]["steps"] == 1
