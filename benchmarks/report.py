"""Writing a benchmark run: the JSON file, the markdown tables and the PNG plot."""

from __future__ import annotations

import json
import os

from benchmarks.cases import DESCRIPTIONS


def _fmt(value, spec=".0f", missing="-") -> str:
    return missing if value is None else format(value, spec)


def _rate(flops_per_s, peak) -> str:
    if flops_per_s is None:
        return "-"
    text = f"{flops_per_s / 1e9:.1f} G"
    if peak:
        text += f" ({100 * flops_per_s / peak:.0f}%)"
    return text


def _compile(summary: dict) -> str:
    if summary.get("compiles") == 0:
        return "cached"
    text = _fmt(summary.get("compile_s"), ".1f")
    if summary.get("compile_cpu_s") is not None:
        text += f" ({summary['compile_cpu_s']:.1f})"
    return text


def header(result: dict) -> list[str]:
    """The lines describing the run: size, shapes, machine, peak, command."""
    meta, size = result["meta"], result["size"]
    peak = result.get("peak") or {}
    prompts = size["batch_size"] // size["num_generations"]
    lines = [f"### jrlhf vs PyTorch: `--size {size['name']}`", "",
             f"- model: {size['description']}; {size['dtype']}",
             f"- batch {size['batch_size']} sequences (DPO/reward: pairs; GRPO: {prompts}"
             f" prompts x {size['num_generations']} generations), prompt {size['prompt_length']}, completion "
             f"{size['completion_length']} tokens (lengths vary from half to all of it; one row is full-length)",
             f"- machine: {meta.get('device', '?')}, {meta.get('threads')} threads for both stacks, "
             f"OMP_WAIT_POLICY=PASSIVE; jax {meta.get('jax')}, torch {meta.get('torch')}, "
             f"transformers {meta.get('transformers')}, trl {meta.get('trl')}"]
    if peak.get("flops_per_s"):
        detail = ""
        if peak.get("source") == "measured":
            detail = (f" (best float32 matmul: XLA {max(peak['xla'].values()) / 1e9:.0f}, torch "
                      f"{max(peak['torch'].values()) / 1e9:.0f} GFLOP/s)")
        lines.append(f"- peak for MFU: {peak['flops_per_s'] / 1e9:.0f} GFLOP/s, {peak['source']}{detail}")
    lines.append(f"- {meta.get('warmup')} warm-up + {meta.get('repeats')} timed steps per system, alternating "
                 f"(reference step, jrlhf step, ...); medians; load average at start "
                 f"{', '.join(f'{x:.1f}' for x in meta.get('load_average', ()))}")
    lines.append(f"- command: `{meta.get('command')}`")
    return lines


def throughput_table(result: dict) -> list[str]:
    """The main table: median tokens/s of both systems and their ratio, compile time, achieved FLOP/s."""
    peak = (result.get("peak") or {}).get("flops_per_s")
    lines = ["| benchmark | PyTorch reference | tokens/step | reference tok/s | jrlhf tok/s | jrlhf / ref "
             "| jrlhf / ref per CPU-s | jrlhf compile s (CPU s) | jrlhf FLOP/s (MFU) | ref FLOP/s (MFU) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["benchmarks"]:
        if "error" in row:
            lines.append(f"| {DESCRIPTIONS.get(row['name'], row['name'])} | error: {row['error']} "
                         "| | | | | | | | |")
            continue
        ref, jr = row["reference"], row["jrlhf"]
        recompiles = f" ({jr['recompiles']} recompiles!)" if jr.get("recompiles") else ""
        lines.append(
            f"| {DESCRIPTIONS.get(row['name'], row['name'])} | {ref['label']} | {jr['tokens_per_step']:.0f} "
            f"| {ref['median_tokens_per_s']:.0f} | {jr['median_tokens_per_s']:.0f} | **{row['speedup']:.2f}x** "
            f"| {_fmt(row.get('speedup_cpu'), '.2f')}x "
            f"| {_compile(jr)}{recompiles} | {_rate(jr['achieved_flops_per_s'], peak)} "
            f"| {_rate(ref['achieved_flops_per_s'], peak)} |")
    return lines


def memory_table(result: dict) -> list[str]:
    memory = result.get("memory")
    if not memory:
        return []
    by = {}
    for system, out in memory.items():
        if "error" in out:
            continue
        for rec in out["results"]:
            by.setdefault(rec["name"], {})[system] = rec
    lines = ["| benchmark | jrlhf peak RSS MiB (+ over start; + during steps) "
             "| PyTorch peak RSS MiB (+ over start; + during steps) | jrlhf device peak MiB "
             "| PyTorch device peak MiB |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, systems in by.items():
        cells = []
        for system in ("jrlhf", "pytorch"):
            rec = systems.get(system)
            cells.append("-" if rec is None else
                         f"{_fmt(rec['peak_rss_mib'])} ({_fmt(rec['peak_rss_delta_mib'], '+.0f')}; "
                         f"{_fmt(rec.get('steps_peak_rss_delta_mib'), '+.0f')})")
        for system in ("jrlhf", "pytorch"):
            rec = systems.get(system) or {}
            cells.append(_fmt(rec.get("device_peak_mib")))
        lines.append(f"| {DESCRIPTIONS.get(name, name)} | " + " | ".join(cells) + " |")
    base = {s: out.get("baseline_rss_mib") for s, out in memory.items() if "error" not in out}
    lines += ["", "Each system in its own subprocess (RSS after imports: "
              + ", ".join(f"{s} {_fmt(v)} MiB" for s, v in base.items())
              + "); the peak is reset before each benchmark and covers building, compiling, one warm-up step and "
              f"{result['meta'].get('memory_steps')} steps; `during steps` is the growth over the RSS after the "
              "warm-up step, during the steps alone (activations, temporaries)."]
    errors = [f"{s}: {out['error']}" for s, out in memory.items() if "error" in out]
    if errors:
        lines.append("Memory measurement failed for " + "; ".join(errors))
    return lines


def scaling_table(result: dict) -> list[str]:
    scaling = result.get("scaling")
    if not scaling:
        return []
    lines = ["| benchmark | simulated devices | compile s | median step ms | tokens/s |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for out in scaling:
        if "error" in out:
            lines.append(f"| - | {out.get('devices')} | error: {out['error']} | | |")
            continue
        for rec in out["results"]:
            lines.append(f"| {DESCRIPTIONS.get(rec['name'], rec['name'])} | {rec['devices']} "
                         f"| {_fmt(rec['compile_s'], '.1f')} | {rec['median_step_s'] * 1e3:.0f} "
                         f"| {rec['median_tokens_per_s']:.0f} |")
    lines += ["", "Data-parallel mesh over N simulated XLA CPU devices (`--xla_force_host_platform_device_count`) "
              "sharing the same cores: this checks that the sharded step compiles and runs; the times make no "
              "claim about scaling on real devices."]
    return lines


def notes() -> list[str]:
    return [
        "Notes:",
        "- Tokens are non-pad prompt + completion tokens counted the same way for both systems (DPO and reward: "
        "chosen and rejected sequences each with their prompt; GRPO: prompts x num_generations rows).",
        "- The comparison is step to step: jrlhf's compiled step on a batch already on the device against the "
        "PyTorch step from `on_step_begin` to `on_step_end` inside the TRL trainer's own loop (data loading, "
        "collation and logging excluded on both sides). The GRPO whole step times generation + reward + update on "
        "both sides. Both training loops add host work on top of this.",
        "- `per CPU-s`: the same ratio with process CPU seconds (all threads) instead of wall seconds; on a "
        "shared machine wall time also counts the time spent waiting for a core. `cached`: the program was "
        "compiled by the previous row (same model and static settings).",
        "- FLOPs: 2 per multiply-add of every weight matmul (LM head included) plus attention scores/values over "
        "the padded shapes; training = 3 forwards (+1 per frozen reference forward); generation counts the "
        "prefill once per distinct prompt and one single-token forward per new token. MFU = model FLOPs / median "
        "step time / peak.",
    ]


def markdown(result: dict) -> str:
    """The whole markdown report of one run."""
    lines = header(result) + [""] + throughput_table(result)
    for section, table in (("Peak memory", memory_table(result)), ("Simulated-device scaling",
                                                                   scaling_table(result))):
        if table:
            lines += ["", f"#### {section}", ""] + table
    lines += [""] + notes()
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> str | None:
    """A PNG bar chart of median tokens/s per benchmark for both systems (log scale, ratio on top); returns the
    path, or None when there is nothing to plot."""
    rows = [r for r in result["benchmarks"] if "error" not in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [r["name"] for r in rows]
    ref = [r["reference"]["median_tokens_per_s"] for r in rows]
    jr = [r["jrlhf"]["median_tokens_per_s"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.5))
    ax.bar(x - 0.2, ref, 0.4, label="PyTorch reference (TRL / transformers)", color="#999999")
    ax.bar(x + 0.2, jr, 0.4, label="jrlhf", color="#1f77b4")
    for i, r in enumerate(rows):
        ax.text(x[i] + 0.2, jr[i] * 1.05, f"{r['speedup']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("median tokens / s")
    size = result["size"]
    ax.set_title(f"--size {size['name']}: batch {size['batch_size']}, prompt {size['prompt_length']}, "
                 f"completion {size['completion_length']}, {size['dtype']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(result: dict, out_dir: str, stem: str) -> dict:
    """Writes ``stem.json``, ``stem.md`` and ``stem.png`` (when there are timed rows) under ``out_dir``; returns
    the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, stem + ".json"), "markdown": os.path.join(out_dir, stem + ".md")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(paths["markdown"], "w") as f:
        f.write(markdown(result))
    if result.get("benchmarks"):
        png = plot(result, os.path.join(out_dir, stem + ".png"))
        if png:
            paths["png"] = png
    return paths


def plan_markdown(result: dict) -> str:
    """The markdown of a ``--dry-run``: what would be run, with shapes, FLOPs and the traced outputs."""
    plan = result["plan"]
    lines = header(result) + ["", f"Dry run: parameters jrlhf {plan.get('jrlhf_parameters', 0):,}, transformers "
                                  f"{plan.get('transformers_parameters')}; nothing was timed.", "",
                              "| benchmark | PyTorch reference | jrlhf batch | GFLOP / step | jrlhf step traced |",
                              "| --- | --- | --- | ---: | --- |"]
    abstract = plan.get("abstract", {})
    for entry in plan["benchmarks"]:
        traced = abstract.get(entry["name"], {})
        what = ("outputs " + json.dumps(traced["outputs"]) if "outputs" in traced
                else f"{len(traced.get('metrics', []))} metrics" if traced else "-")
        batch = ", ".join(f"{k} {v}" for k, v in entry["batch"].items())
        lines.append(f"| {DESCRIPTIONS.get(entry['name'], entry['name'])} | {entry['reference']} | {batch} "
                     f"| {entry['flops_per_step'] / 1e9:.1f} | {what} |")
    return "\n".join(lines) + "\n"


def write_plan(result: dict, out_dir: str, stem: str) -> dict:
    """Writes ``stem.json`` and ``stem.md`` of a dry run."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, stem + ".json"), "markdown": os.path.join(out_dir, stem + ".md")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(paths["markdown"], "w") as f:
        f.write(plan_markdown(result))
    return paths
