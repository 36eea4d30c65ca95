"""Training-step throughput and MFU: diffusion, sCT, sCD and sCD with a CFG teacher.

  python benchmarks/train_step.py                     # GPU: the priority plan below (budget)
  python benchmarks/train_step.py --cpu               # CPU: the 16x16 smoke network
  python benchmarks/train_step.py --sizes xl --objectives scd --batches 16,32,64 --remat block

What is timed is the real training step: ``scm_jax.train.build.train_step_from_config`` (the
step ``scm-jax train`` runs: the config's dropout, adaptive weighting, tangent normalisation,
EMAs, Adam) jitted by ``jit_train_step`` with the state donated and in its sharding, on a
``('data', 'fsdp', 'tensor')`` mesh over all devices (the config's mesh section), traced
under ``activation_rules``; bf16 compute with float32 master weights (``model.dtype``). The
teacher of sCD is a random network of the student's architecture. Each measurement compiles
once (lower + compile times recorded), warms up, then times samples of several back-to-back
steps (one host sync per sample). Steps are fed the same device-resident batch: data loading
is not measured.

Reported per row: images/s, step time (median, IQR), model FLOPs per sample by the
convention of docs/performance.md ((n_teacher + 2 + 3) F, diffusion 3 F, F = the student's
traced forward) and as traced (``scm_jax.flops``: teacher, JVP, forward + backward), XLA's
``cost_analysis()`` FLOPs of the whole step per sample (remat recomputation and elementwise
work included), MFU (convention FLOPs / (step time x devices x dense bf16 peak)), compiled
memory and the device's peak bytes in use. Out-of-memory rows are recorded as ``oom``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from scm_jax import bench
from scm_jax.info import network_flops
from scm_jax.networks import build_network
from scm_jax.optim import make_optimizer
from scm_jax.run.state import create_sharded_state, init_state
from scm_jax.sharding import activation_rules, batch_sharding, mesh_from_config, state_shardings
from scm_jax.train import build

NAME = "train_step"
# (size, objective, per-device batch, remat), most important first: the budget cuts the tail.
GPU_PLAN: tuple[tuple[str, str, int, str], ...] = (
    ("xl", "scd", 32, "none"),
    ("s", "scd", 64, "none"),
    ("xl", "scd_cfg", 32, "none"),
    ("xl", "sct", 32, "none"),
    ("xl", "diffusion", 32, "none"),
    ("s", "scd_cfg", 64, "none"),
    ("s", "sct", 64, "none"),
    ("s", "diffusion", 64, "none"),
    ("xl", "scd", 16, "none"),
    ("xl", "scd", 64, "block"),
    ("s", "scd", 32, "none"),
    ("s", "scd", 128, "none"),
    ("xxl", "scd", 32, "none"),
    ("m", "scd", 32, "none"),
    ("l", "scd", 32, "none"),
)
CPU_PLAN: tuple[tuple[str, str, int, str], ...] = (
    ("smoke", "scd_cfg", 8, "none"),
    ("smoke", "scd", 8, "none"),
    ("smoke", "sct", 8, "none"),
    ("smoke", "diffusion", 8, "none"),
    ("smoke", "scd", 16, "none"),
)


@functools.cache
def _forward_flops(size: str, dtype: str) -> int:
    """F: the student's traced forward, per sample (the convention's unit)."""
    nd = build_network(bench.suite_config(size, "scd_cfg", dtype=dtype).model)
    return network_flops(nd, nd.abstract_params(), ("forward",))["forward"]


def build_step(
    size: str, objective: str, per_device: int, remat: str, dtype: str, dropout: float | None,
    init_net: Any = None, teacher_net: Any = None,
) -> dict[str, Any]:  # fmt: skip
    """Compile the training step of one size and objective on every device, state in place.

    ``init_net`` / ``teacher_net``: the student's and sCD teacher's network parameters
    (default: random, as ``init_state`` / ``NetworkDef.init`` draw them).

    Returns:
      ``{'call', 'stats', 'cfg', 'nd', 'box', 'x0', 'labels', 'teacher'}``: ``call()`` runs one
      donating step (the state lives in ``box[0]``) and returns ``(step, loss)``; ``stats`` are
      ``bench.compile_stats``; ``x0`` / ``labels`` the device-resident batch every step gets.
    """
    devices = jax.device_count()
    cfg = bench.suite_config(size, objective, dtype=dtype, batch_size=per_device * devices,
                             remat=remat, dropout=dropout)  # fmt: skip
    rules = cfg.mesh.rules
    mesh = mesh_from_config(cfg.mesh)
    nd = build_network(cfg.model)
    tx, schedule = make_optimizer(**cfg.optim, batch_size=cfg.batch_size)
    teacher_fn, teacher_abstract = build.abstract_teacher(cfg)
    step_fn = build.train_step_from_config(cfg, nd, teacher_fn, mesh=mesh, tx=tx,
                                         schedule=schedule)  # fmt: skip

    def make_state(key: jax.Array, *init: Any) -> Any:
        return init_state(nd, tx, key, init_net=init[0] if init else None, **build.ema_options(cfg))

    init = () if init_net is None else (init_net,)
    state, shardings = create_sharded_state(make_state, mesh, jax.random.key(0), *init,
                                            rules=rules)  # fmt: skip
    teacher = None
    if teacher_abstract is not None:
        t_shard = state_shardings(teacher_abstract, mesh, rules)
        if teacher_net is not None:
            teacher = jax.device_put(teacher_net, t_shard)
        else:
            t_nd = build_network(build.teacher_model_config(cfg.model))
            teacher = jax.jit(lambda k: t_nd.init(k)["net"], out_shardings=t_shard)(
                jax.random.key(2)
            )
    xs = batch_sharding(mesh, rules)
    b = int(cfg.batch_size)
    x0 = jax.device_put(0.5 * jax.random.normal(jax.random.key(1), (b, *nd.sample_shape)), xs)
    labels = jax.device_put(jnp.arange(b, dtype=jnp.int32) % nd.num_classes, xs)
    with activation_rules(mesh, rules):
        jitted = build.jit_train_step(step_fn, shardings, mesh)
        compiled, stats = bench.compile_stats(jitted, state, x0, labels, teacher)
    box = [state]
    del state

    def call() -> Any:
        box[0], values = compiled(box[0], x0, labels, teacher)
        return box[0].step, values["loss"]

    return {"call": call, "stats": stats, "cfg": cfg, "nd": nd, "box": box, "x0": x0,
            "labels": labels, "teacher": teacher}  # fmt: skip


def flop_counts(size: str, objective: str, dtype: str, stats: dict[str, Any], batch: int) -> dict:
    """Model FLOPs per sample of a compiled step: the convention's k F and as traced."""
    k = bench.OBJECTIVES[objective][2]
    return {"k": k, "convention": k * _forward_flops(size, dtype),
            "traced": stats["model_flops"] / batch,
            "bf16_share": stats["model_flops_bf16"] / max(stats["model_flops"], 1)}  # fmt: skip


def measure(
    size: str, objective: str, per_device: int, remat: str, dtype: str, reps: int, inner: int,
    dropout: float | None, profile: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Compile and time one training step; see the module docstring for the keys
    (``profile``: a folder for a ``jax.profiler`` trace of ``inner`` steps)."""
    built = build_step(size, objective, per_device, remat, dtype, dropout)
    call, stats, cfg, box = built["call"], built["stats"], built["cfg"], built["box"]
    devices = jax.device_count()
    b = int(cfg.batch_size)
    t0 = time.perf_counter()
    timing = bench.time_calls(call, warmup=2, reps=reps, inner=inner, max_seconds=30,
                              profile_dir=profile)  # fmt: skip
    loss = float(call()[1])
    flops = flop_counts(size, objective, dtype, stats, b)
    step_s = timing["median_s"]
    row = {
        "params": int(sum(a.size for a in jax.tree.leaves(box[0].params["net"]))),
        "devices": devices, "global_batch": b, "dropout": float(cfg.model.dropout),
        "step_s": step_s, "step_iqr_s": timing["iqr_s"], "samples": timing["samples"],
        "inner": inner, "images_per_s": b / step_s,
        "model_gflops_per_sample": flops["convention"] / 1e9, "convention_k": flops["k"],
        "traced_gflops_per_sample": flops["traced"] / 1e9,  # remat recomputation included
        "bf16_flop_share": flops["bf16_share"],
        "xla_gflops_per_sample": None if not stats["xla_flops"] else stats["xla_flops"] / b / 1e9,
        "mfu": bench.mfu(flops["convention"] * b, step_s, devices),
        "model_tflops_per_s_per_device": flops["convention"] * b / step_s / devices / 1e12,
        "loss_finite": bool(jnp.isfinite(loss)),
        "timing_s": round(time.perf_counter() - t0, 2),
        **{key: v for key, v in stats.items() if not key.startswith("model_flops")},
        "device_memory": bench.device_memory(),
    }  # fmt: skip
    return row


COLUMNS = [
    ("size", "size", ""), ("objective", "objective", ""), ("batch / device", "per_device", "d"),
    ("remat", "remat", ""), ("step ms", "step_ms", ".1f"), ("images/s", "images_per_s", ".1f"),
    ("model GFLOP / sample (k F)", "model_gflops_per_sample", ".4g"),
    ("XLA GFLOP / sample", "xla_gflops_per_sample", ".4g"), ("MFU", "mfu", ".1%"),
    ("compile s", "compile_s", ".0f"), ("temp GiB", "temp_gib", ".2f"),
]  # fmt: skip


def table(rows: list[dict]) -> str:
    """The markdown table of docs/performance.md (OOM and skipped rows say so)."""
    out = []
    for r in rows:
        r = dict(r)
        if r.get("status") == "ok":
            r["step_ms"] = r["step_s"] * 1e3
            r["temp_gib"] = (r.get("temp_bytes") or 0) / 2**30
        else:
            r["remat"] = f"{r.get('remat')} ({r.get('status')})"
        out.append(r)
    return bench.markdown_table(out, COLUMNS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench.add_common_args(parser, NAME)
    parser.add_argument("--sizes", default=None, help="comma-separated sizes (replaces the plan)")
    parser.add_argument(
        "--objectives", default=None, help=f"comma-separated, of {list(bench.OBJECTIVES)}"
    )
    parser.add_argument("--batches", default=None, help="per-device batches to sweep")
    parser.add_argument("--remat", default=None, help="none, block or full (with --sizes)")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype (model.dtype)")
    parser.add_argument(
        "--dropout",
        type=float,
        default=None,
        help="override the configs' dropout (e.g. 0 to measure its cost)",
    )
    args = parser.parse_args(argv)
    small, out = bench.resolve_common(args, NAME)
    plan = list(CPU_PLAN if small else GPU_PLAN)
    if args.sizes or args.objectives or args.batches or args.remat:
        sizes = (args.sizes or ("smoke" if small else "s,xl")).split(",")
        objectives = (args.objectives or ",".join(bench.OBJECTIVES)).split(",")
        batches = [int(v) for v in (args.batches or ("8" if small else "32")).split(",")]
        plan = [(s, o, b, args.remat or "none") for s in sizes for o in objectives for b in batches]
    if args.quick:
        plan = plan[:1]  # the sCD-CFG step: every part of the step (CI checks that it runs)
    reps = args.reps or (2 if args.quick else 3 if small else 5)
    inner = 1 if args.quick else 2 if small else 3
    budget = bench.Budget(args.budget_s)
    prof = bench.Profiler(args.profile, args.profile_rows)
    res = bench.Results(out, NAME, "python " + " ".join(sys.argv), {
        "plan": plan, "dtype": args.dtype, "param_dtype": "float32", "reps": reps,
        "inner": inner, "small": small, "quick": args.quick, "budget_s": args.budget_s,
        "dropout_override": args.dropout,
        "config": "configs/imagenet512.py:size=<size>,objective=<objective> (scd: student "
        "without guidance input, unguided teacher; scd_cfg: CFG teacher, s ~ U[1, 2])",
    })  # fmt: skip
    longest: dict[str, float] = {}  # size -> longest measurement so far
    for size, objective, per_device, remat in plan:
        key = {"size": size, "objective": objective, "per_device": per_device, "remat": remat}
        need = 1.2 * longest.get(size, max(longest.values(), default=0.0))
        if not budget.allows(need):
            res.add({**key, "status": "skipped", "reason": f"budget: {budget.left():.0f} s left, "
                     f"~{need:.0f} s needed"})  # fmt: skip
            continue
        t0 = time.perf_counter()
        pdir = prof.next_dir(f"{size}_{objective}_{per_device}_{remat}")
        row = bench.run_guarded(functools.partial(
            measure, size, objective, per_device, remat, args.dtype, reps, inner, args.dropout,
            pdir))  # fmt: skip
        res.add({**key, **row, "wall_s": round(time.perf_counter() - t0, 1)})
        longest[size] = max(longest.get(size, 0.0), time.perf_counter() - t0)
        gc.collect()
    res.finish()
    print(table(res.rows))


if __name__ == "__main__":
    main()
