"""The benchmark cases: what each one feeds both systems, its model FLOPs, and the builders of both sides.

Every case gets the same model (one checkpoint written by :func:`benchmarks.data.write_checkpoint`), the same
token sequences and the same shapes on both sides. Token counts are non-pad prompt + completion tokens of what the
step processes: DPO and reward count the prompt once per chosen and once per rejected sequence (both are
forwarded); GRPO counts ``prompts x num_generations`` rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from benchmarks import data as bdata
from benchmarks.sizes import BenchSize, Shape, forward_flops, generation_flops, train_flops

BENCHMARKS = ("dpo_step", "grpo_update_step", "grpo_whole_step", "ppo_update_step", "sft_step", "reward_step",
              "generate_greedy", "generate_sampled")

DESCRIPTIONS = {
    "dpo_step": "DPO step (sigmoid, reference forward per batch)",
    "grpo_update_step": "GRPO update step (given rollouts)",
    "grpo_whole_step": "GRPO whole step (generation + reward + update)",
    "ppo_update_step": "PPO update step (given rollouts, shared value head)",
    "sft_step": "SFT step (completion-only loss)",
    "reward_step": "Reward-model step (Bradley-Terry)",
    "generate_greedy": "Generation, greedy (KV cache)",
    "generate_sampled": "Generation, sampled T=1 (KV cache)",
}


# The systems each benchmark compares: jrlhf, "trl" (TRL's trainer, or transformers.generate for generation) and
# "plain" (a plain PyTorch training loop: same loss, AdamW, no trainer).
SYSTEMS = {
    "dpo_step": ("jrlhf", "trl", "plain"),
    "grpo_update_step": ("jrlhf", "trl", "plain"),
    "grpo_whole_step": ("jrlhf", "trl"),
    "ppo_update_step": ("jrlhf", "plain"),  # TRL 1.16 has no PPO trainer
    "sft_step": ("jrlhf", "trl", "plain"),
    "reward_step": ("jrlhf", "trl"),
    "generate_greedy": ("jrlhf", "trl"),
    "generate_sampled": ("jrlhf", "trl"),
}

REFERENCE_LABELS = {
    ("dpo_step", "trl"): "TRL DPOTrainer", ("dpo_step", "plain"): "plain PyTorch DPO loop",
    ("grpo_update_step", "trl"): "TRL GRPOTrainer (given rollouts)",
    ("grpo_update_step", "plain"): "plain PyTorch GRPO loop",
    ("grpo_whole_step", "trl"): "TRL GRPOTrainer", ("ppo_update_step", "plain"): "plain PyTorch PPO loop",
    ("sft_step", "trl"): "TRL SFTTrainer", ("sft_step", "plain"): "plain PyTorch SFT loop",
    ("reward_step", "trl"): "TRL RewardTrainer",
    ("generate_greedy", "trl"): "transformers generate (greedy)",
    ("generate_sampled", "trl"): "transformers generate (sampled)",
}


def checkpoints_needed(names) -> tuple:
    """The checkpoints (:func:`benchmarks.data.write_checkpoint` names) the benchmarks ``names`` load."""
    needed = {"ppo_update_step": "lm_value", "reward_step": "score"}
    return tuple(sorted({needed.get(name, "lm") for name in names}))


def parse_benchmarks(text: str | None) -> tuple[str, ...]:
    """``"dpo_step,sft_step"`` -> the names, checked (``None`` / ``"all"``: every benchmark)."""
    if text is None or text == "all":
        return BENCHMARKS
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"--benchmarks: unknown {unknown}; choose among {', '.join(BENCHMARKS)}")
    return names


def even_word_reward(prompts, completions, **kwargs):
    """Reward function used by both systems' GRPO: the fraction of completion words with an even id (host
    Python on decoded text, TRL's calling convention)."""
    out = []
    for text in completions:
        ids = [int(w[1:]) for w in text.split() if w.startswith("w") and w[1:].isdigit()]
        out.append(sum(1 for i in ids if i % 2 == 0) / max(len(ids), 1))
    return out


@dataclasses.dataclass
class Inputs:
    """Everything one size's cases share: sizes, checkpoint paths and the token data."""

    size: BenchSize
    paths: dict
    seqs: bdata.Sequences
    rollout: dict
    group_prompts: list
    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    shape: Shape | None = None


def left_pad(rows: list, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ``[B, length]`` ids and mask."""
    ids = np.full((len(rows), length), bdata.PAD, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return ids, mask


def right_pad(rows: list, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``[B, length]`` ids and mask."""
    ids = np.full((len(rows), length), bdata.PAD, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


def make_rollout(size: BenchSize, seqs: bdata.Sequences, seed: int = 0) -> dict:
    """A rollout batch of ``R = batch_size`` rows (``batch_size / num_generations`` prompts, each repeated over its
    group) in both layouts: jrlhf's ``input_ids/attention_mask/loss_mask [R, P + N]`` and TRL's ``prompt_ids,
    prompt_mask [R, P]`` + ``completion_ids, completion_mask [R, N]``; plus ``old_logps``, ``ref_logps``,
    ``old_values [R, N]``, ``scores [R]``, TRL's group ``advantages [R]`` and ``truncated [R]``."""
    rng = np.random.default_rng(seed + 7)
    g = size.num_generations
    rows = size.batch_size
    prompts = [seqs.prompts[(r // g) * g] for r in range(rows)]
    prompt_ids, prompt_mask = left_pad(prompts, size.prompt_length)
    completion_ids, completion_mask = right_pad(seqs.chosen[:rows], size.completion_length)
    vocab = size.hf_config["vocab_size"]
    old_logps = (-np.log(vocab) + 0.1 * rng.standard_normal(completion_ids.shape)).astype(np.float32)
    old_logps *= completion_mask
    ref_logps = (old_logps + 0.05 * rng.standard_normal(completion_ids.shape) * completion_mask).astype(np.float32)
    old_values = (0.1 * rng.standard_normal(completion_ids.shape) * completion_mask).astype(np.float32)
    scores = rng.standard_normal(rows).astype(np.float32)
    grouped = scores.reshape(-1, g)
    advantages = (grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, ddof=1, keepdims=True) + 1e-4)
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "input_ids": np.concatenate([prompt_ids, completion_ids], 1),
        "attention_mask": np.concatenate([prompt_mask, completion_mask], 1),
        "loss_mask": np.concatenate([np.zeros_like(prompt_mask), completion_mask], 1),
        "old_logps": old_logps, "ref_logps": ref_logps, "old_values": old_values, "scores": scores,
        "advantages": advantages.reshape(-1).astype(np.float32), "truncated": np.zeros(rows, np.int32),
    }


def make_inputs(size: BenchSize, paths: dict, seed: int = 0, shape: Shape | None = None) -> Inputs:
    """The shared token data of a size: sequences, the rollout, GRPO's prompts, the generation prompts. ``shape``
    (for the FLOP counts; see :func:`model_shape`) may be left out where FLOPs are not reported."""
    seqs = bdata.make_sequences(size, seed)
    prompts = (seqs.prompts if size.gen_rows == size.batch_size
               else bdata.make_sequences(size, seed + 11, rows=size.gen_rows).prompts)
    prompt_ids, prompt_mask = left_pad(prompts, size.prompt_length)
    return Inputs(size=size, paths=paths, seqs=seqs, rollout=make_rollout(size, seqs, seed),
                  group_prompts=seqs.prompts[:: size.num_generations], prompt_ids=prompt_ids,
                  prompt_mask=prompt_mask, shape=shape)


def model_shape(size: BenchSize) -> Shape:
    """The FLOP-count :class:`Shape` of a size's model (imports jrlhf's config)."""
    return Shape.of(bdata.model_config(size))


def flops(name: str, size: BenchSize, shape: Shape) -> float:
    """Model FLOPs of one step of ``name`` (see :mod:`benchmarks.sizes` for the convention)."""
    b, t, p, n = size.batch_size, size.sequence_length, size.prompt_length, size.completion_length
    if name == "dpo_step":
        return train_flops(shape, 2 * b, t, frozen_forwards=1)
    if name == "reward_step":
        return 3 * forward_flops(shape, 2 * b, t, lm_head=False)
    if name in ("sft_step", "grpo_update_step", "ppo_update_step"):
        return train_flops(shape, b, t)
    if name == "grpo_whole_step":
        return generation_flops(shape, b, p, n, prefill_rows=size.num_prompts) + train_flops(shape, b, t)
    if name in ("generate_greedy", "generate_sampled"):
        return generation_flops(shape, size.gen_rows, p, size.gen_new_tokens)
    raise ValueError(f"unknown benchmark {name!r}")


def build(name: str, system: str, inputs: Inputs, mesh=None):
    """The :class:`benchmarks.timing.Runner` of ``system`` (``"jrlhf"``, ``"trl"`` or ``"plain"``, see
    :data:`SYSTEMS`) for benchmark ``name``."""
    from benchmarks import jrlhf_side, torch_side

    size, paths, seqs = inputs.size, inputs.paths, inputs.seqs
    f = flops(name, size, inputs.shape) if inputs.shape is not None else 0.0
    if system not in SYSTEMS.get(name, ()):
        raise ValueError(f"system={system!r} is not compared on {name!r}; choose among {SYSTEMS.get(name)}")
    if system == "plain":
        if name == "dpo_step":
            return torch_side.plain_dpo(size, paths, jrlhf_side.preference_batch(seqs, size.sequence_length), f)
        if name == "sft_step":
            return torch_side.plain_sft(size, paths, jrlhf_side.sft_batch(seqs, size.sequence_length), f)
        if name == "grpo_update_step":
            return torch_side.plain_grpo_update(size, paths, inputs.rollout, f)
        return torch_side.ppo_update(size, paths, inputs.rollout, f)
    if system == "jrlhf":
        side, extra = jrlhf_side, {"mesh": mesh}
    else:
        side, extra = torch_side, {}
    if name in ("dpo_step", "sft_step", "reward_step"):
        return getattr(side, name.split("_")[0])(size, paths, seqs, f, **extra)
    if name == "grpo_update_step":
        if system == "jrlhf":
            return side.grpo_update(size, paths, inputs.rollout, f, **extra)
        return side.grpo_update(size, paths, inputs.rollout, inputs.group_prompts, even_word_reward, f)
    if name == "grpo_whole_step":
        return side.grpo_whole(size, paths, inputs.group_prompts, even_word_reward, f, **extra)
    if name == "ppo_update_step":
        return side.ppo_update(size, paths, inputs.rollout, f, **extra)
    if name in ("generate_greedy", "generate_sampled"):
        return side.generation(size, paths, inputs.prompt_ids, inputs.prompt_mask,
                               sample=name == "generate_sampled", flops=f, **extra)
    raise ValueError(f"unknown benchmark {name!r}")
