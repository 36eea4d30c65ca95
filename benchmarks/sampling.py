"""Sampling latency and throughput: 1- and 2-step consistency sampling against the teacher.

  python benchmarks/sampling.py                 # GPU: XXL (ImageNet-512 latents), batch 1/64/256
  python benchmarks/sampling.py --cpu           # CPU: the 16x16 smoke network, batch 1 and 8
  python benchmarks/sampling.py --size xl --batches 1,64 --teacher-steps 32

Everything runs through the library's jitted samplers (``scm_jax.run.sampler.Sampler.batch_fn``:
the whole sampler is one XLA program, ``lax.scan`` over the steps, one trace of the network):

* ``consistency``: the sCD student (guidance input, bf16 compute, float32 random weights) at
  1 and 2 steps (t_max, then sCM's t_mid = 1.1);
* ``consistency_unrolled``: the same with the steps unrolled (``sampling.sample_consistency``'s
  ``unroll``): straight-line code instead of a loop, for XLA to compare;
* ``teacher``: the same-size teacher's EDM Heun sampler, 32 steps = 63 evaluations of the
  guided F, each a doubled batch (classifier-free guidance: 126 network evaluations/sample);
* ``+decoder``: the 2- (and 1-) step sample followed by an SD-VAE-sized decoder of random
  weights (``scm_jax.networks.vae_decoder``, 49.5 M parameters, 64x64x4 -> 512x512x3) in the
  same jitted program; ``decoder`` alone for reference;
* ``api``: batch 1 through ``Sampler.sample_batch`` (label and guidance arrays built per call),
  to show what the Python layer adds to the program's latency.

Latency at batch 1 is the median over many waited-for calls; throughput at larger batches is
images/s from the median call. The speed-up is the teacher's time over the consistency
sampler's at the same batch (the seeds' headline: ~50x). Writes
``benchmarks/results/sampling_<platform>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from scm_jax import bench, sampling, trigflow
from scm_jax.flops import count_flops
from scm_jax.networks import build_network
from scm_jax.networks.vae_decoder import SDVAEDecoder, init_random, raw_latents
from scm_jax.run.sampler import Sampler
from scm_jax.train.build import teacher_model_config

NAME = "sampling"
GUIDANCE = 1.5  # the student's guidance input and the teacher's CFG scale


def _plan(batches: list[int], with_decoder: bool) -> list[tuple[str, int, int]]:
    """(kind, steps, batch) in priority order: batch-1 latency first, the teacher's long runs
    and the largest batches last."""
    plan = [("consistency", 2, 1), ("consistency", 1, 1)]
    if with_decoder:
        plan += [("consistency+decoder", 2, 1), ("decoder", 0, 1)]
    plan += [("api", 2, 1), ("teacher", 0, 1), ("consistency_unrolled", 2, 1)]
    for b in batches:
        if b != 1:
            plan += [("consistency", 2, b), ("consistency", 1, b)]
    for b in batches:
        if b != 1:
            plan += [("teacher", 0, b)]
    if with_decoder:
        plan += [("consistency+decoder", 1, 1)]
        plan += [("consistency+decoder", 2, b) for b in batches if b != 1][:1]
    return plan


class Suite:
    """The networks, parameters and jitted programs of one size (built once, reused)."""

    def __init__(self, size: str, dtype: str, teacher_steps: int, decoder_channels: tuple):
        cfg = bench.suite_config(size, "scd_cfg", dtype=dtype)
        self.cfg = cfg
        tf = cfg.trigflow
        self.nd = build_network(cfg.model)
        self.teacher_nd = build_network(teacher_model_config(cfg.model))
        params = jax.jit(lambda k: self.nd.init(k)["net"])(jax.random.key(0))
        t_params = jax.jit(lambda k: self.teacher_nd.init(k)["net"])(jax.random.key(1))
        common = {"sigma_d": tf.sigma_d, "sigma_max": tf.sigma_max}
        self.student = Sampler(self.nd, params, t_mid=tf.t_mid, objective="scd",
                               guidance=GUIDANCE, **common)  # fmt: skip
        self.teacher = Sampler(self.teacher_nd, t_params, objective="diffusion", **common)
        self.teacher_steps = teacher_steps
        self.decoder = SDVAEDecoder(block_out_channels=decoder_channels, dtype=jnp.dtype(dtype))
        hw = self.nd.sample_shape[0]
        self.decoder_vars = init_random(self.decoder, jax.random.key(2), hw)
        self.forward_gflops = count_flops(
            lambda p, x, t, y, g: self.nd.apply_fn(p, x, t, y, g), params,
            *(jnp.zeros(v.shape, v.dtype) for v in self.nd.example_inputs(1).values()),
        ) / 1e9  # fmt: skip
        z = jax.ShapeDtypeStruct((1, hw, hw, 4), jnp.float32)
        self.decoder_gflops = count_flops(self.decoder.apply, self.decoder_vars, z) / 1e9

    def program(self, kind: str, steps: int, batch: int) -> tuple[Any, tuple, float]:
        """``(jitted fn, args, network evaluations per sample)`` of one measurement."""
        key = jax.random.key(3)
        if kind in ("consistency", "consistency+decoder"):
            fn = self.student.batch_fn(steps, batch)
            y, g = self.student.batch_inputs(None, batch)
            args = (self.student.params, key, y, g)
            if kind == "consistency":
                return fn, args, float(steps)
            mean, std = self.cfg.dataset.latent_mean, self.cfg.dataset.latent_std
            sigma_d = float(self.cfg.trigflow.sigma_d)

            def sample_and_decode(params, dvars, key, y, g):
                x0 = fn(params, key, y, g)
                z = raw_latents(x0, mean, std, sigma_d)
                return jnp.clip(self.decoder.apply(dvars, z).astype(jnp.float32), -1, 1)

            return jax.jit(sample_and_decode), (args[0], self.decoder_vars, *args[1:]), steps
        if kind == "consistency_unrolled":
            tf = self.cfg.trigflow
            times = sampling.consistency_times(steps, trigflow.t_max(tf.sigma_max, tf.sigma_d),
                                               tf.t_mid)  # fmt: skip
            fn = sampling.make_consistency_sampler(
                self.nd.apply_fn, (batch, *self.nd.sample_shape), times, tf.sigma_d, unroll=True
            )
            y, g = self.student.batch_inputs(None, batch)
            return fn, (self.student.params, key, y, g), float(steps)
        if kind == "decoder":
            hw = self.nd.sample_shape[0]
            z = jax.random.normal(key, (batch, hw, hw, 4))
            return jax.jit(self.decoder.apply), (self.decoder_vars, z), 0.0
        if kind == "teacher":
            fn = self.teacher.batch_fn(self.teacher_steps, batch)
            y, g = self.teacher.batch_inputs(None, batch, guidance=GUIDANCE)
            return fn, (self.teacher.params, key, y, g), 2.0 * self.teacher.nfe(self.teacher_steps)
        raise ValueError(kind)

    def api_call(self, steps: int) -> Any:
        """Batch 1 through the public API, building label and guidance arrays per call."""
        key = jax.random.key(4)
        return lambda: self.student.sample_batch(key, 1, steps)


def measure(
    suite: Suite, kind: str, steps: int, batch: int, reps: int, latency_reps: int,
    profile: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Compile (where it is a fresh program) and time one sampler call (``profile``: a folder
    for a ``jax.profiler`` trace of one call).

    XLA's ``cost_analysis()`` is not reported here: it counts a ``lax.scan`` (while loop) body
    once, not once per step; the model FLOPs are read from the traced program
    (``scm_jax.flops``, which multiplies a scan's body by its length).
    """
    n = latency_reps if batch == 1 else reps  # batch-1 latency: many calls
    if kind == "teacher":  # 63 guided steps: a few calls at batch 1, one at larger batches
        n = reps if batch == 1 else 1
    if kind == "api":
        call = suite.api_call(steps)
        stats: dict[str, Any] = {}
        nfe = float(steps)
    else:
        fn, args, nfe = suite.program(kind, steps, batch)
        compiled, stats = bench.compile_stats(fn, *args)
        call = lambda: compiled(*args)  # noqa: E731
    timing = bench.time_calls(call, warmup=1 if n < 3 else 2, reps=n, inner=1, max_seconds=20,
                              profile_dir=profile)  # fmt: skip
    s = timing["median_s"]
    if "model_flops" in stats:  # traced: every step of the loop, CFG's doubled batch, decoder
        gflops = stats["model_flops"] / 1e9
    else:
        gflops = nfe * suite.forward_gflops * batch
    return {
        "nfe_per_sample": nfe, "median_s": s, "iqr_s": timing["iqr_s"], "min_s": timing["min_s"],
        "samples": timing["samples"], "images_per_s": batch / s, "model_gflops": gflops,
        "model_tflops_per_s": gflops / s / 1e3, "mfu": bench.mfu(gflops * 1e9, s),
        **{k: stats[k] for k in ("compile_s", "temp_bytes") if k in stats},
        "device_memory": bench.device_memory(),
    }  # fmt: skip


def speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Teacher time over consistency time at each batch measured for both (1 and 2 steps)."""
    ok = {(r["kind"], r["steps"], r["batch"]): r for r in rows if r.get("status") == "ok"}
    out = []
    for (kind, steps, batch), r in sorted(ok.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        teacher = ok.get(("teacher", 0, batch))
        if kind == "consistency" and teacher is not None:
            out.append({"batch": batch, "steps": steps, "teacher_nfe": teacher["nfe_per_sample"],
                        "teacher_s": teacher["median_s"], "consistency_s": r["median_s"],
                        "speedup": teacher["median_s"] / r["median_s"]})  # fmt: skip
    return out


COLUMNS = [
    ("sampler", "kind", ""), ("steps", "steps", "d"), ("batch", "batch", "d"),
    ("network evals / sample", "nfe_per_sample", ".0f"), ("median ms", "median_ms", ".2f"),
    ("IQR ms", "iqr_ms", ".2f"), ("images/s", "images_per_s", ".1f"),
    ("TFLOP/s", "model_tflops_per_s", ".3g"), ("MFU", "mfu", ".1%"),
]  # fmt: skip


def table(rows: list[dict], speedup_rows: list[dict]) -> str:
    """The two markdown tables of docs/performance.md: timings, then speed-ups."""
    ok = [{**r, "median_ms": r["median_s"] * 1e3, "iqr_ms": r["iqr_s"] * 1e3}
          for r in rows if r.get("status") == "ok"]  # fmt: skip
    sp = [{**r, "teacher_ms": r["teacher_s"] * 1e3, "consistency_ms": r["consistency_s"] * 1e3}
          for r in speedup_rows]  # fmt: skip
    return (bench.markdown_table(ok, COLUMNS) + "\n\n" + bench.markdown_table(sp, [
        ("batch", "batch", "d"), ("steps", "steps", "d"),
        ("teacher network evals", "teacher_nfe", ".0f"), ("teacher ms", "teacher_ms", ".1f"),
        ("consistency ms", "consistency_ms", ".2f"), ("speed-up", "speedup", ".1f"),
    ]))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench.add_common_args(parser, NAME)
    parser.add_argument("--size", default=None, help="network size (default xxl; CPU: smoke)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument(
        "--teacher-steps",
        type=int,
        default=32,
        help="Heun steps of the teacher (2 n - 1 evaluations; 32 -> 63)",
    )
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
    parser.add_argument("--no-decoder", action="store_true", help="skip the VAE decoder rows")
    args = parser.parse_args(argv)
    small, out = bench.resolve_common(args, NAME)
    size = args.size or ("smoke" if small else "xxl")
    batches = [int(b) for b in (args.batches or ("1,8" if small else "1,64,256")).split(",")]
    # CPU: the decoder's architecture at 1/16 of its width (the full one is 2.5 TFLOP/image).
    dec_channels = (32, 32, 32, 32) if small else (128, 256, 512, 512)
    reps = args.reps or (2 if args.quick else 3 if small else 5)
    latency_reps = reps if args.quick else 10 * reps
    teacher_steps = 3 if args.quick else args.teacher_steps  # quick: same program, fewer steps
    plan = _plan(batches, not args.no_decoder)
    if args.quick:
        plan = [p for p in plan if p[2] == 1 and p[0] != "decoder"][:5]
    budget = bench.Budget(args.budget_s)
    prof = bench.Profiler(args.profile, args.profile_rows)
    t0 = time.perf_counter()
    suite = Suite(size, args.dtype, teacher_steps, dec_channels)
    res = bench.Results(out, NAME, "python " + " ".join(sys.argv), {
        "size": size, "dtype": args.dtype, "param_dtype": "float32", "batches": batches,
        "teacher_steps": teacher_steps, "teacher_nfe": suite.teacher.nfe(teacher_steps),
        "cfg_scale": GUIDANCE, "decoder_block_out_channels": list(dec_channels),
        "decoder_gflops_per_image": suite.decoder_gflops,
        "forward_gflops_per_sample": suite.forward_gflops, "reps": reps,
        "latency_reps": latency_reps, "small": small,
        "quick": args.quick, "budget_s": args.budget_s, "setup_s": time.perf_counter() - t0,
        "network": "configs/imagenet512.py sCD student (guidance input) and teacher, random "
        "weights, float32 parameters",
    })  # fmt: skip
    longest = 0.0  # the longest non-teacher measurement so far (mostly its compilation)
    for kind, steps, batch in plan:
        key = {"kind": kind, "steps": steps, "batch": batch}
        need = 1.2 * longest
        if kind == "teacher":  # a compilation, then calls of 2 x nfe forwards each
            one = [r for r in res.rows if r.get("status") == "ok" and r["kind"] == "consistency"
                   and r["steps"] == 1 and r["batch"] == batch]  # fmt: skip
            calls = 1 + (reps if batch == 1 else 1)
            per_call = 2 * suite.teacher.nfe(teacher_steps) * (one[0]["median_s"] if one else 0)
            need = longest + calls * per_call
        if not budget.allows(need):
            why = f"budget: {budget.left():.0f} s left, ~{need:.0f} s needed"
            res.add({**key, "status": "skipped", "reason": why})
            continue
        t1 = time.perf_counter()
        pdir = prof.next_dir(f"{kind}_{steps}_{batch}".replace("+", "_"))
        row = bench.run_guarded(
            functools.partial(measure, suite, kind, steps, batch, reps, latency_reps, pdir)
        )
        res.add({**key, **row})
        longest = max(longest, time.perf_counter() - t1) if kind != "teacher" else longest
    sp = speedups(res.rows)
    res.finish(speedups=sp)
    print(table(res.rows, sp))


if __name__ == "__main__":
    main()
