"""Seconds to save (and restore) a full training checkpoint: params + AdamW state of a Hugging Face model.

    python -m benchmarks.save_time MODEL_DIR [--out DIR] [--repeats 3]

Prints one JSON line per repeat: ``blocking_s`` (the loop is paused: device-to-host copy before the async write
starts), ``total_s`` (until the checkpoint is complete on disk, what a preemption grace period must cover),
``restore_s`` and the checkpoint's size. Measures :class:`jrlhf.checkpoint.Checkpointer`, the class the loop uses.
The AdamW moments are filled with random values (as after some training: zeros compress to almost nothing).
``--random-init`` builds the model from MODEL_DIR's config.json alone (same shapes, no weights file needed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import jax


def main(argv=None) -> None:
    from jrlhf.checkpoint import Checkpointer, state_nbytes
    from jrlhf.models import from_pretrained
    from jrlhf.sharding import MeshConfig, make_mesh
    from jrlhf.models import logical_axes
    from jrlhf.step import OptimizerConfig, init_train_state, make_optimizer

    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("--out", default=None, help="folder to write into (default: a temporary folder)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--random-init", action="store_true", help="random weights of MODEL_DIR/config.json's shapes")
    args = p.parse_args(argv)

    if args.random_init:
        from jrlhf.models import ModelConfig, init_model
        from jrlhf.models.checkpoint import read_hf_config

        model, params = init_model(ModelConfig.from_hf_dict(read_hf_config(args.model_dir)), jax.random.PRNGKey(1))
    else:
        model, params = from_pretrained(args.model_dir)
    mesh = make_mesh(MeshConfig())
    optimizer = make_optimizer(OptimizerConfig(name="adamw"), params, param_specs=logical_axes(model))
    state, _ = init_train_state(params, optimizer, jax.random.PRNGKey(0), mesh=mesh, param_specs=logical_axes(model))
    keys = iter(jax.random.split(jax.random.PRNGKey(2), len(jax.tree.leaves(state.opt_state))))

    def fill(x):
        key = next(keys)
        if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) and x.ndim:
            return (1e-3 * jax.random.normal(key, x.shape, x.dtype)).astype(x.dtype)
        return x

    state = state.replace(opt_state=jax.tree.map(fill, state.opt_state))
    jax.block_until_ready(state)
    out = args.out or tempfile.mkdtemp(prefix="jrlhf_save_time_")
    meta = {"step": 0, "data": {}, "config": {}, "model_config": {}}
    for repeat in range(args.repeats):
        directory = os.path.join(out, f"r{repeat}")
        shutil.rmtree(directory, ignore_errors=True)
        ckpt = Checkpointer(directory, keep=2)
        t0 = time.perf_counter()
        ckpt.save(1, state, meta)
        blocking = time.perf_counter() - t0
        ckpt.wait()
        total = time.perf_counter() - t0
        t0 = time.perf_counter()
        restored, _ = ckpt.restore(state)
        jax.block_until_ready(restored)
        restore = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory) for f in fs)
        ckpt.close()
        print(json.dumps({"repeat": repeat, "devices": f"{jax.device_count()}x {jax.devices()[0].platform}",
                          "state_mib": round(state_nbytes(state) / 2**20), "on_disk_mib": round(size / 2**20),
                          "blocking_s": round(blocking, 2), "total_s": round(total, 2),
                          "restore_s": round(restore, 2)}), flush=True)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
