"""The one training loop: data -> step -> metrics -> eval -> checkpoint, for every algorithm.

``train(config)`` (also ``jrlhf.train``) takes a :class:`jrlhf.config.RunConfig`, a nested dict, or a YAML path, and
returns a summary dict (final eval metrics, steps, paths). Everything needed to continue a run is checkpointed:
params, optimizer state, step, RNG, algorithm state, mutable frozen params (TR-DPO's reference), the data iterator's
position and the resolved config. SIGTERM saves before exiting (after any in-flight save finishes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from jrlhf import distributed
from jrlhf.algorithms import get_algorithm
from jrlhf.algorithms.base import RunContext
from jrlhf.checkpoint import Checkpointer
from jrlhf.config import ConfigError, RunConfig, build_config, load_config, to_dict
from jrlhf.data import BatchIterator, PromptBatch, load_tokenizer, make_batch_iterator
from jrlhf.errors import NonFiniteLossError
from jrlhf.metrics import MetricsWriter, to_python_scalars
from jrlhf.models import from_pretrained, init_model, logical_axes, save_pretrained, tiny_config
from jrlhf.sharding import MeshConfig, batch_shardings, logical_to_shardings, make_mesh, put_global, replicated
from jrlhf.step import (NonFiniteError, NonFiniteMonitor, OptimizerConfig, init_train_state, make_onpolicy_update,
                        make_optimizer, make_schedule, make_train_step)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _as_config(config) -> RunConfig:
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, dict):
        return build_config(config)
    if isinstance(config, str):
        return load_config(config)
    raise ConfigError(f"train() takes a RunConfig, a dict or a YAML path, not {type(config).__name__}")


def _dtype(name: str, key: str):
    if name not in DTYPES:
        raise ConfigError(f"{key}='{name}' is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)


def resolve_tokenizer(cfg: RunConfig):
    """The run's tokenizer: ``data.tokenizer`` when given, else the model's own.

    The model's own is the tokenizer saved in ``train.init_from`` / ``model.path``, or the shipped character
    tokenizer for a fresh random model (neither set). ``data.pad_token`` is passed to
    :func:`jrlhf.data.load_tokenizer`.

    Raises:
      ConfigError: the pretrained model's folder has no tokenizer files and ``data.tokenizer`` is not set; or an
        explicit ``data.tokenizer`` maps tokens to other ids than the tokenizer saved with the pretrained model
        (its ids would index the wrong embedding rows).
    """
    d = cfg.data
    path = cfg.train.init_from or cfg.model.path
    key = "train.init_from" if cfg.train.init_from else "model.path"
    if path and os.path.isdir(path) and d.tokenizer is None:
        if not _has_tokenizer(path):
            raise ConfigError(f"{key}='{path}' has no tokenizer files ({', '.join(TOKENIZER_FILES)}); set "
                              "data.tokenizer to the folder of the model's tokenizer")
        return load_tokenizer(path, pad_token=d.pad_token)
    tokenizer = load_tokenizer(d.tokenizer or "char", pad_token=d.pad_token)
    if path and os.path.isdir(path) and _has_tokenizer(path):
        own = load_tokenizer(path, pad_token=d.pad_token)
        if own.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"data.tokenizer='{d.tokenizer}' ({len(tokenizer)} tokens) is not the tokenizer saved "
                              f"with the model in {key}='{path}' ({len(own)} tokens): its ids would index the wrong "
                              "embedding rows; leave data.tokenizer unset to use the model's own")
    return tokenizer


def check_vocabulary(tokenizer, model, where: str = "the model") -> None:
    """Raises :class:`ConfigError` when the tokenizer has ids the model's embedding has no row for
    (``len(tokenizer) > model.config.vocab_size``). A smaller tokenizer is fine (embeddings are often padded)."""
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but {where} has an embedding of vocab_size="
                          f"{vocab}: use the model's own tokenizer (leave data.tokenizer unset) or a model whose "
                          "vocabulary holds every token id")


def build_model(cfg: RunConfig, tokenizer, head: str, rng, path: str | None = None):
    """The model to train: ``path`` (or ``train.init_from`` / ``model.path``) loaded from a local HF directory, else
    a fresh ``model.family`` tiny config with ``model.overrides``. A head missing from the checkpoint (a score or
    value head on an SFT model) is initialised from ``rng``."""
    m = cfg.model
    dtype, param_dtype = _dtype(m.dtype, "model.dtype"), _dtype(m.param_dtype, "model.param_dtype")
    path = path or cfg.train.init_from or m.path
    if path:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model directory '{path}' does not exist (model.path / train.init_from must be "
                                    "a local Hugging Face directory with config.json)")
        model, params = from_pretrained(path, dtype=dtype, param_dtype=param_dtype, head=head, head_rng=rng,
                                        remat=m.remat, scan_unroll=m.scan_unroll)
        check_vocabulary(tokenizer, model, f"the model in '{path}'")
        return model, params
    overrides = dict(m.overrides)
    overrides.setdefault("vocab_size", len(tokenizer))
    overrides.setdefault("pad_token_id", tokenizer.pad_token_id)
    overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
    config = tiny_config(m.family, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                         scan_unroll=m.scan_unroll, **overrides)
    model_and_params = init_model(config, rng, head=head)
    check_vocabulary(tokenizer, model_and_params[0], "the fresh model (model.overrides)")
    return model_and_params


def _optimizer_config(cfg: RunConfig, updates_per_step: int = 1) -> OptimizerConfig:
    """The optimizer settings; ``updates_per_step`` optimizer updates per loop step (an on-policy update's epochs x
    mini-batches) scale the schedule's ``warmup_steps`` and ``total_steps``, which the config counts in loop steps."""
    o = cfg.optim
    return OptimizerConfig(name=o.name, learning_rate=o.learning_rate, schedule=o.schedule,
                           warmup_steps=o.warmup_steps * updates_per_step,
                           total_steps=max(cfg.train.steps, 1) * updates_per_step,
                           weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm, b1=o.b1, b2=o.b2, eps=o.eps)


def _make_iterator(cfg: RunConfig, setup, tokenizer, kind: str):
    d = cfg.data
    common = dict(seed=cfg.train.seed, shuffle=d.shuffle, drop_remainder=True)
    if setup.collate is not None:
        return BatchIterator(setup.train_data.examples, d.batch_size, setup.collate, **common)
    max_length = d.max_prompt_length if kind == "prompt" else d.max_length
    return make_batch_iterator(setup.train_data, d.batch_size, pad_id=tokenizer.pad_token_id,
                               max_length=max_length, buckets=d.buckets or None,
                               packing=d.packing and kind == "sft", **common)


def count_tokens(batch) -> int:
    """Non-pad tokens of a host batch (prompt + completion; chosen + rejected)."""
    if isinstance(batch, PromptBatch):
        return int(np.sum(batch.prompt_mask))
    return int(sum(np.sum(v) for k, v in batch.items() if k.endswith("attention_mask")))


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _to_device(batch, mesh):
    arrays = batch.arrays() if isinstance(batch, PromptBatch) else batch
    if jax.process_count() > 1:
        return distributed.global_batch_from_local(arrays, mesh)
    return put_global(arrays, batch_shardings(arrays, mesh))


def _host_params(params):
    return jax.tree.map(np.asarray, distributed.process_allgather(params))


def train(config) -> dict:
    """Runs (or resumes) one training job; returns ``{"step", "eval", "run_dir", "hf_dir", "preempted"}``.

    Raises:
      ConfigError / DataError / CheckpointError: bad settings, data or checkpoints (one-line messages).
      NonFiniteLossError: the loss or gradients became non-finite; the last good checkpoint is kept.
    """
    cfg = _as_config(config)
    distributed.initialize()
    main = distributed.is_main_process()
    t = cfg.train
    run_dir = os.path.abspath(t.output_dir)
    algo_mod = get_algorithm(cfg.algorithm)
    kind = algo_mod.DATA_KIND

    mesh = make_mesh(MeshConfig(data=cfg.mesh.data, fsdp=cfg.mesh.fsdp, tensor=cfg.mesh.tensor))
    tokenizer = resolve_tokenizer(cfg)
    root_rng = jax.random.PRNGKey(t.seed)
    model_rng, state_rng, algo_rng, collect_rng = jax.random.split(root_rng, 4)
    model, params = build_model(cfg, tokenizer, algo_mod.head(cfg), model_rng)

    def load_extra(path, head):
        return build_model(cfg, tokenizer, head, algo_rng, path=path)

    run = RunContext(cfg=cfg, model=model, params=params, tokenizer=tokenizer, mesh=mesh, rng=algo_rng,
                     load_model=load_extra)
    setup = algo_mod.setup(run)
    param_specs = logical_axes(model)
    if setup.params is not None:  # e.g. PPO's policy + separate critic
        params, param_specs = setup.params, setup.param_specs
    updates_per_step = setup.onpolicy.num_epochs * setup.onpolicy.num_minibatches if setup.onpolicy else 1
    optim_cfg = _optimizer_config(cfg, updates_per_step)
    optimizer = make_optimizer(optim_cfg, params, trainable=setup.trainable, param_specs=param_specs)
    state, state_sh = init_train_state(params, optimizer, state_rng, mesh=mesh, param_specs=param_specs,
                                       algo_state=setup.algo_state)
    frozen, frozen_sh = None, None
    if setup.frozen is not None:
        if setup.frozen_specs is not None:
            frozen_sh = logical_to_shardings(setup.frozen_specs, mesh, shapes=setup.frozen)
        else:
            frozen_sh = jax.tree.map(lambda _: replicated(mesh), setup.frozen)
        frozen = put_global(setup.frozen, frozen_sh, copy=True)
        setup.frozen = None  # the placed copy is the one in use; drop the host one (a whole reference model)
    run.params = None
    del params

    common = dict(state_shardings=state_sh, frozen_shardings=frozen_sh, num_microbatches=t.num_microbatches,
                  prepare_batch=setup.prepare_batch, update_algo_state=setup.update_algo_state,
                  trainable=setup.trainable, learning_rate_fn=make_schedule(optim_cfg))
    if setup.onpolicy is None:
        step_fn = make_train_step(setup.loss_fn, optimizer, mesh, **common)
    else:
        step_fn = make_onpolicy_update(setup.loss_fn, optimizer, mesh, num_epochs=setup.onpolicy.num_epochs,
                                       num_minibatches=setup.onpolicy.num_minibatches, **common)

    iterator = _make_iterator(cfg, setup, tokenizer, kind)
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=t.keep_checkpoints)
    model_meta = dataclasses.asdict(model.config) if dataclasses.is_dataclass(model.config) else {}
    model_meta = json.loads(json.dumps(model_meta, default=str))
    mutable_frozen = setup.after_step is not None and frozen is not None

    def bundle(state, frozen):
        return {"train_state": state, "frozen": frozen} if mutable_frozen else {"train_state": state}

    start_step = 0
    if t.resume and ckpt.latest_step() is not None:
        restored, meta = ckpt.restore(bundle(state, frozen), expect_model=model_meta)
        state = restored["train_state"]
        if mutable_frozen:
            frozen = restored["frozen"]
        iterator.load_state_dict(meta["data"])
        start_step = int(meta["step"])
        if main:
            print(f"[resume] from step {start_step} in {ckpt.directory}", flush=True)

    resolved = to_dict(cfg)
    if main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(resolved, f, sort_keys=False)
    writer = MetricsWriter(run_dir, tensorboard=t.tensorboard, enabled=main)
    monitor = NonFiniteMonitor()

    def save(step, state, frozen, force=False):
        meta = {"step": int(step), "data": iterator.state_dict(), "config": resolved, "model_config": model_meta}
        ckpt.save(step, bundle(state, frozen), meta, force=force)

    def evaluate(step, state, frozen):
        if setup.evaluate is None:
            return {}
        result = setup.evaluate(state.params, frozen)
        writer.write(step, result, split="eval")
        if main:
            body = " ".join(f"{k}={v:.4g}" for k, v in result.items())
            print(f"[eval step {step}] {body}", flush=True)
        return result

    bar = None
    if main and t.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=start_step, desc=cfg.algorithm, dynamic_ncols=True, file=sys.stdout,
                   mininterval=1.0)
    preempted = False
    step = start_step
    tokens_since, time_since = 0, time.perf_counter()
    eval_result = {}
    try:
        with _Preemption() as preemption:
            while step < t.steps:
                host_batch = next(iterator)
                host_metrics = {}
                if setup.onpolicy is not None:
                    rng = jax.random.fold_in(collect_rng, step)
                    device_batch, host_metrics, samples = setup.onpolicy.collect(state, host_batch, frozen, rng)
                    tokens = int(host_metrics.pop("_num_tokens", count_tokens(host_batch)))
                    if samples and t.log_every and (step + 1) % t.log_every == 0:
                        writer.write_text(step + 1, "completions", samples)
                else:
                    device_batch = _to_device(host_batch, mesh)
                    tokens = count_tokens(host_batch)
                state, metrics = step_fn(state, device_batch, frozen)
                monitor(metrics)
                step += 1
                tokens_since += tokens
                if setup.after_step is not None:
                    frozen = setup.after_step(step, state, frozen)
                if t.log_every and step % t.log_every == 0:
                    now = time.perf_counter()
                    scalars = to_python_scalars(jax.device_get(metrics))
                    scalars.update(host_metrics)
                    scalars["tokens_per_second"] = tokens_since / max(now - time_since, 1e-9)
                    tokens_since, time_since = 0, now
                    writer.write(step, scalars)
                    if bar is not None:
                        bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}",
                                        tok_s=f"{scalars['tokens_per_second']:.0f}")
                if bar is not None:
                    bar.update(1)
                if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                    monitor.flush()
                    eval_result = evaluate(step, state, frozen)
                if t.save_every and step % t.save_every == 0 and step < t.steps:
                    monitor.flush()
                    save(step, state, frozen)
                if preemption.requested:
                    monitor.flush()
                    ckpt.wait()
                    save(step, state, frozen, force=True)
                    ckpt.wait()
                    preempted = True
                    if main:
                        print(f"\n[preempted] SIGTERM: saved step {step} to {ckpt.directory}", flush=True)
                    break
        monitor.flush()
    except NonFiniteError as e:
        ckpt.wait()
        last = ckpt.latest_step()
        raise NonFiniteLossError(f"{e} (last good checkpoint: "
                                 f"{'step ' + str(last) if last is not None else 'none'} in {ckpt.directory})") from e
    finally:
        if bar is not None:
            bar.close()

    hf_dir = None
    if not preempted:
        eval_result = evaluate(step, state, frozen)
        save(step, state, frozen)
        ckpt.wait()
        if t.export_hf:
            hf_dir = os.path.join(run_dir, "hf_model")
            host = _host_params(state.params if setup.export_params is None else setup.export_params(state.params))
            if main:
                save_pretrained(model, host, hf_dir, head=setup.export_head)
                tokenizer.save_pretrained(hf_dir)
    ckpt.close()
    writer.close()
    summary = {"step": step, "eval": eval_result, "run_dir": run_dir, "hf_dir": hf_dir, "preempted": preempted,
               "algorithm": cfg.algorithm}
    if main:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
