"""Ahead-of-time compilation of the training step on abstract inputs.

The step is the one :mod:`scm_jax.train.build` makes for training (state donated, outputs in the
state's shardings). :func:`compile_train_step` lowers and compiles that jitted step on
``jax.ShapeDtypeStruct`` inputs carrying their shardings (the state from
``train.state.abstract_state``, the batch split by ``sharding.batch_sharding``, sCD's teacher
parameters sharded like the student) for any mesh, and reports ``compiled.memory_analysis()``
per device. Nothing is materialised, so the 1.5B XXL step compiles for 64 simulated CPU devices
or a TPU topology (:func:`tpu_topology_devices`, libtpu's compile-only devices) on a laptop.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from scm_jax import sharding
from scm_jax.networks import build_network
from scm_jax.optim import make_optimizer
from scm_jax.run.state import abstract_state
from scm_jax.sharding import MESH_AXES, activation_rules, batch_sharding, make_mesh
from scm_jax.train.build import (
    abstract_teacher,
    jit_train_step,
    state_fn,
    train_step_from_config,
)


def _sds(a: Any, s: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)


def lower_train_step(config: ml_collections.ConfigDict, mesh: Mesh) -> Any:
    """Lower the real jitted training step of ``config`` for ``mesh`` on abstract inputs.

    The state, batch ``x0 (B, *sample_shape) float32`` and labels ``(B,) int32`` (class-
    conditional networks) and sCD's teacher parameters are ``ShapeDtypeStruct`` with the
    shardings training gives them; the step is traced inside ``activation_rules``, as in the loop.

    Returns:
      The ``jax.stages.Lowered`` step.
    Raises:
      ValueError: a batch that does not split over the mesh and micro-batches, or another option
        the step refuses.
    """
    rules = config.mesh.rules
    nd = build_network(config.model)
    tx, schedule = make_optimizer(**config.optim, batch_size=config.batch_size)
    teacher_fn, teacher_net = abstract_teacher(config)
    step_fn = train_step_from_config(config, nd, teacher_fn, mesh=mesh, tx=tx, schedule=schedule)

    state, shardings = abstract_state(state_fn(config, nd, tx), mesh, jax.random.key(0),
                                      rules=rules)  # fmt: skip
    state = jax.tree.map(_sds, state, shardings)
    x_sharding = batch_sharding(mesh, rules)
    b = int(config.batch_size)
    x0 = jax.ShapeDtypeStruct((b, *nd.sample_shape), jnp.float32, sharding=x_sharding)
    labels = None
    if nd.num_classes:
        labels = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=x_sharding)
    teacher = None
    if teacher_net is not None:
        teacher = jax.tree.map(
            _sds, teacher_net, sharding.state_shardings(teacher_net, mesh, rules)
        )
    with activation_rules(mesh, rules):
        return jit_train_step(step_fn, shardings, mesh).lower(state, x0, labels, teacher)


MEMORY_FIELDS = {  # report key -> CompiledMemoryStats attribute
    "argument_bytes": "argument_size_in_bytes",
    "output_bytes": "output_size_in_bytes",
    "alias_bytes": "alias_size_in_bytes",
    "temp_bytes": "temp_size_in_bytes",
    "generated_code_bytes": "generated_code_size_in_bytes",
    "peak_bytes": "peak_memory_in_bytes",
}


def compile_train_step(config: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, Any]:
    """Compile the training step of ``config`` for ``mesh`` ahead of time; its memory per device.

    Returns:
      ``{'platform', 'device_kind', 'devices', 'lower_seconds', 'compile_seconds',
      'argument_bytes', 'output_bytes', 'alias_bytes' (donated state reused for the outputs),
      'temp_bytes', 'generated_code_bytes', 'peak_bytes' (XLA's own peak; 0 where it does not
      say, and on XLA:CPU only the arguments' size),
      'total_bytes' = argument + output - alias + temp}``, bytes per device.
    """
    t0 = time.perf_counter()
    lowered = lower_train_step(config, mesh)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    stats = compiled.memory_analysis()
    out: dict[str, Any] = {
        "platform": mesh.devices.flat[0].platform,
        "device_kind": mesh.devices.flat[0].device_kind,
        "devices": int(mesh.devices.size),
        "lower_seconds": round(t1 - t0, 2),
        "compile_seconds": round(t2 - t1, 2),
    }
    for key, attr in MEMORY_FIELDS.items():
        out[key] = int(getattr(stats, attr, 0) or 0) if stats is not None else 0
    out["total_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    )
    return out


def compile_mesh(axis_sizes: Mapping[str, int], devices: Sequence[Any]) -> Mesh:
    """A ``('data', 'fsdp', 'tensor')`` mesh of ``axis_sizes`` over ``devices`` (all of them).

    Cross-slice (DCN) sizes are folded into the axes: the memory per device depends on the axis
    sizes only, not on which links join the devices.
    """
    sizes = [int(axis_sizes[a]) for a in MESH_AXES]
    try:
        return make_mesh(*sizes, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):  # no physical layout for the shape
        arr = np.asarray(list(devices), dtype=object).reshape(sizes)
        return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


# ---------------------------------------------------------------------------------- TPU AOT

# Cloud TPU name -> (libtpu topology prefix, chip config, torus dimensions, TensorCores per
# chip counted in the name, HBM GiB per chip). Megacore chips (v4, v5p) are one JAX device.
TPU_GENERATIONS: dict[str, tuple[str, str, int, int, float]] = {
    "v4": ("v4", "megacore", 3, 2, 32.0),
    "v5p": ("v5", "megacore", 3, 2, 95.0),
    "v5e": ("v5e", "default", 2, 1, 16.0),
    "v5litepod": ("v5e", "default", 2, 1, 16.0),
    "v6e": ("v6e", "default", 2, 1, 32.0),
}
TPU_HELP = (
    "use a Cloud TPU name with a power-of-two size (v4-32, v5p-64, v5e-16, v6e-64) or a libtpu "
    "topology GEN:AxBxC (v5:2x4x4, v6e:8x8)"
)


def _chip_grid(chips: int, dims: int) -> tuple[int, ...]:
    """The usual torus of ``chips`` (a power of two) in ``dims`` dimensions: grow the smallest
    (latest) dimension, from 2x2x1 in 3-D (v4 / v5p: 4 chips per host) and 1x1 in 2-D."""
    grid = [2, 2, 1] if dims == 3 else [1, 1]
    if chips < math.prod(grid) or chips & (chips - 1):
        raise ValueError(f"no standard {dims}-D TPU torus has {chips} chips; {TPU_HELP}")
    while math.prod(grid) < chips:
        i = max(j for j, g in enumerate(grid) if g == min(grid))
        grid[i] *= 2
    return tuple(grid)


def parse_tpu_topology(name: str) -> dict[str, Any]:
    """``'v5p-64'`` / ``'v5:2x4x4'`` -> ``{'name', 'topology', 'chip_config', 'chips',
    'hbm_gib'}`` (the arguments of ``jax.experimental.topologies.get_topology_desc``).

    Raises:
      ValueError: an unknown generation or size (the message lists the accepted forms).
    """
    gen, sep, size = name.strip().lower().partition("-")
    if sep:
        if gen not in TPU_GENERATIONS or not size.isdigit() or int(size) < 1:
            raise ValueError(f"unknown TPU topology {name!r}; {TPU_HELP}")
        prefix, chip_config, dims, cores, hbm = TPU_GENERATIONS[gen]
        if int(size) % cores:
            raise ValueError(f"{name}: {gen} sizes count {cores} cores per chip; {TPU_HELP}")
        grid = _chip_grid(int(size) // cores, dims)
    else:
        prefix, _, shape = name.strip().lower().partition(":")
        gens = {v[0]: v for v in TPU_GENERATIONS.values()}
        parts = shape.split("x")
        dims_ok = len(parts) in (2, 3) and all(p.isdigit() and int(p) > 0 for p in parts)
        if prefix not in gens or not shape or not dims_ok:
            raise ValueError(f"unknown TPU topology {name!r}; {TPU_HELP}")
        _, chip_config, _, _, hbm = gens[prefix]
        grid = tuple(int(p) for p in shape.split("x"))
    topology = f"{prefix}:{'x'.join(map(str, grid))}"
    return {"name": name, "topology": topology, "chip_config": chip_config,
            "chips": math.prod(grid), "hbm_gib": hbm}  # fmt: skip


def tpu_topology_devices(name: str) -> tuple[list[Any], dict[str, Any]]:
    """libtpu's compile-only devices of a TPU topology (no TPU needed) and its description.

    Raises:
      ValueError: a bad name, libtpu not installed (the message says how to get it), or libtpu
        refusing the topology.
    """
    desc = parse_tpu_topology(name)
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(
            f"--topology {name} compiles with libtpu, which is not installed in this Python; "
            f"install it in a separate environment: pip install 'jax[tpu]=={jax.__version__}' "
            "(docs/scaling.md#tpu)"
        )
    # Compile-only devices never touch a chip: let libtpu load although another process (a
    # training job on this TPU VM, a test session) holds its single-process lock file.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    grid = [int(g) for g in desc["topology"].split(":")[1].split("x")]
    host_bounds = (min(grid[0], 2), min(grid[1], 2), 1)  # 4 chips per host (2x2)
    try:
        topo = topologies.get_topology_desc(
            topology_name=desc["topology"], platform="tpu", chip_config_name=desc["chip_config"],
            chips_per_host_bounds=host_bounds, num_slices=1,
        )  # fmt: skip
    except Exception as e:  # libtpu's errors are JaxRuntimeError / RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"libtpu refused topology {desc['topology']} ({name}): {first}") from None
    return list(topo.devices), desc
