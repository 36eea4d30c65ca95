"""What a config costs before anything runs: parameters, FLOPs per sample, and training-state bytes.

Everything is computed on abstract shapes (``jax.eval_shape`` / ``jax.make_jaxpr``): no weight is
materialised, so the 1.5B XXL is inspected on a laptop in seconds. FLOPs follow ``scm_jax.flops``
(2 x multiply-adds of matmuls and convolutions, as traced). Per training step and sample:

* diffusion (teacher):  forward + backward of the student                         (~3 F)
* sCT:                  + one ``jax.jvp`` of the stop-gradient student           (~5 F)
* sCD:                  + one teacher forward                                      (~6 F)
* sCD with CFG teacher: + two teacher forwards (conditional and unconditional)     (~7 F)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from scm_jax.flops import count_flops
from scm_jax.networks import NetworkDef, build_network
from scm_jax.optim import OPTIMIZER_MOMENTS


def _num_params(tree: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def _num_bytes(tree: Any) -> int:
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def teacher_model_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The sCD teacher's network: the student's architecture without the guidance input.

    (Issue 4 loads the real teacher with the config saved in its own run directory.)
    """
    cfg = dict(model_cfg)
    cfg.update(guidance_input=False, dropout=0.0)
    return cfg


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


def model_info(config: ml_collections.ConfigDict, devices: int = 1) -> dict[str, Any]:
    """Parameters, FLOPs and state bytes of the config's model and objective.

    Args:
      config: a loaded config (``configlib.load_config``).
      devices: number of devices the state is sharded over (FSDP: every tree split N ways).
    Returns:
      A JSON-serialisable dict; keys include ``params``, ``forward_gflops``, ``jvp_gflops``,
      ``train_step_gflops`` (per sample, by objective), ``state_bytes`` (total) and
      ``state_bytes_per_device``.
    """
    if devices < 1:
        raise ValueError(f"--devices must be >= 1, got {devices}")
    student = build_network(config.model)
    p_student = student.abstract_params()
    flops = network_flops(student, p_student)
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
    teacher_bytes, teacher_fwd = 0, 0  # an analytic teacher (toy mixture) costs no network FLOPs
    if config.teacher.get("kind", "network") == "network":
        teacher = build_network(teacher_model_config(config.model))
        p_teacher = teacher.abstract_params()
        info["params_teacher"] = _num_params(p_teacher["net"])
        teacher_fwd = network_flops(teacher, p_teacher, ("forward",))["forward"]
        if config.objective == "scd":
            teacher_bytes = _num_bytes(p_teacher["net"])

    F, J, G = flops["forward"], flops["jvp"], flops["fwd_bwd"]
    per_sample = {
        "diffusion": G,
        "sct": J + G,
        "scd": teacher_fwd + J + G,
        "scd_cfg": 2 * teacher_fwd + J + G,
    }
    selected = {"diffusion": "diffusion", "sct": "sct", "scd": "scd_cfg" if guided else "scd"}
    step_key = selected[config.objective]
    info.update(
        forward_gflops=F / 1e9,
        jvp_gflops=J / 1e9,
        fwd_bwd_gflops=G / 1e9,
        teacher_forward_gflops=teacher_fwd / 1e9,
        jvp_over_forward=J / F if F else float("nan"),
        train_step_gflops={k: v / 1e9 for k, v in per_sample.items()},
        train_step_objective=step_key,
        batch_size=int(config.batch_size),
        train_step_tflops_per_batch=per_sample[step_key] * config.batch_size / 1e12,
    )

    # Training state: parameters, optimiser moments, EMA copies, and the teacher (sCD).
    param_bytes = _num_bytes(p_student)
    f32_bytes = 4 * info["params"]
    optim_name = config.optim.name
    if optim_name not in OPTIMIZER_MOMENTS:
        raise ValueError(
            f"unknown optimizer {optim_name!r}; expected one of {sorted(OPTIMIZER_MOMENTS)}"
        )
    n_ema = len(config.ema.power_std) + (1 if config.ema.halflife_kimg > 0 else 0)
    breakdown = {
        "params": param_bytes,
        "optimizer": OPTIMIZER_MOMENTS[optim_name] * f32_bytes,
        "ema": n_ema * param_bytes,
        "teacher": teacher_bytes,
    }
    total = sum(breakdown.values())
    info.update(
        state_bytes=total,
        state_bytes_breakdown=breakdown,
        devices=devices,
        state_bytes_per_device=-(-total // devices),
        per_device_batch=config.batch_size / devices,
    )
    return info


def format_bytes(n: float) -> str:
    """``n`` bytes as a short human string in KiB, MiB or GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_info(info: Mapping[str, Any]) -> str:
    """Human-readable multi-line summary of :func:`model_info`'s result."""
    lines = [
        f"objective {info['objective']}  arch {info['arch']}  size {info['size']}  "
        f"sample {tuple(info['sample_shape'])}",
        f"parameters        {info['params'] / 1e6:10.2f} M  "
        f"(network {info['params_net'] / 1e6:.2f} M, "
        f"weighting head {info['params_weight_head']})",
    ]
    if "params_stock_edm2" in info:
        lines.append(
            f"  stock EDM2      {info['params_stock_edm2'] / 1e6:10.2f} M  "
            f"(sCM conditioning adds {info['params_added_by_scm_conditioning'] / 1e6:+.2f} M)"
        )
    if "params_teacher" in info:
        lines.append(f"  teacher         {info['params_teacher'] / 1e6:10.2f} M")
    lines += [
        f"forward           {info['forward_gflops']:10.2f} GFLOP / sample (2 x multiply-adds)",
        f"jvp (primal+tan)  {info['jvp_gflops']:10.2f} GFLOP / sample "
        f"({info['jvp_over_forward']:.3f} x forward)",
        "train step / sample: "
        + ", ".join(f"{k} {v:.1f}" for k, v in info["train_step_gflops"].items())
        + " GFLOP",
        f"train step ({info['train_step_objective']}, batch {info['batch_size']}): "
        f"{info['train_step_tflops_per_batch']:.1f} TFLOP",
        "state: "
        + ", ".join(f"{k} {format_bytes(v)}" for k, v in info["state_bytes_breakdown"].items())
        + f"; total {format_bytes(info['state_bytes'])}, "
        f"{format_bytes(info['state_bytes_per_device'])} per device on {info['devices']} "
        f"(per-device batch {info['per_device_batch']:g})",
    ]
    return "\n".join(lines)
