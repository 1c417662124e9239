"""``jrlhf plot RUN_DIR [RUN_DIR ...]``: loss / reward / KL / accuracy curves of a run to PNG, and the learned
(proxy) reward against the gold reward of runs that log both (over-optimisation, Gao et al. 2023)."""

from __future__ import annotations

import os

from jrlhf.metrics import read_metrics

# Metric names drawn when present, in this order; anything else matching these substrings is drawn too.
PREFERRED = ("loss", "reward", "rewards/accuracies", "accuracy", "kl", "exact_match", "rewards/margins",
             "entropy", "critic/vf_loss", "actor/pg_loss", "completions/mean_length")
SUBSTRINGS = ("loss", "reward", "kl", "accura", "exact_match")
# The proxy: the learned reward model's mean score (rollouts: rewards/reward_model/mean; held-out greedy
# completions: eval reward_model). The gold: any other reward source logged beside it (a reward function with
# weight 0 in algo.reward_weights is logged but adds nothing to the score) and the held-out exact match.
PROXY_TRAIN, PROXY_EVAL, GOLD_EVAL = "rewards/reward_model/mean", "reward_model", "exact_match"


def gold_train_key(records) -> str | None:
    """The rollouts' gold reward metric: the first ``rewards/NAME/mean`` other than the reward model's."""
    for r in records:
        for k in r:
            if k.startswith("rewards/") and k.endswith("/mean") and k != PROXY_TRAIN:
                return k
    return None


def _series(records, key, split):
    pts = [(r["step"], r[key]) for r in records if r.get("split") == split and r.get(key) is not None]
    return (tuple(p[0] for p in pts), tuple(p[1] for p in pts)) if pts else None


def proxy_gold_series(records) -> dict:
    """``{"proxy": {"train": (steps, values), "eval": ...}, "gold": {...}}`` of a run's metric records (a series is
    left out when not logged); empty unless both a proxy and a gold series are there."""
    gold_key = gold_train_key(records)
    out = {"proxy": {}, "gold": {}}
    for role, train_key, eval_key in (("proxy", PROXY_TRAIN, PROXY_EVAL), ("gold", gold_key, GOLD_EVAL)):
        for split, key in (("train", train_key), ("eval", eval_key)):
            series = _series(records, key, split) if key else None
            if series:
                out[role][split] = series
    return out if out["proxy"] and out["gold"] else {}


def draw_proxy_gold(ax_proxy, ax_gold, runs: dict) -> list:
    """Draws each run's proxy series on ``ax_proxy`` and gold series on ``ax_gold`` (``runs``: label -> records;
    ``train``: the rollouts of each step, solid; ``eval``: greedy completions of the held-out prompts, dashed with
    markers); returns the drawn ``Line2D`` objects, labelled ``"<run> proxy train"`` etc."""
    lines = []
    for index, (label, records) in enumerate(runs.items()):
        series = proxy_gold_series(records)
        color = f"C{index}"
        for role, ax in (("proxy", ax_proxy), ("gold", ax_gold)):
            for split, style in (("train", "-"), ("eval", "o--")):
                if split in series.get(role, {}):
                    xs, ys = series[role][split]
                    name = " ".join(part for part in (label, role, split) if part)
                    lines += ax.plot(xs, ys, style, color=color, markersize=3, label=name,
                                     alpha=1.0 if split == "eval" else 0.6)
    ax_proxy.set_title("proxy: learned reward model score")
    ax_gold.set_title("gold: exact match (monitoring only)")
    for ax in (ax_proxy, ax_gold):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return lines


def plot_proxy_gold(run_dirs, out_path: str | None = None, labels=None) -> str:
    """Proxy (learned reward) and gold reward over steps of one or more runs, side by side, to PNG; returns the
    path (default ``<first run>/proxy_gold.png``).

    Raises:
      ValueError: a run logs no proxy/gold pair (it needs ``algo.reward_model`` and a gold reward source, e.g.
        ``algo.reward_funcs=[addition_exact_match] algo.reward_weights=[0.0,1.0]``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for i, run_dir in enumerate(run_dirs):
        records = read_metrics(run_dir)
        if not proxy_gold_series(records):
            raise ValueError(f"run '{run_dir}' does not log both a learned reward ({PROXY_TRAIN}) and a gold reward "
                             "(another rewards/NAME/mean): add the gold reward function with weight 0, e.g. "
                             "--set algo.reward_funcs=[addition_exact_match] --set algo.reward_weights=[0.0,1.0]")
        label = labels[i] if labels else os.path.basename(os.path.normpath(run_dir))
        runs[label] = records
    fig, (ax_proxy, ax_gold) = plt.subplots(1, 2, figsize=(11, 3.8))
    draw_proxy_gold(ax_proxy, ax_gold, runs)
    fig.tight_layout()
    out_path = out_path or os.path.join(run_dirs[0], "proxy_gold.png")
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def plot_run(run_dir: str, out_path: str | None = None, keys=None) -> str:
    """Draws one panel per metric (train and eval curves) from ``run_dir/metrics.jsonl``; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"run directory '{run_dir}' has an empty metrics.jsonl: nothing to plot")
    names = []
    for r in records:
        for k in r:
            if k not in ("step", "time", "split") and k not in names:
                names.append(k)
    if keys:
        chosen = [k for k in keys if k in names]
    else:
        chosen = [k for k in PREFERRED if k in names]
        chosen += [k for k in names if k not in chosen and any(s in k for s in SUBSTRINGS)]
    chosen = chosen[:12]
    if not chosen:
        raise ValueError(f"no plottable metrics in '{run_dir}' (found: {', '.join(names[:10])})")
    pair = proxy_gold_series(records)
    ncols = min(3, len(chosen) + (2 if pair else 0))
    nrows = (len(chosen) + (2 if pair else 0) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.2 * nrows), squeeze=False)
    if pair:  # the first two panels: proxy and gold over steps
        flat = list(axes.flat)
        draw_proxy_gold(flat[0], flat[1], {"": records})
        axes_left = flat[2:]
    else:
        axes_left = list(axes.flat)
    for ax, key in zip(axes_left, chosen):

        for split, style in (("train", "-"), ("eval", "o-")):
            pts = [(r["step"], r[key]) for r in records if r.get("split") == split and r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label=split, markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes_left[len(chosen):]:
        ax.axis("off")
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)))
    fig.tight_layout()
    out_path = out_path or os.path.join(run_dir, "curves.png")
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
