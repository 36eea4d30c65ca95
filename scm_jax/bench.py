"""Measurement and records for the benchmark suite (``benchmarks/``, docs/performance.md).

One place for what every benchmark needs:

* :func:`environment`: device kind and count, jax / jaxlib / flax versions, Python, host CPU
  count and load average, ``XLA_FLAGS``, the git commit: the metadata of every result file;
* :func:`time_calls`: warm-up, then repeated timed calls with ``jax.block_until_ready``; median,
  quartiles and IQR per call (several calls per sample amortise dispatch and host syncs);
* :func:`compile_stats`: XLA's ``cost_analysis()`` FLOPs and bytes (of the lowered and of the
  compiled program) and ``memory_analysis()`` bytes of a jitted function, beside the model
  FLOPs of ``scm_jax.flops``;
* :data:`PEAK_BF16_TFLOPS` / :func:`peak_flops` / :func:`mfu`: dense bf16 peaks by device kind
  and model-FLOPs utilisation (MaxText's convention, docs/performance.md);
* :class:`Results`: a JSON record ``{'meta', 'config', 'rows'}`` written after every row, so
  that a benchmark stopped by its time budget (or a ``timeout``) keeps what it measured;
* :class:`Budget`: a wall-clock budget that a benchmark checks before starting a measurement;
* :func:`run_guarded`: run one measurement, recording an out-of-memory error as such.

Nothing here imports TensorFlow, torch or ml-collections.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from scm_jax import objectives
from scm_jax.files import write_json_atomic

__all__ = [
    "OBJECTIVES",
    "PEAK_BF16_TFLOPS",
    "Budget",
    "Profiler",
    "Results",
    "add_common_args",
    "compile_stats",
    "device_memory",
    "environment",
    "is_oom",
    "markdown_table",
    "mfu",
    "peak_flops",
    "run_guarded",
    "suite_config",
    "time_calls",
    "time_interleaved",
]

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"

# Dense (no 2:4 sparsity) bf16 matrix peaks in TFLOP/s, by the start of ``device_kind``
# (longest match wins). H100 SXM and H200 share the chip's 989 (reference A3); MFU divides by
# these, not by a measured GEMM rate (~800 on an H100 / H200).
PEAK_BF16_TFLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM
    "NVIDIA H100 SXM": 989.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA GH200": 989.0,
    "NVIDIA A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}


# The training objectives of the suite: config objective, CFG teacher, and the convention's
# model FLOPs per sample in units of one forward F (reference A2: (n_teacher + 2 + 3) F for the
# consistency objectives: teacher forwards, the JVP's primal + tangent, the student's forward +
# backward; 3 F for diffusion training).
OBJECTIVES: dict[str, tuple[str, bool, int]] = {
    "diffusion": ("diffusion", False, 3),
    "sct": ("sct", False, 5),
    "scd": ("scd", False, 6),
    "scd_cfg": ("scd", True, 7),
}


def suite_config(
    size: str, objective: str = "scd_cfg", *, dtype: str = "bfloat16",
    batch_size: int | None = None, remat: str | None = None, dropout: float | None = None,
) -> Any:  # fmt: skip
    """The ImageNet-512 config (``configs/imagenet512.py``, latents 64x64x4, 1000 classes) the
    suite measures, with bf16 compute and float32 parameters by default.

    Args:
      size: an EDM2 size (``xs`` .. ``xxl``) or ``'smoke'`` (the 16x16 CPU network).
      objective: a key of :data:`OBJECTIVES`: ``'scd'`` has an unguided teacher and a student
        without the guidance input, ``'scd_cfg'`` the config's CFG teacher (s ~ U[1, 2]).
      dtype: the network's compute dtype (``model.dtype``); parameters stay float32.
      batch_size, remat, dropout: overrides (None: the config's).
    Returns:
      The (unlocked-then-relocked) ConfigDict.
    """
    from scm_jax.config import defaults
    from scm_jax.train.build import with_overrides

    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {list(OBJECTIVES)}")
    name, cfg_teacher, _ = OBJECTIVES[objective]
    arg = f"objective={name}," + ("smoke" if size == "smoke" else f"size={size}")
    cfg = with_overrides(defaults.load_config(f"imagenet512:{arg}"), batch_size=batch_size,
                         remat=remat)  # fmt: skip
    with cfg.unlocked():
        cfg.model.dtype = dtype
        cfg.model.param_dtype = "float32"
        if dropout is not None:
            cfg.model.dropout = float(dropout)
        if objectives.get(name).needs_teacher and not cfg_teacher:  # plain 'scd': no CFG
            cfg.model.guidance_input = False
            cfg.teacher.guidance_max = 1.0
    return cfg


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of ``device_kind``; None if unknown (CPUs)."""
    matches = [k for k in PEAK_BF16_TFLOPS if device_kind.startswith(k)]
    if not matches:
        return None
    return PEAK_BF16_TFLOPS[max(matches, key=len)] * 1e12


def mfu(
    model_flops: float, seconds: float, devices: int = 1, kind: str | None = None
) -> float | None:
    """Model-FLOPs utilisation: ``model_flops / (seconds x devices x peak)``.

    Args:
      model_flops: model FLOPs of the timed work on all devices (no remat, no optimiser).
      seconds: its wall time.
      devices: devices that shared it.
      kind: device kind (default the first device's).
    Returns:
      A fraction, or None where the device's peak is unknown (CPUs).
    """
    peak = peak_flops(kind or jax.devices()[0].device_kind)
    if peak is None or seconds <= 0:
        return None
    return float(model_flops / (seconds * devices * peak))


def _git_commit() -> str | None:
    """The checkout's short commit, with ``-dirty`` if tracked files differ from it."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                                 cwd=here)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return None
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def _version(module: str) -> str | None:
    mod = sys.modules.get(module)
    if mod is None:
        try:
            mod = __import__(module)
        except ImportError:
            return None
    return getattr(mod, "__version__", None)


def environment() -> dict[str, Any]:
    """Metadata of a benchmark run: device, software versions, host load, flags, commit.

    Returns:
      A JSON-serialisable dict (``platform``, ``device_kind``, ``devices``, ``jax``,
      ``jaxlib``, ``flax``, ``python``, ``cpu_count``, ``load_average`` (1, 5, 15 min at the
      call), ``xla_flags``, ``git_commit``, ``time_utc``, ``peak_bf16_tflops``).
    """
    dev = jax.devices()[0]
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every OS
        load = None
    peak = peak_flops(dev.device_kind)
    return {
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": load,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "git_commit": _git_commit(),
        "time_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "peak_bf16_tflops": None if peak is None else peak / 1e12,
    }


def time_calls(
    call: Callable[[], Any], *, warmup: int = 1, reps: int = 5, inner: int = 1,
    max_seconds: float | None = None, profile_dir: str | Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Time ``call()`` (which launches device work and returns its outputs).

    ``warmup`` calls first (each waited for), then up to ``reps`` samples of ``inner``
    back-to-back calls each, waited for with ``jax.block_until_ready`` at the end of the
    sample only (so a sample of a donating step measures throughput without a host sync per
    call). Stops after ``max_seconds`` of sampling, keeping at least one sample. With
    ``profile_dir``, one more sample runs under ``jax.profiler.trace(profile_dir)`` (a
    TensorBoard / XProf trace and a Chrome ``*.trace.json.gz``; ``benchmarks/
    profile_summary.py`` sums its device time by operation); it is not among the timings.

    Returns:
      ``{'median_s', 'q1_s', 'q3_s', 'iqr_s', 'min_s', 'max_s'}`` per call (a sample's time
      / inner), ``'samples'``, ``'inner'`` and ``'times_s'`` (every sample, per call).
    """
    return time_interleaved({"": call}, warmup=warmup, reps=reps, inner=inner,
                            max_seconds=max_seconds, profile_dir=profile_dir)[""]  # fmt: skip


def time_interleaved(
    calls: Mapping[str, Callable[[], Any]], *, warmup: int = 1, reps: int = 5, inner: int = 1,
    max_seconds: float | None = None, profile_dir: str | Path | None = None,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """:func:`time_calls` of several calls, their samples taken in turn (sample i of each,
    then sample i + 1), so that a machine's changing load affects all alike: the ratio of two
    medians, or the median of per-sample ratios, is then fair. ``profile_dir``: one more
    sample of each, under ``profile_dir/<name>``. Returns ``{name: timing}``."""
    for _ in range(warmup):
        for call in calls.values():
            jax.block_until_ready(call())
    times: dict[str, list[float]] = {name: [] for name in calls}
    start = time.perf_counter()
    for _ in range(max(1, reps)):
        for name, call in calls.items():
            t0 = time.perf_counter()
            out = None
            for _ in range(inner):
                out = call()
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t0) / inner)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    if profile_dir is not None:
        for name, call in calls.items():
            with jax.profiler.trace(str(Path(profile_dir) / name)):
                jax.block_until_ready([call() for _ in range(inner)][-1])
    out: dict[str, dict[str, Any]] = {}
    for name, ts in times.items():
        q1, med, q3 = (float(v) for v in np.percentile(ts, [25, 50, 75]))
        out[name] = {"median_s": med, "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1,
                     "min_s": float(min(ts)), "max_s": float(max(ts)), "samples": len(ts),
                     "inner": inner, "times_s": ts}  # fmt: skip
    return out


def _cost(analysis: Any) -> dict[str, float]:
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    return {"flops": float(analysis.get("flops", 0.0) or 0.0),
            "bytes": float(analysis.get("bytes accessed", 0.0) or 0.0)}  # fmt: skip


def compile_stats(jitted: Any, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """Trace, lower and compile ``jitted(*args)``; the executable and what is known about it.

    Returns:
      ``(compiled, stats)``: call ``compiled(*args)`` to run it without compiling again.
      ``stats``: ``trace_s``, ``lower_s``, ``compile_s``; ``model_flops`` (``scm_jax.flops``
      of the traced program, all devices) and ``model_flops_bf16`` (the part whose products
      run in bf16); ``xla_flops`` / ``xla_bytes`` (``cost_analysis()`` of the lowered,
      unoptimised program: every convolution and matmul counted, elementwise work too, all
      devices; a ``while`` loop's body once); ``xla_flops_compiled`` (of the optimised
      program, per device; GPU backends may not count library calls such as cuDNN
      convolutions, so it can be lower); and ``memory_analysis()`` per device:
      ``argument_bytes``, ``output_bytes``, ``alias_bytes``, ``temp_bytes``,
      ``generated_code_bytes``.
    """
    from scm_jax.flops import jaxpr_flops_split
    from scm_jax.train.aot import MEMORY_FIELDS

    t0 = time.perf_counter()
    traced = jitted.trace(*args, **kwargs)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    by_dtype = jaxpr_flops_split(traced.jaxpr, "dtype")
    by_kind = jaxpr_flops_split(traced.jaxpr, "kind")
    stats: dict[str, Any] = {
        "trace_s": round(t1 - t0, 3), "lower_s": round(t2 - t1, 3),
        "compile_s": round(t3 - t2, 3), "model_flops": sum(by_dtype.values()),
        "model_flops_bf16": by_dtype.get("bfloat16", 0),
        "model_flops_batched_matmul": by_kind.get("batched_matmul", 0),
    }  # fmt: skip
    try:
        lc = _cost(lowered.cost_analysis())
        stats["xla_flops"], stats["xla_bytes"] = lc["flops"], lc["bytes"]
    except Exception as e:  # a backend without cost analysis: say so
        stats["xla_flops"] = None
        stats["xla_cost_error"] = f"{type(e).__name__}: {e}"[:200]
    try:
        stats["xla_flops_compiled"] = _cost(compiled.cost_analysis())["flops"]
    except Exception:
        stats["xla_flops_compiled"] = None
    mem = compiled.memory_analysis()
    for key, attr in MEMORY_FIELDS.items():
        if key != "peak_bytes":
            stats[key] = int(getattr(mem, attr, 0) or 0) if mem is not None else None
    return compiled, stats


def device_memory() -> dict[str, int] | None:
    """The first device's allocator statistics (GPU / TPU): ``bytes_in_use``,
    ``peak_bytes_in_use`` (the largest since the process started, not since the last call:
    the first row of a size is the one to read) and ``bytes_limit``; None on CPUs."""
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keys if k in stats}


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is XLA running out of device memory (at compile or run time)."""
    text = f"{type(exc).__name__}: {exc}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                   "OOM"))  # fmt: skip


def run_guarded(measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``measure()``; an out-of-memory error becomes ``{'status': 'oom', 'error': ...}`` (and
    the caches are cleared once the error, whose traceback holds the measurement's arrays, is
    gone, so the next measurement starts clean); success adds ``'status': 'ok'``. Other errors
    propagate."""
    try:
        return {"status": "ok", **measure()}
    except Exception as e:
        if not is_oom(e):
            raise
        row = {"status": "oom", "error": f"{type(e).__name__}: {str(e)[:300]}"}
    jax.clear_caches()
    gc.collect()
    return row


@dataclasses.dataclass
class Budget:
    """A wall-clock budget: ``left()`` seconds remain of ``seconds`` from creation
    (``seconds=None``: unlimited)."""

    seconds: float | None
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def left(self) -> float:
        if self.seconds is None:
            return float("inf")
        return self.seconds - (time.perf_counter() - self.start)

    def allows(self, estimate_s: float) -> bool:
        """Whether a measurement expected to take ``estimate_s`` seconds fits in what is left."""
        return self.left() >= estimate_s


class Results:
    """A benchmark's JSON record, rewritten after every row.

    Args:
      out: the file (its folder is created).
      name: the benchmark's name; command: the command line that produced it.
      config: what the numbers depend on (sizes, dtypes, batches, budgets).
    """

    def __init__(self, out: str | Path, name: str, command: str, config: Mapping[str, Any]):
        self.out = Path(out)
        self.data: dict[str, Any] = {
            "benchmark": name,
            "command": command,
            "meta": environment(),
            "config": dict(config),
            "rows": [],
            "complete": False,
        }
        self.write()

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.data["rows"]

    def add(self, row: Mapping[str, Any]) -> None:
        """Append ``row``, print it as one JSON line, and rewrite the file."""
        row = dict(row)
        self.rows.append(row)
        print(json.dumps(row, default=_jsonable), flush=True)
        self.write()

    def finish(self, **extra: Any) -> None:
        """Mark the record complete (every planned row measured or skipped) and add ``extra``."""
        self.data.update(extra)
        self.data["complete"] = True
        self.data["meta"]["load_average_end"] = environment()["load_average"]
        self.write()
        print(f"wrote {self.out}", flush=True)

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out, self.data, indent=1, default=_jsonable)


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def add_common_args(parser: argparse.ArgumentParser, name: str) -> None:
    """``--out``, ``--cpu``, ``--budget-s`` and ``--reps``, shared by every benchmark script.

    The default ``--out`` is ``benchmarks/results/<name>_<platform>.json``.
    """
    parser.add_argument(
        "--out",
        default=None,
        help=f"result file (default benchmarks/results/{name}_<platform>.json)",
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="the small CPU version (automatic when jax sees no accelerator)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall-clock budget: measurements that would not fit are recorded as skipped",
    )
    parser.add_argument("--reps", type=int, default=None, help="timed samples per measurement")
    parser.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="write a jax.profiler trace of the first --profile-rows measurements to DIR/<row>",
    )
    parser.add_argument("--profile-rows", type=int, default=1, help="measurements to profile")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="compile without XLA's optimisations and time little: checks that "
        "the benchmark runs (CI); its times mean nothing",
    )


class Profiler:
    """Which measurements to profile: the first ``rows`` of them, each into ``root/<name>``
    (``--profile`` / ``--profile-rows``); ``root=None``: none."""

    def __init__(self, root: str | Path | None, rows: int = 1):
        self.root, self.left = (None if root is None else Path(root)), int(rows)

    def next_dir(self, name: str) -> Path | None:
        """The folder for the measurement ``name``, or None once ``rows`` have been given."""
        if self.root is None or self.left <= 0:
            return None
        self.left -= 1
        return self.root / name


def resolve_common(args: argparse.Namespace, name: str) -> tuple[bool, Path]:
    """``(small, out)``: whether to run the small CPU version, and the result file.

    ``--quick`` turns XLA's optimisations off here (``jax_disable_most_optimizations``)."""
    if args.quick:
        jax.config.update("jax_disable_most_optimizations", True)
    plat = jax.default_backend()
    small = bool(args.cpu) or plat == "cpu"
    out = Path(args.out) if args.out else RESULTS_DIR / f"{name}_{plat}.json"
    return small, out


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]
) -> str:
    """A markdown table of ``rows``; ``columns`` are ``(header, key, format)`` (format '' for
    ``str``); a missing or None value prints as '–'."""
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    sep = "|" + "---|" * len(columns)
    lines = [head, sep]
    for r in rows:
        cells = []
        for _, key, fmt in columns:
            v = r.get(key)
            cells.append("–" if v is None else (format(v, fmt) if fmt else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
