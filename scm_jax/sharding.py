"""The one place that builds the device mesh and shards state from abstract shapes.

A single device is a one-device mesh, so the same code path runs from a laptop to a cluster.
Axes are ``('data', 'fsdp')`` of type ``AxisType.Auto`` (classic GSPMD propagation;
``jax.make_mesh`` defaults to Explicit axes in jax >= 0.10, which would demand explicit
resharding in the model).
Parameters follow the FSDP rule: each leaf is split along its largest dimension divisible by the
``fsdp`` axis size and replicated otherwise. The batch is split over ``('data', 'fsdp')``.
(Logical axis names and tensor parallelism come with the scale-out work.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")


def make_mesh(data: int = 1, fsdp: int = -1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``('data', 'fsdp')`` mesh with Auto axes; one size may be -1 (fill with the rest).

    Raises:
      ValueError: the sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [data, fsdp]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if known <= 0 or n % known:
            raise ValueError(f"{n} devices cannot be split into data={data}, fsdp={fsdp}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n or min(sizes) < 1:
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} does not match {n} devices")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> PartitionSpec:
    """Shard the largest dimension divisible by ``fsdp_size`` on ``'fsdp'``; else replicate."""
    if fsdp_size > 1:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % fsdp_size == 0:
                return PartitionSpec(*[("fsdp" if d == dim else None) for d in range(len(shape))])
    return PartitionSpec()


def state_shardings(abstract: Any, mesh: Mesh) -> Any:
    """``NamedSharding`` for every leaf of an abstract tree (``ShapeDtypeStruct`` leaves)."""
    size = mesh.shape["fsdp"]
    return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(a.shape, size)), abstract)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split the leading (batch) dimension over ``('data', 'fsdp')``."""
    return NamedSharding(mesh, PartitionSpec(MESH_AXES))


def sharded_init(init_fn: Callable[[jax.Array], Any], key: jax.Array, mesh: Mesh) -> Any:
    """Run ``init_fn(key)`` so that every leaf is created directly in its FSDP sharding.

    The shapes come from ``jax.eval_shape`` (nothing materialised); the init is jitted with those
    ``out_shardings``, so XLA computes each device's part only.
    """
    abstract = jax.eval_shape(init_fn, key)
    return jax.jit(init_fn, out_shardings=state_shardings(abstract, mesh))(key)
