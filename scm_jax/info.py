"""What a config costs before anything runs: parameters, FLOPs per sample, and memory per device.

Everything is computed on abstract shapes (``jax.eval_shape`` / ``jax.make_jaxpr``): no weight is
materialised, so the 1.5B XXL is inspected on a laptop in seconds. FLOPs follow ``scm_jax.flops``
(2 x multiply-adds of matmuls and convolutions, as traced). Per training step and sample:

* diffusion (teacher):  forward + backward of the student                         (~3 F)
* sCT:                  + one ``jax.jvp`` of the stop-gradient student           (~5 F)
* sCD:                  + one teacher forward                                      (~6 F)
* sCD with CFG teacher: + two teacher forwards (conditional and unconditional)     (~7 F)
* DMD, rCM: per generator update, k critic updates (a rollout of n ~ U{1..N} student forwards
  and a critic forward + backward) and the generator's (n - 1 forwards, a forward + backward, a
  critic forward, a (guided) teacher forward); rCM adds the sCD terms; ``_flops_info``.

Memory. The training state (parameters, optimizer state, EMA trees, the teacher of sCD, DMD and
rCM, and the DMD / rCM critic with its optimizer state) is the real ``TrainState`` of the config,
and its bytes per device are exact: each leaf's shard under the config's sharding rules
(``scm_jax.sharding.tree_specs``) on the mesh, replicated leaves counted whole. Activations and
other temporaries need the compiled step: :func:`compiled_info` (``scm-jax info --compile``,
``scm_jax.train.aot``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, PartitionSpec

from scm_jax import objectives, sharding
from scm_jax.flops import count_flops
from scm_jax.networks import NetworkDef, build_network
from scm_jax.optim import make_optimizer
from scm_jax.train import aot, build
from scm_jax.train.build import teacher_model_config
from scm_jax.train.step import check_micro_batches

__all__ = [
    "compile_target", "compiled_info", "mesh_axis_sizes", "mesh_str",
    "model_info", "network_flops", "per_device_bytes", "stock_edm2_config", "teacher_model_config",
]  # fmt: skip


def _num_params(tree: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def _num_bytes(tree: Any) -> int:
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def stock_edm2_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The same U-Net with stock EDM2 conditioning (Fourier, ln(sigma)/4, multiplicative)."""
    cfg = dict(model_cfg)
    cfg.update(time_embedding="fourier", c_noise_mode="edm", modulation="mul", guidance_input=False)
    return cfg


def network_flops(
    nd: NetworkDef, params: Any, kinds: tuple[str, ...] = ("forward", "jvp", "fwd_bwd")
) -> dict[str, int]:
    """Per-sample FLOPs of a forward, a JVP (primal + tangent) and a forward + backward.

    Args:
      nd: the built network.
      params: abstract parameters ``{'net': ..., 'weight': ...}`` (ShapeDtypeStruct leaves).
      kinds: which of ``'forward'``, ``'jvp'``, ``'fwd_bwd'`` to trace.
    Returns:
      ``{kind: FLOPs}`` (integers, batch 1) for the requested kinds.
    """
    ex = nd.example_inputs(1)
    x, t, y, s = ex["x"], ex["t"], ex["labels"], ex["guidance"]

    def fwd(p, x, t, y, s):
        return nd.net.apply({"params": p["net"]}, x, t, y, s)

    def jvp(p, x, t, y, s, dx, dt):
        return jax.jvp(lambda x, t: fwd(p, x, t, y, s), (x, t), (dx, dt))

    def fwd_bwd(p, x, t, y, s):
        def loss(p):
            w = nd.weight_head.apply({"params": p["weight"]}, t)
            return jnp.sum(fwd(p, x, t, y, s) ** 2) * jnp.exp(w).sum()

        return jax.value_and_grad(loss)(p)

    traced = {
        "forward": lambda: count_flops(fwd, params, x, t, y, s),
        "jvp": lambda: count_flops(jvp, params, x, t, y, s, x, t),
        "fwd_bwd": lambda: count_flops(fwd_bwd, params, x, t, y, s),
    }
    return {k: traced[k]() for k in kinds}


def mesh_axis_sizes(
    mesh_cfg: Mapping[str, Any], devices: int, overrides: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Mesh axis sizes ``{'data', 'fsdp', 'tensor'}`` of a config's ``mesh`` section on
    ``devices`` devices, without the devices (each axis is its ICI size x its DCN size).

    Args:
      mesh_cfg: ``config.mesh`` (``defaults.MESH_DEFAULTS``); its rules are checked too.
      devices: the device count; fills the one ICI size that is -1.
      overrides: ICI sizes replacing the config's (``--mesh data=8,fsdp=8``).
    Raises:
      ValueError: sizes that do not multiply to ``devices``, an unknown axis or a bad rule.
    """
    if devices < 1:
        raise ValueError(f"--devices must be >= 1, got {devices}")
    sharding.check_rules(mesh_cfg["rules"])
    unknown = sorted(set(overrides or {}) - set(sharding.MESH_AXES))
    if unknown:
        axes = ", ".join(sharding.MESH_AXES)
        raise ValueError(f"unknown mesh axes {unknown}; the axes are {axes}")
    ici = {a: int((overrides or {}).get(a, mesh_cfg[a])) for a in sharding.MESH_AXES}
    dcn = {a: int(mesh_cfg.get(f"dcn_{a}", 1)) for a in sharding.MESH_AXES}
    slices = math.prod(dcn.values())
    if slices < 1 or devices % slices:
        raise ValueError(f"{devices} devices cannot form {slices} DCN slices ({dcn})")
    ici = sharding._fill(ici, devices // slices, "ICI")
    return {a: ici[a] * dcn[a] for a in sharding.MESH_AXES}


def _shard_shape(shape: Sequence[int], spec: PartitionSpec, axis_sizes: Mapping[str, int]):
    out = list(shape)
    for d, entry in enumerate(spec):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        out[d] = -(-out[d] // math.prod(axis_sizes.get(a, 1) for a in axes))
    return out


def per_device_bytes(
    tree: Any, axis_sizes: Mapping[str, int], rules: Sequence[Sequence[Any]],
    replicated: bool = False,
) -> int:  # fmt: skip
    """Bytes one device holds of ``tree`` (arrays / ShapeDtypeStruct leaves) when it is sharded by
    ``sharding.tree_specs(tree, axis_sizes, rules)``: the sum over leaves of the shard's size x
    itemsize (a replicated leaf counts whole); ``replicated=True`` counts every leaf whole."""
    leaves = jax.tree.leaves(tree)
    if replicated:
        return _num_bytes(tree)
    specs = jax.tree.leaves(
        sharding.tree_specs(tree, axis_sizes, rules), is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    return int(sum(
        math.prod(_shard_shape(x.shape, s, axis_sizes)) * jnp.dtype(x.dtype).itemsize
        for x, s in zip(leaves, specs, strict=True)
    ))  # fmt: skip


def model_info(
    config: ml_collections.ConfigDict, devices: int = 1, *, mesh: Mapping[str, int] | None = None,
    flops: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Parameters, FLOPs and training-state bytes (total and per device) of a config.

    Args:
      config: a loaded config (``defaults.load_config``), with ``batch_size``,
        ``train.micro_batches`` and ``model.remat`` as they should be analysed
        (``scm_jax.train.build.with_overrides``).
      devices: number of devices; fills the -1 of the config's mesh section.
      mesh: ICI axis sizes overriding the config's (``{'data': 8, 'fsdp': 8}``).
      flops: trace the networks for FLOPs (False: the ``*_gflops`` keys are absent; faster).
    Returns:
      A JSON-serialisable dict; keys include ``params``, ``forward_gflops``, ``jvp_gflops``,
      ``train_step_gflops`` (per sample, by objective), ``mesh`` (axis sizes), ``state_bytes``
      and ``state_bytes_breakdown`` (totals), ``state_bytes_per_device`` and
      ``state_bytes_per_device_breakdown`` (exact, from the sharding rules), ``per_device_batch``
      and ``per_device_micro_batch``.
    Raises:
      ValueError: a mesh that does not fit ``devices``, or a batch that does not split into
        micro-batches over the batch shards (one clear message).
    """
    axis_sizes = mesh_axis_sizes(config.mesh, devices, mesh)
    rules = config.mesh.rules
    micro = config.train.get("micro_batches", 1)
    if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1:
        raise ValueError(f"train.micro_batches must be an integer >= 1, got {micro!r}")
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
    batch_axes = next((a for n, a in sharding.check_rules(rules) if n == "batch"), ())
    shards = math.prod(axis_sizes[a] for a in batch_axes)
    check_micro_batches(int(config.batch_size), micro, shards)
    student = build_network(config.model)
    p_student = student.abstract_params()
    info: dict[str, Any] = {
        "objective": config.objective,
        "arch": config.model.arch,
        "size": config.model.get("size", ""),
        "sample_shape": list(student.sample_shape),
        "params": _num_params(p_student),
        "params_net": _num_params(p_student["net"]),
        "params_weight_head": _num_params(p_student["weight"]),
    }
    if config.model.arch == "edm2_unet":
        stock = _num_params(build_network(stock_edm2_config(config.model)).abstract_params()["net"])
        info["params_stock_edm2"] = stock
        info["params_added_by_scm_conditioning"] = info["params_net"] - stock

    # Teacher (sCD): a network of the student's architecture, or an analytic one (toy mixture).
    guided = config.teacher.guidance_max > 1.0
    p_teacher, teacher_fwd = None, 0  # an analytic teacher (toy mixture) costs no network FLOPs
    if config.teacher.get("kind", "network") == "network":
        teacher = build_network(teacher_model_config(config.model))
        p_teacher = teacher.abstract_params()["net"]
        info["params_teacher"] = _num_params(p_teacher)
        if flops:
            teacher_fwd = network_flops(teacher, teacher.abstract_params(), ("forward",))
            teacher_fwd = teacher_fwd["forward"]
    info["batch_size"] = int(config.batch_size)
    if flops:
        info.update(_flops_info(network_flops(student, p_student), teacher_fwd, guided, config))

    # Training state: the config's real TrainState (parameters, optimiser state, EMAs, step and
    # key), and the teacher (sCD), each leaf sharded by the rules on this mesh.
    tx, _ = make_optimizer(**config.optim, batch_size=config.batch_size)
    state = build.abstract_train_state(config, student, tx)
    parts: dict[str, tuple[Any, bool]] = {  # name -> (tree, replicated)
        "params": (state.params, False),
        "optimizer": (state.opt_state, False),
        "ema": (state.emas, False),
        "teacher": (p_teacher if objectives.get(config.objective).needs_teacher else None, False),
        "critic": (state.critic, False),  # DMD / rCM: the fake score and its optimiser state
        "step_and_key": ((state.step, state.rng), True),  # replicated (train.state)
    }
    breakdown = {k: _num_bytes(t) for k, (t, _) in parts.items()}
    per_device = {k: per_device_bytes(t, axis_sizes, rules, r) for k, (t, r) in parts.items()}
    info.update(
        state_bytes=sum(breakdown.values()),
        state_bytes_breakdown=breakdown,
        devices=devices,
        mesh=axis_sizes,
        state_bytes_per_device=sum(per_device.values()),
        state_bytes_per_device_breakdown=per_device,
        batch_shards=shards,
        per_device_batch=config.batch_size // shards,
        micro_batches=micro,
        per_device_micro_batch=config.batch_size // (shards * micro),
        remat=str(config.model.get("remat", "none")),
    )
    return info


def compile_target(
    axis_sizes: Mapping[str, int], topology: str | None = None
) -> tuple[Mesh, dict[str, Any]]:
    """The mesh the step is compiled for, checked before anything slow runs.

    Devices: libtpu's compile-only devices of ``topology`` (e.g. ``'v5p-64'``); else the default
    backend's devices (a GPU / TPU, or simulated CPU devices, whose XLA:CPU buffer assignment
    approximates an accelerator's).

    Returns:
      ``(mesh, extra)``; ``extra`` holds ``'topology'`` and ``'hbm_bytes'`` (the chip's memory)
      for a TPU topology.
    Raises:
      ValueError: more devices asked for than the backend has (the message says why), or a
        topology libtpu cannot compile for.
    """
    n = math.prod(axis_sizes.values())
    extra: dict[str, Any] = {}
    if topology:
        chips = aot.parse_tpu_topology(topology)["chips"]  # one device per chip
        if chips != n:
            raise ValueError(
                f"--topology {topology} has {chips} devices but the mesh "
                f"{mesh_str(axis_sizes)} has {n}; use --devices {chips}"
            )
        devices, desc = aot.tpu_topology_devices(topology)
        extra = {"topology": desc["topology"], "hbm_bytes": int(desc["hbm_gib"] * 2**30)}
    else:
        devices = jax.devices()
        if len(devices) < n:
            platform = devices[0].platform
            why = (
                "jax was initialised before --devices could set "
                "--xla_force_host_platform_device_count (set it in XLA_FLAGS)"
                if platform == "cpu"
                else "compile for fewer, or for a TPU topology with --topology"
            )
            raise ValueError(
                f"cannot compile for {n} devices: this machine has {len(devices)} {platform} "
                f"device(s); {why}"
            )
        devices = devices[:n]
    return aot.compile_mesh(axis_sizes, devices), extra


def compiled_info(
    config: ml_collections.ConfigDict, target: tuple[Mesh, dict[str, Any]]
) -> dict[str, Any]:
    """Compile the real training step ahead of time for ``target`` (:func:`compile_target`) and
    report ``scm_jax.train.aot.compile_train_step``'s memory per device, plus ``'topology'`` and
    ``'hbm_bytes'`` for a TPU topology. ``config`` as for :func:`model_info`."""
    mesh, extra = target
    return {**aot.compile_train_step(config, mesh), **extra}


def mesh_str(axis_sizes: Mapping[str, int]) -> str:
    """``'data=4 x fsdp=2'``: a mesh's axis sizes for messages and the report."""
    return " x ".join(f"{a}={n}" for a, n in axis_sizes.items())


def _flops_info(
    flops: Mapping[str, int], teacher_fwd: int, guided: bool, config: ml_collections.ConfigDict
) -> dict[str, Any]:
    """FLOP keys of :func:`model_info` from the student's and teacher's traced FLOPs."""
    F, J, G = flops["forward"], flops["jvp"], flops["fwd_bwd"]
    T = teacher_fwd
    c = 2 if guided else 1  # teacher passes per sample: CFG evaluates it twice
    per_sample = {}  # every sCM-step objective's cost (the table's convention, reference A2)
    for name in objectives.names_where(lambda o: not o.critic):
        per_sample[name] = objectives.get(name).step_flops(F, J, G, T)
        if objectives.get(name).tangent_from_teacher:
            per_sample[f"{name}_cfg"] = objectives.get(name).step_flops(F, J, G, T, cfg_passes=2)
    entry = objectives.get(config.objective)
    if entry.critic:
        critic_step = _dmd_flops(F, G, T, guided, config)
        per_sample[config.objective] = entry.step_flops(F, J, G, T, cfg_passes=c,
                                                        critic_step=critic_step)  # fmt: skip
    step_key = f"{entry.name}_cfg" if guided and f"{entry.name}_cfg" in per_sample else entry.name
    return {
        "forward_gflops": F / 1e9,
        "jvp_gflops": J / 1e9,
        "fwd_bwd_gflops": G / 1e9,
        "teacher_forward_gflops": teacher_fwd / 1e9,
        "jvp_over_forward": J / F if F else float("nan"),
        "train_step_gflops": {k: v / 1e9 for k, v in per_sample.items()},
        "train_step_objective": step_key,
        "train_step_tflops_per_batch": per_sample[step_key] * config.batch_size / 1e12,
    }


def _dmd_flops(F: int, G: int, T: int, guided: bool, config: ml_collections.ConfigDict) -> float:
    """Expected FLOPs per sample of one DMD step (one generator update), before rCM's sCD
    term (which :meth:`scm_jax.objectives.Objective.step_flops` adds: c T + J + G).

    With k critic updates, rollouts of n ~ U{1..N} steps (mean n = (N + 1) / 2), c = 2 teacher
    passes with CFG (else 1) and the critic of the student's architecture:
    k (n F + G) + (n - 1) F + G + F + c T, plus (r / B)((2 s - 1) c T + G) for DMD's regression
    term on r of B samples with s Heun steps.
    """
    d = config.dmd
    k, n = int(d.critic_updates), (int(d.generator_steps) + 1) / 2
    c = 2 if guided else 1
    total = k * (n * F + G) + (n - 1) * F + G + F + c * T
    if d.regression_weight:
        r = int(d.regression_batch) or int(config.batch_size)
        total += r / config.batch_size * ((2 * int(d.regression_steps) - 1) * c * T + G)
    return total
