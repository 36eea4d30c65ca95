"""JVP overhead: the time of sCM's ``jax.jvp`` (primal + tangent) over the time of a forward.

  python benchmarks/jvp_overhead.py                    # GPU: S, XL, XXL bf16, ... (budget)
  python benchmarks/jvp_overhead.py --cpu              # CPU: the 16x16 smoke network
  python benchmarks/jvp_overhead.py --sizes s,xl --dtypes bfloat16,float32 --batch 32
  python benchmarks/jvp_overhead.py --flops-only      # any machine: traced FLOPs of every size

For each size and compute dtype, the sCD student of ``configs/imagenet512.py`` (bf16 compute,
float32 parameters, random weights) is jitted twice: its forward F_theta(x_t / sigma_d, t, y, s),
and ``scm_jax.losses.tangent_jvp`` -- the one JVP of the stop-gradient network that sCT and sCD
compute, parameters closed over (symbolic-zero tangents), tangents (cos t sin t dx_t/dt,
cos t sin t sigma_d). Both take the parameters as arguments. Reported: median time per call of
each, their ratio (target on an H100 in bf16: <= 2.2; also the median of the ratios of
interleaved samples, ``time_ratio_paired``, robust to a machine's changing load), the
model-FLOP ratio (``scm_jax.flops``: 2.00-2.01), XLA's ``cost_analysis()`` FLOPs of both
programs, achieved TFLOP/s, the forward's MFU, and the share of the FLOPs in attention's
products (whether a flash-attention kernel could matter). Writes
``benchmarks/results/jvp_overhead_<platform>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from scm_jax import bench
from scm_jax.flops import jaxpr_flops_split
from scm_jax.losses import tangent_jvp
from scm_jax.networks import EDM2_CHANNELS, build_network

NAME = "jvp_overhead"
# (size, compute dtype) in priority order under a budget: S and XL in bf16 first, then XXL,
# float32 where it shows what bf16 gains, then the other sizes.
GPU_PLAN = (
    ("s", "bfloat16"), ("xl", "bfloat16"), ("xxl", "bfloat16"), ("s", "float32"),
    ("xl", "float32"), ("xs", "bfloat16"), ("m", "bfloat16"), ("l", "bfloat16"),
)  # fmt: skip
GPU_BATCH = 32
CPU_SIZES = ("smoke",)
CPU_BATCH = 8


def measure(size: str, dtype: str, batch: int, reps: int, profile: Path | None = None) -> dict:
    """Forward and JVP of one size and dtype: times, FLOPs, memory (``profile``: a folder for
    a ``jax.profiler`` trace of each)."""
    cfg = bench.suite_config(size, "scd_cfg", dtype=dtype)
    nd = build_network(cfg.model)
    sigma_d = float(cfg.trigflow.sigma_d)
    params = jax.jit(lambda k: nd.init(k)["net"])(jax.random.key(0))
    k = jax.random.split(jax.random.key(1), 3)
    shape = (batch, *nd.sample_shape)
    x_t = sigma_d * jax.random.normal(k[0], shape) * 1.4
    dx_dt = sigma_d * jax.random.normal(k[1], shape)
    t = jax.random.uniform(k[2], (batch,), minval=0.1, maxval=1.5)
    labels = jnp.arange(batch, dtype=jnp.int32) % nd.num_classes
    guidance = jnp.full((batch,), 1.5)

    def forward(p, x_t, t, labels, guidance):
        return nd.apply_fn(p, x_t / sigma_d, t, labels, guidance)

    def jvp(p, x_t, t, dx_dt, labels, guidance):
        return tangent_jvp(nd.apply_fn, p, x_t, t, dx_dt, sigma_d=sigma_d, labels=labels,
                           guidance=guidance)  # fmt: skip

    row: dict = {"size": size, "dtype": dtype, "batch": batch,
                 "params": int(sum(a.size for a in jax.tree.leaves(params)))}  # fmt: skip
    programs = {"forward": (forward, (params, x_t, t, labels, guidance)),
                "jvp": (jvp, (params, x_t, t, dx_dt, labels, guidance))}  # fmt: skip
    calls, all_stats = {}, {}
    for name, (fn, args) in programs.items():
        compiled, all_stats[name] = bench.compile_stats(jax.jit(fn), *args)
        calls[name] = lambda c=compiled, a=args: c(*a)
    # Interleaved samples: forward, JVP, forward, JVP, ... (a fair ratio on a loaded machine).
    inner = 3 if size != "smoke" else 5
    timings = bench.time_interleaved(calls, warmup=2, reps=reps, inner=inner, max_seconds=30,
                                     profile_dir=profile)  # fmt: skip
    for name, timing in timings.items():
        stats = all_stats[name]
        flops = stats["model_flops"]  # scm_jax.flops of the traced program
        row.update({
            f"{name}_s": timing["median_s"], f"{name}_iqr_s": timing["iqr_s"],
            f"{name}_samples": timing["samples"],
            f"{name}_model_gflops": flops / 1e9, f"{name}_xla_gflops": _g(stats["xla_flops"]),
            # attention's QK^T and PV are the products with batch dimensions
            f"{name}_attention_flop_share": stats["model_flops_batched_matmul"] / flops,
            f"{name}_compile_s": stats["compile_s"], f"{name}_temp_bytes": stats["temp_bytes"],
            f"{name}_tflops_per_s": flops / timing["median_s"] / 1e12,
        })  # fmt: skip
    pairs = zip(timings["jvp"]["times_s"], timings["forward"]["times_s"], strict=True)
    row["time_ratio_paired"] = float(np.median([j / f for j, f in pairs]))
    row["time_ratio"] = row["jvp_s"] / row["forward_s"]
    row["model_flop_ratio"] = row["jvp_model_gflops"] / row["forward_model_gflops"]
    if row["forward_xla_gflops"] and row["jvp_xla_gflops"]:
        row["xla_flop_ratio"] = row["jvp_xla_gflops"] / row["forward_xla_gflops"]
    row["forward_mfu"] = bench.mfu(row["forward_model_gflops"] * 1e9, row["forward_s"])
    row["jvp_mfu"] = bench.mfu(row["jvp_model_gflops"] * 1e9, row["jvp_s"])
    row["device_memory"] = bench.device_memory()
    return row


def _g(flops: float | None) -> float | None:
    return None if flops is None else flops / 1e9


COLUMNS = [
    ("size", "size", ""), ("dtype", "dtype", ""), ("batch", "batch", "d"),
    ("forward ms", "forward_ms", ".2f"), ("JVP ms", "jvp_ms", ".2f"),
    ("JVP / forward (time)", "time_ratio", ".2f"),
    ("paired", "time_ratio_paired", ".2f"),
    ("JVP / forward (model FLOPs)", "model_flop_ratio", ".3f"),
    ("JVP / forward (XLA FLOPs)", "xla_flop_ratio", ".3f"),
    ("forward TFLOP/s", "forward_tflops_per_s", ".3g"), ("forward MFU", "forward_mfu", ".1%"),
    ("attention share of JVP FLOPs", "jvp_attention_flop_share", ".2%"),
]  # fmt: skip


def traced_flops(size: str) -> dict:
    """Per-sample model FLOPs of the forward and the JVP of one size, traced on abstract shapes
    (no compilation, no device): totals and the share in attention's products."""
    nd = build_network(bench.suite_config(size, "scd_cfg").model)
    ex, params = nd.example_inputs(1), nd.abstract_params()["net"]
    x, t, y, g = ex["x"], ex["t"], ex["labels"], ex["guidance"]

    def forward(p, x, t, y, g):
        return nd.apply_fn(p, x, t, y, g)

    def jvp(p, x, t, y, g):
        return tangent_jvp(nd.apply_fn, p, x, t, x, sigma_d=0.5, labels=y, guidance=g)

    row: dict = {"size": size, "status": "ok", "params": int(sum(a.size for a in
                 jax.tree.leaves(params)))}  # fmt: skip
    for name, fn in (("forward", forward), ("jvp", jvp)):
        kinds = jaxpr_flops_split(jax.make_jaxpr(fn)(params, x, t, y, g), "kind")
        total = sum(kinds.values())
        row[f"{name}_model_gflops"] = total / 1e9
        row[f"{name}_attention_flop_share"] = kinds.get("batched_matmul", 0) / total
        row[f"{name}_conv_flop_share"] = kinds.get("conv", 0) / total
    row["model_flop_ratio"] = row["jvp_model_gflops"] / row["forward_model_gflops"]
    return row


FLOPS_COLUMNS = [
    ("size", "size", ""), ("forward GFLOP / sample", "forward_model_gflops", ".1f"),
    ("JVP GFLOP / sample", "jvp_model_gflops", ".1f"),
    ("JVP / forward", "model_flop_ratio", ".3f"),
    ("convolutions (forward)", "forward_conv_flop_share", ".2%"),
    ("attention products (forward)", "forward_attention_flop_share", ".2%"),
    ("attention products (JVP)", "jvp_attention_flop_share", ".2%"),
]  # fmt: skip


def table(rows: list[dict]) -> str:
    """The markdown table of docs/performance.md from this benchmark's rows."""
    if rows and "forward_s" not in rows[0] and rows[0].get("status") == "ok":  # --flops-only
        return bench.markdown_table(rows, FLOPS_COLUMNS)
    ok = [{**r, "forward_ms": r["forward_s"] * 1e3, "jvp_ms": r["jvp_s"] * 1e3}
          for r in rows if r.get("status") == "ok"]  # fmt: skip
    return bench.markdown_table(ok, COLUMNS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench.add_common_args(parser, NAME)
    parser.add_argument("--sizes", default=None, help="comma-separated sizes (xs..xxl, smoke)")
    parser.add_argument("--dtypes", default=None, help="compute dtypes (bfloat16, float32)")
    parser.add_argument("--batch", type=int, default=None, help="samples per call")
    parser.add_argument(
        "--flops-only",
        action="store_true",
        help="trace every size's forward and JVP on abstract shapes (no timing, any machine): "
        "model FLOPs and the share in attention; writes benchmarks/results/jvp_flops.json",
    )
    args = parser.parse_args(argv)
    if args.flops_only:
        return flops_only(args)
    small, out = bench.resolve_common(args, NAME)
    dtypes = args.dtypes.split(",") if args.dtypes else ["bfloat16", "float32"]
    if args.quick and not args.dtypes:
        dtypes = ["float32"]
    if args.sizes or small:
        sizes = args.sizes.split(",") if args.sizes else list(CPU_SIZES)
        plan = [(s, d) for s in sizes for d in dtypes]
    else:
        plan = [(s, d) for s, d in GPU_PLAN if d in dtypes]
    batch = args.batch or (CPU_BATCH if small else GPU_BATCH)
    reps = args.reps or (2 if args.quick else 15 if small else 20)
    budget = bench.Budget(args.budget_s)
    prof = bench.Profiler(args.profile, args.profile_rows)
    res = bench.Results(out, NAME, "python " + " ".join(sys.argv), {
        "plan": plan, "batch": batch, "reps": reps, "small": small,
        "budget_s": args.budget_s, "quick": args.quick,
        "network": "configs/imagenet512.py sCD student with the guidance input, random weights, "
        "float32 parameters",
    })  # fmt: skip
    longest = 0.0
    for size, dtype in plan:
        if not budget.allows(1.5 * longest):
            res.add({"size": size, "dtype": dtype, "batch": batch, "status": "skipped",
                     "reason": f"budget: {budget.left():.0f} s left"})  # fmt: skip
            continue
        t0 = time.perf_counter()
        pdir = prof.next_dir(f"{size}_{dtype}")
        row = bench.run_guarded(functools.partial(measure, size, dtype, batch, reps, pdir))
        res.add({"size": size, "dtype": dtype, "batch": batch, **row})
        longest = max(longest, time.perf_counter() - t0)
    res.finish()
    print(table(res.rows))


def flops_only(args: argparse.Namespace) -> None:
    """``--flops-only``: :func:`traced_flops` of every size (or ``--sizes``)."""
    sizes = args.sizes.split(",") if args.sizes else list(EDM2_CHANNELS)
    out = Path(args.out) if args.out else bench.RESULTS_DIR / "jvp_flops.json"
    res = bench.Results(out, NAME, "python " + " ".join(sys.argv), {
        "flops_only": True, "sizes": sizes,
        "network": "configs/imagenet512.py sCD student with the guidance input (abstract)",
    })  # fmt: skip
    for size in sizes:
        res.add(traced_flops(size))
    res.finish()
    print(table(res.rows))


if __name__ == "__main__":
    main()
