"""The training step built from a config, and its ahead-of-time compilation on abstract inputs.

:func:`train_step_from_config` turns a config's options into ``make_train_step`` arguments for
``scm-jax info --compile`` and AOT compilation; the training loop still has its own copy of this
wiring (``train/loop.py``; issue 23 makes one builder of the two), and
:func:`jit_train_step` wraps the step the way training runs it (state donated, outputs in the
state's shardings). :func:`compile_train_step` lowers and compiles that jitted step on
``jax.ShapeDtypeStruct`` inputs carrying their shardings (the state from
``train.state.abstract_state``, the batch split by ``sharding.batch_sharding``, sCD's teacher
parameters sharded like the student) for any mesh, and reports ``compiled.memory_analysis()``
per device. Nothing is materialised, so the 1.5B XXL step compiles for 64 simulated CPU devices
or a TPU topology (:func:`tpu_topology_devices`, libtpu's compile-only devices) on a laptop.
"""

from __future__ import annotations

import copy
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
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scm_jax import objectives, sharding
from scm_jax.config.durations import resolve_durations
from scm_jax.guidance import ApplyFn
from scm_jax.losses import proposal_time_edges
from scm_jax.networks import NetworkDef, build_network
from scm_jax.optim import make_optimizer
from scm_jax.run.state import TrainState, abstract_state, init_state
from scm_jax.sharding import MESH_AXES, activation_rules, batch_sharding, make_mesh
from scm_jax.train import dmd_config
from scm_jax.train.metrics import NUM_TIME_BINS
from scm_jax.train.step import StepFn, make_train_step


def teacher_model_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The sCD teacher's network: the student's architecture without the guidance input.

    (Training loads the real teacher with the config saved in its own run directory.)
    """
    cfg = dict(model_cfg)
    cfg.update(guidance_input=False, dropout=0.0)
    return cfg


def with_overrides(
    config: ml_collections.ConfigDict, *, batch_size: int | None = None,
    micro_batches: int | None = None, remat: str | None = None,
) -> ml_collections.ConfigDict:  # fmt: skip
    """A copy of ``config`` with ``batch_size``, ``train.micro_batches`` and ``model.remat``
    replaced where given (None: keep the config's value)."""
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
        if batch_size is not None:
            cfg.batch_size = int(batch_size)
        if micro_batches is not None:
            cfg.train.micro_batches = int(micro_batches)
        if remat is not None:
            cfg.model.remat = remat
    return cfg


def ema_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``{'power_std', 'halflife_kimg'}`` of ``config.ema`` (``init_state`` / the step), the
    half-life resolved from ``ema.halflife_fraction`` where that is set."""
    ema = resolve_durations(config).ema
    return {"power_std": tuple(ema.power_std), "halflife_kimg": ema.halflife_kimg}


def train_step_from_config(
    config: ml_collections.ConfigDict, nd: NetworkDef, teacher_apply_fn: ApplyFn | None = None,
    *, mesh: Mesh | None = None, tx: optax.GradientTransformation | None = None,
    schedule: Any = None,
) -> StepFn:  # fmt: skip
    """The (unjitted) training step of ``config``: ``make_train_step`` with the config's options.

    Args:
      config: a resolved config; reads objective, trigflow, loss, teacher guidance range, ema,
        batch_size and ``train.micro_batches``.
      nd: the network being trained (``build_network(config.model)``).
      teacher_apply_fn: sCD's teacher (``Teacher.apply_fn``); None for the other objectives.
      mesh: the device mesh; the batch is split by ``batch_sharding(mesh, config.mesh.rules)``
        (None: an unsharded batch).
      tx, schedule: the optimiser and its schedule; default ``make_optimizer(**config.optim)``.
    Returns:
      ``step(state, x0 (B, ...) float32, labels (B,) int32 | None, teacher_params)`` ->
      ``(state, values)`` (``scm_jax.train.step.make_train_step``).
    Raises:
      ValueError: options ``make_train_step`` refuses (one clear message).
    """
    config = resolve_durations(config)  # warm-up and DMD start in steps
    if objectives.get(config.objective).critic:  # DMD / rCM: generator + critic (step_dmd)
        return dmd_config.dmd_step_from_config(
            config, nd, teacher_apply_fn, mesh=mesh, tx=tx, schedule=schedule
        )
    if tx is None or schedule is None:
        tx, schedule = make_optimizer(**config.optim, batch_size=config.batch_size)
    sigma_d = float(config.trigflow.sigma_d)
    cm = objectives.get(config.objective).consistency
    loss = config.loss
    return make_train_step(
        nd, tx, schedule, objective=config.objective, sigma_d=sigma_d,
        P_mean=config.trigflow.P_mean, P_std=config.trigflow.P_std,
        batch_size=config.batch_size, **ema_options(config),
        loss_options={
            "warmup_steps": loss.tangent_warmup_steps, "warmup_form": loss.warmup_form,
            "tangent_norm": loss.tangent_norm, "tangent_c": loss.tangent_c,
            "mask_nonfinite": loss.mask_nonfinite,
        } if cm else None,
        adaptive_weighting=loss.adaptive_weighting,
        teacher_apply_fn=teacher_apply_fn,
        guidance_range=(config.teacher.guidance_min, config.teacher.guidance_max),
        time_edges=proposal_time_edges(
            config.trigflow.P_mean, config.trigflow.P_std, sigma_d, NUM_TIME_BINS
        ),
        micro_batches=int(config.train.get("micro_batches", 1)),
        batch_sharding=None if mesh is None else batch_sharding(mesh, config.mesh.rules),
    )  # fmt: skip


def jit_train_step(step_fn: StepFn, state_shardings: TrainState, mesh: Mesh) -> Any:
    """``jax.jit`` of the step as training runs it: the state argument donated, the new state in
    ``state_shardings`` and the metric values replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step_fn, donate_argnums=0, out_shardings=(state_shardings, replicated))


def abstract_train_state(
    config: ml_collections.ConfigDict, nd: NetworkDef, tx: optax.GradientTransformation
) -> TrainState:
    """The train state of ``config`` as ``jax.ShapeDtypeStruct`` leaves (nothing materialised)."""
    return jax.eval_shape(state_fn(config, nd, tx), jax.random.key(0))


def state_fn(
    config: ml_collections.ConfigDict, nd: NetworkDef, tx: optax.GradientTransformation,
    *, per_leaf: bool = False,
) -> Any:  # fmt: skip
    """``make_state(key, init_net=None) -> TrainState`` of ``config``: ``init_state``, or with
    the critic for DMD / rCM (``dmd_config.dmd_state_fn``)."""
    if objectives.get(config.objective).critic:
        return dmd_config.dmd_state_fn(config, nd, tx, per_leaf=per_leaf)

    def make_state(key: jax.Array, init_net: Any = None) -> TrainState:
        return init_state(nd, tx, key, **ema_options(config), init_net=init_net, per_leaf=per_leaf)

    return make_state


def abstract_teacher(
    config: ml_collections.ConfigDict,
) -> tuple[ApplyFn | None, Any]:
    """The teacher (sCD, DMD, rCM) without a checkpoint: ``(apply_fn, abstract net params or
    None)``.

    A network teacher has the student's architecture (:func:`teacher_model_config`); the toy
    config's exact mixture teacher has no parameters. Other objectives: ``(None, None)``.
    """
    if not objectives.get(config.objective).needs_teacher:
        return None, None
    if config.teacher.get("kind", "network") == "exact_gmm":
        from scm_jax.gmm import GaussianMixture, teacher_apply_fn

        gmm = GaussianMixture.from_dict(
            {k: config.dataset[k] for k in ("means", "stds", "weights")}
        )
        return teacher_apply_fn(gmm, config.trigflow.sigma_d), None
    teacher = build_network(teacher_model_config(config.model))
    return teacher.apply_fn, teacher.abstract_params()["net"]


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
