"""The one training loop: data -> step -> metrics -> eval -> checkpoint, for every algorithm.

``train(config)`` (also ``jrlhf.train``) takes a :class:`jrlhf.config.RunConfig`, a nested dict, or a YAML path, and
returns a summary dict (final eval metrics, steps, paths). Everything needed to continue a run is checkpointed:
params, optimizer state, step, RNG, algorithm state, mutable frozen params (TR-DPO's reference), the data iterator's
position and the resolved config.

One shutdown path: SIGTERM or SIGINT (Ctrl-C) ends the run after the current step, an exception ends it where it is;
either way the save in flight is finished (or, if it fails, its partial folder removed), the latest completed step is
saved when the run has trained since the last save, and the run directory's lock is released. A second signal ends
the process by that signal at once. After the last step the state is saved before the final evaluation and export, so a
stop there loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
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
from jrlhf.algorithms.onpolicy import AsyncRollouts
from jrlhf.checkpoint import CheckpointError, Checkpointer, acquire_run_lock
from jrlhf.config import ConfigError, RunConfig, build_config, check_no_placeholders, load_config, to_dict
from jrlhf.data import BatchIterator, PromptBatch, load_tokenizer, make_batch_iterator
from jrlhf.errors import CheckpointSaveError, NonFiniteLossError
from jrlhf.metrics import MetricsWriter, to_python_scalars
from jrlhf.models.checkpoint import read_json_file
from jrlhf.models import from_pretrained, init_model, logical_axes, save_pretrained, tiny_config
from jrlhf.models.lora import add_adapters, has_adapters, save_peft_adapter, trainable_mask
from jrlhf.models.transformer import ADAPTER_RNG_SALT
from jrlhf.sharding import MeshConfig, batch_shardings, logical_to_shardings, make_mesh, put_global, replicated
from jrlhf.step import (NonFiniteError, OptimizerConfig, init_train_state, make_onpolicy_update, make_optimizer,
                        make_schedule, make_train_step)

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
    if path and os.path.isfile(os.path.join(path, "config.json")):
        # transformers' tokenizer loader reads config.json too: a damaged one is named here, in one line
        read_json_file(os.path.join(path, "config.json"), "the model's config")
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


def build_model(cfg: RunConfig, tokenizer, head: str, rng, path: str | None = None, adapters: bool = True):
    """The model to train: ``path`` (or ``train.init_from`` / ``model.path``) loaded from a local HF directory, else
    a fresh ``model.family`` tiny config with ``model.overrides``. A head missing from the checkpoint (a score or
    value head on an SFT model) is initialised from ``rng``. With ``model.lora`` (and ``adapters``) fresh LoRA
    adapters are added (:func:`jrlhf.models.lora.add_adapters`, drawn from ``fold_in(rng, ADAPTER_RNG_SALT)``)."""
    model, params = _build_base_model(cfg, tokenizer, head, rng, path)
    if cfg.model.lora is None or not adapters:
        return model, params
    if cfg.model.lora.dropout > 0:
        raise ConfigError(f"model.lora.dropout={cfg.model.lora.dropout}: jrlhf's training losses run the model "
                          "deterministically, so adapter dropout would never apply; set model.lora.dropout=0")
    return add_adapters(model, params, cfg.model.lora.to_model(), jax.random.fold_in(rng, ADAPTER_RNG_SALT))


def _build_base_model(cfg: RunConfig, tokenizer, head: str, rng, path: str | None = None):
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
    if o.schedule != "constant" and max(cfg.train.steps, 1) <= o.warmup_steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be below train.steps={cfg.train.steps} with "
                          f"optim.schedule={o.schedule!r}: lower optim.warmup_steps (or set optim.schedule=constant)")
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
                               pad_to_multiple_of=d.pad_to_multiple_of,
                               packing=d.packing and kind == "sft", **common)


def count_tokens(batch) -> int:
    """Non-pad tokens of a host batch (prompt + completion; chosen + rejected)."""
    if isinstance(batch, PromptBatch):
        return int(np.sum(batch.prompt_mask))
    return int(sum(np.sum(v) for k, v in batch.items() if k.endswith("attention_mask")))


class _Shutdown:
    """Turns the first SIGTERM / SIGINT into a stop request the loop checks between steps. A second one quits at once:
    the ``on_quit`` callbacks run (the run lock is released), the signal's default action is restored and the signal
    re-sent, so the process ends by that signal (status 128 + signal number; no Python clean-up, so no background save
    thread prints tracebacks; the unfinished save's temporary folder is ignored by the next run). Restores the
    previous handlers on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, main: bool):
        self.signum: int | None = None
        self.main = main
        self.on_quit = []
        self._remote = False
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"\n[stop] {name} again: quitting without saving; the last complete checkpoint is kept",
                  file=sys.stderr, flush=True)
            for callback in self.on_quit:
                try:
                    callback()
                except Exception:  # noqa: BLE001 - quitting regardless
                    pass
            sys.stdout.flush()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        if self.main:
            print(f"\n[stop] {name}: stopping after the current step and saving (send it again to quit without "
                  "saving)", file=sys.stderr, flush=True)

    @property
    def name(self) -> str | None:
        if self.signum is not None:
            return signal.Signals(self.signum).name
        return "a signal to another process" if self._remote else None

    def requested(self) -> bool:
        """True once a stop was asked for on any process (the processes of a multi-host run agree every call)."""
        local = self.signum is not None
        if jax.process_count() == 1:
            return local
        anywhere = bool(np.max(distributed.process_allgather(np.array([local], np.int32))))
        self._remote = anywhere and not local
        return anywhere

    def _restore(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __exit__(self, *exc):
        self._restore()


class _NonFiniteCheck:
    """Reads the running ``nonfinite_count`` one step late (the loop never waits on the device) and stops the run
    once more than ``train.max_nonfinite`` updates were skipped, naming the loop step metrics.jsonl records."""

    def __init__(self, allowed: int):
        self.allowed = int(allowed)
        self._pending = None

    def __call__(self, step: int, metrics) -> None:
        count = metrics["nonfinite_count"]
        if isinstance(count, jax.Array):
            count.copy_to_host_async()
        previous, self._pending = self._pending, (step, count)
        if previous is not None:
            self._check(*previous)

    def flush(self) -> None:
        previous, self._pending = self._pending, None
        if previous is not None:
            self._check(*previous)

    def _check(self, step: int, count) -> None:
        count = int(np.asarray(count))
        if count > self.allowed:
            raise NonFiniteError(
                f"non-finite loss or gradients at step {step}: {count} update(s) skipped so far (the parameters were "
                f"left unchanged), train.max_nonfinite={self.allowed}; lower optim.learning_rate, check the data, or "
                "raise train.max_nonfinite")


def check_batch_divisible(batch_size: int, mesh, what: str = "data.batch_size") -> None:
    """A batch is split over the mesh's ``data`` x ``fsdp`` devices: its size must be a multiple of their count.

    Raises:
      ConfigError: naming both numbers and the fix (checked before JAX places the first batch).
    """
    shards = int(mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1))
    if batch_size % shards:
        lower, upper = batch_size - batch_size % shards, batch_size + shards - batch_size % shards
        examples = f"{lower} or {upper}" if lower else f"{upper}"
        raise ConfigError(
            f"{what}={batch_size} is not divisible by the {shards} devices the batch is split over (mesh.data x "
            f"mesh.fsdp = {mesh.shape.get('data', 1)} x {mesh.shape.get('fsdp', 1)}); use a multiple of {shards} "
            f"(e.g. {examples}) or change the mesh")


def _to_device(batch, mesh):
    arrays = batch.arrays() if isinstance(batch, PromptBatch) else batch
    if jax.process_count() > 1:
        return distributed.global_batch_from_local(arrays, mesh)
    return put_global(arrays, batch_shardings(arrays, mesh))


def _select(params, flags) -> list:
    """The leaves of ``params`` whose flag is True (flatten order): what a LoRA checkpoint holds."""
    return [x for x, f in zip(jax.tree.leaves(params), flags) if f]


def _put_back(params, flags, selected):
    """``params`` with the flagged leaves replaced by ``selected`` (in order)."""
    leaves, treedef = jax.tree.flatten(params)
    it = iter(selected)
    return jax.tree.unflatten(treedef, [next(it) if f else x for x, f in zip(leaves, flags)])


def _fingerprint(leaves) -> list:
    """A cheap fingerprint of frozen weights: per leaf ``[sum, sum of squares]`` in float64 (host), as strings."""
    out = []
    for x in leaves:
        a = np.asarray(jax.device_get(x)).astype(np.float32, copy=False)
        out.append(f"{np.sum(a, dtype=np.float64):.17g}/{np.sum(np.square(a, dtype=np.float64)):.17g}")
    return out


BEST_FILE = "best.json"


def _best_tracker(t, setup, run_dir: str, *, resumed: bool):
    """The run's :class:`jrlhf.metrics.BestCheckpoint` (``None`` without ``train.metric_for_best_model``),
    restored from ``best.json`` when the run resumes."""
    from jrlhf.config import ConfigError
    from jrlhf.metrics import BestCheckpoint

    if not t.metric_for_best_model:
        if t.load_best_model_at_end or t.early_stopping_patience:
            raise ConfigError("train.load_best_model_at_end / train.early_stopping_patience need "
                              "train.metric_for_best_model (the evaluation metric to select on)")
        return None
    if setup.evaluate is None or not t.eval_every:
        raise ConfigError("train.metric_for_best_model needs periodic evaluation: set train.eval_every > 0 and the "
                          "data the algorithm evaluates on (e.g. data.eval_prompts)")
    if t.early_stopping_patience < 0:
        raise ConfigError(f"train.early_stopping_patience={t.early_stopping_patience}: must be >= 0 (0: off)")
    tracker = BestCheckpoint(t.metric_for_best_model, greater_is_better=t.greater_is_better,
                             patience=t.early_stopping_patience, threshold=t.early_stopping_threshold)
    path = os.path.join(run_dir, BEST_FILE)
    if resumed and os.path.exists(path):
        with open(path) as f:
            tracker.load_state_dict(json.load(f))
    return tracker


def _host_params(params):
    return jax.tree.map(np.asarray, distributed.process_allgather(params))


def train(config) -> dict:
    """Runs (or resumes) one training job; returns ``{"step", "eval", "run_dir", "hf_dir", "preempted", "stopped_by",
    "algorithm"}``.

    The run directory (``train.output_dir``) is locked for the life of the call (:class:`jrlhf.checkpoint.RunLock`).
    ``preempted`` is True when SIGTERM/SIGINT stopped the run; the latest state is then saved (``stopped_by`` names
    the signal) and calling ``train`` again resumes it.

    Raises:
      ConfigError / DataError / CheckpointError: bad settings, data or checkpoints (one-line messages).
      RunLockedError: another live run uses ``train.output_dir``.
      CheckpointSaveError: a save could not start (free space) or failed; the last good checkpoint is intact.
      NonFiniteLossError: more than ``train.max_nonfinite`` updates were non-finite; the last good checkpoint is kept.
      A second SIGTERM/SIGINT ends the process by that signal at once (nothing more is saved).
      Any other exception of a step, a reward function or an evaluation: re-raised after the latest completed step
      was saved (printed as ``[saved] ...``).
    """
    cfg = _as_config(config)
    check_no_placeholders(cfg)
    distributed.initialize()
    with _Shutdown(distributed.is_main_process()) as shutdown:
        lock = acquire_run_lock(os.path.abspath(cfg.train.output_dir))
        shutdown.on_quit.append(lock.release)
        try:
            return _train(cfg, shutdown)
        finally:
            lock.release()


def _train(cfg: RunConfig, shutdown: _Shutdown) -> dict:
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

    def load_extra(path, head):  # with LoRA, a trained critic ("value") gets adapters; a reward model does not
        return build_model(cfg, tokenizer, head, algo_rng, path=path, adapters=head == "value")

    run = RunContext(cfg=cfg, model=model, params=params, tokenizer=tokenizer, mesh=mesh, rng=algo_rng,
                     load_model=load_extra)
    setup = algo_mod.setup(run)
    param_specs = logical_axes(model)
    if setup.params is not None:  # e.g. PPO's policy + separate critic
        params, param_specs = setup.params, setup.param_specs
    if cfg.model.lora is not None and setup.trainable is None:
        setup.trainable = trainable_mask  # adapters (and a scalar head) only: the base gets no gradient or state
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
    # LoRA: checkpoints hold the trained leaves (adapters, a scalar head) and the optimizer state; the frozen base is
    # rebuilt from model.path / init_from / the seed, and its fingerprint is checked on resume
    lora_trained = None
    if cfg.model.lora is not None:
        lora_trained = jax.tree.leaves(setup.trainable(params) if callable(setup.trainable) else setup.trainable)
        base_fingerprint = _fingerprint([x for x, f in zip(jax.tree.leaves(params), lora_trained) if not f])
    del params

    common = dict(state_shardings=state_sh, frozen_shardings=frozen_sh, num_microbatches=t.num_microbatches,
                  prepare_batch=setup.prepare_batch, update_algo_state=setup.update_algo_state,
                  trainable=setup.trainable, learning_rate_fn=make_schedule(optim_cfg))
    if setup.onpolicy is None:
        step_fn = make_train_step(setup.loss_fn, optimizer, mesh, **common)
    else:
        step_fn = make_onpolicy_update(setup.loss_fn, optimizer, mesh, num_epochs=setup.onpolicy.num_epochs,
                                       num_minibatches=setup.onpolicy.num_minibatches, **common)

    if setup.onpolicy is None:
        check_batch_divisible(cfg.data.batch_size, mesh)
    iterator = _make_iterator(cfg, setup, tokenizer, kind)

    def log(message):
        if main:
            print(message, flush=True)

    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=t.keep_checkpoints, log=log)
    model_meta = dataclasses.asdict(model.config) if dataclasses.is_dataclass(model.config) else {}
    model_meta = json.loads(json.dumps(model_meta, default=str))
    mutable_frozen = setup.after_step is not None and frozen is not None

    # asynchronous rollouts (algo.max_staleness > 0): the rollouts submitted but not trained yet are saved as their
    # behaviour params (max_staleness slots, unused ones hold the current params) and regenerated on resume
    staleness = int(getattr(cfg.algo, "max_staleness", 0) or 0) if setup.onpolicy is not None else 0

    def bundle(state, frozen, behaviour=None):
        def trained(params):
            return _select(params, lora_trained) if lora_trained is not None else params

        out = {"train_state": state.replace(params=trained(state.params)) if lora_trained is not None else state}
        if mutable_frozen:
            out["frozen"] = frozen
        if staleness:
            slots = list(behaviour or [])[:staleness]
            slots += [state.params] * (staleness - len(slots))
            out["behaviour"] = [trained(params) for params in slots]
        return out

    start_step = 0
    resumed_pending = []
    if t.resume and ckpt.latest_step() is not None:
        _check_saved_staleness(ckpt, staleness)
        restored, meta = ckpt.restore(bundle(state, frozen), expect_model=model_meta)
        if lora_trained is not None:
            saved = meta.get("lora_base_fingerprint")
            if saved is not None and saved != base_fingerprint:
                raise CheckpointError(
                    f"the checkpoint in {ckpt.directory} holds LoRA adapters trained on another base model (the "
                    "frozen weights from model.path / train.init_from / train.seed differ from that run's); use the "
                    "same base model or another train.output_dir")
            trained = restored["train_state"].params
            restored["train_state"] = restored["train_state"].replace(
                params=_put_back(state.params, lora_trained, trained))
        state = restored["train_state"]
        if mutable_frozen:
            frozen = restored["frozen"]
        for (pending_step, behaviour_step), params in zip(meta.get("pending", []), restored.get("behaviour", [])):
            if lora_trained is not None:
                params = _put_back(state.params, lora_trained, params)
            resumed_pending.append((int(pending_step), int(behaviour_step), params))
        iterator.load_state_dict(meta["data"])
        start_step = int(meta["step"])
        log(f"[resume] from step {start_step} in {ckpt.directory}")

    resolved = to_dict(cfg)
    if main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(resolved, f, sort_keys=False)
    writer = MetricsWriter(run_dir, tensorboard=t.tensorboard, enabled=main)
    monitor = _NonFiniteCheck(t.max_nonfinite)

    # ``done``: the newest completed step, its state, frozen params and the data position after it; an exception or a
    # signal mid-step never leaves a half-updated one. ``saved_step``: the newest step saved (or being saved).
    done = {"step": start_step, "state": state, "frozen": frozen, "data": iterator.state_dict(), "pending": []}
    saved_step = start_step

    def save(force=False):
        nonlocal saved_step
        meta = {"step": int(done["step"]), "data": done["data"], "config": resolved, "model_config": model_meta}
        if lora_trained is not None:
            meta["lora_base_fingerprint"] = base_fingerprint
        if staleness:
            meta["max_staleness"] = staleness
            meta["pending"] = [[j, b] for j, b, _ in done["pending"]]
        ckpt.save(done["step"], bundle(done["state"], done["frozen"], [p for _, _, p in done["pending"]]), meta,
                  force=force)
        saved_step = done["step"]

    best = _best_tracker(t, setup, run_dir, resumed=start_step > 0)

    def export(state, hf_dir):
        host = _host_params(state.params if setup.export_params is None else setup.export_params(state.params))
        if main:
            save_pretrained(model, host, hf_dir, head=setup.export_head)  # LoRA: merged into the kernels
            tokenizer.save_pretrained(hf_dir)
            _copy_generation_config(cfg, hf_dir)
            if has_adapters(model):
                _export_adapter(cfg, model, host, setup.export_head, os.path.join(run_dir, "hf_adapter"), log)

    def evaluate(step, state, frozen):
        if setup.evaluate is None:
            return {}
        result = setup.evaluate(state.params, frozen)
        writer.write(step, result, split="eval")
        if main:
            body = " ".join(f"{k}={v:.4g}" for k, v in result.items())
            print(f"[eval step {step}] {body}", flush=True)
        if best is not None and best.update(step, result):
            if t.load_best_model_at_end and t.export_hf:
                export(state, os.path.join(run_dir, "hf_model"))  # on disk at once: a stop later keeps it
            if main:
                with open(os.path.join(run_dir, BEST_FILE), "w") as f:
                    json.dump(best.state_dict(), f, indent=2)
                print(f"[best] step {step}: {best.metric}={best.best_value:.4g}", flush=True)
        elif best is not None and main:
            with open(os.path.join(run_dir, BEST_FILE), "w") as f:
                json.dump(best.state_dict(), f, indent=2)
        return result

    bar = None
    if main and t.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=start_step, desc=cfg.algorithm, dynamic_ncols=True, file=sys.stdout,
                   mininterval=1.0)
    step = start_step
    tokens_since, time_since = 0, time.perf_counter()
    eval_result = {}
    hf_dir = None
    early_stopped = False
    pipe, data_before = None, {}
    if staleness:
        pipe = AsyncRollouts(lambda params, *args: setup.onpolicy.collect(_ParamsView(params), *args), staleness,
                             num_steps=t.steps)

        def rollout_args(j):  # in the loop's thread: the data order of the synchronous loop
            data_before[j] = iterator.state_dict()
            return next(iterator), frozen, jax.random.fold_in(collect_rng, j)

        for pending_step, behaviour_step, params in resumed_pending:
            pipe.submit(pending_step, params, *rollout_args(pending_step), behaviour_step=behaviour_step)
    try:
        while step < t.steps and not shutdown.requested():
            host_metrics = {}
            if pipe is not None:
                pipe.fill(step, state.params, rollout_args)  # snapshots the params before the update donates them
                (device_batch, host_metrics, samples), behaviour_step = pipe.take(step)
                host_metrics = dict(host_metrics)
                host_metrics["rollout/staleness"] = float(step - behaviour_step)
                tokens = int(host_metrics.pop("_num_tokens", 0))
                if samples and t.log_every and (step + 1) % t.log_every == 0:
                    writer.write_text(step + 1, "completions", samples)
            elif setup.onpolicy is not None:
                host_batch = next(iterator)
                rng = jax.random.fold_in(collect_rng, step)
                extra = {}
                if getattr(cfg.algo, "dynamic_sampling", False):  # more prompt batches for dropped groups
                    extra["next_prompts"] = lambda: next(iterator)
                device_batch, host_metrics, samples = setup.onpolicy.collect(state, host_batch, frozen, rng, **extra)
                tokens = int(host_metrics.pop("_num_tokens", count_tokens(host_batch)))
                if samples and t.log_every and (step + 1) % t.log_every == 0:
                    writer.write_text(step + 1, "completions", samples)
            else:
                host_batch = next(iterator)
                device_batch = _to_device(host_batch, mesh)
                tokens = count_tokens(host_batch)
            state, metrics = step_fn(state, device_batch, frozen)
            if setup.after_step is not None:
                frozen = setup.after_step(step + 1, state, frozen)
            step += 1
            if pipe is None:
                done.update(step=step, state=state, frozen=frozen, data=iterator.state_dict())
            else:  # the data position before the prompts of the rollouts still pending (re-drawn on resume)
                pending = pipe.pending()
                data = data_before[pending[0][0]] if pending else iterator.state_dict()
                for j in [j for j in data_before if j < step]:
                    del data_before[j]
                done.update(step=step, state=state, frozen=frozen, data=data, pending=pending)
            monitor(step, metrics)
            tokens_since += tokens
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
                if best is not None and best.should_stop:
                    log(f"[early stop] step {step}: {best.metric} has not improved by more than "
                        f"{t.early_stopping_threshold} for {best.patience} evaluations (best {best.best_value:.4g} "
                        f"at step {best.best_step})")
                    early_stopped = True
                    break
            if t.save_every and step % t.save_every == 0 and step < t.steps:
                monitor.flush()
                save()
        monitor.flush()
        # the latest state is saved before anything else can fail or be interrupted: eval, export
        if step > saved_step:
            save(force=True)
        ckpt.wait()
    except NonFiniteError as e:
        ckpt.wait()  # the save in flight holds an earlier, checked step
        last = ckpt.latest_step()
        raise NonFiniteLossError(f"{e} (the run stopped; last good checkpoint: "
                                 f"{'step ' + str(last) if last is not None else 'none'} in {ckpt.directory})"
                                 ) from None
    except CheckpointSaveError:
        raise
    except Exception:
        _save_on_error(ckpt, done, saved_step, save, log)
        raise
    finally:
        if pipe is not None:
            pipe.close()
        if bar is not None:
            bar.close()

    preempted = shutdown.requested()
    if preempted:
        if ckpt.latest_step() is None:
            log(f"\n[preempted] {shutdown.name} before the first step: nothing was trained, nothing to save")
        else:
            log(f"\n[preempted] {shutdown.name}: step {step} is saved in {ckpt.directory}; rerun the same command "
                "to resume")
    else:
        if not early_stopped:  # an early stop has just evaluated this step
            eval_result = evaluate(step, state, frozen)
        preempted = shutdown.requested()
        if preempted:
            log(f"\n[preempted] {shutdown.name} during the final evaluation: step {step} is saved in "
                f"{ckpt.directory}; rerun the same command to evaluate and export")
        elif t.export_hf:
            hf_dir = os.path.join(run_dir, "hf_model")
            if best is not None and t.load_best_model_at_end and best.best_step is not None:
                log(f"[best] hf_model/ holds step {best.best_step} ({best.metric}={best.best_value:.4g})")
            else:
                export(state, hf_dir)
    ckpt.close()
    writer.close()
    summary = {"step": step, "eval": eval_result, "run_dir": run_dir, "hf_dir": hf_dir, "preempted": preempted,
               "stopped_by": shutdown.name if preempted else None, "algorithm": cfg.algorithm}
    if best is not None:
        summary["best"] = {"metric": best.metric, "step": best.best_step, "value": best.best_value,
                           "eval": best.best_eval, "exported": bool(hf_dir and t.load_best_model_at_end)}
        summary["early_stopped"] = early_stopped
    if main:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _export_adapter(cfg: RunConfig, model, host_params, export_head, path: str, log) -> None:
    """Writes the LoRA adapters in PEFT's format to ``path`` (``hf_adapter/`` of the run), with the run's base
    model folder as ``base_model_name_or_path``; a model PEFT's format cannot describe here (GPT-2's fused q/k/v, a
    score-model export) is reported and skipped (``hf_model/`` holds the merged model either way)."""
    if export_head not in (None, "lm", "lm+value") or model.head not in ("lm", "lm+value"):
        log("[export] hf_adapter/ skipped: PEFT adapters are written for causal-LM exports only")
        return
    try:
        save_peft_adapter(model, host_params, path, base_model_name_or_path=cfg.train.init_from or cfg.model.path)
    except ValueError as error:
        log(f"[export] hf_adapter/ skipped: {error}")


def _copy_generation_config(cfg: RunConfig, hf_dir: str) -> None:
    """Copies ``generation_config.json`` of the model the run started from (``train.init_from``, else
    ``model.path``) into the export, so that every EOS id it declares still ends generation after a reload."""
    for source in (cfg.train.init_from, cfg.model.path):
        path = os.path.join(source, "generation_config.json") if source else None
        if path and os.path.isfile(path):
            shutil.copyfile(path, os.path.join(hf_dir, "generation_config.json"))
            return


class _ParamsView:
    """What an on-policy ``collect`` reads of the train state (``state.params``), holding a params snapshot."""

    def __init__(self, params):
        self.params = params


def _check_saved_staleness(ckpt, staleness: int) -> None:
    """A checkpoint holds the pending rollouts of its run's ``algo.max_staleness``: resuming it needs the same value.

    Raises:
      CheckpointError: the newest checkpoint was written with another ``algo.max_staleness``.
    """
    try:
        meta = ckpt.read_meta(ckpt.latest_step())
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is reported (and skipped) by restore()
        return
    saved = int(meta.get("max_staleness", 0)) if isinstance(meta, dict) else 0
    if saved != staleness:
        raise CheckpointError(
            f"the checkpoint in {ckpt.directory} was written with algo.max_staleness={saved} (it holds that many "
            f"pending rollouts' behaviour params); resume with algo.max_staleness: {saved}, or use another "
            "train.output_dir")


def _save_on_error(ckpt, done, saved_step, save, log) -> None:
    """On an exception mid-run: finish the save in flight, then save the newest completed step if it is newer than
    the last save. A failure here is reported and does not hide the original exception."""
    try:
        ckpt.wait()
        if done["step"] > saved_step:
            save(force=True)
            ckpt.wait()
            log(f"[saved] step {done['step']} (the last completed step) to {ckpt.directory} before stopping")
    except BaseException as error:  # noqa: BLE001 - the original error is the one to report
        log(f"[not saved] step {done['step']} could not be saved ({type(error).__name__}: {error}); "
            f"last checkpoint: {ckpt.latest_step()}")
