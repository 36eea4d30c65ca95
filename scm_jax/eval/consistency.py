"""Consistency error: a consistency model's f(x_t, t) against its teacher's PF-ODE endpoint.

For fixed pairs (x0, z) (N examples, z ~ N(0, sigma_d^2 I)) and each time t_k of a grid,

    x_t = cos t_k x0 + sin t_k z,
    Phi(x_t, t_k) = the teacher's PF-ODE dx/dt = sigma_d F_teacher integrated from (x_t, t_k)
                    to 0 (EDM Heun, ``heun_steps`` steps; ``sampling.solve_ode_from``),
    err(t_k) = RMS(f(x_t, t_k) - Phi(x_t, t_k)) / std(x0),

with f(x_t, t) = cos t x_t - sin t sigma_d F(x_t / sigma_d, t) the student's consistency
function, RMS over all N x D elements, and std(x0) the standard deviation of all elements of the
fixed x0 set (one number). A perfect consistency model of its teacher has err = 0 at every t.
Phi depends only on the teacher and the pairs: :func:`reference` computes it once (the caller
caches it, ``scm_jax.eval.consistency_run``).

The 2-step path (the sampler's times t_max, t_mid) from the same z and a fixed second noise z':
x_hat = f(x_{t_max}, t_max), x_mid = cos t_mid x_hat + sin t_mid z', and

    2step            = RMS(f(x_mid, t_mid) - Phi(x_mid, t_mid)) / std(x0),
    2step_vs_teacher = RMS(f(x_mid, t_mid) - Phi(x_{t_max}, t_max)) / std(x0).

x_mid depends on the student, so Phi(x_mid, t_mid) is recomputed at every evaluation (N Heun
solves). The 1-step output against the teacher's endpoint from x_{t_max} is err(t_max).
``2step_vs_teacher`` is not zero for a perfect student: re-noising with z' leaves the PF-ODE
trajectory of z, so even the teacher's own 2-step path (x_hat = Phi(x_{t_max}), f = Phi) lands
elsewhere; that value, ``ideal_2step_vs_teacher``, is computed with the reference to read it
against.

Default grid (:func:`default_times`): ``num`` times evenly spaced in ln sigma (sigma = sigma_d
tan t) from sigma = 0.01 to sigma_max, i.e. t from 0.02 to t_max, plus t_mid; every grid holds
t_max and t_mid. Arrays here are float32 ``(N, ...)`` examples (images ``(N, H, W, C)``, points
``(N, D)``), labels int32 ``(N,)`` or None; functions take arrays and ``ApplyFn`` callables, no
config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from scm_jax import sampling, trigflow
from scm_jax.guidance import ApplyFn

Array = jax.Array

DEFAULT_NUM_TIMES = 8
DEFAULT_SIGMA_LO = 0.01
DEFAULT_HEUN_STEPS = 64
PREFIX = "consistency/"


# ------------------------------------------------------------------------- grid and pairs


def default_times(
    sigma_d: float, sigma_max: float, t_mid: float, num: int = DEFAULT_NUM_TIMES,
    sigma_lo: float = DEFAULT_SIGMA_LO,
) -> tuple[float, ...]:  # fmt: skip
    """``num`` times evenly spaced in ln sigma from ``sigma_lo`` to ``sigma_max``, plus t_mid.

    Returns increasing Python floats in (0, t_max]; the last is t_max = arctan(sigma_max /
    sigma_d). 8 times with sigma_d = 0.5, sigma_max = 80: t = 0.020, 0.072, 0.255, 0.745, 1.100
    (t_mid), 1.290, 1.497, 1.543, 1.565.
    """
    sigmas = np.geomspace(sigma_lo, sigma_max, num)
    return check_times(np.arctan(sigmas / sigma_d).tolist(), trigflow.t_max(sigma_max, sigma_d),
                       t_mid)  # fmt: skip


def time_label(t: float) -> str:
    """The metric name of grid time ``t``: ``consistency/t=0.255``."""
    return f"{PREFIX}t={t:.3f}"


def check_times(times: Any, t_max: float, t_mid: float) -> tuple[float, ...]:
    """The grid as increasing floats in (0, t_max], with t_max and t_mid added if missing.

    Raises:
      ValueError: a time outside (0, t_max], or two times that share a metric name (3 decimals).
    """
    out = {round(float(t), 6): float(t) for t in (t_max, t_mid)}  # duplicates: the first kept
    for t in times:
        if not 0 < float(t) <= t_max + 1e-9:
            raise ValueError(f"consistency time {t!r} is outside (0, t_max = {t_max:.5f}]")
        out.setdefault(round(float(t), 6), min(float(t), t_max))
    grid = tuple(sorted(out.values()))
    labels = [time_label(t) for t in grid]
    if len(set(labels)) != len(labels):
        raise ValueError(f"consistency times {list(grid)} are closer than 0.001 apart")
    return grid


@dataclasses.dataclass(frozen=True)
class Pairs:
    """The fixed inputs: x0, z, z' float32 ``(N, ...)``, labels int32 ``(N,)`` or None."""

    x0: np.ndarray
    z: np.ndarray
    z_mid: np.ndarray
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(self.x0)

    @property
    def std(self) -> float:
        """std(x0): the standard deviation of all elements of x0 (float64 on the host)."""
        return float(np.std(self.x0, dtype=np.float64))

    def fingerprint(self) -> str:
        """sha256 of the arrays' bytes (a cache is valid only for the same pairs)."""
        h = hashlib.sha256()
        for a in (self.x0, self.z, self.z_mid, self.labels):
            h.update(b"-" if a is None else np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def make_pairs(x0: np.ndarray, labels: np.ndarray | None, seed: int, sigma_d: float) -> Pairs:
    """:class:`Pairs` for examples ``x0`` ``(N, ...)``: z, z' ~ N(0, sigma_d^2 I) from
    ``jax.random.key(seed)`` (split in two), float32, independent of the device count."""
    x0 = np.asarray(x0, np.float32)
    k_z, k_mid = jax.random.split(jax.random.key(seed))
    z = np.asarray(trigflow.sample_noise(k_z, x0.shape, sigma_d), np.float32)
    z_mid = np.asarray(trigflow.sample_noise(k_mid, x0.shape, sigma_d), np.float32)
    return Pairs(x0, z, z_mid, None if labels is None else np.asarray(labels, np.int32))


# ------------------------------------------------------------------------- jitted pieces


def _f(apply_fn: ApplyFn, params: Any, x_t: Array, t: Array, labels, guidance, sigma_d: float):
    """f(x_t, t) = cos t x_t - sin t sigma_d F(x_t / sigma_d, t) with t a scalar array."""
    tb = jnp.broadcast_to(t, (x_t.shape[0],))
    return trigflow.consistency_fn(x_t, tb, apply_fn(params, x_t / sigma_d, tb, labels, guidance),
                                   sigma_d)  # fmt: skip


def _sq(diff: Array, w: Array) -> Array:
    """sum_i w_i ||diff_i||^2 (float32 scalar); w ``(B,)`` masks padded rows."""
    return jnp.sum(w * jnp.sum(jnp.square(diff).reshape(diff.shape[0], -1), axis=1))


def make_reference_fn(
    teacher_fn: ApplyFn, times: tuple[float, ...], t_mid: float, heun_steps: int, sigma_d: float,
    out_sharding: NamedSharding | None = None,
) -> Callable[..., tuple[Array, Array]]:  # fmt: skip
    """Jitted ``fn(params, x0, z, z_mid, labels, cfg_scale) -> (Phi (K, B, ...), ideal (B, ...))``.

    Phi[k] = the teacher's Heun endpoint from (cos t_k x0 + sin t_k z, t_k); ideal = the endpoint
    of the teacher's own 2-step path, Phi(cos t_mid Phi[t_max] + sin t_mid z', t_mid). The K
    solves run one after the other (``lax.map``: memory of one batch). ``cfg_scale``: the
    teacher's classifier-free guidance scale or None. ``out_sharding``: where the outputs go
    (replicated, so that every process can read them), or None.
    """
    grid = jnp.asarray(times, jnp.float32)

    def solve(params, x_t, t, labels, cfg_scale):
        return sampling.solve_ode_from(teacher_fn, params, x_t, t, heun_steps, sigma_d,
                                       labels=labels, guidance_scale=cfg_scale)  # fmt: skip

    def fn(params, x0, z, z_mid, labels, cfg_scale):
        phi = jax.lax.map(lambda t: solve(params, trigflow.add_noise(x0, z, t), t, labels,
                                          cfg_scale), grid)  # fmt: skip
        x_mid = trigflow.add_noise(phi[-1], z_mid, t_mid)  # times are increasing: t_max last
        return phi, solve(params, x_mid, jnp.float32(t_mid), labels, cfg_scale)

    return jax.jit(fn, out_shardings=out_sharding)


def make_student_fn(
    student_fn: ApplyFn, teacher_fn: ApplyFn, times: tuple[float, ...], t_mid: float,
    heun_steps: int, sigma_d: float, out_sharding: NamedSharding | None = None,
) -> Callable[..., tuple[Array, Array, Array]]:  # fmt: skip
    """Jitted ``fn(s_params, t_params, x0, z, z_mid, w, phi, labels, guidance, cfg_scale)``
    ``-> (sq (K,), sq_2step, sq_2step_vs_teacher)``: weighted sums of squared errors of a batch.

    ``phi`` ``(K, B, ...)`` is the batch's reference, ``w`` ``(B,)`` 1 for real rows and 0 for
    padding, ``guidance`` the student's guidance input ``(B,)`` or None, ``cfg_scale`` the
    teacher's CFG scale or None, ``out_sharding`` as :func:`make_reference_fn`. Per batch: K + 2
    student calls and one Heun solve.
    """
    grid = jnp.asarray(times, jnp.float32)
    t_max, t_mid_ = grid[-1], jnp.float32(t_mid)

    def fn(s_params, t_params, x0, z, z_mid, w, phi, labels, guidance, cfg_scale):
        def at(args):
            t, phi_k = args
            f = _f(student_fn, s_params, trigflow.add_noise(x0, z, t), t, labels, guidance,
                   sigma_d)  # fmt: skip
            return _sq(f - phi_k, w)

        sq = jax.lax.map(at, (grid, phi))
        x_hat = _f(student_fn, s_params, trigflow.add_noise(x0, z, t_max), t_max, labels,
                   guidance, sigma_d)  # fmt: skip
        x_mid = trigflow.add_noise(x_hat, z_mid, t_mid_)
        f_mid = _f(student_fn, s_params, x_mid, t_mid_, labels, guidance, sigma_d)
        phi_mid = sampling.solve_ode_from(
            teacher_fn, t_params, x_mid, t_mid_, heun_steps, sigma_d, labels=labels,
            guidance_scale=cfg_scale,
        )  # fmt: skip
        return sq, _sq(f_mid - phi_mid, w), _sq(f_mid - phi[-1], w)

    return jax.jit(fn, out_shardings=out_sharding)


# ------------------------------------------------------------------------- batched drivers


def _batches(n: int, batch: int):
    """(start, stop) of each batch of ``batch`` rows over ``n`` (the last one short)."""
    return [(s, min(s + batch, n)) for s in range(0, n, batch)]


def _pad(a: np.ndarray | None, start: int, stop: int, batch: int, axis: int = 0):
    """Rows [start, stop) of ``a`` along ``axis``, padded with copies of the first to ``batch``."""
    if a is None:
        return None
    part = np.take(a, np.arange(start, stop), axis=axis)
    if stop - start == batch:
        return part
    fill = np.repeat(np.take(part, [0], axis=axis), batch - (stop - start), axis=axis)
    return np.concatenate([part, fill], axis=axis)


def _batch_size(batch: int, n: int, sharding: NamedSharding | None) -> int:
    """Rows per call: ``batch`` (at most n), rounded up to a multiple of the batch shards."""
    ways = 1
    if sharding is not None:
        for axes in sharding.spec[:1]:
            for a in (axes,) if isinstance(axes, str) else axes or ():
                ways *= sharding.mesh.shape[a]
    return math.ceil(min(batch, n) / ways) * ways


def _replicated(sharding: NamedSharding | None) -> NamedSharding | None:
    return None if sharding is None else NamedSharding(sharding.mesh, PartitionSpec())


def _put(tree: Any, sharding: NamedSharding | None, axis: int = 0) -> Any:
    """Place host arrays batch-sharded along ``axis`` (None: leave them to XLA)."""
    if sharding is None:
        return tree
    spec = PartitionSpec(*([None] * axis), *sharding.spec)
    return jax.device_put(tree, NamedSharding(sharding.mesh, spec))


def reference(
    teacher_fn: ApplyFn, teacher_params: Any, pairs: Pairs, times: tuple[float, ...], *,
    t_mid: float, sigma_d: float, heun_steps: int = DEFAULT_HEUN_STEPS,
    cfg_scale: float | None = None, batch: int = 256, sharding: NamedSharding | None = None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """The teacher's endpoints for the pairs: ``{'phi': (K, N, ...), 'ideal_2step': (N, ...)}``.

    Args:
      teacher_fn, teacher_params: the teacher F (``ApplyFn``; params on the mesh, or None).
      pairs: :class:`Pairs`; times: the grid (:func:`check_times`: increasing, t_max last).
      t_mid, sigma_d, heun_steps: the 2-step time, data std, Heun steps (2 heun_steps - 1 NFE).
      cfg_scale: the teacher's classifier-free guidance scale (needs labels), or None.
      batch: examples per call (rounded up to a multiple of the sharding's batch shards; the
        last call is padded and the padding masked).
      sharding: the batch sharding (``scm_jax.sharding.batch_sharding``), or None.
    Returns:
      float32 numpy arrays on the host.
    """
    fn = make_reference_fn(teacher_fn, times, t_mid, heun_steps, sigma_d, _replicated(sharding))
    n, batch = len(pairs), _batch_size(batch, len(pairs), sharding)
    phis, ideals = [], []
    g = None if cfg_scale is None else jnp.float32(cfg_scale)
    for start, stop in _batches(n, batch):
        args = [_pad(a, start, stop, batch) for a in (pairs.x0, pairs.z, pairs.z_mid,
                                                      pairs.labels)]  # fmt: skip
        phi, ideal = fn(teacher_params, *_put(args, sharding), g)
        phis.append(np.asarray(phi)[:, : stop - start])
        ideals.append(np.asarray(ideal)[: stop - start])
    return {"phi": np.concatenate(phis, axis=1), "ideal_2step": np.concatenate(ideals)}


def evaluate(
    student_fn: ApplyFn, student_params: Any, teacher_fn: ApplyFn, teacher_params: Any,
    pairs: Pairs, ref: dict[str, np.ndarray], times: tuple[float, ...], *, t_mid: float,
    sigma_d: float, heun_steps: int = DEFAULT_HEUN_STEPS, guidance: float | None = None,
    cfg_scale: float | None = None, batch: int = 256, sharding: NamedSharding | None = None,
    fns: dict | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The consistency errors of a student (module docstring), as a JSON-ready dict.

    Args:
      student_fn, student_params: the consistency model F (``ApplyFn``).
      teacher_fn, teacher_params, pairs, times, t_mid, sigma_d, heun_steps, cfg_scale, batch,
        sharding: as :func:`reference` (the same teacher: it solves from x_mid).
      ref: :func:`reference` of these pairs and times.
      guidance: the student's guidance input (a model with one), or None.
      fns: a dict kept by the caller between evaluations: the compiled function is reused.
    Returns:
      ``{'times', 'sigmas', 'errors' (one per time), '1step' (= the t_max error), '2step',
      '2step_vs_teacher', 'ideal_2step_vs_teacher', 'data_std', 'num'}`` (floats, lists).
    """
    key = (student_fn, teacher_fn, times, t_mid, heun_steps, sigma_d, sharding)
    fns = {} if fns is None else fns
    if key not in fns:
        fns[key] = make_student_fn(student_fn, teacher_fn, times, t_mid, heun_steps, sigma_d,
                                   _replicated(sharding))  # fmt: skip
    fn = fns[key]
    n, batch = len(pairs), _batch_size(batch, len(pairs), sharding)
    g_cfg = None if cfg_scale is None else jnp.float32(cfg_scale)
    sq, sq2, sq2t = np.zeros(len(times)), 0.0, 0.0
    for start, stop in _batches(n, batch):
        args = [_pad(a, start, stop, batch) for a in (pairs.x0, pairs.z, pairs.z_mid)]
        w = (np.arange(batch) < stop - start).astype(np.float32)
        labels = _pad(pairs.labels, start, stop, batch)
        g = None if guidance is None else np.full((batch,), guidance, np.float32)
        phi = _pad(ref["phi"], start, stop, batch, axis=1)
        placed = [*_put([*args, w], sharding), _put(phi, sharding, axis=1)]
        out = fn(student_params, teacher_params, *placed, *_put([labels, g], sharding), g_cfg)
        a, b, c = (np.asarray(v, np.float64) for v in out)
        sq, sq2, sq2t = sq + a, sq2 + float(b), sq2t + float(c)
    count, std = float(pairs.x0.size), pairs.std
    err = [math.sqrt(v / count) / std for v in sq]
    ideal = ref["ideal_2step"].astype(np.float64) - ref["phi"][-1].astype(np.float64)
    return {
        "times": list(times), "sigmas": [sigma_d * math.tan(t) for t in times], "errors": err,
        "1step": err[-1], "2step": math.sqrt(sq2 / count) / std,
        "2step_vs_teacher": math.sqrt(sq2t / count) / std,
        "ideal_2step_vs_teacher": math.sqrt(float(np.mean(ideal**2))) / std,
        "data_std": std, "num": n,
    }  # fmt: skip


# ------------------------------------------------------------------------- reporting


def scalars(result: dict[str, Any]) -> dict[str, float]:
    """The metrics: ``consistency/t=<t>`` per time, ``consistency/1step``, ``/2step`` and
    ``/2step_vs_teacher``."""
    out = {time_label(t): e for t, e in zip(result["times"], result["errors"], strict=True)}
    for name in ("1step", "2step", "2step_vs_teacher"):
        out[PREFIX + name] = result[name]
    return out


def format_table(result: dict[str, Any], t_mid: float) -> str:
    """The table ``scm-jax eval --consistency`` prints: t, sigma, error, then the 2-step path."""
    t_max = result["times"][-1]
    lines = [f"{'t':>7} {'sigma':>9} {'RMS error / std(x0)':>20}"]
    for t, s, e in zip(result["times"], result["sigmas"], result["errors"], strict=True):
        note = "  (t_max: 1-step)" if t == t_max else "  (t_mid)" if abs(t - t_mid) < 1e-6 else ""
        lines.append(f"{t:>7.3f} {s:>9.4g} {e:>20.4g}{note}")
    lines += [
        f"2-step: f(x_mid, t_mid) vs teacher from x_mid:        {result['2step']:.4g}",
        f"1-step output vs teacher endpoint from x_t_max:       {result['1step']:.4g}",
        f"2-step output vs teacher endpoint from x_t_max:       {result['2step_vs_teacher']:.4g}"
        f"  (the teacher's own 2-step path: {result['ideal_2step_vs_teacher']:.4g})",
    ]
    return "\n".join(lines)
