"""``scm-jax info``'s human-readable report of :func:`scm_jax.info.model_info` (entry points).

The numbers come from :mod:`scm_jax.info`; this module only lays them out (``--json`` prints
them as they are).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from scm_jax.info import mesh_str


def format_bytes(n: float) -> str:
    """``n`` bytes as a short human string in KiB, MiB or GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_info(info: Mapping[str, Any]) -> str:
    """Human-readable multi-line summary of :func:`model_info`'s result (and ``'compiled'``)."""
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
    total, per_dev = info["state_bytes_breakdown"], info["state_bytes_per_device_breakdown"]
    if "forward_gflops" in info:
        lines += [
            f"forward           {info['forward_gflops']:10.2f} GFLOP / sample (2 x multiply-adds)",
            f"jvp (primal+tan)  {info['jvp_gflops']:10.2f} GFLOP / sample "
            f"({info['jvp_over_forward']:.3f} x forward)",
            "train step / sample: "
            + ", ".join(f"{k} {v:.1f}" for k, v in info["train_step_gflops"].items())
            + " GFLOP",
            f"train step ({info['train_step_objective']}, batch {info['batch_size']}): "
            f"{info['train_step_tflops_per_batch']:.1f} TFLOP",
        ]
    lines += [
        f"mesh {mesh_str(info['mesh'])} ({info['devices']} devices); per-device batch "
        f"{info['per_device_batch']}"
        + (f" in {info['micro_batches']} micro-batches of {info['per_device_micro_batch']}"
           if info["micro_batches"] > 1 else "")
        + f"; remat {info['remat']}",
        "state:      "
        + ", ".join(f"{k} {format_bytes(v)}" for k, v in total.items() if v)
        + f"; total {format_bytes(info['state_bytes'])}",
        "per device: "
        + ", ".join(f"{k} {format_bytes(v)}" for k, v in per_dev.items() if total[k])
        + f"; total {format_bytes(info['state_bytes_per_device'])} (exact, sharding rules)",
    ]  # fmt: skip
    if "compiled" in info:
        lines += format_compiled(info["compiled"])
    return "\n".join(lines)


def format_compiled(c: Mapping[str, Any]) -> list[str]:
    """Lines describing :func:`compiled_info`'s result."""
    where = {
        "cpu": f"XLA:CPU buffer assignment on {c['devices']} simulated CPU devices -- an "
        "approximation of accelerator memory (GPU fusion and convolution workspaces differ)",
        "gpu": f"XLA:GPU buffer assignment on {c['devices']} {c['device_kind']}",
        "tpu": f"XLA:TPU buffer assignment on {c['devices']} {c['device_kind']} devices"
        + (f" ({c['topology']}, ahead of time via libtpu)" if "topology" in c else ""),
    }.get(c["platform"], f"{c['platform']} buffer assignment")
    lines = [
        f"compiled train step, per device ({where}):",
        f"  arguments {format_bytes(c['argument_bytes'])}, "
        f"outputs {format_bytes(c['output_bytes'])}, "
        f"aliased (donated) {format_bytes(c['alias_bytes'])}, "
        f"temporaries {format_bytes(c['temp_bytes'])}, "
        f"generated code {format_bytes(c['generated_code_bytes'])}",
        f"  total {format_bytes(c['total_bytes'])} (arguments + outputs - aliased + temporaries)"
        + (
            f", peak {format_bytes(c['peak_bytes'])}"
            if c.get("peak_bytes") and c["platform"] != "cpu"
            else ""
        )  # XLA:CPU: arguments
        + (f" of {format_bytes(c['hbm_bytes'])} HBM" if c.get("hbm_bytes") else ""),
        f"  lowered in {c['lower_seconds']:.1f} s, compiled in {c['compile_seconds']:.1f} s",
    ]
    return lines
