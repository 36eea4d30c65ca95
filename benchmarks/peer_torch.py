"""The PyTorch peer: the same network's sCD step in JAX and in PyTorch, one run, one device.

  python benchmarks/peer_torch.py                  # GPU: S and XL in bf16 (budget)
  python benchmarks/peer_torch.py --cpu            # CPU: the smoke network (torch.compile: minutes)
  python benchmarks/peer_torch.py --cpu --quick    # CI: eager only; checks that it runs
  python benchmarks/peer_torch.py --sizes s --objectives scd_cfg --batch 64 --variants eager

For each size and objective (``bench.suite_config``: ``scd_cfg`` the CFG teacher at s ~ U[1, 2],
``scd`` an unguided teacher), one set of random float32 parameters (gains at 1, so F is not zero)
is the JAX step's initial state (``train_step.build_step``: the donated training step
``scm-jax train`` runs, dropout 0) and, through ``scm_jax.run.state_dict``, the PyTorch
student, weighting head (``scm_jax.torch.weighting``) and teacher. Before timing, both compute in
float32 (highest matmul precision, no TF32) the student's forward and the sCD loss and its
gradient for the same x0, z, t, labels, s and step; the row records the errors and is a
``mismatch`` (not timed) beyond :data:`TOLERANCE`. Then, per PyTorch variant (``eager``,
``compile``: ``torch.compile`` of the loss, default mode; ``eager_channels_last``), the JAX step
and ``scm_jax.torch.scd.SCDStep`` (bf16 autocast, float32 master weights, Adam, weight
projection, EMAs: the same work) are timed in turn (``bench.time_interleaved``), then the
forward and sCM's JVP of each framework the same way (JAX: ``jax.jvp`` with the parameters
closed over; PyTorch: ``torch.func.jvp`` under ``no_grad``; with the JVP / forward FLOP ratio of
each: ``scm_jax.flops`` and ``torch.utils.flop_counter``). Reported: images/s of both, the
speed-up (PyTorch step time / JAX step time; target >= 1.3 on an H100 / H200), MFU of both by
the convention's (n_teacher + 2 + 3) F, the JVP / forward time and FLOP ratios. A variant that
fails to compile is a row with its error. Writes ``benchmarks/results/peer_torch_<platform>.json``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scm_jax import bench
from scm_jax.losses import tangent_jvp
from scm_jax.networks import build_network
from scm_jax.run.state_dict import to_state_dict
from scm_jax.train.build import teacher_model_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # benchmarks/train_step.py: the JAX step as that benchmark builds it
from peer_parity import TOLERANCE, check_parity

NAME = "peer_torch"
# (size, objective, per-device batch) in priority order (the budget cuts the tail): train_step's
# batches; XL at 16 in case both frameworks' XL steps at 32 do not fit on one device together.
GPU_PLAN = (("s", "scd_cfg", 64), ("xl", "scd_cfg", 32), ("s", "scd", 64), ("xl", "scd", 32),
            ("xl", "scd_cfg", 16))  # fmt: skip
CPU_PLAN = (("smoke", "scd_cfg", 8),)  # --objectives scd_cfg,scd for both (inductor: minutes)
# The cheap variants first: a budget cuts torch.compile's (long) compilation, not them.
VARIANTS = ("eager", "eager_channels_last", "compile")
SECONDS = 30  # of interleaved step samples per variant (then half as long for forward / JVP)


def _nontrivial(params: Any) -> Any:
    """Random network parameters with every scalar gain at 1 (at 0, F and the gradient of all but
    the output layer vanish, and a parity check would prove nothing)."""
    return jax.tree.map(lambda a: jnp.ones_like(a) if a.ndim == 0 else a, params)


class _Ready:
    """A PyTorch result that ``jax.block_until_ready`` waits for (a CUDA synchronize)."""

    def __init__(self, value: Any, sync: Any) -> None:
        self.value, self.sync = value, sync

    def block_until_ready(self) -> _Ready:
        self.sync()
        return self


def _tensors(tree: Any) -> dict[str, Any]:
    """A numpy parameter tree as PyTorch's state dict (``scm_jax.run.state_dict``)."""
    import torch

    return {k: torch.from_numpy(v) for k, v in to_state_dict(tree).items()}


def _torch_module(model_cfg: dict, params: Any, device: Any) -> Any:
    """The ``scm_jax.torch`` network of ``model_cfg`` holding ``params`` (numpy tree) in float32:
    master weights; bf16 compute comes from ``torch.autocast``."""
    import scm_jax.torch as scm_torch

    net = scm_torch.build_network({**model_cfg, "dtype": "float32"})
    net.load_state_dict(_tensors(params))
    return net.to(device)


def _paired(t: dict[str, dict], a: str, b: str) -> float:
    """Median of the per-sample ratios t[a] / t[b] (samples taken in turn)."""
    pairs = zip(t[a]["times_s"], t[b]["times_s"], strict=True)
    return float(np.median([x / y for x, y in pairs]))


def build_pair(size: str, objective: str, per_device: int, dtype: str, device: Any) -> dict:
    """Both steps of one size, objective and batch from one set of parameters, their parity
    checked, and the forward / JVP programs of both (module docstring).

    Returns:
      ``{'common'}`` (the row fields every variant shares: sizes, FLOPs, the check) and, when
      the check passed, ``'jax'`` (``train_step.build_step``'s dict plus the compiled forward
      ``fwd`` and JVP ``jvp`` and their inputs ``io``), ``'step'`` (``SCDStep``), ``'torch_io'``.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from scm_jax.torch.scd import SCDStep
    from scm_jax.torch.weighting import build_weight_head

    cfg = bench.suite_config(size, objective, dtype=dtype, dropout=0.0)
    nd, t_nd = build_network(cfg.model), build_network(teacher_model_config(cfg.model))
    net_p = _nontrivial(nd.init(jax.random.key(10))["net"])
    teacher_p = _nontrivial(t_nd.init(jax.random.key(11))["net"])
    jx = train_step.build_step(size, objective, per_device, "none", dtype, 0.0,
                               init_net=net_p, teacher_net=teacher_p)  # fmt: skip
    cfg, box = jx["cfg"], jx["box"]
    host = jax.device_get({"net": net_p, "weight": box[0].params["weight"], "teacher": teacher_p})
    del net_p, teacher_p
    mods = {"net": _torch_module(dict(cfg.model), host["net"], device),
            "teacher": _torch_module(teacher_model_config(cfg.model), host["teacher"], device),
            "head": build_weight_head(dict(cfg.model))}  # fmt: skip
    mods["head"].load_state_dict(_tensors(host["weight"]))
    mods["head"].to(device)
    check = check_parity(size, objective, host, mods, device)
    del host
    b, sigma_d = int(cfg.batch_size), float(cfg.trigflow.sigma_d)
    flops = train_step.flop_counts(size, objective, dtype, jx["stats"], b)
    common = {"batch": b, "params": int(sum(p.numel() for p in mods["net"].parameters())),
              "model_gflops_per_sample": flops["convention"] / 1e9, "convention_k": flops["k"],
              "jax_compile_s": jx["stats"]["compile_s"], **check}  # fmt: skip
    if not check["check_ok"]:
        return {"common": common}
    autocast = None if dtype == "float32" else getattr(torch, dtype)
    step = SCDStep.from_config(cfg, mods["net"], mods["head"], mods["teacher"], autocast=autocast)
    # Forward / JVP inputs (as benchmarks/jvp_overhead.py): x_t, dx_t/dt, t, labels, s.
    k = jax.random.split(jax.random.key(1), 3)
    io = {"x": sigma_d * 1.4 * jax.random.normal(k[0], (b, *nd.sample_shape)),
          "t": jax.random.uniform(k[2], (b,), minval=0.1, maxval=1.5), "y": jx["labels"],
          "s": jnp.full((b,), 1.5) if nd.guidance_input else None,
          "dx": sigma_d * jax.random.normal(k[1], (b, *nd.sample_shape))}  # fmt: skip
    apply_fn = jx["nd"].apply_fn
    fwd = jax.jit(lambda p, x, t, y, s: apply_fn(p, x / sigma_d, t, y, s))
    jvp = jax.jit(lambda p, x, t, dx, y, s: tangent_jvp(apply_fn, p, x, t, dx, sigma_d=sigma_d,
                                                        labels=y, guidance=s))  # fmt: skip
    p = box[0].params["net"]
    jx["fwd"], fwd_stats = bench.compile_stats(fwd, p, io["x"], io["t"], io["y"], io["s"])
    jx["jvp"], jvp_stats = bench.compile_stats(jvp, p, io["x"], io["t"], io["dx"], io["y"],
                                               io["s"])  # fmt: skip
    del p  # the step donates its state: calls read box[0]'s current parameters
    jx["io"] = io
    nchw = lambda a: torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy()).to(device)  # noqa: E731
    vec = lambda a: None if a is None else torch.from_numpy(np.array(a)).to(device)  # noqa: E731
    tio = {"x0": nchw(jx["x0"]), "labels": vec(np.asarray(jx["labels"]).astype(np.int64)),
           "x": nchw(io["x"]), "dx": nchw(io["dx"]), "t": vec(io["t"]),
           "s": vec(io["s"])}  # fmt: skip
    counted = {}
    for name, fn in (("forward", torch_forward), ("jvp", torch_jvp)):
        with FlopCounterMode(display=False) as counter:
            fn(step, tio, tio["x"], tio["dx"])
        counted[name] = counter.get_total_flops()
    common.update({
        "jax_jvp_flop_ratio": jvp_stats["model_flops"] / fwd_stats["model_flops"],
        "torch_jvp_flop_ratio": counted["jvp"] / max(counted["forward"], 1),
        "jax_forward_gflops": fwd_stats["model_flops"] / 1e9,
        "torch_forward_gflops": counted["forward"] / 1e9,
    })  # fmt: skip
    return {"common": common, "jax": jx, "step": step, "torch_io": tio}


def _autocast(step: Any, device_type: str) -> Any:
    import torch

    dtype = step.autocast or torch.float32
    return torch.autocast(device_type, dtype=dtype, enabled=step.autocast is not None)


def torch_forward(step: Any, io: dict, x: Any, dx: Any = None) -> Any:
    """The student's forward F_theta(x_t / sigma_d, t, y, s) under no_grad and autocast."""
    import torch

    with torch.no_grad(), _autocast(step, x.device.type):
        return step.net(x / step.sigma_d, io["t"], io["labels"], io["s"])


def torch_jvp(step: Any, io: dict, x: Any, dx: Any) -> Any:
    """sCM's JVP of the student (``scm_jax.torch.scd.tangent_jvp``) under autocast."""
    from scm_jax.torch.scd import tangent_jvp as torch_tangent_jvp

    with _autocast(step, x.device.type):
        return torch_tangent_jvp(step.net, x, io["t"], dx, sigma_d=step.sigma_d,
                                 labels=io["labels"], guidance=io["s"])  # fmt: skip


def variant_calls(pair: dict, variant: str, backend: str, sync: Any) -> tuple[dict, dict]:
    """``(steps, parts)``: the JAX and PyTorch step calls, and the forward / JVP calls of both,
    for one PyTorch variant (``compile`` sets ``step.loss_fn`` to a ``torch.compile``)."""
    import torch

    jx, step, tio = pair["jax"], pair["step"], pair["torch_io"]
    box, io = jx["box"], jx["io"]
    fwd, jvp, x0, x, dx = torch_forward, torch_jvp, tio["x0"], tio["x"], tio["dx"]
    step.loss_fn = step.eager_loss_fn
    if variant == "compile":
        step.loss_fn = torch.compile(step.eager_loss_fn, backend=backend)
        fwd, jvp = torch.compile(fwd, backend=backend), torch.compile(jvp, backend=backend)
    elif variant == "eager_channels_last":
        x0, x, dx = (a.contiguous(memory_format=torch.channels_last) for a in (x0, x, dx))
    steps = {"jax": jx["call"], "torch": lambda: _Ready(step(x0, tio["labels"]), sync)}
    parts = {
        "jax_forward": lambda: jx["fwd"](box[0].params["net"], io["x"], io["t"], io["y"], io["s"]),
        "jax_jvp": lambda: jx["jvp"](box[0].params["net"], io["x"], io["t"], io["dx"], io["y"],
                                     io["s"]),
        "torch_forward": lambda: _Ready(fwd(step, tio, x), sync),
        "torch_jvp": lambda: _Ready(jvp(step, tio, x, dx), sync),
    }  # fmt: skip
    return steps, parts


def measure(
    size: str,
    objective: str,
    per_device: int,
    args: argparse.Namespace,
    reps: int,
    inner: int,
    budget: bench.Budget,
    prof: bench.Profiler,
    res: bench.Results,
) -> None:
    """One (size, objective, batch): both steps, the parity check, one row per variant."""
    import torch

    cuda = jax.default_backend() == "gpu" and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    pair = build_pair(size, objective, per_device, args.dtype, device)
    common = {"size": size, "objective": objective, "per_device": per_device, **pair["common"]}
    if "step" not in pair:
        for v in args.variants:
            why = f"float32 forward / loss / gradient beyond {TOLERANCE}"
            res.add({**common, "variant": v, "status": "mismatch", "reason": why})
        return
    longest = 0.0  # the first variant of a built pair always runs: a budget cuts later ones
    for variant in args.variants:
        backend = args.compile_backend if variant == "compile" else None
        row = {**common, "variant": variant, "compile_backend": backend}
        if not budget.allows(1.2 * longest):
            res.add({**row, "status": "skipped", "reason": f"budget: {budget.left():.0f} s left"})
            continue
        t0 = time.perf_counter()
        try:
            steps, parts = variant_calls(pair, variant, args.compile_backend, sync)
            pdir = prof.next_dir(f"{size}_{objective}_{variant}")
            row.update(status="ok", **_time_variant(steps, parts, row["batch"], reps, inner,
                                                    cuda, pdir))  # fmt: skip
        except Exception as e:  # a variant that fails to compile (or OOMs) is a result
            if variant != "compile" and not bench.is_oom(e):
                raise
            row.update(status="oom" if bench.is_oom(e) else "error",
                       error=f"{type(e).__name__}: {str(e)[:400]}")  # fmt: skip
            if cuda:
                torch.cuda.empty_cache()
        res.add({**row, "wall_s": round(time.perf_counter() - t0, 1)})
        longest = max(longest, time.perf_counter() - t0)
    pair["step"].loss_fn = pair["step"].eager_loss_fn


def _time_variant(steps: dict, parts: dict, batch: int, reps: int, inner: int, cuda: bool,
                  profile: Any) -> dict[str, Any]:  # fmt: skip
    """First calls (PyTorch's compile), then the interleaved steps, then forward / JVP."""
    import torch

    out: dict[str, Any] = {}
    for name, fn in (("torch_step", steps["torch"]), ("torch_forward", parts["torch_forward"]),
                     ("torch_jvp", parts["torch_jvp"])):  # fmt: skip
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out[f"{name}_first_call_s"] = round(time.perf_counter() - t0, 3)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # Sampling stops after SECONDS (at least one sample): a GPU's times are steady, XL's long.
    ts = bench.time_interleaved(steps, warmup=2, reps=reps, inner=inner, max_seconds=SECONDS)
    losses = (float(steps["jax"]()[1]), float(steps["torch"]().value[0]))
    tf = bench.time_interleaved(parts, warmup=2, reps=reps, inner=inner,
                                max_seconds=SECONDS / 2)  # fmt: skip
    jax_s, torch_s = ts["jax"]["median_s"], ts["torch"]["median_s"]
    out.update({
        "jax_step_s": jax_s, "jax_step_iqr_s": ts["jax"]["iqr_s"], "torch_step_s": torch_s,
        "torch_step_iqr_s": ts["torch"]["iqr_s"], "samples": ts["jax"]["samples"],
        "inner": inner, "jax_images_per_s": batch / jax_s, "torch_images_per_s": batch / torch_s,
        "speedup": torch_s / jax_s, "speedup_paired": _paired(ts, "torch", "jax"),
        "losses_finite": bool(np.isfinite(losses).all()),
    })  # fmt: skip
    for fw in ("jax", "torch"):
        f, j = tf[f"{fw}_forward"]["median_s"], tf[f"{fw}_jvp"]["median_s"]
        out.update(
            {
                f"{fw}_forward_s": f,
                f"{fw}_jvp_s": j,
                f"{fw}_jvp_ratio": j / f,
                f"{fw}_jvp_ratio_paired": _paired(tf, f"{fw}_jvp", f"{fw}_forward"),
            }
        )
    if cuda:
        out["torch_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    out["jax_device_memory"] = bench.device_memory()
    if profile is not None:  # the JAX step (jax.profiler; PyTorch's kernels are not its to trace)
        try:
            bench.time_calls(steps["jax"], warmup=0, reps=1, inner=inner,
                             profile_dir=profile / "jax")  # fmt: skip
        except Exception as e:  # a profiler that fails does not lose the timings
            out["profile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def _mfu(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        r = dict(r)
        if r.get("status") == "ok":
            f = r["model_gflops_per_sample"] * 1e9 * r["batch"]
            r["jax_mfu"] = bench.mfu(f, r["jax_step_s"])
            r["torch_mfu"] = bench.mfu(f, r["torch_step_s"])
        else:
            r["variant"] = f"{r.get('variant')} ({r.get('status')})"
        out.append(r)
    return out


COLUMNS = [
    ("size", "size", ""), ("objective", "objective", ""), ("batch", "batch", "d"),
    ("PyTorch variant", "variant", ""), ("JAX images/s", "jax_images_per_s", ".1f"),
    ("PyTorch images/s", "torch_images_per_s", ".1f"),
    ("speed-up (PyTorch time / JAX time)", "speedup", ".2f"), ("paired", "speedup_paired", ".2f"),
    ("JAX MFU", "jax_mfu", ".1%"), ("PyTorch MFU", "torch_mfu", ".1%"),
    ("JAX JVP / fwd (time)", "jax_jvp_ratio_paired", ".2f"),
    ("PyTorch JVP / fwd (time)", "torch_jvp_ratio_paired", ".2f"),
    ("JAX JVP / fwd (FLOPs)", "jax_jvp_flop_ratio", ".3f"),
    ("PyTorch JVP / fwd (FLOPs)", "torch_jvp_flop_ratio", ".3f"),
    ("PyTorch first call s", "torch_step_first_call_s", ".1f"),
    ("f32 loss / grad rel. error", "check", ""),
]  # fmt: skip


def table(rows: list[dict]) -> str:
    """The markdown table of docs/performance.md (the paired columns: medians of per-sample
    ratios; skipped, failed and mismatched variants say so)."""
    out = _mfu(rows)
    for r in out:
        if "check_loss_err" in r:
            r["check"] = f"{r['check_loss_err']:.1e} / {r['check_grad_err']:.1e}"
    return bench.markdown_table(out, COLUMNS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench.add_common_args(parser, NAME)
    parser.add_argument("--sizes", default=None, help="comma-separated sizes (replaces the plan)")
    parser.add_argument("--objectives", default=None, help="scd_cfg and / or scd (with --sizes)")
    parser.add_argument("--batch", type=int, default=None, help="per-device batch (with --sizes)")
    parser.add_argument("--variants", default=None, help=f"PyTorch variants, of {VARIANTS}")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype (PyTorch: autocast)")
    parser.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default inductor; 'eager': graph capture only)",
    )
    parser.add_argument(
        "--jax-memory-fraction",
        type=float,
        default=0.45,
        help="GPU memory JAX may take (no preallocation): PyTorch shares the device",
    )
    parser.add_argument("--torch-threads", type=int, default=None, help="default: CPU cores")
    args = parser.parse_args(argv)
    # Both frameworks on one GPU: JAX must not preallocate (gpu_suite.sh asks for 0.92).
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(args.jax_memory_fraction)
    small, out = bench.resolve_common(args, NAME)
    if small:  # a shared CPU: OpenMP threads that spin while they wait slow PyTorch down
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch

        import scm_jax.torch  # noqa: F401
    except ImportError as e:
        hint = "pip install 'scm-jax[torch]'"
        raise SystemExit(f"peer_torch.py needs PyTorch: {hint} ({e})") from None
    threads = args.torch_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = True  # as EDM2's training loop
    plan = list(CPU_PLAN if small else GPU_PLAN)
    if args.sizes or args.objectives or args.batch:
        sizes = (args.sizes or ("smoke" if small else "s,xl")).split(",")
        objectives = (args.objectives or "scd_cfg,scd").split(",")
        batch = args.batch or (8 if small else 32)
        plan = [(s, o, batch) for s in sizes for o in objectives]
    if args.quick:
        plan = plan[:1]
    default = ["eager"] if args.quick else list(VARIANTS)  # CI: torch.compile takes minutes
    args.variants = args.variants.split(",") if args.variants else default
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown --variants {unknown}; expected some of {list(VARIANTS)}")
    args.compile_backend = args.compile_backend or "inductor"
    reps = args.reps or (2 if args.quick else 5 if small else 8)
    inner = 1 if args.quick else 2
    budget = bench.Budget(args.budget_s)
    prof = bench.Profiler(args.profile, args.profile_rows)
    res = bench.Results(out, NAME, "python " + " ".join(sys.argv), {
        "plan": plan, "variants": args.variants, "dtype": args.dtype, "param_dtype": "float32",
        "reps": reps, "inner": inner, "small": small, "quick": args.quick,
        "budget_s": args.budget_s, "compile_backend": args.compile_backend,
        "torch": torch.__version__, "torch_threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "tolerance": TOLERANCE, "dropout": 0.0,
        "config": "configs/imagenet512.py:size=<size>,objective=scd (scd_cfg: CFG teacher, "
        "s ~ U[1, 2], student with guidance input; scd: unguided teacher), dropout 0",
    })  # fmt: skip
    longest = 0.0
    for size, objective, per_device in plan:
        if not budget.allows(1.2 * longest):
            for v in args.variants:
                res.add({"size": size, "objective": objective, "per_device": per_device,
                         "variant": v, "status": "skipped",
                         "reason": f"budget: {budget.left():.0f} s left"})  # fmt: skip
            continue
        t0 = time.perf_counter()
        try:
            measure(size, objective, per_device, args, reps, inner, budget, prof, res)
        except Exception as e:
            if not bench.is_oom(e):
                raise
            for v in args.variants:
                res.add({"size": size, "objective": objective, "per_device": per_device,
                         "variant": v, "status": "oom", "error": str(e)[:300]})  # fmt: skip
        longest = max(longest, time.perf_counter() - t0)
        gc.collect()
        jax.clear_caches()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    res.finish()
    print(table(res.rows))


if __name__ == "__main__":
    main()
