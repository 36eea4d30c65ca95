"""The one place for the device mesh, the sharding rules and the shardings derived from them.

Mesh. Axes ``('data', 'fsdp', 'tensor')``, each of type ``AxisType.Auto`` (classic GSPMD
propagation). That is a deliberate choice: ``jax.make_mesh`` defaults to Explicit axes in
jax >= 0.10, under which every op whose output sharding is ambiguous needs an explicit
``reshard`` in the model; the U-Net is written as plain jnp and is sharded from the outside
(parameters, batch and a few activation constraints), which is what Auto axes are for. Each axis
has an in-slice size (ICI: NVLink within a node, a TPU slice's torus) and a cross-slice size (DCN:
between nodes or slices); the mesh axis is their product, with the DCN part outermost so that the
collectives of the inner axes stay on the fast links. One device is a 1x1x1 mesh, so the same
code runs from a laptop to a cluster.

Rules. Arrays carry *logical* axis names (``'batch'``, ``'in'``, ``'out'``, ``'channels'``, ...);
``rules`` map them to mesh axes and are data in the config (``config.mesh.rules``,
``DEFAULT_RULES`` below), MaxText-style: the first rule for a name whose mesh axes are unused in
that array and divide the dimension wins (axes of size 1 are left out; a tuple of axes that does
not divide is shortened from the end); otherwise the dimension is replicated.
Parameters get their names from their path and rank (:func:`param_logical_axes`). Then the FSDP
fallback: if the ``fsdp`` axis is still unused in an array (an unannotated leaf, or a rule that
did not divide), it goes on the largest remaining dimension it divides. Optimizer moments, EMA
trees and the sCD teacher use the same function, so they are sharded exactly like the student.
The batch is split over ``('data', 'fsdp')``.

Activations. :func:`constrain` pins a few key activations (the network's input, output and block
outputs) to their logical sharding while a :func:`activation_rules` context is active (the
training step is traced inside one); elsewhere it does nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = [
    "AXIS_TYPE", "BATCH_AXES", "DEFAULT_RULES", "MESH_AXES", "activation_rules", "batch_sharding",
    "check_batch", "check_rules", "constrain", "fsdp_spec", "logical_to_spec", "make_mesh",
    "mesh_from_config", "param_logical_axes", "sharded_init", "state_shardings", "tree_specs",
]  # fmt: skip

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
AXIS_TYPE = AxisType.Auto  # see the module docstring

Rule = tuple[str, Any]  # (logical name, None | mesh axis | tuple of mesh axes)

# Logical axis -> mesh axes (the ``mesh.rules`` default): the first rule for a name whose mesh
# axes are free, > 1 and divide the dimension wins; unmatched dimensions are replicated, then
# the FSDP fallback puts a still-unused 'fsdp' on the largest dimension it divides.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("in", "fsdp"),  # a weight's input features (conv / linear C_in)
    ("out", "tensor"),  # a weight's output features
    ("vocab", None),  # class-embedding rows (the FSDP fallback may still split them)
    ("kh", None),
    ("kw", None),
    ("height", None),
    ("width", None),
    ("channels", "tensor"),  # activations' channels, like the weights that made them
)

# ------------------------------------------------------------------------------------- mesh


def _fill(sizes: dict[str, int], total: int, what: str) -> dict[str, int]:
    """Replace at most one -1 in ``sizes`` so that they multiply to ``total``."""
    free = [a for a, s in sizes.items() if s == -1]

    shown = " x ".join(f"{a}={s}" for a, s in sizes.items())
    if len(free) > 1:
        raise ValueError(f"at most one {what} mesh axis may be -1, got {shown}")
    if any(s < 1 for a, s in sizes.items() if a not in free):
        raise ValueError(f"{what} mesh sizes must be >= 1 (or -1 to fill), got {shown}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if total % known:
            raise ValueError(f"{total} devices cannot be split into {what} mesh {shown}")
        sizes = {**sizes, free[0]: total // known}
    if math.prod(sizes.values()) != total:
        raise ValueError(
            f"{what} mesh {shown} has {math.prod(sizes.values())} devices but there are {total}; "
            "make the sizes multiply to the device count or set one to -1"
        )
    return sizes


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, *,
    dcn: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None,
) -> Mesh:  # fmt: skip
    """The ``('data', 'fsdp', 'tensor')`` mesh with Auto axes.

    Args:
      data, fsdp, tensor: in-slice (ICI) sizes; one may be -1 (filled with the rest).
      dcn: cross-slice (DCN) sizes ``{'data': 2, ...}`` (default all 1): the mesh axis is the
        ICI size times the DCN size; slices are TPU slices, or processes (hosts) on GPU/CPU.
      devices: default ``jax.devices()`` (all processes').
    Returns:
      The mesh; ``mesh.shape[a]`` is ICI x DCN for each axis.
    Raises:
      ValueError: sizes that do not multiply to the device count, more than one -1, unknown
        DCN axes, or a DCN shape the devices' slices / processes do not match.
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn = {a: 1 for a in MESH_AXES} | dict(dcn or {})
    unknown = sorted(set(dcn) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown DCN mesh axes {unknown}; the axes are {', '.join(MESH_AXES)}")
    if any(int(s) < 1 for s in dcn.values()):
        raise ValueError(f"DCN mesh sizes must be >= 1, got {dcn}")
    slices = math.prod(dcn.values())
    if len(devices) % slices:
        raise ValueError(f"{len(devices)} devices cannot form {slices} DCN slices ({dcn})")
    ici = _fill({"data": data, "fsdp": fsdp, "tensor": tensor}, len(devices) // slices, "ICI")
    ici_shape = tuple(ici[a] for a in MESH_AXES)
    if slices == 1:
        return jax.make_mesh(
            ici_shape, MESH_AXES, axis_types=(AXIS_TYPE,) * len(MESH_AXES), devices=devices
        )
    from jax.experimental import mesh_utils

    tpu = devices[0].platform == "tpu"
    granules = len({getattr(d, "slice_index", 0) if tpu else d.process_index for d in devices})
    if granules != slices:
        raise ValueError(
            f"DCN mesh {dcn} needs {slices} {'slices' if tpu else 'processes'} but the devices "
            f"span {granules}; set mesh.dcn_* to the number of "
            f"{'TPU slices' if tpu else 'hosts (processes)'}"
        )
    arr = mesh_utils.create_hybrid_device_mesh(
        ici_shape, tuple(int(dcn[a]) for a in MESH_AXES), devices, process_is_granule=not tpu
    )
    return Mesh(arr, MESH_AXES, axis_types=(AXIS_TYPE,) * len(MESH_AXES))


def mesh_from_config(
    mesh_cfg: Mapping[str, Any], devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """:func:`make_mesh` from a config's ``mesh`` section (``defaults.MESH_DEFAULTS``), with
    its rules checked first."""
    check_rules(mesh_cfg["rules"])
    dcn = {a: int(mesh_cfg[f"dcn_{a}"]) for a in MESH_AXES}
    return make_mesh(
        int(mesh_cfg["data"]), int(mesh_cfg["fsdp"]), int(mesh_cfg["tensor"]), dcn=dcn,
        devices=devices,
    )  # fmt: skip


def batch_size_per_shard(mesh: Mesh) -> int:
    """How many ways the batch is split: the product of the ``BATCH_AXES`` sizes."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(batch_size: int, mesh: Mesh, micro_batches: int = 1) -> None:
    """Raise ValueError unless ``batch_size`` splits into ``micro_batches`` equal parts, each
    divisible over the mesh's ``data`` x ``fsdp`` devices."""
    ways = batch_size_per_shard(mesh) * micro_batches
    if batch_size % ways:
        what = f"{micro_batches} micro-batches x " if micro_batches > 1 else ""
        raise ValueError(
            f"batch_size {batch_size} is not divisible by {what}data x fsdp = "
            f"{mesh.shape['data']} x {mesh.shape['fsdp']} (mesh {dict(mesh.shape)}); choose a "
            f"multiple of {ways}"
        )


# ------------------------------------------------------------------------------------ rules


def _axes(target: Any) -> tuple[str, ...]:
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def check_rules(rules: Sequence[Sequence[Any]]) -> tuple[Rule, ...]:
    """Validate ``rules`` (pairs of a logical name and None / a mesh axis / a tuple of them).

    Returns:
      The rules as a tuple of ``(name, tuple of mesh axes)``.
    Raises:
      ValueError: a malformed rule or one naming an unknown mesh axis.
    """
    out = []
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(
                f"sharding rule {rule!r}: expected (logical name, mesh axis or axes or None), "
                "e.g. ('out', 'tensor') or ('batch', ('data', 'fsdp'))"
            )
        axes = _axes(rule[1])
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown or len(set(axes)) != len(axes):
            raise ValueError(
                f"sharding rule {tuple(rule)!r} names the mesh axis {unknown or list(axes)}; the "
                f"mesh axes are {', '.join(MESH_AXES)}, each at most once per rule"
            )
        out.append((rule[0], axes))
    return tuple(out)


def logical_to_spec(
    names: Sequence[str | None] | None, shape: Sequence[int], axis_sizes: Mapping[str, int],
    rules: Sequence[Sequence[Any]] = DEFAULT_RULES, fsdp_fallback: bool = True,
) -> PartitionSpec:  # fmt: skip
    """The PartitionSpec of an array of ``shape`` whose dimensions are named ``names``.

    Args:
      names: one logical name (or None) per dimension; None: unannotated (all replicated, then
        the FSDP fallback).
      shape: the array's shape.
      axis_sizes: mesh axis sizes, e.g. ``dict(mesh.shape)``.
      rules: see the module docstring.
      fsdp_fallback: put a still-unused ``fsdp`` axis on the largest dimension it divides.
    Returns:
      A PartitionSpec with one entry per dimension (trailing Nones dropped).
    """
    parsed = check_rules(rules)
    names = [None] * len(shape) if names is None else list(names)
    if len(names) != len(shape):
        raise ValueError(f"logical names {names} do not match the shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[Any] = [None] * len(shape)
    for d, (name, size) in enumerate(zip(names, shape, strict=True)):
        for rule_name, axes in parsed:
            if rule_name != name:
                continue
            live = tuple(a for a in axes if axis_sizes.get(a, 1) > 1)
            while live and size % math.prod(axis_sizes[a] for a in live):
                live = live[:-1]  # ('data', 'fsdp') on 6 rows with data=2, fsdp=4: 'data'
            if (axes and not live) or any(a in used for a in live):
                continue  # try the next rule for this name
            if live:
                spec[d] = live[0] if len(live) == 1 else live
                used.update(live)
            break
    fsdp = axis_sizes.get("fsdp", 1)
    if fsdp_fallback and fsdp > 1 and "fsdp" not in used:
        for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if spec[d] is None and shape[d] % fsdp == 0:
                spec[d] = "fsdp"
                break
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def param_logical_axes(path: Sequence[Any], shape: Sequence[int]) -> tuple[str | None, ...] | None:
    """Logical names of a parameter from its tree path and rank (None: unannotated).

    The networks' weights are all named ``weight``: rank 4 is a conv kernel
    ``(kh, kw, in, out)``, rank 2 a linear map ``(in, out)`` or, under ``emb_label``, the class
    embedding ``(vocab, out)``; scalars and gains have no names (the FSDP fallback decides).
    """
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if not keys or keys[-1] != "weight":
        return None
    if len(shape) == 4:
        return ("kh", "kw", "in", "out")
    if len(shape) == 2:
        return ("vocab", "out") if "emb_label" in keys else ("in", "out")
    return None


def tree_specs(
    abstract: Any, axis_sizes: Mapping[str, int], rules: Sequence[Sequence[Any]] = DEFAULT_RULES
) -> Any:
    """PartitionSpec of every leaf of a tree of arrays / ``ShapeDtypeStruct`` (parameters,
    optimizer state, EMAs, a whole train state), from :func:`param_logical_axes` and ``rules``.
    Needs only the axis sizes, so it runs for any mesh without its devices."""

    def spec(path: Any, leaf: Any) -> PartitionSpec:
        shape = tuple(leaf.shape)
        return logical_to_spec(param_logical_axes(path, shape), shape, axis_sizes, rules)

    return jax.tree_util.tree_map_with_path(spec, abstract)


def state_shardings(
    abstract: Any, mesh: Mesh, rules: Sequence[Sequence[Any]] = DEFAULT_RULES
) -> Any:
    """``NamedSharding`` for every leaf of an abstract tree (see :func:`tree_specs`)."""
    specs = tree_specs(abstract, dict(mesh.shape), rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> PartitionSpec:
    """The FSDP fallback alone: the largest dimension ``fsdp_size`` divides goes on ``'fsdp'``."""
    return logical_to_spec(None, shape, {"fsdp": fsdp_size}, ())


def batch_sharding(mesh: Mesh, rules: Sequence[Sequence[Any]] = DEFAULT_RULES) -> NamedSharding:
    """Split the leading (batch) dimension by the ``'batch'`` rule (``('data', 'fsdp')``)."""
    axes = next((a for n, a in check_rules(rules) if n == "batch"), BATCH_AXES)
    return NamedSharding(mesh, PartitionSpec(axes or None))


def sharded_init(
    init_fn: Callable[[jax.Array], Any], key: jax.Array, mesh: Mesh,
    rules: Sequence[Sequence[Any]] = DEFAULT_RULES,
) -> Any:  # fmt: skip
    """Run ``init_fn(key)`` so that every leaf is created directly in its sharding.

    The shapes come from ``jax.eval_shape`` (nothing materialised); the init is jitted with those
    ``out_shardings``, so XLA computes each device's part only.
    """
    abstract = jax.eval_shape(init_fn, key)
    return jax.jit(init_fn, out_shardings=state_shardings(abstract, mesh, rules))(key)


# ------------------------------------------------------------------------------ activations

_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar(
    "scm_jax_activation_rules", default=None
)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Sequence[Sequence[Any]] = DEFAULT_RULES) -> Iterator[None]:
    """Within this context, :func:`constrain` pins activations to ``mesh`` by ``rules``.
    Functions must be *traced* inside it (the first call of a jitted function)."""
    token = _ACTIVE.set((mesh, tuple(tuple(r) for r in rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` of ``x`` to its logical ``names`` under the active
    :func:`activation_rules` (no FSDP fallback for activations); identity outside one."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(names, x.shape, dict(mesh.shape), rules, fsdp_fallback=False)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def describe_specs(specs: Any) -> dict[str, str]:
    """``{path: 'PartitionSpec(...)'}`` of a tree of specs (golden files, docs)."""
    flat = jax.tree_util.tree_leaves_with_path(specs, is_leaf=_is_spec)
    return {jax.tree_util.keystr(p): str(s) for p, s in flat}
