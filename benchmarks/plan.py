"""The plan of a run and the dry-run checks: configs, shapes, FLOPs, and an abstract trace of every jrlhf step.

``--dry-run`` builds everything a run needs except weights and timings: the model config of both stacks (jrlhf's
``ModelConfig`` and the ``transformers`` config from the same dict, its parameters counted on the ``meta`` device),
the batch shapes of every benchmark, their model FLOPs, and ``jax.eval_shape`` of each jrlhf step function and of the
sampler on abstract parameters (the programs are traced, so a shape or sharding error shows, but nothing is
allocated or compiled). This is how the GPU/TPU sizes are checked on a CPU-only machine.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks import cases
from benchmarks.sizes import BenchSize, Shape, parameter_count


def batch_shapes(name: str, size: BenchSize) -> dict:
    """The jrlhf batch arrays of benchmark ``name`` and their shapes."""
    b, p, n, t = size.batch_size, size.prompt_length, size.completion_length, size.sequence_length
    if name in ("dpo_step", "reward_step"):
        return {f"{side}_{key}": [b, t] for side in ("chosen", "rejected")
                for key in ("input_ids", "attention_mask", "loss_mask")}
    if name == "sft_step":
        return {key: [b, t] for key in ("input_ids", "attention_mask", "loss_mask")}
    if name in ("grpo_update_step", "grpo_whole_step", "ppo_update_step"):
        out = {key: [b, t] for key in ("input_ids", "attention_mask", "loss_mask")}
        out.update(old_logps=[b, n], scores=[b], truncated=[b])
        if name == "ppo_update_step":
            out.update(ref_logps=[b, n], old_values=[b, n])
        if name == "grpo_whole_step":
            out["prompt_ids (sampler input)"] = [size.num_prompts, p]
        return out
    rows = size.gen_rows
    return {"prompt_ids": [rows, p], "prompt_mask": [rows, p], "tokens (output)": [rows, size.gen_new_tokens]}


def build_plan(size: BenchSize, names, shape: Shape) -> dict:
    """Per benchmark: what the reference is, the batch shapes and the model FLOPs of one step."""
    references = {name: ", ".join(cases.REFERENCE_LABELS[(name, system)] for system in cases.SYSTEMS[name]
                                  if system != "jrlhf") for name in cases.SYSTEMS}
    tied = bool(size.hf_config.get("tie_word_embeddings", False))
    return {
        "parameters": parameter_count(shape, tied),
        "benchmarks": [{"name": name, "reference": references[name], "batch": batch_shapes(name, size),
                        "flops_per_step": cases.flops(name, size, shape)} for name in names],
    }


def _abstract_state(model, optimizer, algo_state=None):
    import jax
    import jax.numpy as jnp

    from jrlhf.models import abstract_params
    from jrlhf.step import TrainState

    params = abstract_params(model)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    algo = {} if algo_state is None else jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                                                       algo_state)
    return TrainState(step=scalar, params=params, opt_state=jax.eval_shape(optimizer.init, params),
                      rng=jax.ShapeDtypeStruct((2,), jnp.uint32), algo_state=algo, nonfinite_count=scalar), params


def _sds(shape, dtype):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def abstract_check(size: BenchSize, names) -> dict:
    """``jax.eval_shape`` of every jrlhf step of ``names`` (and the sampler) on abstract parameters: returns per
    benchmark the metric names the step produces (or the sampler's output shapes) and the trace seconds; raises on
    a shape error."""
    import jax
    import jax.numpy as jnp

    from benchmarks import data as bdata
    from benchmarks.jrlhf_side import grpo_config, ppo_config
    from jrlhf import sampling
    from jrlhf.algorithms import dpo, grpo, ppo, reward, sft
    from jrlhf.algorithms.base import preference_globals
    from jrlhf.models import build_model, logical_axes
    from jrlhf.sharding import make_mesh
    from jrlhf.step import (OptimizerConfig, make_onpolicy_update, make_optimizer, make_train_step,
                            train_state_shardings)

    config = bdata.model_config(size)
    mesh = make_mesh()
    b, p, n, t = size.batch_size, size.prompt_length, size.completion_length, size.sequence_length
    i32, f32 = jnp.int32, jnp.float32
    out = {}
    for name in names:
        start = time.perf_counter()
        head = {"reward_step": "score", "ppo_update_step": "lm+value"}.get(name, "lm")
        model = build_model(config, head)
        specs = logical_axes(model)
        optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-6), param_specs=specs)
        algo_state = {"kl_coef": np.float32(0.05)} if name == "ppo_update_step" else None
        state, params = _abstract_state(model, optimizer, algo_state)
        shardings = train_state_shardings(params, optimizer, mesh=mesh, param_specs=specs, algo_state=algo_state)
        frozen = None
        if name in ("generate_greedy", "generate_sampled", "grpo_whole_step"):
            rows = size.num_prompts if name == "grpo_whole_step" else size.gen_rows
            samples = size.num_generations if name == "grpo_whole_step" else 1
            new = n if name == "grpo_whole_step" else size.gen_new_tokens

            def sample(params, ids, mask, key):
                return sampling.generate(model, params, ids, mask, key, max_new_tokens=new, num_samples=samples,
                                         temperature=1.0, eos_token_id=bdata.EOS, pad_token_id=bdata.PAD)

            shapes = jax.eval_shape(sample, params, _sds([rows, p], i32), _sds([rows, p], i32),
                                    jax.eval_shape(lambda: jax.random.key(0)))
            out_shapes = {k: list(v.shape) for k, v in shapes._asdict().items()}
            if name != "grpo_whole_step":
                out[name] = {"outputs": out_shapes, "trace_s": time.perf_counter() - start}
                continue
        if name in ("dpo_step", "reward_step"):
            batch = {f"{side}_{key}": _sds([b, t], i32) for side in ("chosen", "rejected")
                     for key in ("input_ids", "attention_mask", "loss_mask")}
            loss = (dpo.make_loss_fn(model, dpo.Config()) if name == "dpo_step"
                    else reward.make_loss_fn(model, reward.Config()))
            step = make_train_step(loss, optimizer, mesh, state_shardings=shardings, prepare_batch=preference_globals)
            frozen = dpo.Frozen(ref_params=params) if name == "dpo_step" else None
        elif name == "sft_step":
            batch = {key: _sds([b, t], i32) for key in ("input_ids", "attention_mask", "loss_mask")}
            step = make_train_step(sft.make_loss_fn(model, sft.Config()), optimizer, mesh, state_shardings=shardings)
        else:
            batch = {key: _sds([b, t], i32) for key in ("input_ids", "attention_mask", "loss_mask")}
            batch.update(old_logps=_sds([b, n], f32), scores=_sds([b], f32), truncated=_sds([b], i32))
            if name == "ppo_update_step":
                algo = ppo_config(size)
                batch.update(ref_logps=_sds([b, n], f32), old_values=_sds([b, n], f32))
                step = make_onpolicy_update(ppo.make_loss_fn(model, algo), optimizer, mesh,
                                            state_shardings=shardings, num_epochs=1, num_minibatches=1,
                                            prepare_batch=ppo.make_prepare_batch(algo),
                                            update_algo_state=ppo.make_update_algo_state(algo, b))
            else:
                algo = grpo_config(size)
                step = make_onpolicy_update(grpo.make_loss_fn(model, algo), optimizer, mesh,
                                            state_shardings=shardings, num_epochs=1, num_minibatches=1,
                                            prepare_batch=grpo.make_prepare_batch(algo))
        new_state, metrics = step.jitted(frozen).eval_shape(state, batch, frozen)
        record = {"metrics": sorted(metrics), "trace_s": time.perf_counter() - start}
        if name == "grpo_whole_step":
            record["sampler_outputs"] = out_shapes
        out[name] = record
    return out


def torch_parameter_count(size: BenchSize) -> int | None:
    """Parameters of the ``transformers`` causal LM built from the size's dict on the ``meta`` device (nothing
    allocated), or None when torch/transformers are missing."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        return None
    hf = dict(size.hf_config)
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def jrlhf_parameter_count(size: BenchSize) -> int:
    """Parameters of jrlhf's causal LM of the size (abstract: nothing allocated)."""
    from benchmarks import data as bdata
    from jrlhf.models import abstract_params, build_model

    import jax

    params = abstract_params(build_model(bdata.model_config(size), "lm"))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
