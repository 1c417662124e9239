"""Guards against reward over-optimisation in PPO with a learned reward model: running score scaling / norm /
clip, the adaptive KL controller inside PPO's algorithm state, best-checkpoint selection and early stopping on a
held-out metric, the gold reward logged beside the proxy with weight 0, and the proxy-vs-gold plot. Every number
is checked against a hand computation or numpy written out here."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf import cli, losses
from jrlhf.algorithms import onpolicy, ppo
from jrlhf.config import ConfigError
from jrlhf.metrics import BestCheckpoint


# ------------------------------------------------------------------------------------------ score normalisation


def test_running_moments_match_numpy_over_the_whole_stream():
    # from nothing, one batch: its own population moments (hand: mean 2.5, var 1.25)
    mean, var, count = losses.running_moments_update(0.0, 1.0, 0.0, jnp.array([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_allclose([mean, var, count], [2.5, 1.25, 4.0], rtol=1e-6)
    # a second batch with a masked row: the moments of the 6 counted values, numpy over the concatenation
    second = jnp.array([10.0, -2.0, 99.0])
    mean, var, count = losses.running_moments_update(mean, var, count, second, jnp.array([1, 1, 0]))
    seen = np.array([1.0, 2.0, 3.0, 4.0, 10.0, -2.0])
    np.testing.assert_allclose([mean, var, count], [seen.mean(), seen.var(), 6.0], rtol=1e-6)
    # an all-masked batch leaves them unchanged
    same = losses.running_moments_update(mean, var, count, second, jnp.zeros(3))
    np.testing.assert_allclose(same, [seen.mean(), seen.var(), 6.0], rtol=1e-6)


def test_scale_scores_hand_computed():
    # moments of [1, 2, 3, 4]: mean 2.5, population var 1.25, Bessel std sqrt(1.25 * 4 / 3) = 1.2909944
    std = np.sqrt(1.25 * 4 / 3)
    scores = jnp.array([1.0, 4.0, 9.0])
    scaled = losses.scale_scores(scores, 2.5, 1.25, 4.0)
    np.testing.assert_allclose(scaled, np.array([1.0, 4.0, 9.0]) / std, rtol=1e-6)
    normed = losses.scale_scores(scores, 2.5, 1.25, 4.0, use_score_norm=True)
    np.testing.assert_allclose(normed, [-1.5 / std, 1.5 / std, 6.5 / std], rtol=1e-6)  # -1.1619, 1.1619, 5.0349
    clipped = losses.scale_scores(scores, 2.5, 1.25, 4.0, use_score_norm=True, score_clip=1.0)
    np.testing.assert_allclose(clipped, [-1.0, 1.0, 1.0], rtol=1e-6)
    # one value seen: std 1 (no spread to scale by yet)
    np.testing.assert_allclose(losses.scale_scores(scores, 0.0, 0.0, 1.0), scores / (1 + 1.1920929e-07), rtol=1e-6)


def _rollout_batch(scores):
    """A 4-row rollout batch of 2-token completions (1-token prompts) with the given sequence scores."""
    rows = len(scores)
    return {"scores": jnp.array(scores, jnp.float32), "old_logps": jnp.zeros((rows, 2)),
            "ref_logps": jnp.zeros((rows, 2)), "old_values": jnp.zeros((rows, 2)),
            "loss_mask": jnp.array([[0, 1, 1]] * rows, jnp.int32)}


def test_ppo_shapes_scores_with_the_running_moments_updated_by_this_rollout_first():
    algo = ppo.Config(use_score_scaling=True, use_score_norm=True, score_clip=1.0)
    batch = _rollout_batch([1.0, 3.0, float("nan"), 5.0])  # the NaN row (no reward) is not counted
    # earlier rollouts: mean 2, var 4, count 2 (values 0 and 4); with 1, 3, 5: the values 0, 4, 1, 3, 5
    shaped, moments = ppo.shaped_scores(batch, algo, (2.0, 4.0, 2.0))
    seen = np.array([0.0, 4.0, 1.0, 3.0, 5.0])
    np.testing.assert_allclose(moments, [seen.mean(), seen.var(), 5.0], rtol=1e-6)
    std = seen.std(ddof=1)  # 2.0736
    expected = np.clip((np.array([1.0, 3.0, 0.0, 5.0]) - seen.mean()) / std, -1, 1)
    np.testing.assert_allclose(np.asarray(shaped)[[0, 1, 3]], expected[[0, 1, 3]], rtol=1e-5)
    # score_clip alone clips the raw scores
    shaped, moments = ppo.shaped_scores(batch, ppo.Config(score_clip=2.0), None)
    assert moments is None
    np.testing.assert_allclose(np.asarray(shaped)[[0, 1, 3]], [1.0, 2.0, 2.0])


def test_ppo_group_baseline_centres_each_prompts_scores_before_scaling_hand_computed():
    # two prompts x 4 samples (rows b * 4 + i); prompt 0: 1, 3, (no reward), 5 -> mean of the scorable 3;
    # prompt 1: 2, 2, 4, 8 -> mean 4
    batch = _rollout_batch([1.0, 3.0, float("nan"), 5.0, 2.0, 2.0, 4.0, 8.0])
    shaped, moments = ppo.shaped_scores(batch, ppo.Config(num_generations=4, score_baseline="group"), None)
    assert moments is None
    np.testing.assert_allclose(np.asarray(shaped), [-2.0, 0.0, 0.0, 2.0, -2.0, -2.0, 0.0, 4.0])
    # then the running moments see the centred scores -2, 0, 2, -2, -2, 0, 4 (mean 0, population var 32 / 7)
    algo = ppo.Config(num_generations=4, score_baseline="group", use_score_scaling=True, use_score_norm=True,
                      score_clip=1.5)
    shaped, moments = ppo.shaped_scores(batch, algo, (0.0, 1.0, 0.0))
    np.testing.assert_allclose(moments, [0.0, 32 / 7, 7.0], rtol=1e-6, atol=1e-7)
    std = np.sqrt(32 / 6)  # Bessel: 2.3094
    expected = np.clip(np.array([-2.0, 0.0, 2.0, -2.0, -2.0, 0.0, 4.0]) / std, -1.5, 1.5)
    np.testing.assert_allclose(np.asarray(shaped)[[0, 1, 3, 4, 5, 6, 7]], expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="score_baseline=.mean."):
        ppo.check_algo(ppo.Config(num_generations=4, score_baseline="mean"))
    with pytest.raises(ConfigError, match="num_generations=1"):
        ppo.check_algo(ppo.Config(num_generations=1, score_baseline="group"))


def test_ppo_algo_state_follows_the_kl_controller_and_keeps_the_moments():
    algo = ppo.Config(adaptive_kl=True, target_kl=1.0, kl_horizon=100.0, use_score_scaling=True)
    state = ppo.init_algo_state(algo)
    assert {k: float(v) for k, v in state.items()} == {"kl_coef": float(np.float32(0.05)), "score_mean": 0.0,
                                                       "score_var": 1.0, "score_count": 0.0}
    update = ppo.make_update_algo_state(algo, rollout_rows=10)
    metrics = {"kl": jnp.float32(3.0), "score/running_mean": jnp.float32(0.5), "score/running_var": jnp.float32(2.0),
               "score/running_count": jnp.float32(8.0)}
    new = update(state, metrics)
    # Ziegler et al.: error = clip(3 / 1 - 1, -0.2, 0.2) = 0.2; 0.05 * (1 + 0.2 * 10 / 100) = 0.051
    np.testing.assert_allclose(new["kl_coef"], 0.051, rtol=1e-6)
    np.testing.assert_allclose([new["score_mean"], new["score_var"], new["score_count"]], [0.5, 2.0, 8.0])
    # KL below target: error = clip(0.5 - 1) = -0.2 -> 0.051 * (1 - 0.02) = 0.04998
    np.testing.assert_allclose(update(new, {**metrics, "kl": jnp.float32(0.5)})["kl_coef"], 0.051 * 0.98, rtol=1e-6)


def test_ppo_score_settings_are_checked():
    with pytest.raises(ConfigError, match="use_score_norm needs algo.use_score_scaling"):
        ppo.check_algo(ppo.Config(use_score_norm=True))
    with pytest.raises(ConfigError, match="score_clip=0"):
        ppo.check_algo(ppo.Config(score_clip=0.0))


# ------------------------------------------------------------------------------------------- gold beside proxy


def test_a_weight_zero_reward_function_is_logged_but_adds_nothing():
    def gold(prompts, completions, **kwargs):
        return [1.0, 0.0, 1.0]

    sources = onpolicy.RewardSources(funcs=[gold], names=["gold"], weights=np.array([0.0, 1.0], np.float32))
    total, per_source = onpolicy._score(sources, np.array([0.0], np.float32), np.float32(1.0), ["a", "b", "c"],
                                        ["x", "y", "z"], [[1], [2], [3]], [{}, {}, {}],
                                        np.array([2.5, -1.0, 0.25], np.float32))
    np.testing.assert_array_equal(total, [2.5, -1.0, 0.25])  # the reward model's scores alone
    np.testing.assert_array_equal(per_source["gold"], [1.0, 0.0, 1.0])
    from jrlhf.rewards import reward_metrics

    metrics = reward_metrics(total, per_source)
    np.testing.assert_allclose([metrics["rewards/gold/mean"], metrics["rewards/reward_model/mean"]],
                               [2 / 3, 0.5833333], rtol=1e-6)


# ----------------------------------------------------------------------------------------- best checkpoint


def test_best_checkpoint_and_early_stopping_rule_hand_traced():
    rule = BestCheckpoint("reward_model", patience=2, threshold=0.05)
    trace = []
    for step, value in zip(range(10, 70, 10), (0.1, 0.3, 0.32, 0.31, 0.2, 0.5)):
        improved = rule.update(step, {"reward_model": value, "exact_match": 0.0})
        trace.append((improved, rule.best_step, rule.bad_evals, rule.should_stop))
    # 0.32 beats 0.3 (new best) but not by more than 0.05: patience counts it; 0.31 is the second bad evaluation
    assert trace == [(True, 10, 0, False), (True, 20, 0, False), (True, 30, 1, False), (False, 30, 2, True),
                     (False, 30, 3, True), (True, 60, 0, False)]
    assert rule.best_eval == {"reward_model": 0.5, "exact_match": 0.0}
    lower = BestCheckpoint("loss", greater_is_better=False)
    assert [lower.update(s, {"loss": v}) for s, v in ((1, 2.0), (2, 1.0), (3, 1.5))] == [True, True, False]
    assert lower.best_step == 2 and not lower.should_stop  # patience 0: never stops
    restored = BestCheckpoint("reward_model", patience=2, threshold=0.05)
    restored.load_state_dict(json.loads(json.dumps(rule.state_dict())))
    assert (restored.best_value, restored.best_step, restored.bad_evals) == (0.5, 60, 0)
    with pytest.raises(ConfigError, match="'reward_model' is not among the evaluation's metrics.*exact_match"):
        BestCheckpoint("reward_model").update(1, {"exact_match": 0.5})


def test_loop_stops_early_and_exports_the_best_evaluated_step(tmp_path, monkeypatch):
    import jrlhf
    from jrlhf import train_loop
    from jrlhf.data import load_records, write_jsonl

    train_file = str(tmp_path / "sft.jsonl")
    write_jsonl(train_file, load_records("builtin:addition/sft_train.jsonl")[:64])
    exports = []
    save_pretrained = train_loop.save_pretrained

    def recording(model, params, path, **kwargs):
        exports.append(path)
        return save_pretrained(model, params, path, **kwargs)

    monkeypatch.setattr(train_loop, "save_pretrained", recording)

    def config(out, **train):
        return {"algorithm": "sft",
                "model": {"family": "llama", "overrides": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
                                                           "num_heads": 2, "num_kv_heads": 1,
                                                           "max_position_embeddings": 64}},
                "data": {"train": train_file, "batch_size": 8, "max_length": 32,
                         "eval_prompts": "builtin:addition/eval.jsonl", "max_eval_examples": 4,
                         "eval_max_new_tokens": 2},
                "optim": {"learning_rate": 3e-3},
                "train": {"output_dir": str(tmp_path / out), "log_every": 1, "progress_bar": False,
                          "tensorboard": False, **train}}

    # an untrained model's exact match stays 0: the first evaluation (step 1) is the best and is exported at once;
    # steps 2 and 3 do not improve, patience 2 stops the run there, and the end of the run exports nothing more
    summary = jrlhf.train(config("run", steps=6, eval_every=1, metric_for_best_model="exact_match",
                                 load_best_model_at_end=True, early_stopping_patience=2))
    assert summary["step"] == 3 and summary["early_stopped"]
    assert summary["best"]["step"] == 1 and summary["best"]["value"] == 0.0 and summary["best"]["exported"]
    assert exports == [os.path.join(summary["run_dir"], "hf_model")]
    with open(os.path.join(summary["run_dir"], "best.json")) as f:
        assert json.load(f)["best_step"] == 1
    with pytest.raises(ConfigError, match="need train.metric_for_best_model"):
        jrlhf.train(config("bad", steps=1, load_best_model_at_end=True))


# ------------------------------------------------------------------------------------------------------ plot


def _write_metrics(run_dir, proxy, gold, eval_proxy, eval_gold):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step, (p, g) in enumerate(zip(proxy, gold), start=1):
            f.write(json.dumps({"step": step, "split": "train", "loss": 0.1, "rewards/reward_model/mean": p,
                                "rewards/addition_exact_match/mean": g}) + "\n")
        for step, (p, g) in zip((2, 4), zip(eval_proxy, eval_gold)):
            f.write(json.dumps({"step": step, "split": "eval", "reward_model": p, "exact_match": g}) + "\n")


def test_plot_draws_proxy_and_gold_of_each_run(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jrlhf.metrics import read_metrics
    from jrlhf.plot import draw_proxy_gold

    run = str(tmp_path / "run")
    _write_metrics(run, [1.0, 2.0, 3.0, 4.0], [0.5, 0.7, 0.6, 0.4], [1.5, 3.5], [0.6, 0.45])
    fig, (a, b) = plt.subplots(1, 2)
    lines = draw_proxy_gold(a, b, {"unguarded": read_metrics(run)})
    drawn = {line.get_label(): (tuple(line.get_xdata()), tuple(line.get_ydata())) for line in lines}
    assert drawn == {"unguarded proxy train": ((1, 2, 3, 4), (1.0, 2.0, 3.0, 4.0)),
                     "unguarded proxy eval": ((2, 4), (1.5, 3.5)),
                     "unguarded gold train": ((1, 2, 3, 4), (0.5, 0.7, 0.6, 0.4)),
                     "unguarded gold eval": ((2, 4), (0.6, 0.45))}
    assert {line.axes for line in lines if "proxy" in line.get_label()} == {a}
    assert {line.axes for line in lines if "gold" in line.get_label()} == {b}
    plt.close(fig)

    other = str(tmp_path / "other")
    _write_metrics(other, [1.0, 1.1, 1.2, 1.3], [0.5, 0.6, 0.7, 0.8], [1.1, 1.3], [0.6, 0.8])
    out = str(tmp_path / "pg.png")
    assert cli.main(["plot", run, other, "--out", out]) == 0
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["plot", run]) == 0  # one run: the curves, proxy and gold panels first
    assert os.path.exists(os.path.join(run, "curves.png"))
    no_gold = str(tmp_path / "no_gold")
    os.makedirs(no_gold)
    with open(os.path.join(no_gold, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 1, "split": "train", "rewards/reward_model/mean": 1.0}) + "\n")
    assert cli.main(["plot", "--proxy-gold", no_gold]) == 2


def test_shipped_ppo_rm_recipe_keeps_the_gold_reward_out_of_the_score():
    from jrlhf.config import load_config

    cfg = load_config("builtin:ppo_rm", algorithm="ppo")
    ppo.check_algo(cfg.algo)
    assert list(cfg.algo.reward_funcs) == ["addition_exact_match"] and cfg.algo.reward_model
    assert list(cfg.algo.reward_weights) == [0.0, 1.0]  # gold: weight 0 (logged only); the reward model: 1
    assert cfg.train.metric_for_best_model == "reward_model" and not cfg.train.load_best_model_at_end
    assert cfg.train.eval_every > 0


def test_reward_model_proxy_skips_completions_with_no_text():
    """An empty completion (the policy ended at once) is a legitimate sample: the held-out proxy scores the others
    and logs the share scored, instead of stopping the run on an empty pair."""
    import jax

    from jrlhf.data import load_tokenizer
    from jrlhf.evaluation import reward_model_scorer
    from jrlhf.models import init_model, tiny_config

    tokenizer = load_tokenizer("char")
    model, params = init_model(tiny_config("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                           eos_token_id=tokenizer.eos_token_id, num_layers=1), jax.random.PRNGKey(0),
                               head="score")
    scorer = reward_model_scorer(model, params, tokenizer, batch_size=4)
    alone = scorer(["12+34="], ["64"])
    mixed = scorer(["1+1=", "12+34=", "5+5="], ["", "64", " "])
    assert alone["reward_model/scored_frac"] == 1.0 and mixed["reward_model/scored_frac"] == 1 / 3
    assert mixed["reward_model"] == alone["reward_model"]
    assert scorer(["1+1="], [""]) == {"reward_model/scored_frac": 0.0}
