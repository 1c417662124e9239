"""The train-step builder shared by every algorithm: optimizer, train state, sharded and accumulated steps.

An algorithm is a pure loss function::

    loss_fn(params, batch, frozen, ctx: StepContext) -> (loss, metrics)

``params`` are the trained parameters (cast to ``compute_dtype`` when one is set), ``batch`` one micro-batch (a flat
dict of arrays whose leading dimension is the micro-batch size), ``frozen`` whatever is not trained (reference
params, a reward model; passed through unchanged), and ``ctx`` the step's RNG, step number, algorithm state and the
*batch-global* quantities computed once on the whole optimizer-step batch (``ctx.globals``).

Normalisation convention: every micro-batch loss is normalised by global counts (``ctx.globals["num_tokens"]``,
``ctx.globals["num_sequences"]``...), so the micro-batch losses **sum** to the full-batch loss and their gradients
sum to the full-batch gradient. Gradients are summed over the ``lax.scan`` over micro-batches; the metrics the loss
returns are averaged over micro-batches (``min``/``max`` metrics, by name, take the min / max:
:func:`metric_reduction`), so a metric that is a mean over a count that differs between micro-batches (tokens) is
scaled by :func:`microbatch_share` to stay exact.

:func:`make_train_step` compiles ``step(state, batch, frozen) -> (state, metrics)`` with ``jax.jit``, explicit
``NamedSharding`` in/out shardings and the state donated. :func:`make_onpolicy_update` compiles a whole on-policy
update (epochs x mini-batches as nested ``lax.scan``) as one program. Both guard against non-finite losses and
gradients in-graph: the update is skipped and ``state.nonfinite_count`` incremented, with no host sync;
:class:`NonFiniteMonitor` reads the counter a step late on the host and raises :class:`NonFiniteError`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jrlhf.sharding import (
    BATCH_AXES,
    DEFAULT_RULES,
    batch_sharding,
    logical_to_shardings,
    mesh_axis_size,
    put_global,
    replicated,
)

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
PrepareBatchFn = Callable[[dict, Any, Any], tuple[dict, dict]]
UpdateAlgoStateFn = Callable[[Any, dict], Any]

# ----------------------------------------------------------------------------------------------------------------
# State and context
# ----------------------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes.

    Attributes:
      step: int32 scalar, number of optimizer steps attempted (skipped non-finite steps included).
      params: pytree of fp32 master parameters.
      opt_state: the optax state of ``params``.
      rng: PRNG key, split once per step / update.
      algo_state: pytree of algorithm state (adaptive KL coefficient, running means...); ``{}`` when unused.
      nonfinite_count: int32 scalar, number of updates skipped because the loss or a gradient was not finite.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    algo_state: Any
    nonfinite_count: jax.Array


class StepContext(NamedTuple):
    """What ``loss_fn`` receives besides params, batch and frozen.

    Attributes:
      rng: PRNG key of this micro-batch (distinct per micro-batch and per step).
      step: int32 scalar, the optimizer step this micro-batch belongs to.
      algo_state: the algorithm state (read-only inside the loss).
      globals: dict of batch-global quantities computed once on the whole optimizer-step batch before the
        micro-batch scan: ``num_sequences`` (float32, the batch size), ``num_tokens`` (float32, the sum of
        ``batch["loss_mask"][:, 1:]`` when the batch has a ``loss_mask``), plus whatever ``prepare_batch`` adds,
        and ``num_microbatches`` (float32, set by the step). Metrics are combined over micro-batches by
        :func:`metric_reduction` (mean, or min / max by name); a token-mean metric is exact when scaled by
        :func:`microbatch_share`.
    """

    rng: jax.Array
    step: jax.Array
    algo_state: Any
    globals: dict


# ----------------------------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------------------------


def _path_key(path) -> tuple[str, ...]:
    return tuple(jax.tree_util.keystr((k,)) for k in path)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)



@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer, learning-rate schedule, weight decay and clipping.

    Attributes:
      name: ``"adamw"`` (decoupled weight decay, as ``torch.optim.AdamW``) or ``"sgd"`` (weight decay added to the
        gradient before momentum, as ``torch.optim.SGD``).
      learning_rate: peak learning rate.
      schedule: ``"constant"``, ``"linear"`` (to ``final_lr_ratio * learning_rate`` at ``total_steps``) or
        ``"cosine"`` (half a cosine down to ``final_lr_ratio * learning_rate`` at ``total_steps``).
      warmup_steps: linear warm-up from 0: ``lr(step) = learning_rate * step / warmup_steps`` for
        ``step < warmup_steps`` (the Hugging Face convention: the first update has learning rate 0).
      total_steps: required by ``linear`` and ``cosine``; the step at which the decay ends.
      final_lr_ratio: learning rate at the end of the decay, as a fraction of ``learning_rate``.
      b1, b2, eps: Adam moments and epsilon.
      momentum, nesterov: SGD momentum (0 = plain SGD).
      weight_decay: decay coefficient (0 disables it).
      decay_norms_and_biases: if False (default) parameters with fewer than 2 dimensions (norm scales, biases) are
        not decayed.
      max_grad_norm: clip the global gradient norm to this value; ``None`` or ``0`` disables clipping.
    """

    name: str = "adamw"
    learning_rate: float = 1e-5
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    final_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    decay_norms_and_biases: bool = False
    max_grad_norm: float | None = 1.0


def make_schedule(cfg: OptimizerConfig) -> Callable[[jax.Array], jax.Array]:
    """The learning rate as a function of the update count (int scalar -> float32 scalar); see
    :class:`OptimizerConfig` for the formulas."""
    if cfg.schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"OptimizerConfig.schedule={cfg.schedule!r}: use 'constant', 'linear' or 'cosine'.")
    if cfg.warmup_steps < 0:
        raise ValueError(f"OptimizerConfig.warmup_steps={cfg.warmup_steps}: must be >= 0.")
    if cfg.schedule != "constant":
        if cfg.total_steps is None or cfg.total_steps <= cfg.warmup_steps:
            raise ValueError(
                f"OptimizerConfig.schedule={cfg.schedule!r} needs total_steps > warmup_steps "
                f"(got total_steps={cfg.total_steps}, warmup_steps={cfg.warmup_steps})."
            )
    peak = float(cfg.learning_rate)
    warmup = int(cfg.warmup_steps)
    final = float(cfg.final_lr_ratio)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        if cfg.schedule == "constant":
            decayed = jnp.float32(1.0)
        else:
            progress = jnp.clip((count - warmup) / float(cfg.total_steps - warmup), 0.0, 1.0)
            shape = 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
            decayed = final + (1.0 - final) * shape
        if warmup > 0:
            decayed = jnp.where(count < warmup, count / warmup, decayed)
        return (peak * decayed).astype(jnp.float32)

    return schedule


def _matrix_rank(spec: PartitionSpec, ndim: int) -> int:
    """Number of weight-matrix axes of a parameter from its logical spec: ``layers`` axes are not counted and
    ``head_dim`` is merged into its ``heads`` / ``kv_heads`` axis (a stacked ``[L, N, D]`` query bias has rank 1, a
    ``[L, H, N, D]`` query kernel rank 2)."""
    names = list(spec) + [None] * (ndim - len(spec))
    return sum(1 for name in names if name not in ("layers", "head_dim"))


def decay_mask(params: Any, param_specs: Any = None) -> Any:
    """Weight-decay mask (pytree of bools matching ``params``): True for weight matrices and embeddings, False for
    norm scales and biases.

    With ``param_specs`` (logical ``PartitionSpec`` s, :func:`jrlhf.models.logical_axes`) a parameter is decayed
    when it has at least two weight-matrix axes (see :func:`_matrix_rank`), which stays right for layer-stacked
    params; without them, when ``ndim >= 2``.
    """
    if param_specs is None:
        return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
    specs = jax.tree_util.tree_structure(params).flatten_up_to(param_specs)
    flags = [_matrix_rank(spec, jnp.ndim(p)) >= 2 for spec, p in zip(specs, jax.tree.leaves(params))]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), flags)


def _path_decay_mask(param_specs: Any) -> Callable[[Any], Any]:
    """Callable optax mask deciding by parameter path, so it also works on the partially masked trees optax builds
    for ``multi_transform``."""
    by_path = {
        _path_key(path): spec
        for path, spec in jax.tree_util.tree_flatten_with_path(param_specs, is_leaf=_is_spec)[0]
    }

    def mask(params):
        def decide(path, p):
            spec = by_path.get(_path_key(path))
            if spec is None:
                raise ValueError(
                    f"make_optimizer(param_specs=...): no logical spec for parameter {jax.tree_util.keystr(path)}."
                )
            return _matrix_rank(spec, jnp.ndim(p)) >= 2

        return jax.tree_util.tree_map_with_path(decide, params)

    return mask


def _trainable_labels(trainable: Any) -> Callable[[Any], Any]:
    def labels(params):
        mask = trainable(params) if callable(trainable) else trainable
        try:
            return jax.tree.map(lambda _, t: "trainable" if bool(t) else "frozen", params, mask)
        except ValueError as err:
            raise ValueError(
                "make_optimizer(trainable=...): the mask must be a pytree of bools with the structure of params "
                f"({err})."
            ) from None

    return labels


def make_optimizer(
    cfg: OptimizerConfig, params: Any = None, trainable: Any = None, *, param_specs: Any = None
) -> optax.GradientTransformation:
    """Builds the optax transformation described by ``cfg``.

    Order: global-norm clipping (on raw gradients) -> Adam scaling (then decoupled weight decay) / SGD (weight
    decay, then momentum) -> learning-rate schedule. Weight decay skips norm scales and biases
    (:func:`decay_mask`) unless ``cfg.decay_norms_and_biases``.

    Args:
      cfg: the :class:`OptimizerConfig`.
      params: optional params pytree, used to check ``trainable`` early.
      trainable: ``None`` (train everything), a pytree of bools with the structure of ``params``, or a callable
        ``params -> pytree of bools``. Non-trainable leaves get zero updates and no optimizer state
        (``optax.multi_transform``), e.g. a value head trained beside a frozen trunk. Pass the same mask as
        ``make_train_step(trainable=...)`` to also skip their gradients.
      param_specs: logical ``PartitionSpec`` s of the params (``jrlhf.models.logical_axes(model)``); recommended
        for layer-stacked models, where a stacked norm scale ``[L, H]`` has ``ndim == 2`` but must not be decayed.

    Returns:
      An ``optax.GradientTransformation``.
    """
    if cfg.name not in ("adamw", "sgd"):
        raise ValueError(f"OptimizerConfig.name={cfg.name!r}: use 'adamw' or 'sgd'.")
    if cfg.learning_rate < 0 or cfg.weight_decay < 0:
        raise ValueError("OptimizerConfig.learning_rate and weight_decay must be >= 0.")
    schedule = make_schedule(cfg)
    if cfg.decay_norms_and_biases:
        mask = None
    elif param_specs is not None:
        mask = _path_decay_mask(param_specs)
    else:
        mask = decay_mask
    parts = []
    if cfg.max_grad_norm:
        parts.append(optax.clip_by_global_norm(float(cfg.max_grad_norm)))
    if cfg.name == "adamw":
        parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay, mask))
    else:
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay, mask))
        if cfg.momentum:
            parts.append(optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov))
    parts.append(optax.scale_by_learning_rate(schedule))
    tx = optax.chain(*parts)
    if trainable is None:
        return tx
    labels = _trainable_labels(trainable)
    if params is not None:
        flags = jax.tree.leaves(jax.tree.map(lambda s: s == "trainable", labels(params)))
        if not any(flags):
            raise ValueError("make_optimizer(trainable=...): no parameter is trainable.")
    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


# ----------------------------------------------------------------------------------------------------------------
# Train state construction
# ----------------------------------------------------------------------------------------------------------------


def _opt_state_shardings(opt_shapes: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Gives every optimizer-state leaf that mirrors a parameter (same path suffix and shape) that parameter's
    sharding; every other leaf (counts, scalars) is replicated."""
    param_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    by_path = {
        _path_key(path): (tuple(np.shape(p)), sh)
        for (path, p), sh in zip(param_leaves, treedef.flatten_up_to(param_shardings))
    }
    rep = replicated(mesh)
    leaves, opt_def = jax.tree_util.tree_flatten_with_path(opt_shapes)
    out = []
    for path, leaf in leaves:
        key = _path_key(path)
        chosen = rep
        for start in range(len(key)):
            hit = by_path.get(key[start:])
            if hit is not None and hit[0] == tuple(np.shape(leaf)):
                chosen = hit[1]
                break
        out.append(chosen)
    return jax.tree_util.tree_unflatten(opt_def, out)


def train_state_shardings(
    params: Any,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh,
    param_specs: Any,
    rules: Sequence[tuple[str, Any]] | Mapping[str, Any] = DEFAULT_RULES,
    algo_state: Any = None,
    on_indivisible: str = "replicate",
) -> TrainState:
    """The :class:`TrainState` of ``NamedSharding`` s for these params, without building the state.

    Args:
      params: params pytree (arrays or ``jax.ShapeDtypeStruct``).
      optimizer: the optax transformation.
      mesh: the mesh.
      param_specs: pytree of logical ``PartitionSpec`` matching ``params`` (``jrlhf.models.logical_axes``).
      rules: logical name -> mesh axis rules.
      algo_state: the algorithm state pytree (all replicated), or ``None``.
      on_indivisible: see :func:`jrlhf.sharding.logical_to_shardings`.
    """
    param_sh = logical_to_shardings(param_specs, mesh, rules, shapes=params, on_indivisible=on_indivisible)
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(np.shape(p), jnp.result_type(p)), params)
    opt_shapes = jax.eval_shape(optimizer.init, abstract)
    rep = replicated(mesh)
    return TrainState(
        step=rep,
        params=param_sh,
        opt_state=_opt_state_shardings(opt_shapes, params, param_sh, mesh),
        rng=rep,
        algo_state=jax.tree.map(lambda _: rep, {} if algo_state is None else algo_state),
        nonfinite_count=rep,
    )


def _put_key(rng: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(rng, (int, np.integer)):
        rng = jax.random.PRNGKey(int(rng))
    if jnp.issubdtype(jnp.result_type(rng), jax.dtypes.prng_key):
        impl = jax.random.key_impl(rng)
        return jax.random.wrap_key_data(put_global(jax.random.key_data(rng), sharding, copy=True), impl=impl)
    return put_global(rng, sharding, copy=True)


def init_train_state(
    params: Any,
    optimizer: optax.GradientTransformation,
    rng: Any,
    *,
    mesh: Mesh,
    param_specs: Any,
    rules: Sequence[tuple[str, Any]] | Mapping[str, Any] = DEFAULT_RULES,
    algo_state: Any = None,
    on_indivisible: str = "replicate",
) -> tuple[TrainState, TrainState]:
    """Places params on ``mesh`` following the logical-axis rules and builds the optimizer state beside them.

    Args:
      params: pytree of (fp32) parameters; every process passes the same full values.
      optimizer: the optax transformation (:func:`make_optimizer`).
      rng: a PRNG key (or an int seed) for the steps' randomness.
      mesh: the mesh.
      param_specs: pytree of logical ``PartitionSpec`` matching ``params``.
      rules: logical name -> mesh axis rules (default :data:`jrlhf.sharding.DEFAULT_RULES`).
      algo_state: pytree of algorithm state (replicated), ``None`` for none.
      on_indivisible: see :func:`jrlhf.sharding.logical_to_shardings`.

    Returns:
      ``(state, state_shardings)``: the :class:`TrainState` (``step = 0``) and the matching :class:`TrainState` of
      ``NamedSharding`` to hand to :func:`make_train_step`. The state owns fresh buffers: ``params`` stays valid
      (e.g. as reference params in ``frozen``) after the step donates the state.
    """
    shardings = train_state_shardings(
        params,
        optimizer,
        mesh=mesh,
        param_specs=param_specs,
        rules=rules,
        algo_state=algo_state,
        on_indivisible=on_indivisible,
    )
    params = put_global(params, shardings.params, copy=True)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    rep = replicated(mesh)
    algo_state = {} if algo_state is None else algo_state
    state = TrainState(
        step=put_global(np.int32(0), rep),
        params=params,
        opt_state=opt_state,
        rng=_put_key(rng, rep),
        algo_state=put_global(jax.tree.map(np.asarray, algo_state), shardings.algo_state, copy=True),
        nonfinite_count=put_global(np.int32(0), rep),
    )
    return state, shardings


# ----------------------------------------------------------------------------------------------------------------
# The compiled update
# ----------------------------------------------------------------------------------------------------------------


def default_globals(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Batch-global normalisers of a batch: ``num_sequences`` (float32 scalar, the leading size, or the sum of
    ``sequence_mask [B]`` when the batch has one: rows marked 0 carry no loss, e.g. unscorable rollouts) and, when
    the batch has a ``loss_mask [B, T]``, ``num_tokens`` = ``sum(loss_mask[:, 1:])`` (float32 scalar)."""
    leaves = jax.tree.leaves(batch)
    out: dict[str, jax.Array] = {}
    if leaves:
        out["num_sequences"] = jnp.float32(leaves[0].shape[0])
    if isinstance(batch, Mapping) and "sequence_mask" in batch:
        out["num_sequences"] = jnp.sum(batch["sequence_mask"].astype(jnp.float32))
    if isinstance(batch, Mapping) and "loss_mask" in batch:
        out["num_tokens"] = jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32))
    return out


def metric_reduction(name: str) -> str:
    """How a metric is combined over the micro-batches of one step: ``"min"`` when the last ``/``-separated part of
    its name starts with ``min_`` or ends with ``_min`` (``min_reward``, ``clip_ratio/low_min``), ``"max"`` likewise
    for ``max``, else ``"mean"``."""
    last = name.rsplit("/", 1)[-1]
    for kind in ("min", "max"):
        if last == kind or last.startswith(kind + "_") or last.endswith("_" + kind):
            return kind
    return "mean"


def reduce_microbatch_metrics(metrics: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Combines ``[M, ...]`` stacked micro-batch metrics by :func:`metric_reduction` of their names (float32)."""
    ops = {"min": jnp.min, "max": jnp.max, "mean": jnp.mean}
    return {key: ops[metric_reduction(key)](jnp.asarray(value, jnp.float32), axis=0)
            for key, value in dict(metrics).items()}


def microbatch_share(count: jax.Array, ctx: "StepContext", key: str = "num_tokens") -> jax.Array:
    """``count * num_microbatches / ctx.globals[key]``: the factor that turns a micro-batch's local mean (over
    ``count`` items) into a metric whose *average over the micro-batches* is the exact mean over the whole batch
    (the step averages metrics over micro-batches; micro-batches hold different token counts). ``1`` when the
    micro-batch is the whole batch. float32 scalar; 0 when the global count is 0."""
    total = jnp.asarray(ctx.globals[key], jnp.float32)
    micro = jnp.asarray(ctx.globals.get("num_microbatches", 1.0), jnp.float32)
    return jnp.where(total > 0, jnp.asarray(count, jnp.float32) * micro / jnp.maximum(total, 1e-30), 0.0)


def _cast_floating(tree: Any, dtype: Any) -> Any:
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _split_leading(tree: Any, num: int, mesh: Mesh) -> Any:
    """``[B, ...] -> [num, B / num, ...]`` with part ``k`` = rows ``k, k + num, k + 2 num, ...``: strided, so that
    every part keeps rows on every device of the batch axes (no data movement)."""
    constraint = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))

    def split(x):
        b = x.shape[0]
        y = x.reshape((b // num, num) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(y, constraint)

    return jax.tree.map(split, tree)


class _Updater:
    """The shared core: micro-batched gradient accumulation, guarded optimizer update."""

    def __init__(
        self,
        loss_fn: LossFn,
        optimizer: optax.GradientTransformation,
        mesh: Mesh,
        param_shardings: Any,
        num_microbatches: int,
        compute_dtype: Any,
        trainable: Any,
    ):
        if not isinstance(num_microbatches, int) or num_microbatches < 1:
            raise ValueError(f"num_microbatches={num_microbatches!r}: must be a positive int.")
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.mesh = mesh
        self.param_shardings = param_shardings
        self.num_microbatches = num_microbatches
        self.compute_dtype = compute_dtype
        self.trainable = trainable

    def _flags(self, params):
        """Python bools, one per leaf of ``params`` in flatten order: True where the leaf is trained; ``None`` when
        everything is."""
        if self.trainable is None:
            return None
        mask = self.trainable(params) if callable(self.trainable) else self.trainable
        try:
            flags = jax.tree.structure(params).flatten_up_to(mask)
        except (ValueError, TypeError) as err:
            raise ValueError("trainable=...: the mask must be a pytree of bools with the structure of params "
                             f"({err}).") from None
        return [bool(f) for f in flags]

    def grads(self, params, batch, frozen, globals_, rng, step, algo_state, flags=None):
        """Summed loss, summed fp32 gradients and micro-batch-averaged metrics of one optimizer-step batch.

        With ``flags`` (see :meth:`_flags`) the gradient is taken with respect to the trained leaves only (a list,
        in flatten order); the others enter the loss as constants, so no gradient is computed for them."""
        leaves, treedef = jax.tree.flatten(params)
        if flags is None:
            flags = [True] * len(leaves)
        fixed = [x for x, f in zip(leaves, flags) if not f]
        shardings = [s for s, f in zip(treedef.flatten_up_to(self.param_shardings), flags) if f]

        def merge(trained):
            it_t, it_f = iter(trained), iter(fixed)
            return jax.tree.unflatten(treedef, [next(it_t) if f else next(it_f) for f in flags])

        def micro_loss(trained, micro_batch, micro_rng):
            p = _cast_floating(merge(trained), self.compute_dtype)
            ctx = StepContext(rng=micro_rng, step=step, algo_state=algo_state, globals=globals_)
            loss, metrics = self.loss_fn(p, micro_batch, frozen, ctx)
            if jnp.ndim(loss) != 0:
                raise ValueError(f"loss_fn must return a scalar loss, got shape {jnp.shape(loss)}.")
            return loss.astype(jnp.float32), metrics

        trained = [x for x, f in zip(leaves, flags) if f]
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        if self.num_microbatches == 1:
            (loss, metrics), grads = grad_fn(trained, batch, jax.random.fold_in(rng, 0))
            return loss, grads, metrics

        micro = _split_leading(batch, self.num_microbatches, self.mesh)
        grads0 = [jnp.zeros(p.shape, jnp.float32) for p in trained]
        grads0 = jax.lax.with_sharding_constraint(grads0, shardings)

        def body(carry, xs):
            grad_sum, loss_sum = carry
            index, micro_batch = xs
            (loss, metrics), grads = grad_fn(trained, micro_batch, jax.random.fold_in(rng, index))
            grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
            grad_sum = jax.lax.with_sharding_constraint(grad_sum, shardings)
            return (grad_sum, loss_sum + loss), metrics

        (grads, loss), metrics = jax.lax.scan(
            body, (grads0, jnp.float32(0.0)), (jnp.arange(self.num_microbatches), micro)
        )
        metrics = reduce_microbatch_metrics(metrics)
        return loss, grads, metrics

    def apply(self, params, opt_state, batch, frozen, user_globals, rng, step, algo_state):
        """One guarded optimizer update on ``batch``.

        Returns ``(params, opt_state, finite [bool], loss, grad_norm, metrics)``; params and opt_state are the old
        ones when ``finite`` is False. With ``trainable``, the leaves that are not trained are returned as they came
        in (no gradient, no update, no copy)."""
        globals_ = {**default_globals(batch), **user_globals,
                    "num_microbatches": jnp.float32(self.num_microbatches)}
        flags = self._flags(params)
        loss, grads, metrics = self.grads(params, batch, frozen, globals_, rng, step, algo_state, flags)
        finite = jnp.isfinite(loss) & _all_finite(grads)
        leaves, treedef = jax.tree.flatten(params)
        flags = [True] * len(leaves) if flags is None else flags
        it = iter(grads)
        # the optimizer sees the whole tree; the zeros of untrained leaves feed only updates that are never applied
        full_grads = jax.tree.unflatten(treedef, [next(it) if f else jnp.zeros(x.shape, jnp.float32)
                                                  for x, f in zip(leaves, flags)])
        updates, new_opt_state = self.optimizer.update(full_grads, opt_state, params)
        shardings = treedef.flatten_up_to(self.param_shardings)
        out = []
        for x, u, sh, f in zip(leaves, treedef.flatten_up_to(updates), shardings, flags):
            if not f:
                out.append(x)
                continue
            new = jax.lax.with_sharding_constraint(optax.apply_updates(x, u), sh)
            out.append(jnp.where(finite, new, x))
        params = jax.tree.unflatten(treedef, out)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        return params, opt_state, finite, loss, optax.tree.norm(grads), metrics


def _check_batch(batch: Any, divisor: int, what: str) -> int:
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not leaves:
        raise ValueError("batch is empty: pass a dict of arrays with a leading batch dimension.")
    sizes = {}
    for path, x in leaves:
        if np.ndim(x) == 0:
            raise ValueError(
                f"batch{jax.tree_util.keystr(path)} is a scalar: every batch array needs a leading batch "
                "dimension (put batch-wide constants in frozen or compute them in prepare_batch)."
            )
        sizes[jax.tree_util.keystr(path)] = np.shape(x)[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch arrays disagree on the leading (batch) dimension: {sizes}.")
    size = next(iter(sizes.values()))
    if size % divisor:
        raise ValueError(f"batch size {size} is not divisible by {what} = {divisor}; change the batch size.")
    return size


def _as_prepare(prepare_batch: PrepareBatchFn | None) -> PrepareBatchFn:
    if prepare_batch is None:
        return lambda batch, frozen, algo_state: (batch, {})
    return prepare_batch


class CompiledStep:
    """A compiled step: ``step(state, batch, frozen=None) -> (state, metrics)``.

    Checks the batch's shapes on the host (no device sync), then calls the ``jax.jit`` function. When no
    ``frozen_shardings`` were given, the first call adopts the shardings ``frozen`` already has (so it is never
    copied). ``lower(state, batch, frozen)`` lowers without running; ``jitted(frozen)`` gives the ``jax.jit``
    object. ``frozen_check`` (``frozen -> None``, raising on a wrong ``frozen``; set by
    :meth:`jrlhf.algorithms.base.Algorithm.train_step`) runs before every call, so a ``frozen`` of the wrong type is
    a one-line error rather than ``jax.jit``'s pytree-prefix message.
    """

    def __init__(self, fn, mesh, state_shardings, batch_shardings, frozen_shardings, divisor, divisor_what, donate):
        self._fn = fn
        self._mesh = mesh
        self._state_shardings = state_shardings
        self._batch_shardings = batch_shardings
        self._frozen_shardings = frozen_shardings
        self._divisor = divisor
        self._divisor_what = divisor_what
        self._donate = donate
        self._jitted = None
        self.frozen_check = None

    def _frozen_shardings_of(self, frozen):
        if self._frozen_shardings is not None:
            return self._frozen_shardings
        rep = replicated(self._mesh)

        mesh_devices = set(self._mesh.devices.flat)

        def adopt(x):
            sharding = getattr(x, "sharding", None)
            if isinstance(sharding, jax.sharding.Sharding) and set(sharding.device_set) == mesh_devices:
                return sharding
            return rep

        return jax.tree.map(adopt, frozen)

    def jitted(self, frozen=None):
        """The ``jax.jit`` function ``(state, batch, frozen) -> (state, metrics)``."""
        if self._jitted is None:
            self._jitted = jax.jit(
                self._fn,
                in_shardings=(self._state_shardings, self._batch_shardings, self._frozen_shardings_of(frozen)),
                out_shardings=(self._state_shardings, replicated(self._mesh)),
                donate_argnums=(0,) if self._donate else (),
            )
        return self._jitted

    def lower(self, state, batch, frozen=None):
        """``jax.jit(...).lower(state, batch, frozen)``: inspect the program without running it."""
        _check_batch(batch, self._divisor, self._divisor_what)
        if self.frozen_check is not None:
            self.frozen_check(frozen)
        return self.jitted(frozen).lower(state, batch, frozen)

    def __call__(self, state: TrainState, batch: dict, frozen: Any = None) -> tuple[TrainState, dict]:
        _check_batch(batch, self._divisor, self._divisor_what)
        if self.frozen_check is not None:
            self.frozen_check(frozen)
        return self.jitted(frozen)(state, batch, frozen)


def _step_metrics(metrics, loss, grad_norm, finite, count, step, lr_fn):
    out = {}
    for key, value in dict(metrics).items():
        inexact = jnp.issubdtype(jnp.result_type(value), jnp.inexact)
        out[key] = jnp.asarray(value, jnp.float32) if inexact else value
    out["loss"] = loss
    out["grad_norm"] = grad_norm
    out["nonfinite"] = jnp.logical_not(finite).astype(jnp.int32)
    out["nonfinite_count"] = count
    out["step"] = step
    if lr_fn is not None:
        out["learning_rate"] = jnp.asarray(lr_fn(step), jnp.float32)
    return out


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    state_shardings: TrainState,
    frozen_shardings: Any = None,
    batch_shardings: Any = None,
    num_microbatches: int = 1,
    prepare_batch: PrepareBatchFn | None = None,
    update_algo_state: UpdateAlgoStateFn | None = None,
    compute_dtype: Any = None,
    trainable: Any = None,
    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
    donate: bool = True,
) -> CompiledStep:
    """Compiles one optimizer step of ``loss_fn``: ``step(state, batch, frozen) -> (state, metrics)``.

    Inside the program: ``prepare_batch`` on the whole batch, the batch-global normalisers
    (:func:`default_globals`), a ``lax.scan`` over ``num_microbatches`` strided micro-batches summing fp32 gradients,
    the optimizer update guarded by an all-finite flag, then ``update_algo_state``.

    Args:
      loss_fn: ``loss_fn(params, batch, frozen, ctx: StepContext) -> (scalar loss, dict of metrics)`` on one
        micro-batch, normalised by the global counts in ``ctx.globals`` (micro-batch losses sum to the batch loss).
      optimizer: optax transformation (:func:`make_optimizer`).
      mesh: the mesh the state lives on.
      state_shardings: the :class:`TrainState` of shardings from :func:`init_train_state`.
      frozen_shardings: pytree (or prefix) of shardings for ``frozen``; ``None`` adopts, at the first call, the
        shardings ``frozen``'s arrays already have on this mesh (others replicated).
      batch_shardings: shardings for the batch (a prefix such as one ``NamedSharding`` is fine); default
        :func:`jrlhf.sharding.batch_sharding` for every leaf (leading dim over ``("data", "fsdp")``).
      num_microbatches: gradient-accumulation micro-batches; the batch size must be divisible by
        ``num_microbatches * data * fsdp``. Micro-batch ``k`` holds rows ``k, k + M, k + 2M, ...``.
      prepare_batch: ``prepare_batch(batch, frozen, algo_state) -> (batch, globals)``, run once on the whole batch
        before the micro-batch scan (whitening, batch-scaled advantages, sorts...). Its ``globals`` override the
        defaults; every returned batch array keeps the leading batch dimension. A ``prepare_batch`` with the attribute
        ``reads_params = True`` is called as ``prepare_batch(batch, frozen, algo_state, params=...)`` with the
        current params (cast to ``compute_dtype``; it runs outside the differentiated loss, so nothing it computes
        carries a gradient), e.g. :mod:`jrlhf.algorithms.kto`'s batch-global KL estimate.
      update_algo_state: ``update_algo_state(algo_state, metrics) -> algo_state``, run in-graph after the update
        (adaptive KL, running means); skipped when the step is not finite.
      compute_dtype: e.g. ``jnp.bfloat16``: floating params are cast to it inside the step before ``loss_fn``;
        the master params, gradients and optimizer state stay fp32. ``frozen`` is passed as stored.
      trainable: same mask as ``make_optimizer(trainable=...)`` (Python bools, or a callable returning them): the
        gradient is taken with respect to the trained leaves only (the others enter the loss as constants: no
        gradient is computed for them, e.g. a LoRA run's frozen base, :func:`jrlhf.models.lora.trainable_mask`),
        and the others are returned unchanged.
      learning_rate_fn: optional schedule (:func:`make_schedule`); adds ``metrics["learning_rate"]`` at
        ``state.step``.
      donate: donate the input state's buffers (the caller must not reuse the old state).

    Returns:
      A :class:`CompiledStep`. Its metrics (replicated) are the loss's metrics combined over micro-batches
      (:func:`reduce_microbatch_metrics`) plus
      ``loss`` (float32, sum over micro-batches = full-batch loss), ``grad_norm`` (global norm of the gradients
      before clipping), ``nonfinite`` (int32, 1 if this step was skipped), ``nonfinite_count`` (int32, running
      total), ``step`` (int32, the step number of this update) and optionally ``learning_rate``.
    """
    updater = _Updater(loss_fn, optimizer, mesh, state_shardings.params, num_microbatches, compute_dtype, trainable)
    prepare = _as_prepare(prepare_batch)

    def step_fn(state: TrainState, batch: dict, frozen: Any):
        if getattr(prepare_batch, "reads_params", False):  # e.g. KTO's KL estimate under the current policy
            batch, user_globals = prepare(batch, frozen, state.algo_state,
                                          params=_cast_floating(state.params, compute_dtype))
        else:
            batch, user_globals = prepare(batch, frozen, state.algo_state)
        next_rng, step_rng = jax.random.split(state.rng)
        params, opt_state, finite, loss, grad_norm, metrics = updater.apply(
            state.params, state.opt_state, batch, frozen, user_globals, step_rng, state.step, state.algo_state
        )
        count = state.nonfinite_count + jnp.logical_not(finite).astype(jnp.int32)
        metrics = _step_metrics(metrics, loss, grad_norm, finite, count, state.step, learning_rate_fn)
        algo_state = state.algo_state
        if update_algo_state is not None:
            updated = update_algo_state(algo_state, metrics)
            algo_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old).astype(old.dtype), updated, algo_state
            )
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            rng=next_rng,
            algo_state=algo_state,
            nonfinite_count=count,
        )
        return new_state, metrics

    divisor = num_microbatches * mesh_axis_size(mesh, BATCH_AXES)
    return CompiledStep(
        step_fn,
        mesh,
        state_shardings,
        batch_sharding(mesh) if batch_shardings is None else batch_shardings,
        frozen_shardings,
        divisor,
        "num_microbatches x data x fsdp",
        donate,
    )


def make_onpolicy_update(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    state_shardings: TrainState,
    num_epochs: int,
    num_minibatches: int,
    shuffle: bool | None = None,
    frozen_shardings: Any = None,
    batch_shardings: Any = None,
    num_microbatches: int = 1,
    prepare_batch: PrepareBatchFn | None = None,
    update_algo_state: UpdateAlgoStateFn | None = None,
    compute_dtype: Any = None,
    trainable: Any = None,
    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
    donate: bool = True,
) -> CompiledStep:
    """Compiles a whole on-policy update: ``update(state, rollout_batch, frozen) -> (state, metrics)``.

    ``prepare_batch`` runs once on the whole rollout batch (its globals, e.g. advantage statistics, are shared by
    every mini-batch). Then ``num_epochs`` passes (outer ``lax.scan``), each over ``num_minibatches`` mini-batches
    (inner ``lax.scan``); every mini-batch is one guarded optimizer update, itself accumulated over
    ``num_microbatches``. The default normalisers (``num_tokens``, ``num_sequences``) are those of the mini-batch,
    i.e. of the optimizer step, unless ``prepare_batch`` sets them.

    Randomness (documented so that a run can be reproduced step by step)::

        next_rng, update_rng = split(state.rng);  perm_rng, loss_rng = split(update_rng)
        epoch e permutation = jax.random.permutation(split(perm_rng, num_epochs)[e], B)   (if shuffle)
        mini-batch k of epoch e = rows k, k + num_minibatches, ... of the permuted batch
        its step rng = fold_in(loss_rng, e * num_minibatches + k)  (micro-batch m: fold_in(step rng, m))

    Args: as :func:`make_train_step`, plus
      num_epochs: passes over the rollout batch.
      num_minibatches: optimizer updates per pass; the batch size must be divisible by
        ``num_minibatches * num_microbatches * data * fsdp``.
      shuffle: permute the rollout batch at each epoch (from the state RNG); ``None`` (default): only when there is
        more than one update (``num_epochs * num_minibatches > 1``): one epoch of one mini-batch sees every row once
        whatever the order, so it skips the permutation (the RNG splits stay the same).
      update_algo_state: run once after all the mini-batches with the metrics averaged over them; skipped if any
        mini-batch update was skipped.

    Returns:
      A :class:`CompiledStep`. ``state.step`` advances by ``num_epochs * num_minibatches``. Metrics are combined
      over all mini-batches (:func:`reduce_microbatch_metrics`: averaged, min / max by name), plus ``loss``
      (mean mini-batch loss), ``grad_norm`` (mean), ``nonfinite`` (number of skipped mini-batches),
      ``nonfinite_count``, ``step`` (the state's step before the update) and optionally ``learning_rate`` (at that
      step).
    """
    for name, value in (("num_epochs", num_epochs), ("num_minibatches", num_minibatches)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive int.")
    if shuffle is None:
        shuffle = num_epochs * num_minibatches > 1
    updater = _Updater(loss_fn, optimizer, mesh, state_shardings.params, num_microbatches, compute_dtype, trainable)
    prepare = _as_prepare(prepare_batch)

    def update_fn(state: TrainState, batch: dict, frozen: Any):
        batch, user_globals = prepare(batch, frozen, state.algo_state)
        batch_size = jax.tree.leaves(batch)[0].shape[0]
        next_rng, update_rng = jax.random.split(state.rng)
        perm_rng, loss_rng = jax.random.split(update_rng)
        epoch_keys = jax.random.split(perm_rng, num_epochs)
        bsh = NamedSharding(mesh, PartitionSpec(BATCH_AXES))

        def epoch_body(carry, xs):
            epoch, key = xs
            epoch_batch = batch
            if shuffle:
                perm = jax.random.permutation(key, batch_size)
                epoch_batch = jax.tree.map(
                    lambda x: jax.lax.with_sharding_constraint(jnp.take(x, perm, axis=0), bsh), batch
                )
            minibatches = _split_leading(epoch_batch, num_minibatches, mesh)

            def minibatch_body(carry, xs):
                params, opt_state, step, count = carry
                index, minibatch = xs
                rng = jax.random.fold_in(loss_rng, epoch * num_minibatches + index)
                params, opt_state, finite, loss, grad_norm, metrics = updater.apply(
                    params, opt_state, minibatch, frozen, user_globals, rng, step, state.algo_state
                )
                skipped = jnp.logical_not(finite).astype(jnp.int32)
                out = dict(metrics)
                out["loss"] = loss
                out["grad_norm"] = grad_norm
                out["nonfinite"] = skipped
                return (params, opt_state, step + 1, count + skipped), out

            return jax.lax.scan(minibatch_body, carry, (jnp.arange(num_minibatches), minibatches))

        carry = (state.params, state.opt_state, state.step, state.nonfinite_count)
        (params, opt_state, step, count), per_update = jax.lax.scan(
            epoch_body, carry, (jnp.arange(num_epochs), epoch_keys)
        )
        skipped = jnp.sum(per_update.pop("nonfinite"))
        metrics = reduce_microbatch_metrics(
            {k: jnp.reshape(v, (-1,) + jnp.shape(v)[2:]) for k, v in per_update.items()})
        metrics["nonfinite"] = skipped
        metrics["nonfinite_count"] = count
        metrics["step"] = state.step
        if learning_rate_fn is not None:
            metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
        algo_state = state.algo_state
        if update_algo_state is not None:
            updated = update_algo_state(algo_state, metrics)
            algo_state = jax.tree.map(
                lambda new, old: jnp.where(skipped == 0, new, old).astype(old.dtype), updated, algo_state
            )
        new_state = TrainState(
            step=step,
            params=params,
            opt_state=opt_state,
            rng=next_rng,
            algo_state=algo_state,
            nonfinite_count=count,
        )
        return new_state, metrics

    divisor = num_minibatches * num_microbatches * mesh_axis_size(mesh, BATCH_AXES)
    return CompiledStep(
        update_fn,
        mesh,
        state_shardings,
        batch_sharding(mesh) if batch_shardings is None else batch_shardings,
        frozen_shardings,
        divisor,
        "num_minibatches x num_microbatches x data x fsdp",
        donate,
    )


# ----------------------------------------------------------------------------------------------------------------
# Host-side helpers
# ----------------------------------------------------------------------------------------------------------------


class NonFiniteError(FloatingPointError):
    """Raised by :class:`NonFiniteMonitor` when too many updates were skipped for non-finite values."""


class NonFiniteMonitor:
    """Reads ``metrics["nonfinite_count"]`` one step late, so the training loop never waits on the device.

    Usage::

        monitor = NonFiniteMonitor(max_nonfinite=0)
        for batch in batches:
            state, metrics = step(state, batch, frozen)
            monitor(metrics)          # checks the *previous* step's metrics (already computed)
        monitor.flush()               # checks the last one

    Raises :class:`NonFiniteError` naming the step once more than ``max_nonfinite`` updates were skipped.
    """

    def __init__(self, max_nonfinite: int = 0):
        self.max_nonfinite = int(max_nonfinite)
        self._pending: tuple[Any, Any] | None = None

    def _check(self, pending) -> None:
        step, count = (int(np.asarray(x)) for x in pending)
        if count > self.max_nonfinite:
            raise NonFiniteError(
                f"non-finite loss or gradients: {count} update(s) skipped so far, the last at or before step {step} "
                f"(allowed: {self.max_nonfinite}); lower the learning rate, check the data, or raise max_nonfinite."
            )

    def __call__(self, metrics: Mapping[str, Any]) -> None:
        """Registers this step's metrics and checks the previous step's."""
        pending = (metrics["step"], metrics["nonfinite_count"])
        for x in pending:
            if isinstance(x, jax.Array):
                x.copy_to_host_async()
        previous, self._pending = self._pending, pending
        if previous is not None:
            self._check(previous)

    def flush(self) -> None:
        """Checks the most recent step's metrics now (waits for it)."""
        previous, self._pending = self._pending, None
        if previous is not None:
            self._check(previous)
