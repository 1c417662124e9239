"""The jrlhf side of every benchmark: the compiled step functions of :mod:`jrlhf.step` built from the algorithms'
loss functions, and :func:`jrlhf.sampling.generate`.

What is timed is the public call users make (``step(state, batch, frozen)``, ``update(state, rollout, frozen)``,
``generate(...)``) until its outputs are ready, with the batch already on the device; the GRPO whole step is the
training loop's iteration: ``collect`` (sampler, the forward building the rollout batch, decoding and the host
reward function) followed by the compiled update. Compilation is timed apart through jax's compile events (trace,
lowering to StableHLO, XLA compile) and any compilation during the timed steps is counted as a recompile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
import types
from typing import Any, Callable

import numpy as np

from benchmarks import data as bdata
from benchmarks.sizes import BenchSize
from benchmarks.timing import Runner

LEARNING_RATE = 1e-6
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


class CompileTracker:
    """Sums jax's compile-event durations while :meth:`track` is active (one listener for the process)."""

    _lock = threading.Lock()
    _installed = False
    _active: list = []

    @classmethod
    def _listener(cls, event: str, duration: float, **kwargs) -> None:
        if event in _COMPILE_EVENTS:
            for record in cls._active:
                record["seconds"] += duration
                if event == _COMPILE_EVENTS[-1]:
                    record["compiles"] += 1

    @classmethod
    @contextlib.contextmanager
    def track(cls):
        """Yields a dict whose ``seconds`` and ``compiles`` grow with the compilations inside the block."""
        import jax

        with cls._lock:
            if not cls._installed:
                jax.monitoring.register_event_duration_secs_listener(cls._listener)
                cls._installed = True
        record = {"seconds": 0.0, "compiles": 0}
        cls._active.append(record)
        try:
            yield record
        finally:
            # by identity: nested blocks hold equal dicts
            cls._active[:] = [r for r in cls._active if r is not record]


class JaxRunner(Runner):
    """A jrlhf step: ``run() -> tokens`` returns once the step's outputs are ready."""

    system = "jrlhf"

    def __init__(self, name: str, label: str, run: Callable[[], int], flops: float, info: dict | None = None):
        super().__init__(name, label, flops)
        self._run = run
        self._recompiles = 0
        self.info = {} if info is None else info

    def compile(self) -> float:
        cpu = time.process_time()
        with CompileTracker.track() as record:
            self._run()
        self.compile_cpu_seconds = time.process_time() - cpu
        self.compiles = record["compiles"]
        return record["seconds"]

    def step(self) -> int:
        with CompileTracker.track() as record:
            tokens = self._run()
        self._recompiles += record["compiles"]
        return tokens

    def recompiles(self) -> int:
        return self._recompiles


@dataclasses.dataclass
class Setup:
    """A model on a mesh with its optimizer and train state."""

    model: Any
    params: Any
    mesh: Any
    optimizer: Any
    state: Any
    shardings: Any


def setup(size: BenchSize, path: str, head: str = "lm", mesh=None, algo_state=None) -> Setup:
    """Loads the checkpoint at ``path`` with ``head``, builds AdamW (lr 1e-6, clipping at 1.0, no weight decay:
    the TRL trainers' settings) and the train state on ``mesh`` (default: every device on the data axis)."""
    from jrlhf.models import from_pretrained, logical_axes
    from jrlhf.sharding import make_mesh, put_global
    from jrlhf.step import OptimizerConfig, init_train_state, make_optimizer

    model, params = from_pretrained(path, dtype=size.dtype, param_dtype="float32", head=head,
                                    scan_unroll=size.scan_unroll, remat=size.remat)
    mesh = make_mesh() if mesh is None else mesh
    specs = logical_axes(model)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=LEARNING_RATE, max_grad_norm=1.0, weight_decay=0.0),
                               param_specs=specs)
    state, shardings = init_train_state(params, optimizer, 0, mesh=mesh, param_specs=specs, algo_state=algo_state)
    params = put_global(params, shardings.params)
    return Setup(model=model, params=params, mesh=mesh, optimizer=optimizer, state=state, shardings=shardings)


def _on_mesh(batch: dict, mesh) -> dict:
    from jrlhf.sharding import batch_sharding, put_global

    return put_global({k: np.asarray(v) for k, v in batch.items()}, batch_sharding(mesh))


def _step_runner(name: str, s: Setup, step, batch: dict, frozen, flops: float, tokens: int) -> JaxRunner:
    import jax

    on_mesh = _on_mesh(batch, s.mesh)
    holder = {"state": s.state}
    s.state = None  # donated by the step from now on

    info = {}

    def run() -> int:
        holder["state"], metrics = step(holder["state"], on_mesh, frozen)
        jax.block_until_ready((holder["state"], metrics))
        info["metrics"] = metrics  # the last step's metrics (device arrays), for tests
        return tokens

    return JaxRunner(name, "jrlhf", run, flops, info=info)


# ---------------------------------------------------------------------------------------------------- batches


def preference_batch(seqs: bdata.Sequences, length: int) -> dict:
    """jrlhf's right-padded preference batch ``{chosen,rejected}_{input_ids,attention_mask,loss_mask} [B, T]``."""
    from jrlhf.data import collate_preference

    examples = []
    for p, c, r in zip(seqs.prompts, seqs.chosen, seqs.rejected):
        examples.append({"chosen_input_ids": p + c, "chosen_loss_mask": [0] * len(p) + [1] * len(c),
                         "rejected_input_ids": p + r, "rejected_loss_mask": [0] * len(p) + [1] * len(r)})
    return collate_preference(examples, pad_id=bdata.PAD, length=length)


def sft_batch(seqs: bdata.Sequences, length: int) -> dict:
    """jrlhf's right-padded SFT batch ``input_ids, attention_mask, loss_mask [B, T]`` (loss on the completion)."""
    from jrlhf.data import collate_sft

    examples = [{"input_ids": p + c, "loss_mask": [0] * len(p) + [1] * len(c)}
                for p, c in zip(seqs.prompts, seqs.chosen)]
    return collate_sft(examples, pad_id=bdata.PAD, length=length)


# ---------------------------------------------------------------------------------------------------- offline


def dpo(size: BenchSize, paths: dict, seqs: bdata.Sequences, flops: float, mesh=None) -> JaxRunner:
    """DPO (sigmoid, beta 0.1) step with the reference params in ``frozen``."""
    from jrlhf.algorithms import dpo as algo
    from jrlhf.algorithms.base import preference_globals
    from jrlhf.step import make_train_step

    s = setup(size, paths["lm"], mesh=mesh)
    config = algo.Config(beta=0.1, logprob_chunk_size=size.logprob_chunk_size)
    step = make_train_step(algo.make_loss_fn(s.model, config), s.optimizer, s.mesh,
                           state_shardings=s.shardings, prepare_batch=preference_globals)
    batch = preference_batch(seqs, size.sequence_length)
    tokens = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    return _step_runner("dpo_step", s, step, batch, algo.Frozen(ref_params=s.params), flops, tokens)


def sft(size: BenchSize, paths: dict, seqs: bdata.Sequences, flops: float, mesh=None) -> JaxRunner:
    """SFT step (token-mean NLL on the completion tokens)."""
    from jrlhf.algorithms import sft as algo
    from jrlhf.step import make_train_step

    s = setup(size, paths["lm"], mesh=mesh)
    config = algo.Config(logprob_chunk_size=size.logprob_chunk_size)
    step = make_train_step(algo.make_loss_fn(s.model, config), s.optimizer, s.mesh,
                           state_shardings=s.shardings)
    batch = sft_batch(seqs, size.sequence_length)
    return _step_runner("sft_step", s, step, batch, None, flops, int(batch["attention_mask"].sum()))


def reward(size: BenchSize, paths: dict, seqs: bdata.Sequences, flops: float, mesh=None) -> JaxRunner:
    """Reward-model step (Bradley-Terry on the score head at the last real token)."""
    from jrlhf.algorithms import reward as algo
    from jrlhf.algorithms.base import preference_globals
    from jrlhf.step import make_train_step

    s = setup(size, paths["score"], head="score", mesh=mesh)
    step = make_train_step(algo.make_loss_fn(s.model, algo.Config()), s.optimizer, s.mesh,
                           state_shardings=s.shardings, prepare_batch=preference_globals)
    batch = preference_batch(seqs, size.sequence_length)
    tokens = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    return _step_runner("reward_step", s, step, batch, None, flops, tokens)


# ---------------------------------------------------------------------------------------------------- on-policy


def grpo_config(size: BenchSize):
    """jrlhf's GRPO config with TRL 1.16's defaults (dapo loss, beta 0, group scaling, temperature 1)."""
    from jrlhf.algorithms import grpo

    return grpo.Config(num_generations=size.num_generations, max_completion_length=size.completion_length,
                       temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo", scale_rewards="group",
                       num_iterations=1, steps_per_generation=None)


def grpo_update(size: BenchSize, paths: dict, rollout: dict, flops: float, mesh=None) -> JaxRunner:
    """One GRPO update (one epoch, one mini-batch: one optimizer step) on a given rollout batch."""
    from jrlhf.algorithms import grpo
    from jrlhf.step import make_onpolicy_update

    s = setup(size, paths["lm"], mesh=mesh)
    algo = grpo_config(size)
    update = make_onpolicy_update(grpo.make_loss_fn(s.model, algo), s.optimizer, s.mesh,
                                  state_shardings=s.shardings, num_epochs=1, num_minibatches=1,
                                  prepare_batch=grpo.make_prepare_batch(algo))
    batch = {k: rollout[k] for k in ("input_ids", "attention_mask", "loss_mask", "old_logps", "scores",
                                     "truncated")}
    return _step_runner("grpo_update_step", s, update, batch, None, flops, int(rollout["attention_mask"].sum()))


def grpo_whole(size: BenchSize, paths: dict, prompts: list, reward_fn: Callable, flops: float,
               mesh=None) -> JaxRunner:
    """The training loop's GRPO iteration: ``collect`` (generation of ``num_generations`` samples per prompt from
    one shared prefill, the rollout forward, decoding, the host reward function) then the compiled update."""
    import jax

    from jrlhf.algorithms import grpo, onpolicy
    from jrlhf.config import DataSection, RunConfig
    from jrlhf.data.batching import collate_prompts
    from jrlhf.step import make_onpolicy_update

    s = setup(size, paths["lm"], mesh=mesh)
    algo = grpo_config(size)
    tokenizer = bdata.build_tokenizer(size.hf_config["vocab_size"])
    cfg = RunConfig(algorithm="grpo", data=DataSection(max_completion_length=size.completion_length), algo=algo)
    run_context = types.SimpleNamespace(cfg=cfg, mesh=s.mesh, tokenizer=tokenizer, model=s.model, params=s.params)
    rewards = onpolicy.RewardSources(funcs=[reward_fn], names=[reward_fn.__name__], weights=np.ones(1, np.float32))
    collect = onpolicy.make_collect(run_context, rewards, onpolicy.Collector())
    update = make_onpolicy_update(grpo.make_loss_fn(s.model, algo), s.optimizer, s.mesh,
                                  state_shardings=s.shardings, num_epochs=1, num_minibatches=1,
                                  prepare_batch=grpo.make_prepare_batch(algo))
    examples = [{"prompt_ids": p, "record": {"prompt": bdata.words(p)}} for p in prompts]
    prompt_batch = collate_prompts(examples, pad_id=bdata.PAD, length=size.prompt_length)
    holder = {"state": s.state, "step": 0}
    s.state = None
    key = jax.random.key(1)

    def run() -> int:
        holder["step"] += 1
        rollout, metrics, _ = collect(holder["state"], prompt_batch, None, jax.random.fold_in(key, holder["step"]))
        holder["state"], update_metrics = update(holder["state"], rollout, None)
        jax.block_until_ready((holder["state"], update_metrics))
        return int(metrics["_num_tokens"])

    return JaxRunner("grpo_whole_step", "jrlhf", run, flops)


def ppo_config(size: BenchSize):
    """jrlhf's PPO config: one epoch, one mini-batch (one optimizer step per update), shared critic, k1 KL."""
    from jrlhf.algorithms import ppo

    return ppo.Config(num_generations=1, max_completion_length=size.completion_length, temperature=0.7,
                      critic="shared", kl_coef=0.05, kl_estimator="k1", gamma=1.0, lam=0.95, cliprange=0.2,
                      cliprange_value=0.2, vf_coef=0.1, whiten_rewards=False, whiten_advantages=True,
                      ppo_epochs=1, num_mini_batches=1)


def ppo_update(size: BenchSize, paths: dict, rollout: dict, flops: float, mesh=None) -> JaxRunner:
    """One PPO update (GAE + whitening in-graph, clipped surrogate + clipped value loss on the shared-trunk value
    head, one optimizer step) on a given rollout batch."""
    from jrlhf.algorithms import ppo
    from jrlhf.step import make_onpolicy_update

    algo = ppo_config(size)
    s = setup(size, paths["lm_value"], head="lm+value", mesh=mesh, algo_state={"kl_coef": np.float32(algo.kl_coef)})
    rows = int(rollout["input_ids"].shape[0])
    update = make_onpolicy_update(ppo.make_loss_fn(s.model, algo), s.optimizer, s.mesh,
                                  state_shardings=s.shardings, num_epochs=1, num_minibatches=1,
                                  prepare_batch=ppo.make_prepare_batch(algo),
                                  update_algo_state=ppo.make_update_algo_state(algo, rows))
    batch = {k: rollout[k] for k in ("input_ids", "attention_mask", "loss_mask", "old_logps", "ref_logps",
                                     "old_values", "scores", "truncated")}
    return _step_runner("ppo_update_step", s, update, batch, None, flops, int(rollout["attention_mask"].sum()))


# ---------------------------------------------------------------------------------------------------- sampler


def generation(size: BenchSize, paths: dict, prompt_ids: np.ndarray, prompt_mask: np.ndarray, *, sample: bool,
               flops: float, mesh=None) -> JaxRunner:
    """:func:`jrlhf.sampling.generate` of ``N`` new tokens per left-padded prompt, no EOS (every row produces
    ``N`` tokens): greedy (temperature 0) or sampling at temperature 1 without top-k/top-p."""
    import jax

    from jrlhf import sampling
    from jrlhf.models import from_pretrained
    from jrlhf.sharding import batch_sharding, make_mesh, put_global, replicated

    model, params = from_pretrained(paths["lm"], dtype=size.dtype, param_dtype="float32",
                                    scan_unroll=size.scan_unroll)
    mesh = make_mesh() if mesh is None else mesh
    params = put_global(params, replicated(mesh))
    ids = put_global(np.asarray(prompt_ids, np.int32), batch_sharding(mesh))
    mask = put_global(np.asarray(prompt_mask, np.int32), batch_sharding(mesh))
    tokens = int(np.sum(prompt_mask)) + size.gen_new_tokens * int(prompt_ids.shape[0])
    counter = {"step": 0}
    key = jax.random.key(2)

    def run() -> int:
        counter["step"] += 1
        out = sampling.generate(model, params, ids, mask, jax.random.fold_in(key, counter["step"]),
                                max_new_tokens=size.gen_new_tokens, temperature=1.0 if sample else 0.0,
                                top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=bdata.PAD)
        jax.block_until_ready(out)
        return tokens

    return JaxRunner("generate_sampled" if sample else "generate_greedy", "jrlhf", run, flops)
