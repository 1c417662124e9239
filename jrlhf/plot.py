"""``jrlhf plot RUN_DIR``: loss / reward / KL / accuracy curves of a run to PNG."""

from __future__ import annotations

import os

from jrlhf.metrics import read_metrics

# Metric names drawn when present, in this order; anything else matching these substrings is drawn too.
PREFERRED = ("loss", "reward", "rewards/accuracies", "accuracy", "kl", "exact_match", "rewards/margins",
             "entropy", "critic/vf_loss", "actor/pg_loss", "completions/mean_length")
SUBSTRINGS = ("loss", "reward", "kl", "accura", "exact_match")


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
    ncols = min(3, len(chosen))
    nrows = (len(chosen) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, chosen):
        for split, style in (("train", "-"), ("eval", "o-")):
            pts = [(r["step"], r[key]) for r in records if r.get("split") == split and r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label=split, markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)))
    fig.tight_layout()
    out_path = out_path or os.path.join(run_dir, "curves.png")
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
