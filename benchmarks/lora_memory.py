"""What XLA plans for one DPO step: full fine-tuning with a reference copy vs LoRA with the base as the reference.

    python -m benchmarks.lora_memory CONFIG_JSON|SIZE [--pairs 8] [--length 512] [--r 16] [--remat full]
        [--dtype float32] [--base-dtype float32]

CONFIG_JSON is a Hugging Face ``config.json`` (e.g. SmolLM2-135M-Instruct's), SIZE a name of
``benchmarks.sizes.SIZES`` with a Hugging Face config (``qwen2-0.5b``, ``qwen2-1.5b``). ``--dtype`` is the compute
dtype of both settings; full fine-tuning keeps float32 params (master weights) and AdamW state, LoRA stores the
frozen base in ``--base-dtype`` and the adapters and their AdamW state in float32. Nothing is allocated: the step is
lowered on abstract shapes (random weights would give the same plan) and compiled for one device, and
``compiled.memory_analysis()`` is printed per setting: arguments (params, optimizer state, frozen reference, batch),
temporaries, outputs, aliased (donated) bytes and their total (``arguments + temporaries + outputs - aliased``).
One JSON line per setting, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np


def _abstract_state(params, opt, shardings):
    from jrlhf.step import TrainState

    sds = lambda x, s: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=s)  # noqa: E731
    opt_abs = jax.eval_shape(opt.init, params)
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step),
        params=jax.tree.map(sds, params, shardings.params),
        opt_state=jax.tree.map(sds, opt_abs, shardings.opt_state),
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=shardings.rng),
        algo_state={},
        nonfinite_count=jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.nonfinite_count))


def measure(hf_config: dict, *, lora_r: int | None, pairs: int, length: int, remat: str, dtype: str = "float32",
            base_dtype: str = "float32") -> dict:
    from jrlhf.algorithms import dpo
    from jrlhf.models import ModelConfig, abstract_params, build_model, logical_axes
    from jrlhf.models.lora import LoraConfig, trainable_mask
    from jrlhf.sharding import MeshConfig, make_mesh, replicated
    from jrlhf.step import OptimizerConfig, make_optimizer, train_state_shardings

    config = ModelConfig.from_hf_dict(hf_config, remat=remat, dtype=dtype,
                                      param_dtype=base_dtype if lora_r else "float32",
                                      lora=LoraConfig(r=lora_r, alpha=2 * lora_r) if lora_r else None)
    model = build_model(config, "lm")
    params = abstract_params(model)
    specs = logical_axes(model)
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    trainable = trainable_mask if lora_r else None
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-5), params, trainable=trainable, param_specs=specs)
    shardings = train_state_shardings(params, opt, mesh=mesh, param_specs=specs)
    state = _abstract_state(params, opt, shardings)
    algo = dpo.make(model, dpo.Config(beta=0.1))
    frozen = None
    if algo.frozen_type is not None:  # full fine-tuning: the reference is a second copy of the weights
        rep = replicated(mesh)
        frozen = dpo.Frozen(ref_params=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                                                    params))
    ids = jax.ShapeDtypeStruct((pairs, length), jnp.int32)
    batch = {f"{side}_{key}": ids for side in ("chosen", "rejected")
             for key in ("input_ids", "attention_mask", "loss_mask")}
    step = algo.train_step(opt, mesh, state_shardings=shardings, trainable=trainable)
    compiled = step.lower(state, batch, frozen).compile()
    mem = compiled.memory_analysis()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    n_trained = sum(int(np.prod(x.shape)) for x, t in zip(jax.tree.leaves(params),
                                                          jax.tree.leaves(trainable(params) if trainable else
                                                                          jax.tree.map(lambda _: True, params)))
                    if t)
    out = {"setting": f"LoRA r={lora_r}, base as reference" if lora_r else "full fine-tune, reference copy",
           "params": n_params, "trained": n_trained,
           "arguments": mem.argument_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
           "outputs": mem.output_size_in_bytes, "aliased": mem.alias_size_in_bytes}
    out["total"] = out["arguments"] + out["temporaries"] + out["outputs"] - out["aliased"]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config_json", help="a Hugging Face config.json, or a benchmarks.sizes name")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--remat", default="full")
    parser.add_argument("--dtype", default="float32", help="compute dtype of both settings")
    parser.add_argument("--base-dtype", default="float32", help="storage dtype of LoRA's frozen base")
    args = parser.parse_args(argv)
    from benchmarks.sizes import SIZES

    if args.config_json in SIZES:
        hf_config = SIZES[args.config_json].hf_config
    else:
        with open(args.config_json) as f:
            hf_config = json.load(f)
    rows = []
    for lora_r in (None, args.r):
        row = measure(hf_config, lora_r=lora_r, pairs=args.pairs, length=args.length, remat=args.remat,
                      dtype=args.dtype, base_dtype=args.base_dtype)
        print(json.dumps(row), flush=True)
        rows.append(row)
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    print("\n| DPO step | trained params | arguments GiB | temporaries GiB | outputs GiB | aliased GiB | total GiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['setting']} | {r['trained']:,} of {r['params']:,} | {gib(r['arguments'])} | "
              f"{gib(r['temporaries'])} | {gib(r['outputs'])} | {gib(r['aliased'])} | {gib(r['total'])} |")


if __name__ == "__main__":
    main()
