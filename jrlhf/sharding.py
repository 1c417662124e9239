"""Device meshes and the logical-axis rule table that maps parameter axes onto them.

A jrlhf mesh always has the three axes ``("data", "fsdp", "tensor")``:

* ``data``   -- pure data parallelism: parameters replicated, the batch split.
* ``fsdp``   -- fully sharded data parallelism: the batch split *and* the ``embed`` axis of every parameter split.
* ``tensor`` -- tensor (model) parallelism: heads, MLP width and vocabulary split; the batch is not split.

Models name the axes of their parameters with logical names (``vocab``, ``embed``, ``heads``, ``kv_heads``,
``head_dim``, ``mlp``, ``layers``, ``norm``; see :func:`jrlhf.models.logical_axes`). One short rule table,
:data:`DEFAULT_RULES`, maps each logical name to a mesh axis (or to ``None``: replicated), and
:func:`logical_to_shardings` turns a pytree of logical :class:`~jax.sharding.PartitionSpec` into a pytree of
:class:`~jax.sharding.NamedSharding`. Batches are split along their leading dimension over ``("data", "fsdp")``
(:func:`batch_sharding`).

Fallbacks of :func:`logical_to_shardings` (documented behaviour, not errors, unless ``on_indivisible="error"``):

* a dimension whose size is not divisible by the size of its mesh axes is replicated along that dimension;
* a mesh axis already used by an earlier dimension of the same parameter is not reused (that later dimension is
  replicated), since one mesh axis can split only one dimension of an array.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
"""Names of the three mesh axes, in mesh order."""

BATCH_AXES: tuple[str, str] = ("data", "fsdp")
"""Mesh axes the leading (batch) dimension of every batch array is split over."""

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
)
"""Logical axis name -> mesh axis (a name, a tuple of names, or ``None`` for replicated)."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ``data``, ``fsdp`` and ``tensor`` mesh axes.

    Exactly one size may be ``-1``: it takes all the devices the other two leave. The product of the sizes must
    equal the number of devices the mesh is built from.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Returns the concrete ``(data, fsdp, tensor)`` sizes for ``num_devices`` devices (``-1`` filled in)."""
        sizes = (self.data, self.fsdp, self.tensor)
        if num_devices < 1:
            raise ValueError(f"MeshConfig needs at least one device, got num_devices={num_devices}.")
        for name, size in zip(MESH_AXES, sizes):
            if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
                raise ValueError(f"MeshConfig.{name}={size!r}: each size must be a positive int or -1 (the rest).")
        free = [name for name, size in zip(MESH_AXES, sizes) if size == -1]
        if len(free) > 1:
            raise ValueError(f"MeshConfig {sizes}: only one of data/fsdp/tensor may be -1, got {free}.")
        fixed = math.prod(size for size in sizes if size != -1)
        if free:
            if num_devices % fixed:
                raise ValueError(
                    f"MeshConfig {dict(zip(MESH_AXES, sizes))}: the fixed axes use {fixed} devices, which does not "
                    f"divide the {num_devices} available; choose sizes whose product divides {num_devices}."
                )
            sizes = tuple(num_devices // fixed if size == -1 else size for size in sizes)
        elif fixed != num_devices:
            raise ValueError(
                f"MeshConfig {dict(zip(MESH_AXES, sizes))} needs {fixed} devices but {num_devices} are given; "
                f"set one axis to -1 or make the product equal {num_devices}."
            )
        return tuple(int(size) for size in sizes)


def make_mesh(
    cfg_or_sizes: MeshConfig | Mapping[str, int] | Sequence[int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a ``("data", "fsdp", "tensor")`` mesh with every axis of type ``AxisType.Auto``.

    Args:
      cfg_or_sizes: a :class:`MeshConfig`, a mapping with keys among ``data``/``fsdp``/``tensor``, or a sequence of
        three sizes ``(data, fsdp, tensor)``; ``-1`` means "the rest of the devices". ``None`` means
        ``MeshConfig()``: all devices along ``data``.
      devices: the devices to use (default: ``jax.devices()``, i.e. every device of every process).

    Returns:
      A :class:`jax.sharding.Mesh` of shape ``(data, fsdp, tensor)``.
    """
    cfg = as_mesh_config(cfg_or_sizes)
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.resolve(len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def as_mesh_config(cfg_or_sizes: MeshConfig | Mapping[str, int] | Sequence[int] | None) -> MeshConfig:
    """Normalises ``None``, a :class:`MeshConfig`, a mapping or a 3-sequence of sizes to a :class:`MeshConfig`."""
    if cfg_or_sizes is None:
        return MeshConfig()
    if isinstance(cfg_or_sizes, MeshConfig):
        return cfg_or_sizes
    if isinstance(cfg_or_sizes, Mapping):
        unknown = set(cfg_or_sizes) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh sizes: unknown axes {sorted(unknown)}; the axes are {MESH_AXES}.")
        return MeshConfig(**{k: int(v) for k, v in cfg_or_sizes.items()})
    sizes = tuple(cfg_or_sizes)
    if len(sizes) != len(MESH_AXES):
        raise ValueError(f"mesh sizes {sizes}: give three sizes (data, fsdp, tensor).")
    return MeshConfig(*(int(s) for s in sizes))


def mesh_axis_size(mesh: Mesh, axes: str | Sequence[str] | None) -> int:
    """Number of devices a mesh axis (or tuple of axes, or ``None`` = 1) spans."""
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def _rules_dict(rules: Sequence[tuple[str, Any]] | Mapping[str, Any]) -> dict[str, Any]:
    items = rules.items() if isinstance(rules, Mapping) else rules
    table: dict[str, Any] = {}
    for entry in items:
        if len(entry) != 2 or not isinstance(entry[0], str):
            raise ValueError(f"sharding rule {entry!r}: each rule is a pair (logical_name, mesh_axis_or_None).")
        name, target = entry
        if name in table:
            raise ValueError(f"sharding rules: logical name {name!r} appears twice.")
        table[name] = target
    return table


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def logical_to_mesh_spec(
    logical_spec: PartitionSpec,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] | Mapping[str, Any] = DEFAULT_RULES,
    shape: Sequence[int] | None = None,
    *,
    on_indivisible: str = "replicate",
    where: str = "",
) -> PartitionSpec:
    """Maps one logical ``PartitionSpec`` (e.g. ``P("embed", "mlp")``) to a mesh ``PartitionSpec``.

    Args:
      logical_spec: one logical name (or ``None``) per array dimension.
      mesh: the mesh whose axis sizes decide divisibility.
      rules: logical name -> mesh axis table (see :data:`DEFAULT_RULES`).
      shape: the array's shape; when given, a dimension not divisible by its mesh axes' size is replicated
        (``on_indivisible="replicate"``) or raises (``on_indivisible="error"``).
      on_indivisible: ``"replicate"`` (default) or ``"error"``.
      where: a path used in error messages.

    Returns:
      A ``PartitionSpec`` over mesh axis names, with trailing ``None`` entries stripped.
    """
    if on_indivisible not in ("replicate", "error"):
        raise ValueError(f"on_indivisible={on_indivisible!r}: use 'replicate' or 'error'.")
    table = _rules_dict(rules)
    if shape is not None and len(logical_spec) > len(shape):
        raise ValueError(
            f"{where or 'array'}: logical spec {logical_spec} has {len(logical_spec)} entries but the array has "
            f"shape {tuple(shape)}; the model's logical_axes and params disagree."
        )
    used: set[str] = set()
    out: list[Any] = []
    for dim, name in enumerate(logical_spec):
        if name is None:
            out.append(None)
            continue
        if isinstance(name, (tuple, list)):
            raise ValueError(f"{where or 'array'}: logical spec {logical_spec} dim {dim}: give one logical name.")
        if name not in table:
            raise ValueError(
                f"{where or 'array'}: logical axis name {name!r} has no sharding rule; add "
                f"({name!r}, <mesh axis or None>) to the rules (known names: {sorted(table)})."
            )
        target = table[name]
        axes: tuple[str, ...] = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        for axis in axes:
            if axis not in mesh.shape:
                raise ValueError(
                    f"sharding rule ({name!r}, {target!r}) names mesh axis {axis!r}, which the mesh "
                    f"{dict(mesh.shape)} lacks."
                )
        axes = tuple(a for a in axes if a not in used)
        if axes and shape is not None:
            size = mesh_axis_size(mesh, axes)
            if shape[dim] % size:
                if on_indivisible == "error":
                    raise ValueError(
                        f"{where or 'array'}: dimension {dim} ({name!r}) of shape {tuple(shape)} has size "
                        f"{shape[dim]}, not divisible by mesh axes {axes} of size {size}; change the mesh or map "
                        f"{name!r} to None in the rules."
                    )
                axes = ()
        used.update(axes)
        out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def logical_to_shardings(
    logical_specs: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] | Mapping[str, Any] = DEFAULT_RULES,
    *,
    shapes: Any = None,
    on_indivisible: str = "replicate",
) -> Any:
    """Turns a pytree of logical ``PartitionSpec`` into a pytree of :class:`NamedSharding` on ``mesh``.

    Args:
      logical_specs: pytree of ``PartitionSpec`` over logical names (``jrlhf.models.logical_axes(model)``).
      mesh: the target mesh.
      rules: logical name -> mesh axis table (default :data:`DEFAULT_RULES`).
      shapes: optional matching pytree of arrays / ``jax.ShapeDtypeStruct`` (e.g. the params); enables the
        divisibility check (see the module docstring for the fallback).
      on_indivisible: ``"replicate"`` (default) or ``"error"``.

    Returns:
      A pytree with the structure of ``logical_specs`` whose leaves are ``NamedSharding(mesh, mesh_spec)``.
    """
    if shapes is None:
        return jax.tree.map(
            lambda spec: NamedSharding(mesh, logical_to_mesh_spec(spec, mesh, rules, on_indivisible=on_indivisible)),
            logical_specs,
            is_leaf=_is_spec,
        )
    spec_leaves, treedef = jax.tree_util.tree_flatten_with_path(logical_specs, is_leaf=_is_spec)
    shape_leaves = treedef.flatten_up_to(shapes)
    out = []
    for (path, spec), arr in zip(spec_leaves, shape_leaves):
        if not _is_spec(spec):
            raise TypeError(f"{jax.tree_util.keystr(path)}: expected a PartitionSpec, got {type(spec).__name__}.")
        mesh_spec = logical_to_mesh_spec(
            spec, mesh, rules, np.shape(arr), on_indivisible=on_indivisible, where=jax.tree_util.keystr(path)
        )
        out.append(NamedSharding(mesh, mesh_spec))
    return jax.tree_util.tree_unflatten(treedef, out)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch array ``[B, ...]``: the leading dimension split over ``("data", "fsdp")``."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy of an array on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
    """Per-leaf batch shardings: :func:`batch_sharding` for arrays of rank >= 1, :func:`replicated` for scalars."""
    return jax.tree.map(lambda x: batch_sharding(mesh) if np.ndim(x) >= 1 else replicated(mesh), batch)


def put_global(tree: Any, shardings: Any, *, copy: bool = False) -> Any:
    """Places host or single-device values on (possibly multi-process) shardings.

    Every process must pass the same full values. Arrays committed to devices outside the target's process are
    copied through host memory.

    Args:
      tree: pytree of numpy / jax arrays holding the *global* values.
      shardings: a matching pytree of ``Sharding`` (or one sharding for every leaf).
      copy: if True the result never shares buffers with ``tree`` (safe to donate the result while ``tree`` is
        still used); if False an array that already has the target sharding is returned as it is.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def put(x, sharding):
        if isinstance(x, jax.Array):
            if x.sharding == sharding and not copy:
                return x
            if jax.process_count() > 1 and x.is_fully_addressable and not sharding.is_fully_addressable:
                return jax.device_put(np.asarray(x), sharding)
            if copy:
                # device_put may reuse the source buffer for the shard on the source device even with
                # may_alias=False; a fresh copy first keeps the caller's array valid after donation.
                x = jnp.copy(x)
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree, shardings)


def describe_shardings(tree: Any) -> dict[str, str]:
    """``{path: str(spec)}`` for every array leaf: handy to log how parameters were laid out."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, x in leaves:
        sharding = getattr(x, "sharding", x)
        out[jax.tree_util.keystr(path)] = str(getattr(sharding, "spec", sharding))
    return out
