"""Device mesh and logical-axis sharding, driven by config (maxdiffusion style).

Modules annotate parameters with logical names (see :mod:`fasdiff_jax.models.layers`); the
config maps logical names to mesh axes. Here we turn those annotations into
``NamedSharding``s, dropping a mesh axis from any dimension it does not divide (an SD conv
with 4 input channels cannot be split 8 ways), so one rule set works for every layer.
Initialisation is sharded from the start: ``eval_shape`` -> shardings -> ``jit(init)``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# (logical name, mesh axis or axes or None). The first rule whose mesh axes are all free
# for a given array is used, exactly as in flax.linen.logical_to_mesh_axes.
DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_h", None),
    ("conv_w", None),
    ("norm", None),
    ("length", None),
    ("height", None),
    ("width", None),
    ("channels", None),
)

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")


def create_mesh(
    shape: Mapping[str, int] | Sequence[int],
    axis_names: Sequence[str] = MESH_AXES,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh over all (or the given) devices. A ``-1`` entry takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(shape, Mapping):
        axis_names = tuple(shape.keys())
        sizes = [int(v) for v in shape.values()]
    else:
        sizes = [int(v) for v in shape]
    for name, size in zip(axis_names, sizes):  # 0 divided by zero; -2 x -4 made 8 "devices"
        if size < 1 and size != -1:
            raise ValueError(f"mesh axis {name!r} must be a positive size or -1 (the devices "
                             f"left), got {size}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(axis_names, sizes))} needs {math.prod(sizes)} devices, "
            f"have {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(sizes), tuple(axis_names))


def _mesh_axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        return mesh.shape[axes]
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_mesh_spec(
    logical: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = DEFAULT_LOGICAL_AXIS_RULES,
) -> P:
    """Map logical axis names to a PartitionSpec valid for ``shape`` on ``mesh``.

    Mesh axes absent from the mesh, or whose size does not divide the dimension, are
    dropped for that dimension (it is then replicated along them).
    """
    if logical is None:
        return P()
    spec = nn.logical_to_mesh_axes(tuple(logical), rules)
    out = []
    for dim, axes in zip(shape, spec):
        if axes is None:
            out.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        names = tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1)
        if not names or dim % _mesh_axis_size(mesh, names):
            out.append(None)
        else:
            out.append(names[0] if len(names) == 1 else names)
    return P(*out)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def tree_shardings(
    abstract_tree: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = DEFAULT_LOGICAL_AXIS_RULES,
) -> Any:
    """NamedShardings for a (possibly boxed, possibly abstract) tree of arrays.

    Boxed leaves (``nn.LogicallyPartitioned``) are sharded by their names; plain leaves are
    replicated. The result has the structure of the *unboxed* tree.
    """

    def one(leaf: Any) -> NamedSharding:
        if _is_box(leaf):
            value = leaf.value
            return NamedSharding(mesh, logical_to_mesh_spec(leaf.names, value.shape, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, abstract_tree, is_leaf=_is_box)


def init_sharded(
    init_fn: Callable[..., Any],
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = DEFAULT_LOGICAL_AXIS_RULES,
    *args: Any,
) -> tuple[Any, Any]:
    """Run ``init_fn(*args)`` under jit with sharded outputs; never builds a replicated copy.

    Returns ``(unboxed_tree, shardings)``.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = tree_shardings(abstract, mesh, rules)
    with jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh:
        tree = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return tree, shardings


def gathered_over(shardings: Any, axes: Sequence[str]) -> Any:
    """A tree of ``NamedSharding``s with the mesh ``axes`` dropped from every spec.

    FSDP stores params split over the axes that split the batch and computes with them
    gathered over those axes; the train step constrains its params to this layout (see
    :func:`fasdiff_jax.models.train_step.make_train_step`)."""
    drop = set(axes)

    def one(s: NamedSharding) -> NamedSharding:
        spec = []
        for entry in s.spec:
            names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            names = tuple(a for a in names if a not in drop)
            spec.append(None if not names else names[0] if len(names) == 1 else names)
        return NamedSharding(s.mesh, P(*spec))

    return jax.tree.map(one, shardings)


def shard_tree(tree: Any, shardings: Any) -> Any:
    """Place an (unboxed) host or device tree onto the given shardings."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def batch_shards(mesh: Mesh, batch_axes: Sequence[str] = ("data", "fsdp")) -> int:
    """How many parts :func:`batch_sharding` splits a batch into on ``mesh``."""
    return int(np.prod([mesh.shape[a] for a in batch_axes if a in mesh.shape]))


def batch_sharding(mesh: Mesh, ndim: int, batch_axes: Sequence[str] = ("data", "fsdp")) -> NamedSharding:
    """Shard the leading (batch) dimension over the given mesh axes that exist."""
    axes = tuple(a for a in batch_axes if a in mesh.shape)
    return NamedSharding(mesh, P(axes if axes else None, *([None] * (ndim - 1))))
