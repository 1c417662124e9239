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


SYSTEM_NAMES = {"trl": "TRL / transformers", "plain": "plain PyTorch loop"}


def peak_flops(result: dict) -> float | None:
    """The peak MFU is measured against: the best of the run's measurements (start and end) or the datasheet's."""
    values = [p.get("flops_per_s") for p in (result.get("peak"), result.get("peak_end")) if p]
    values = [v for v in values if v]
    return max(values) if values else None


def _peak_line(result: dict) -> str | None:
    peak = peak_flops(result)
    if not peak:
        return None
    parts = []
    for when in ("peak", "peak_end"):
        p = result.get(when) or {}
        if p.get("source") == "measured":
            stacks = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in p.get("stacks", {}).items())
            parts.append(f"{'start' if when == 'peak' else 'end'}: {stacks} GFLOP/s")
        elif p:
            parts.append(f"{p.get('source')}")
    return f"- peak for MFU: {peak / 1e9:.0f} GFLOP/s ({'; '.join(parts)}; float32 square matmul, each stack in " \
           "its own process)" if (result.get("peak") or {}).get("source") == "measured" else \
        f"- peak for MFU: {peak / 1e12:.0f} TFLOP/s ({'; '.join(parts)})"


def _settings(result: dict) -> str:
    seen = {}
    for row in result["benchmarks"]:
        for system, record in row.get("systems", {}).items():
            if "ready" in record and system not in seen:
                seen[system] = record["ready"].get("settings", {})
    parts = []
    for system, settings in seen.items():
        text = ", ".join(f"{k}={v}" for k, v in settings.items())
        parts.append(f"{system}: {text or 'defaults'}")
    return "; ".join(parts)


def header(result: dict) -> list[str]:
    """The lines describing the run: size, shapes, machine, load, peak, threading, command."""
    meta, size = result["meta"], result["size"]
    prompts = size["batch_size"] // size["num_generations"]
    lines = [f"### jrlhf vs TRL, a plain PyTorch loop and transformers.generate: `--size {size['name']}`", "",
             f"- command: `{meta.get('command')}` (git {meta.get('git_commit')}, {meta.get('time')})",
             f"- model: {size['description']}; {size['dtype']}",
             f"- batch {size['batch_size']} sequences (DPO/reward: pairs; GRPO: {prompts}"
             f" prompts x {size['num_generations']} generations), prompt {size['prompt_length']}, completion "
             f"{size['completion_length']} tokens (lengths from half to all of it; one row full-length); generation "
             f"{size.get('generation_rows', size['batch_size'])} rows x "
             f"{size.get('generation_new_tokens', size['completion_length'])} new tokens",
             f"- machine: {meta.get('device', '?')}, {meta.get('cpu_count')} CPUs; jax {meta.get('jax')}, torch "
             f"{meta.get('torch')}, transformers {meta.get('transformers')}, trl {meta.get('trl')}",
             f"- load before: `{meta.get('uptime_before')}`; after: `{meta.get('uptime_after', '?')}`",
             f"- each system in its own process, threading: {_settings(result) or '-'}",
             f"- timing: {meta.get('warmup')} warm-up steps, then {meta.get('rounds')} rounds of {meta.get('block')} "
             "timed steps per system, one process computing at a time, the order reversed every round; medians "
             "over all timed steps; the ratio range is over the rounds"]
    line = _peak_line(result)
    if line:
        lines.append(line)
    return lines


def _cell_ratio(ratio: dict | None) -> str:
    if not ratio:
        return "-"
    return f"**{ratio['ratio']:.2f}x** ({ratio['round_min']:.2f}-{ratio['round_max']:.2f})"


def _mfu(summary: dict | None, peak) -> str:
    if not summary or not summary.get("achieved_flops_per_s") or not peak:
        return "-"
    return f"{100 * summary['achieved_flops_per_s'] / peak:.0f}%"


def throughput_table(result: dict) -> list[str]:
    """The main table: median tokens/s of every system, jrlhf's ratios to each, compile and first-step times, MFU."""
    peak = peak_flops(result)
    lines = ["| benchmark | tokens/step | jrlhf tok/s | TRL / generate tok/s | plain loop tok/s | jrlhf / TRL "
             "| jrlhf / plain loop | jrlhf compile s | first step s: jrlhf / TRL / plain | MFU: jrlhf / TRL / plain |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["benchmarks"]:
        title = DESCRIPTIONS.get(row["name"], row["name"])
        if "error" in row:
            lines.append(f"| {title} | error: {row['error']} | | | | | | | | |")
            continue
        systems = row["systems"]
        summary = {s: r.get("summary") for s, r in systems.items()}
        jr = summary["jrlhf"]

        def rate(system):
            record = systems.get(system)
            if record is None:
                return "-"
            if "error" in record:
                return "error"
            return f"{record['summary']['median_tokens_per_s']:.0f}"

        def first(system):
            record = systems.get(system) or {}
            if system == "jrlhf":  # compile() ran the first call
                return _fmt((record.get("ready") or {}).get("compile_and_first_call_s"), ".1f")
            warm = record.get("warmup_seconds") or []
            return f"{warm[0]:.1f}" if warm else "-"

        ready = systems["jrlhf"]["ready"]
        compile_text = "cached" if ready.get("compiles") == 0 else _fmt(ready.get("compile_s"), ".1f")
        recompiles = f" ({jr['recompiles']} recompiles!)" if jr.get("recompiles") else ""
        lines.append(
            f"| {title} | {jr['tokens_per_step']:.0f} | {rate('jrlhf')} | {rate('trl')} | {rate('plain')} "
            f"| {_cell_ratio(row.get('ratios', {}).get('trl'))} | {_cell_ratio(row.get('ratios', {}).get('plain'))} "
            f"| {compile_text}{recompiles} | {first('jrlhf')} / {first('trl')} / {first('plain')} "
            f"| {_mfu(jr, peak)} / {_mfu(summary.get('trl'), peak)} / {_mfu(summary.get('plain'), peak)} |")
    labels = sorted({(row["name"], s, r["ready"]["label"]) for row in result["benchmarks"]
                     for s, r in row.get("systems", {}).items() if s != "jrlhf" and "ready" in r})
    if labels:
        lines += ["", "References: " + "; ".join(f"{name} {SYSTEM_NAMES.get(s, s)} = {label}"
                                                 for name, s, label in labels) + "."]
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
             "| TRL peak RSS MiB (...) | plain loop peak RSS MiB (...) | device peak MiB: jrlhf | TRL | plain |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, systems in by.items():
        cells = []
        for system in ("jrlhf", "trl", "plain"):
            rec = systems.get(system)
            cells.append("-" if rec is None else
                         f"{_fmt(rec['peak_rss_mib'])} ({_fmt(rec['peak_rss_delta_mib'], '+.0f')}; "
                         f"{_fmt(rec.get('steps_peak_rss_delta_mib'), '+.0f')})")
        for system in ("jrlhf", "trl", "plain"):
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
        "- Tokens are non-pad prompt + completion tokens counted the same way for every system (DPO and reward: "
        "chosen and rejected sequences each with their prompt; GRPO: prompts x num_generations rows; generation: "
        "prompt tokens + new tokens).",
        "- jrlhf's compiled step runs on a batch already on the device; a TRL step is timed inside the trainer's "
        "own loop from `on_step_begin` to `on_step_end` (data loading, collation and logging excluded); a plain "
        "loop step is forward(s) + loss + backward + clipping + AdamW on tensors already built.",
        "- First step: jrlhf's compile (trace + lowering + XLA) and first call; the PyTorch systems' first eager "
        "step. `cached`: compiled by an earlier benchmark in the same process (not the case with one process per "
        "benchmark).",
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
    def rates(system):
        return [((r["systems"].get(system) or {}).get("summary") or {}).get("median_tokens_per_s") or 0.0
                for r in rows]

    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.5))
    for offset, system, label, color in ((-0.27, "trl", "TRL / transformers.generate", "#999999"),
                                         (0.0, "plain", "plain PyTorch loop", "#ff7f0e"),
                                         (0.27, "jrlhf", "jrlhf", "#1f77b4")):
        ax.bar(x + offset, rates(system), 0.27, label=label, color=color)
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


def compact_table(result: dict) -> list[str]:
    """A short table of a run (the README's): jrlhf's tokens/s, its ratios to each reference with their round
    range, its compile seconds and MFU."""
    peak = peak_flops(result)
    lines = ["| benchmark | jrlhf tok/s | jrlhf / TRL (or generate) | jrlhf / plain PyTorch loop | jrlhf compile s "
             "| MFU jrlhf / TRL / plain |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["benchmarks"]:
        title = DESCRIPTIONS.get(row["name"], row["name"])
        if "error" in row:
            lines.append(f"| {title} | error: {row['error']} | | | | |")
            continue
        systems = row["systems"]
        jr = systems["jrlhf"]["summary"]
        summary = {s: r.get("summary") for s, r in systems.items()}

        def ratio(system):
            if system not in systems:
                return "-"
            if "error" in systems[system]:
                return "error"
            return _cell_ratio(row.get("ratios", {}).get(system))

        lines.append(f"| {title} | {jr['median_tokens_per_s']:.0f} | {ratio('trl')} | {ratio('plain')} "
                     f"| {_fmt(systems['jrlhf']['ready'].get('compile_s'), '.1f')} "
                     f"| {_mfu(jr, peak)} / {_mfu(summary.get('trl'), peak)} / {_mfu(summary.get('plain'), peak)} |")
    return lines


if __name__ == "__main__":  # python -m benchmarks.report RESULT.json: the header and the short table of a run
    import sys

    with open(sys.argv[1]) as f:
        loaded = json.load(f)
    print("\n".join(header(loaded) + [""] + compact_table(loaded)))
