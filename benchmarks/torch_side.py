"""The PyTorch side of every benchmark, two kinds of reference:

- ``system="trl"``: TRL 1.16's trainers where they exist (DPO, SFT, reward, GRPO) and ``transformers.generate``;
- ``system="plain"``: a plain PyTorch training loop on the same ``transformers`` model (the same loss, AdamW, gradient
  clipping, no trainer): DPO, SFT, the GRPO update and the PPO update (TRL 1.16 has no PPO trainer). This is the bar
  a compiled step has to clear: eager PyTorch without a trainer's per-step work around it.

TRL trainers are timed inside their own ``Trainer.train()`` loop: a callback takes the time from ``on_step_begin``
to ``on_step_end``, which covers ``training_step`` (TRL's ``_prepare_inputs`` -- for GRPO the generation, the reward
functions and the advantages --, the loss, the backward), gradient clipping, ``optimizer.step()``, the scheduler and
``zero_grad``. Data loading and collation happen before ``on_step_begin`` and logging after ``on_step_end``, so
neither is timed, as jrlhf's batches are also built before its timed step.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Callable

import numpy as np

from benchmarks import data as bdata
from benchmarks.sizes import BenchSize
from benchmarks.timing import Runner

LEARNING_RATE = 1e-6


def torch_device(size: BenchSize) -> str:
    """``"cuda"`` for accelerator sizes when CUDA is available, else ``"cpu"``."""
    import torch

    return "cuda" if size.accelerator and torch.cuda.is_available() else "cpu"


def torch_dtype(size: BenchSize):
    import torch

    return torch.bfloat16 if size.dtype == "bfloat16" else torch.float32


def load_causal_lm(path: str, size: BenchSize):
    """The ``transformers`` causal LM of ``path`` in float32 master weights (bf16 sizes run under autocast, as the
    TRL trainers do with ``bf16=True``), on the benchmark's device, default attention implementation (SDPA)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    quantization = getattr(config, "quantization_config", None) or {}
    if isinstance(quantization, dict) and quantization.get("quant_method") == "gguf":
        # a checkpoint converted from GGUF keeps the GGUF's quantization note in config.json, but its safetensors are
        # already dequantized float tensors: without the note the Trainer accepts the model for full fine-tuning
        del config.quantization_config
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
    return model.to(torch_device(size))


def _trainer_args(config_cls, size: BenchSize, output_dir: str, **overrides):
    """Shared trainer settings: batch, AdamW at a constant learning rate, clipping at 1.0 (the TRL/Trainer default,
    as jrlhf's), no logging/saving/evaluation, no hub, no dataloader workers."""
    import torch

    kwargs = dict(
        output_dir=output_dir, per_device_train_batch_size=size.batch_size, max_steps=1,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, report_to=[], use_cpu=not (size.accelerator and torch.cuda.is_available()),
        logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, bf16=size.dtype == "bfloat16", push_to_hub=False,
    )
    kwargs.update(overrides)
    return config_cls(**kwargs)


class TrainerRunner(Runner):
    """A TRL trainer timed by a callback inside ``trainer.train()`` (see the module docstring).

    Args:
      name, label: the benchmark and the system's label in the report.
      trainer: the TRL trainer (``max_steps`` is set by :meth:`loop`).
      count_tokens: ``inputs -> int`` non-pad prompt + completion tokens of one step, from the prepared inputs
        ``compute_loss`` receives.
    """

    system = "trl"

    def __init__(self, name: str, label: str, trainer, count_tokens: Callable, flops: float, cleanup=None):
        super().__init__(name, label, flops)
        self.trainer = trainer
        self._count = count_tokens
        self._tokens = 0
        self._cleanup = cleanup
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        original = trainer.compute_loss

        def compute_loss(model, inputs, *args, **kwargs):
            self._tokens = int(self._count(inputs))
            return original(model, inputs, *args, **kwargs)

        trainer.compute_loss = compute_loss

    def compile(self) -> float | None:
        return None  # eager: nothing to compile; the first steps are discarded as warm-up

    def loop(self, steps: int, between: Callable[[int, float, int, float], None]) -> None:
        from transformers import TrainerCallback

        runner = self

        class StepTimer(TrainerCallback):
            def __init__(self):
                self.start = None
                self.index = 0

            def on_step_begin(self, args, state, control, **kwargs):
                self.cpu = time.process_time()
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                _sync()
                elapsed = time.perf_counter() - self.start
                cpu = time.process_time() - self.cpu
                between(self.index, elapsed, runner._tokens, cpu)
                self.index += 1

        timer = StepTimer()
        self.trainer.args.max_steps = steps
        self.trainer.add_callback(timer)
        try:
            self.trainer.train()
        finally:
            self.trainer.remove_callback(timer)

    def close(self) -> None:
        if self._cleanup is not None:
            self._cleanup()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _tempdir():
    return tempfile.TemporaryDirectory(prefix="jrlhf-bench-")


# ---------------------------------------------------------------------------------------------------- offline


def dpo(size: BenchSize, paths: dict, seqs: bdata.Sequences, flops: float) -> TrainerRunner:
    """TRL ``DPOTrainer`` (sigmoid loss, beta 0.1, reference model = a copy of the initial policy, computed per
    batch) on ``seqs``."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tmp = _tempdir()
    texts = seqs.texts()
    dataset = Dataset.from_dict({"prompt": texts["prompt"], "chosen": texts["chosen"],
                                 "rejected": texts["rejected"]})
    tokenizer = bdata.build_tokenizer(size.hf_config["vocab_size"])
    args = _trainer_args(DPOConfig, size, tmp.name, beta=0.1, loss_type=["sigmoid"], max_length=None,
                         precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=load_causal_lm(paths["lm"], size), ref_model=load_causal_lm(paths["lm"], size),
                         args=args, train_dataset=dataset, processing_class=tokenizer)
    return TrainerRunner("dpo_step", "TRL DPOTrainer", trainer, lambda x: x["attention_mask"].sum().item(), flops,
                         tmp.cleanup)


def sft(size: BenchSize, paths: dict, seqs: bdata.Sequences, flops: float) -> TrainerRunner:
    """TRL ``SFTTrainer`` on prompt-completion data (loss on the completion tokens only, its default there)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tmp = _tempdir()
    texts = seqs.texts()
    dataset = Dataset.from_dict({"prompt": texts["prompt"], "completion": texts["chosen"]})
    tokenizer = bdata.build_tokenizer(size.hf_config["vocab_size"])
    args = _trainer_args(SFTConfig, size, tmp.name, max_length=None, packing=False, padding_free=False)
    trainer = SFTTrainer(model=load_causal_lm(paths["lm"], size), args=args, train_dataset=dataset,
                         processing_class=tokenizer)
    return TrainerRunner("sft_step", "TRL SFTTrainer", trainer, lambda x: x["attention_mask"].sum().item(), flops,
                         tmp.cleanup)


def reward(size: BenchSize, paths: dict, seqs: bdata.Sequences, flops: float) -> TrainerRunner:
    """TRL ``RewardTrainer`` (Bradley-Terry) on a one-label ``...ForSequenceClassification`` model."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    tmp = _tempdir()
    texts = seqs.texts()
    dataset = Dataset.from_dict({"prompt": texts["prompt"], "chosen": texts["chosen"],
                                 "rejected": texts["rejected"]})
    tokenizer = bdata.build_tokenizer(size.hf_config["vocab_size"])
    model = AutoModelForSequenceClassification.from_pretrained(paths["score"], num_labels=1, dtype=torch.float32)
    model = model.to(torch_device(size))
    args = _trainer_args(RewardConfig, size, tmp.name, max_length=None)
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return TrainerRunner("reward_step", "TRL RewardTrainer", trainer, lambda x: x["attention_mask"].sum().item(),
                         flops, tmp.cleanup)


# ---------------------------------------------------------------------------------------------------- GRPO


def _grpo_args(size: BenchSize, output_dir: str):
    from trl import GRPOConfig

    return _trainer_args(GRPOConfig, size, output_dir, num_generations=size.num_generations,
                         max_completion_length=size.completion_length, temperature=1.0, top_p=1.0, top_k=0,
                         beta=0.0, loss_type="dapo", scale_rewards="group", num_iterations=1,
                         steps_per_generation=1, log_completions=False, shuffle_dataset=False)


def _grpo_tokens(inputs) -> int:
    return int(inputs["prompt_mask"].sum().item() + inputs["completion_mask"].sum().item())


def grpo_whole(size: BenchSize, paths: dict, prompts: list, reward_fn: Callable, flops: float) -> TrainerRunner:
    """TRL ``GRPOTrainer``: every step generates ``num_generations`` completions for each of the step's prompts
    with ``transformers.generate`` (KV cache on), scores them with ``reward_fn``, computes group advantages and takes
    one optimizer step (``num_iterations=1``, ``beta=0``: TRL's defaults)."""
    from datasets import Dataset
    from trl import GRPOTrainer

    tmp = _tempdir()
    dataset = Dataset.from_dict({"prompt": [bdata.words(p) for p in prompts]})
    tokenizer = bdata.build_tokenizer(size.hf_config["vocab_size"])
    tokenizer.padding_side = "left"
    trainer = GRPOTrainer(model=load_causal_lm(paths["lm"], size), reward_funcs=[reward_fn],
                          args=_grpo_args(size, tmp.name), train_dataset=dataset, processing_class=tokenizer)
    return TrainerRunner("grpo_whole_step", "TRL GRPOTrainer", trainer, _grpo_tokens, flops, tmp.cleanup)


def grpo_update(size: BenchSize, paths: dict, rollout: dict, prompts: list, reward_fn: Callable,
                flops: float) -> TrainerRunner:
    """TRL ``GRPOTrainer`` whose ``_prepare_inputs`` returns the given rollout instead of generating: the step is
    TRL's GRPO loss (with its entropies), the backward and the AdamW step on fixed rollouts."""
    import torch
    from datasets import Dataset
    from trl import GRPOTrainer

    device = torch_device(size)
    completion_mask = torch.tensor(rollout["completion_mask"], dtype=torch.long)
    cached = {
        "prompt_ids": torch.tensor(rollout["prompt_ids"], dtype=torch.long),
        "prompt_mask": torch.tensor(rollout["prompt_mask"], dtype=torch.long),
        "completion_ids": torch.tensor(rollout["completion_ids"], dtype=torch.long),
        "completion_mask": completion_mask,
        "advantages": torch.tensor(rollout["advantages"], dtype=torch.float32),
        "old_per_token_logps": torch.tensor(rollout["old_logps"], dtype=torch.float32),
        "num_items_in_batch": completion_mask.sum(),
    }
    cached = {k: v.to(device) for k, v in cached.items()}

    class GivenRollouts(GRPOTrainer):
        def _prepare_inputs(self, generation_batch):
            return dict(cached)

    tmp = _tempdir()
    dataset = Dataset.from_dict({"prompt": [bdata.words(p) for p in prompts]})
    tokenizer = bdata.build_tokenizer(size.hf_config["vocab_size"])
    tokenizer.padding_side = "left"
    trainer = GivenRollouts(model=load_causal_lm(paths["lm"], size), reward_funcs=[reward_fn],
                            args=_grpo_args(size, tmp.name), train_dataset=dataset, processing_class=tokenizer)
    return TrainerRunner("grpo_update_step", "TRL GRPOTrainer (given rollouts)", trainer, _grpo_tokens, flops,
                         tmp.cleanup)


# ---------------------------------------------------------------------------------------------------- PPO


class StepRunner(Runner):
    """A PyTorch step ``step() -> tokens`` timed by the generic loop (``system``: ``"plain"`` for a hand-written
    training loop, ``"trl"`` for ``transformers.generate``)."""

    def __init__(self, name: str, label: str, step: Callable[[], int], flops: float, system: str = "plain",
                 metrics: dict | None = None):
        super().__init__(name, label, flops)
        self._step = step
        self.system = system
        self.metrics = {} if metrics is None else metrics  # the last step's loss (a detached tensor), for tests

    def compile(self) -> float | None:
        return None

    def step(self) -> int:
        tokens = self._step()
        _sync()
        return tokens


def ppo_update(size: BenchSize, paths: dict, rollout: dict, flops: float, kl_coef: float = 0.05,
               cliprange: float = 0.2, cliprange_value: float = 0.2, vf_coef: float = 0.1, gamma: float = 1.0,
               lam: float = 0.95, temperature: float = 0.7) -> StepRunner:
    """Hand-written PyTorch PPO update step (TRL 1.16 has no PPO trainer), written as TRL's former ``PPOTrainer``
    computed it: a ``transformers`` causal LM with a linear value head on the shared trunk; per step the k1 KL
    penalty, GAE (a reversed loop over the completion), whitened advantages, the clipped surrogate and the clipped
    value loss (token means), backward, clipping at 1.0 and an AdamW step. Log-probs and values only at the
    completion positions (``logits_to_keep``-style slicing before the LM head); the mean token entropy is computed
    as a metric (no gradient), as TRL's PPO logged it and jrlhf's loss reports it."""
    import torch
    from safetensors.numpy import load_file

    device = torch_device(size)
    lm = load_causal_lm(paths["lm_value"], size)
    score = load_file(os.path.join(paths["lm_value"], "model.safetensors"))["score.weight"]
    value_head = torch.nn.Linear(lm.config.hidden_size, 1, bias=False)
    with torch.no_grad():
        value_head.weight.copy_(torch.tensor(np.asarray(score, np.float32).reshape(1, -1)))
    value_head = value_head.to(device)
    params = list(lm.parameters()) + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    lm.train()

    t = lambda key, dtype: torch.tensor(rollout[key], dtype=dtype, device=device)  # noqa: E731
    input_ids, attention = t("input_ids", torch.long), t("attention_mask", torch.long)
    mask = t("loss_mask", torch.float32)[:, -size.completion_length:]
    old_logps, ref_logps = t("old_logps", torch.float32), t("ref_logps", torch.float32)
    old_values, scores = t("old_values", torch.float32), t("scores", torch.float32)
    n = size.completion_length
    targets = input_ids[:, -n:]
    tokens = int(attention.sum().item())
    autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16) if size.dtype == "bfloat16"
                else contextlib.nullcontext())
    metrics = {}

    def masked_mean(x, m):
        return (x * m).sum() / m.sum().clamp_min(1.0)

    def whiten(x, m):
        mean = masked_mean(x, m)
        var = masked_mean((x - mean) ** 2, m) * m.sum() / (m.sum() - 1).clamp_min(1.0)
        return (x - mean) * torch.rsqrt(var + 1e-8)

    def step() -> int:
        with torch.no_grad():
            lengths = mask.sum(-1).long()
            rewards = -kl_coef * (old_logps - ref_logps) * mask
            last = (lengths - 1).clamp_min(0)
            rewards[torch.arange(rewards.shape[0], device=device), last] += scores
            advantages_reversed, last_gae = [], 0.0
            values = old_values * mask
            for i in reversed(range(n)):
                next_value = values[:, i + 1] if i < n - 1 else 0.0
                delta = rewards[:, i] + gamma * next_value - values[:, i]
                last_gae = delta + gamma * lam * last_gae
                advantages_reversed.append(last_gae)
            advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask
            returns = advantages + values
            advantages = whiten(advantages, mask) * mask
        with autocast:
            hidden = lm.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
            states = hidden[:, -n - 1:-1]
            logits = lm.lm_head(states).float() / temperature
            logps = torch.gather(torch.log_softmax(logits, -1), 2, targets[..., None]).squeeze(-1)
            values_new = value_head(states).squeeze(-1).float()
        ratio = torch.exp(logps - old_logps)
        pg = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange))
        clipped_values = old_values + torch.clamp(values_new - old_values, -cliprange_value, cliprange_value)
        vf = 0.5 * torch.max((values_new - returns) ** 2, (clipped_values - returns) ** 2)
        loss = masked_mean(pg, mask) + vf_coef * masked_mean(vf, mask)
        with torch.no_grad():
            probs = torch.softmax(logits, -1)
            entropy = masked_mean(torch.logsumexp(logits, -1) - (probs * logits).sum(-1), mask)
        metrics["loss"] = loss.detach()
        _backward_and_step(loss, params, optimizer)
        metrics["entropy"] = entropy.detach()
        return tokens

    return StepRunner("ppo_update_step", "plain PyTorch PPO loop", step, flops, metrics=metrics)


# ---------------------------------------------------------------------------------------------------- generation


def generation(size: BenchSize, paths: dict, prompt_ids: np.ndarray, prompt_mask: np.ndarray, *, sample: bool,
               flops: float) -> StepRunner:
    """``transformers`` ``generate`` with the KV cache (default dynamic cache), ``max_new_tokens = N`` and no EOS,
    so every row produces exactly ``N`` tokens; greedy, or sampling at temperature 1 without top-k/top-p."""
    import torch

    device = torch_device(size)
    model = load_causal_lm(paths["lm"], size).eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    mask = torch.tensor(prompt_mask, dtype=torch.long, device=device)
    n = size.gen_new_tokens
    kwargs = dict(max_new_tokens=n, min_new_tokens=None, do_sample=sample, use_cache=True,
                  pad_token_id=bdata.PAD, eos_token_id=None)
    if sample:
        kwargs.update(temperature=1.0, top_k=0, top_p=1.0)
    else:
        kwargs.update(temperature=None, top_k=None, top_p=None)
    autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16) if size.dtype == "bfloat16"
                else contextlib.nullcontext())
    generator_seed = [0]

    def step() -> int:
        generator_seed[0] += 1
        torch.manual_seed(generator_seed[0])
        with torch.inference_mode(), autocast:
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        new = out.shape[1] - ids.shape[1]
        return int(mask.sum().item()) + new * ids.shape[0]

    label = "transformers generate " + ("(sampled)" if sample else "(greedy)")
    name = "generate_sampled" if sample else "generate_greedy"
    return StepRunner(name, label, step, flops, system="trl")


# ---------------------------------------------------------------------------------------------------- plain loops


def _backward_and_step(loss, params, optimizer) -> None:
    """The plain loops' update: backward, global-norm clipping at 1.0 (as jrlhf's ``optim.max_grad_norm``), AdamW."""
    import torch

    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _plain_optimizer(params):
    """AdamW (lr 1e-6, no weight decay) as the trainers and jrlhf use it."""
    import torch

    return torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)


def _token_logps(logits, targets):
    """``log p(target)`` per position, ``[B, T]`` float32, through ``cross_entropy`` (PyTorch's fused log-softmax +
    gather; no ``[B, T, V]`` log-probabilities kept beside the logits)."""
    import torch.nn.functional as F

    flat = logits.float().reshape(-1, logits.shape[-1])
    return -F.cross_entropy(flat, targets.reshape(-1), reduction="none").view(targets.shape)


def _autocast(size: BenchSize, device: str):
    import torch

    return (torch.autocast(device_type=device, dtype=torch.bfloat16) if size.dtype == "bfloat16"
            else contextlib.nullcontext())


def plain_dpo(size: BenchSize, paths: dict, batch: dict, flops: float, beta: float = 0.1) -> StepRunner:
    """A plain PyTorch DPO step (sigmoid loss) on jrlhf's right-padded preference ``batch``
    (``{chosen,rejected}_{input_ids,attention_mask,loss_mask} [B, T]``): chosen and rejected concatenated into one
    ``[2B, T]`` forward of the policy and one ``torch.no_grad`` forward of the frozen reference; summed completion
    log-probs; ``-logsigmoid(beta * margin)`` averaged over pairs; backward, clipping at 1.0, AdamW."""
    import torch
    import torch.nn.functional as F

    device = torch_device(size)
    policy = load_causal_lm(paths["lm"], size).train()
    reference = load_causal_lm(paths["lm"], size).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    params = list(policy.parameters())
    optimizer = _plain_optimizer(params)
    cat = lambda key, dtype: torch.tensor(np.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]]),  # noqa: E731
                                          dtype=dtype, device=device)
    ids, attention = cat("input_ids", torch.long), cat("attention_mask", torch.long)
    mask = cat("loss_mask", torch.float32)[:, 1:]
    targets = ids[:, 1:]
    pairs = int(batch["chosen_input_ids"].shape[0])
    tokens = int(attention.sum().item())
    autocast = _autocast(size, device)

    def sequence_logps(model):
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        return (_token_logps(logits, targets) * mask).sum(-1)

    metrics = {}

    def step() -> int:
        with torch.no_grad(), autocast:
            ref = sequence_logps(reference)
        with autocast:
            logps = sequence_logps(policy)
        margin = (logps[:pairs] - ref[:pairs]) - (logps[pairs:] - ref[pairs:])
        loss = -F.logsigmoid(beta * margin).mean()
        metrics["loss"] = loss.detach()
        _backward_and_step(loss, params, optimizer)
        return tokens

    return StepRunner("dpo_step", "plain PyTorch DPO loop", step, flops, metrics=metrics)


def plain_sft(size: BenchSize, paths: dict, batch: dict, flops: float) -> StepRunner:
    """A plain PyTorch SFT step on jrlhf's SFT ``batch`` (``input_ids, attention_mask, loss_mask [B, T]``): token-mean
    NLL over the completion tokens (``cross_entropy`` with ``ignore_index``), backward, clipping at 1.0, AdamW."""
    import torch
    import torch.nn.functional as F

    device = torch_device(size)
    model = load_causal_lm(paths["lm"], size).train()
    params = list(model.parameters())
    optimizer = _plain_optimizer(params)
    ids = torch.tensor(batch["input_ids"], dtype=torch.long, device=device)
    attention = torch.tensor(batch["attention_mask"], dtype=torch.long, device=device)
    labels = ids[:, 1:].masked_fill(torch.tensor(batch["loss_mask"], device=device)[:, 1:] == 0, -100)
    tokens = int(attention.sum().item())
    autocast = _autocast(size, device)

    metrics = {}

    def step() -> int:
        with autocast:
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        metrics["loss"] = loss.detach()
        _backward_and_step(loss, params, optimizer)
        return tokens

    return StepRunner("sft_step", "plain PyTorch SFT loop", step, flops, metrics=metrics)


def plain_grpo_update(size: BenchSize, paths: dict, rollout: dict, flops: float, epsilon: float = 0.2,
                      temperature: float = 1.0) -> StepRunner:
    """A plain PyTorch GRPO update on a given rollout (TRL's layout: left-padded prompt + right-padded completion):
    the LM head on the completion positions only (``logits_to_keep``-style), token log-probs at ``temperature``,
    the clipped surrogate with the rollout's group advantages, the DAPO normalisation (sum over the batch's
    completion tokens / their count; ``beta = 0``, no reference model), backward, clipping at 1.0, AdamW."""
    import torch

    device = torch_device(size)
    model = load_causal_lm(paths["lm"], size).train()
    params = list(model.parameters())
    optimizer = _plain_optimizer(params)
    t = lambda key, dtype: torch.tensor(rollout[key], dtype=dtype, device=device)  # noqa: E731
    ids, attention = t("input_ids", torch.long), t("attention_mask", torch.long)
    n = size.completion_length
    mask = t("completion_mask", torch.float32)
    old_logps, advantages = t("old_logps", torch.float32), t("advantages", torch.float32)[:, None]
    targets = ids[:, -n:]
    tokens = int(attention.sum().item())
    autocast = _autocast(size, device)

    metrics = {}

    def step() -> int:
        with autocast:
            hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state[:, -n - 1:-1]
            logits = model.lm_head(hidden)
        logps = _token_logps(logits.float() / temperature, targets)
        ratio = torch.exp(logps - old_logps)
        per_token = -torch.min(ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages)
        loss = (per_token * mask).sum() / mask.sum().clamp_min(1.0)
        metrics["loss"] = loss.detach()
        _backward_and_step(loss, params, optimizer)
        return tokens

    return StepRunner("grpo_update_step", "plain PyTorch GRPO loop", step, flops, metrics=metrics)
