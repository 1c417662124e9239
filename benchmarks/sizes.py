"""Benchmark sizes (model config, batch, sequence lengths) and the model-FLOP counts used for MFU.

Every size is a Hugging Face ``config.json`` dict plus the batch shape, so jrlhf and the PyTorch reference build the
same architecture from the same dict (and share weights through a saved checkpoint).

FLOP convention (stated in every report): a matmul of ``[m, k] x [k, n]`` is ``2 m k n`` FLOPs; the forward of one
sequence of ``T`` tokens costs ``2 * W * T`` for the weight matmuls (``W`` = matmul weights, LM head included,
embedding lookups excluded) plus ``4 * L * N * D * T * S`` for attention scores and values (``S`` keys per query,
the full masked ``T x S`` as both stacks compute it); a training step costs three forwards (forward + backward), a
frozen model (DPO's reference) one forward. FLOPs are counted on the padded shapes both systems run.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class BenchSize:
    """One benchmark size.

    Attributes:
      name: the ``--size`` name.
      hf_config: the model's Hugging Face ``config.json`` dict (token ids filled in by the benchmark tokenizer).
      batch_size: sequences per step: SFT/reward/PPO rows, DPO pairs, GRPO completions (prompts x generations),
        generation prompts.
      prompt_length: longest prompt ``P`` (the padded prompt length).
      completion_length: longest completion ``N`` (the generation budget).
      num_generations: GRPO completions per prompt (``batch_size / num_generations`` prompts per step).
      dtype: compute dtype of both systems (``float32`` or ``bfloat16``).
      accelerator: the size is meant for a GPU/TPU (the PyTorch reference then runs on CUDA when present).
      description: one line for the report.
      scan_unroll: jrlhf's ``ModelConfig.scan_unroll`` (layers per iteration of the scan over layers): the layer
        count (fully unrolled) for the shallow CPU sizes, 1 (a rolled loop, fastest to compile) for the large ones.
      generation_rows, generation_new_tokens: rows and new tokens of the generation benchmarks (default
        ``batch_size`` and ``completion_length``).
      remat: jrlhf's ``ModelConfig.remat`` for the training steps (``"none"``, ``"full"``...).
      model_path: a real Hugging Face checkpoint both systems load instead of random weights (``None``: a random
        checkpoint is written per run); its sizes define ``hf_config``.
      benchmarks: the benchmarks the size supports (``None``: all).
      logprob_chunk_size: jrlhf's ``logprob_chunk_size`` of DPO/SFT (vocabulary chunk of the log-softmax; ``None``:
        full logits); set for real vocabularies so that ``[B, T, V]`` float32 logits are not materialised.
    """

    name: str
    hf_config: dict
    batch_size: int
    prompt_length: int
    completion_length: int
    num_generations: int
    dtype: str
    accelerator: bool
    description: str
    scan_unroll: int = 1
    generation_rows: int | None = None
    generation_new_tokens: int | None = None
    remat: str = "none"
    model_path: str | None = None
    benchmarks: tuple | None = None
    logprob_chunk_size: int | None = None

    @property
    def gen_rows(self) -> int:
        """Rows of the generation benchmarks."""
        return self.generation_rows or self.batch_size

    @property
    def gen_new_tokens(self) -> int:
        """New tokens per row of the generation benchmarks."""
        return self.generation_new_tokens or self.completion_length

    @property
    def sequence_length(self) -> int:
        """Padded prompt + completion length ``T = P + N``."""
        return self.prompt_length + self.completion_length

    @property
    def num_prompts(self) -> int:
        """GRPO prompts per step."""
        return self.batch_size // self.num_generations

    def replace(self, **changes) -> "BenchSize":
        """A copy with ``changes`` (e.g. ``batch_size=4``), validated again."""
        return dataclasses.replace(self, **changes)

    def __post_init__(self):
        for field in ("batch_size", "prompt_length", "completion_length", "num_generations"):
            if getattr(self, field) < 1:
                raise ValueError(f"BenchSize.{field}={getattr(self, field)}: must be >= 1")
        if self.batch_size % self.num_generations:
            raise ValueError(f"BenchSize.batch_size={self.batch_size} must be a multiple of "
                             f"num_generations={self.num_generations} (GRPO rows = prompts x generations)")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"BenchSize.dtype={self.dtype!r}: use 'float32' or 'bfloat16'")
        if self.hf_config.get("vocab_size", 0) < 16:
            raise ValueError("BenchSize.hf_config needs a vocab_size of at least 16 (special tokens + words)")


def _llama(vocab, hidden, layers, heads, kv_heads, mlp, max_positions=1024, tie=False):
    return dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=hidden // heads, max_position_embeddings=max_positions, rope_theta=10000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=tie, attention_bias=False, mlp_bias=False,
                initializer_range=0.02)


SIZES: dict[str, BenchSize] = {
    "mini": BenchSize(
        name="mini", hf_config=_llama(64, 32, 1, 2, 1, 64, max_positions=64), batch_size=4, prompt_length=6,
        completion_length=5, num_generations=2, dtype="float32", accelerator=False,
        description="Llama, hidden 32, 1 layer, vocab 64: the harness's own tests (times mean nothing)"),
    "tiny": BenchSize(
        name="tiny", hf_config=_llama(512, 128, 4, 4, 2, 384), batch_size=8, prompt_length=64,
        completion_length=64, num_generations=4, dtype="float32", accelerator=False,
        description="Llama, hidden 128, 4 layers, 4 heads (2 kv), mlp 384, vocab 512 (0.92M params)",
        scan_unroll=4),
    "small": BenchSize(
        name="small", hf_config=_llama(8192, 512, 8, 8, 4, 1536), batch_size=8, prompt_length=64,
        completion_length=64, num_generations=4, dtype="float32", accelerator=False,
        description="Llama, hidden 512, 8 layers, 8 heads (4 kv), mlp 1536, vocab 8192 (~34M params)",
        scan_unroll=8),
    "gpt2-125m": BenchSize(
        name="gpt2-125m",
        hf_config=dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_inner=3072,
                       n_positions=1024, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                       tie_word_embeddings=True, initializer_range=0.02, resid_pdrop=0.0, embd_pdrop=0.0,
                       attn_pdrop=0.0),
        batch_size=32, prompt_length=256, completion_length=256, num_generations=8, dtype="bfloat16",
        accelerator=True, description="GPT-2 small (124M params), bf16; one GPU/TPU"),
    "qwen2-0.5b": BenchSize(
        name="qwen2-0.5b",
        hf_config=dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                       max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, use_sliding_window=False, initializer_range=0.02),
        batch_size=16, prompt_length=256, completion_length=512, num_generations=8, dtype="bfloat16",
        accelerator=True, description="Qwen2-0.5B shape (494M params), bf16; one GPU/TPU",
        generation_rows=64, generation_new_tokens=512),
    "qwen2-1.5b": BenchSize(
        name="qwen2-1.5b",
        hf_config=dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                       num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                       max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, use_sliding_window=False, initializer_range=0.02),
        batch_size=16, prompt_length=256, completion_length=512, num_generations=8, dtype="bfloat16",
        accelerator=True, description="Qwen2-1.5B shape (1.54B params), bf16, full remat; one GPU/TPU",
        generation_rows=64, generation_new_tokens=512, remat="full"),
}

# Benchmarks a real checkpoint supports: those on the causal LM alone (no value or score head in the checkpoint).
LM_BENCHMARKS = ("dpo_step", "grpo_update_step", "sft_step", "generate_greedy", "generate_sampled")


def real_size(path: str, name: str = "smollm2-135m", batch_size: int = 8, prompt_length: int = 256,
              completion_length: int = 256) -> BenchSize:
    """A size on the real Hugging Face checkpoint at ``path`` (its ``config.json`` gives the shapes): float32,
    ``batch_size`` rows of ``prompt_length + completion_length`` tokens (DPO: 8 pairs x 512 tokens), generation of
    ``completion_length`` new tokens per row. Raises ``ValueError`` when ``path`` has no ``config.json``."""
    import json
    import os

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"--model-path {path!r}: no config.json there; pass a Hugging Face checkpoint folder "
                         "(e.g. the converted SmolLM2-135M-Instruct)")
    with open(config_path) as f:
        hf = json.load(f)
    keep = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta",
            "rope_parameters", "rms_norm_eps", "tie_word_embeddings", "attention_bias", "mlp_bias",
            "initializer_range", "hidden_act")
    hf_config = {k: hf[k] for k in keep if k in hf}
    layers = hf_config.get("num_hidden_layers", 0)
    return BenchSize(
        name=name, hf_config=hf_config, batch_size=batch_size, prompt_length=prompt_length,
        completion_length=completion_length, num_generations=4, dtype="float32", accelerator=False,
        description=(f"real checkpoint {os.path.basename(os.path.normpath(path))}: {hf_config.get('model_type')}, "
                     f"hidden {hf_config.get('hidden_size')}, {layers} layers, vocab {hf_config.get('vocab_size')}"),
        scan_unroll=1, model_path=path, benchmarks=LM_BENCHMARKS, logprob_chunk_size=8192)


def get_size(name: str, scan_unroll: int | None = None, model_path: str | None = None,
             remat: str | None = None) -> BenchSize:
    """The :class:`BenchSize` called ``name`` (with ``scan_unroll`` / ``remat`` replaced unless ``None``); with
    ``model_path`` the size of that real checkpoint (:func:`real_size`, named ``name``). An unknown name is an error
    listing the valid ones."""
    if model_path is not None:
        size = real_size(model_path, name=name)
    elif name not in SIZES:
        raise ValueError(f"--size {name!r} is not defined; choose one of {', '.join(SIZES)} (or give --model-path "
                         "for a real checkpoint)")
    else:
        size = SIZES[name]
    size = size if scan_unroll is None else size.replace(scan_unroll=scan_unroll)
    return size if remat is None else size.replace(remat=remat)


# ---------------------------------------------------------------------------------------------------- FLOPs


@dataclasses.dataclass(frozen=True)
class Shape:
    """The architecture numbers the FLOP count needs (read from a :class:`jrlhf.models.ModelConfig`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    gated_mlp: bool

    @classmethod
    def of(cls, config: Any) -> "Shape":
        """From a ``jrlhf.models.ModelConfig``."""
        return cls(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                   intermediate_size=config.intermediate_size, num_layers=config.num_layers,
                   num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                   gated_mlp=config.mlp == "gated")


def matmul_weights(shape: Shape, lm_head: bool = True) -> int:
    """Number of weights that multiply activations per token: attention q/k/v/o and MLP of every layer, plus the
    ``[V, H]`` LM head when ``lm_head`` (embedding lookups are not matmuls)."""
    h, n, k, d, f = shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.intermediate_size
    attention = h * n * d + 2 * h * k * d + n * d * h
    mlp = (3 if shape.gated_mlp else 2) * h * f
    return shape.num_layers * (attention + mlp) + (shape.vocab_size * h if lm_head else 0)


def forward_flops(shape: Shape, rows: int, queries: int, keys: int | None = None, lm_head: bool = True) -> float:
    """FLOPs of one forward over ``rows`` sequences of ``queries`` new tokens attending to ``keys`` keys each
    (``keys`` default ``queries``: a full causal forward)."""
    keys = queries if keys is None else keys
    weights = 2.0 * matmul_weights(shape, lm_head) * rows * queries
    attention = 4.0 * shape.num_layers * shape.num_heads * shape.head_dim * rows * queries * keys
    return weights + attention


def train_flops(shape: Shape, rows: int, length: int, frozen_forwards: int = 0) -> float:
    """FLOPs of one training step on ``[rows, length]``: forward + backward (3 forwards) plus ``frozen_forwards``
    forwards of a frozen model of the same shape (e.g. DPO's reference)."""
    return (3 + frozen_forwards) * forward_flops(shape, rows, length)


def generation_flops(shape: Shape, rows: int, prompt_length: int, new_tokens: int,
                     prefill_rows: int | None = None) -> float:
    """FLOPs of sampling ``new_tokens`` tokens for ``rows`` sequences from prompts of ``prompt_length`` over a KV
    cache: the prefill forward of ``prefill_rows`` distinct prompts (default ``rows``; fewer when samples of a
    prompt share its prefill), then one single-token forward per row and new token after the first, attending to
    the cache so far."""
    total = forward_flops(shape, rows if prefill_rows is None else prefill_rows, prompt_length)
    for step in range(1, new_tokens):
        total += forward_flops(shape, rows, 1, prompt_length + step)
    return total


def parameter_count(shape: Shape, tied: bool) -> int:
    """Parameters of the model (norm scales and biases left out): matmul weights plus the embedding (counted once
    when tied)."""
    embed = shape.vocab_size * shape.hidden_size
    return matmul_weights(shape, lm_head=not tied) + embed


def shrink(size: BenchSize) -> BenchSize:
    """The same architecture family, dtype, remat and benchmark layout as ``size`` at tiny shapes, run on the CPU:
    how an accelerator plan (``make bench-gpu``) is checked end to end on a machine without one."""
    hf = dict(size.hf_config)
    if hf.get("model_type") == "gpt2":
        hf.update(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=128)
    else:
        hf.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    return size.replace(name=f"{size.name}-shrunk", hf_config=hf, batch_size=4, prompt_length=16,
                        completion_length=16, num_generations=2, accelerator=False, generation_rows=4,
                        generation_new_tokens=16,
                        description=f"{size.name}'s layout at tiny shapes (hidden 64, 2 layers), {size.dtype}; CPU")
