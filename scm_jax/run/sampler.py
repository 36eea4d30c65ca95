"""The sampling API: ``scm_jax.load_sampler(workdir) -> Sampler``.

::

    import scm_jax
    sampler = scm_jax.load_sampler("runs/mnist_sct")        # the run's EMA weights
    images = sampler.sample(0, 64, steps=2, labels=range(64))  # (64, 28, 28, 1) in [-1, 1]
    x0 = sampler.consistency(x_t, t)                           # f_theta(x_t, t)
    F = sampler.network(x_t / sampler.sigma_d, t)              # F_theta(x_t / sigma_d, t)

``sample``, ``sample_batch`` and ``batch_fn`` return samples in *data units* (images in [-1, 1]):
the run's data scale (``dataset.normalize``, latents' statistics; ``scm_jax.data.scale``) is
inverted on the device. ``network`` and ``consistency`` work in model units, like training.

For a consistency model (sCT, sCD) ``steps`` is the number of network evaluations (1 or 2 in
the paper; sCM's t_mid = 1.1 for 2). For a diffusion run (a teacher) ``steps`` is the number of
EDM Heun steps of the PF-ODE sampler (2 steps - 1 network evaluations each).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scm_jax import objectives, sampling, trigflow
from scm_jax.data.scale import DataScale, data_scale
from scm_jax.networks import NetworkDef

Array = jax.Array


class Sampler:
    """Jitted sampling from one set of network parameters.

    Args:
      nd: the network; params: its parameters (``init(...)['net']``, usually an EMA).
      sigma_d, sigma_max, t_mid: TrigFlow data std, largest noise level, 2-step middle time.
      objective: ``'sct'``/``'scd'`` (consistency sampling) or ``'diffusion'`` (PF-ODE).
      guidance: default guidance scale for networks with a guidance input (sCD CFG students).
      batch_size: largest batch per network call in :meth:`sample` (bounds memory).
      scale: model units -> data units of the samples (None: the identity).

    ``step``: the checkpoint step of the parameters when :func:`load_sampler` read them (after
    a fallback past a damaged checkpoint, the older step; an export's recorded step), else None.
    """

    def __init__(
        self, nd: NetworkDef, params: Any, *, sigma_d: float, sigma_max: float = 80.0,
        t_mid: float = 1.1, objective: str = "sct", guidance: float | None = None,
        batch_size: int = 256, scale: DataScale | None = None, _cache: dict | None = None,
    ) -> None:  # fmt: skip
        self.nd, self.params = nd, params
        self.sigma_d, self.sigma_max, self.t_mid = float(sigma_d), float(sigma_max), float(t_mid)
        self.scale = scale or DataScale(sigma_d=float(sigma_d))
        self.objective = objective
        self.guidance = guidance
        self.batch_size = int(batch_size)
        self._cache: dict[Any, Any] = {} if _cache is None else _cache
        self.step: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """One sample's shape: ``(H, W, C)`` images or ``(D,)`` points."""
        return self.nd.sample_shape

    def with_params(self, params: Any) -> Sampler:
        """The same sampler with other parameters, sharing compiled functions."""
        return Sampler(
            self.nd, params, sigma_d=self.sigma_d, sigma_max=self.sigma_max, t_mid=self.t_mid,
            objective=self.objective, guidance=self.guidance, batch_size=self.batch_size,
            scale=self.scale, _cache=self._cache,
        )  # fmt: skip

    # -- inputs ---------------------------------------------------------------------------
    def _labels(self, labels: Any, n: int) -> Array | None:
        if not self.nd.num_classes:
            if labels is not None:
                raise ValueError("this model is unconditional; do not pass labels")
            return None
        if labels is None:  # built on the host: one transfer, no device ops before the sampler
            return jnp.asarray(np.arange(n, dtype=np.int32) % self.nd.num_classes)
        out = np.asarray(list(labels) if isinstance(labels, Iterable) else labels, np.int32)
        out = np.broadcast_to(out, (n,)) if out.ndim == 0 else out
        if out.shape != (n,):
            raise ValueError(f"labels must be one int or {n} ints, got shape {out.shape}")
        if np.any((out < -1) | (out >= self.nd.num_classes)):
            raise ValueError(f"labels must lie in [0, {self.nd.num_classes}) (or -1 = null)")
        return jnp.asarray(out)

    def _guidance(self, guidance: float | None, n: int) -> Array | None:
        g = self.guidance if guidance is None else guidance
        if self.nd.guidance_input:
            return jnp.asarray(np.full((n,), 1.0 if g is None else float(g), np.float32))
        if guidance is not None and not objectives.is_diffusion(self.objective):
            raise ValueError("this model has no guidance input; do not pass guidance")
        return None

    # -- the network and the consistency function ------------------------------------------
    def network(self, x_scaled: Any, t: Any, labels: Any = None, guidance: float | None = None):
        """F_theta(x_scaled, t) ``(B, ...)`` float32; ``x_scaled = x_t / sigma_d``, t ``(B,)``."""
        x = jnp.asarray(x_scaled, jnp.float32)
        b = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        if "network" not in self._cache:
            self._cache["network"] = jax.jit(self.nd.apply_fn)
        fn = self._cache["network"]
        return fn(self.params, x, t, self._labels(labels, b), self._guidance(guidance, b))

    def consistency(self, x_t: Any, t: Any, labels: Any = None, guidance: float | None = None):
        """f_theta(x_t, t) = cos t x_t - sin t sigma_d F_theta (the clean-sample estimate)."""
        x = jnp.asarray(x_t, jnp.float32)
        b = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        F = self.network(x / self.sigma_d, t, labels, guidance)
        return trigflow.consistency_fn(x, t, F, self.sigma_d)

    # -- sampling -------------------------------------------------------------------------
    def _fn(self, steps: int, b: int):
        key = ("sample", steps, b)
        if key not in self._cache:
            shape = (b, *self.shape)
            if objectives.is_diffusion(self.objective):
                fn, _ = sampling.make_ode_sampler(self.nd.apply_fn, shape, steps, self.sigma_d,
                                                  sigma_max=self.sigma_max)  # fmt: skip
            else:
                times = sampling.consistency_times(
                    steps, trigflow.t_max(self.sigma_max, self.sigma_d), self.t_mid
                )
                fn = sampling.make_consistency_sampler(self.nd.apply_fn, shape, times, self.sigma_d)
            if not self.scale.identity:  # samples in data units, decoded on the device
                fn = jax.jit(_decoded(fn, self.scale))
            self._cache[key] = fn
        return self._cache[key]

    def nfe(self, steps: int) -> int:
        """Network evaluations per sample of ``steps``: ``steps`` for consistency sampling,
        ``2 steps - 1`` for the EDM Heun sampler of a diffusion run (twice that with CFG)."""
        return sampling.ode_nfe(steps) if objectives.is_diffusion(self.objective) else int(steps)

    def batch_fn(self, steps: int, batch: int, sharding: Any = None):
        """The jitted ``fn(params, key, labels, guidance) -> (batch, *shape)`` float32 samples in
        data units (not clipped) behind :meth:`sample_batch`; inputs from :meth:`batch_inputs`.

        Args:
          steps: network evaluations (consistency) or Heun steps (diffusion).
          batch: samples per call (static).
          sharding: the samples' sharding (e.g. ``scm_jax.sharding.batch_sharding(mesh)``; the
            parameters must then live on the same devices); None: as XLA places them.
        """
        key = ("sample", steps, batch, sharding)
        if key not in self._cache:
            fn = self._fn(steps, batch)
            self._cache[key] = fn if sharding is None else jax.jit(fn, out_shardings=sharding)
        return self._cache[key]

    def batch_inputs(
        self, labels: Any, batch: int, guidance: float | None = None
    ) -> tuple[Array | None, Array | None]:
        """``(labels, guidance)`` arrays for :meth:`batch_fn`: int32 ``(batch,)`` labels (default
        ``i % num_classes``; None if unconditional) and float32 ``(batch,)`` guidance: the
        student's guidance input (default the middle of its training range), or a diffusion
        run's CFG scale (None: no guidance).

        Raises:
          ValueError: bad labels, or guidance for a model that has no guidance input (or CFG
            guidance for an unconditional diffusion model).
        """
        y = self._labels(labels, batch)
        if not objectives.is_diffusion(self.objective):
            return y, self._guidance(guidance, batch)
        if guidance is None:
            return y, None
        if y is None:
            raise ValueError("classifier-free guidance needs a class-conditional model")
        return y, jnp.asarray(np.full((batch,), float(guidance), np.float32))

    def sample_batch(
        self, key: Array, batch: int, steps: int = 2, labels: Any = None,
        guidance: float | None = None, sharding: Any = None,
    ) -> Array:  # fmt: skip
        """One batch of samples on the device(s), without a host round-trip.

        Args:
          key: a PRNG key.
          batch: number of samples.
          steps, labels, guidance: as :meth:`sample`.
          sharding: as :meth:`batch_fn` (labels and guidance are placed with it too).
        Returns:
          jax.Array float32 ``(batch, *shape)`` in data units, not clipped (:meth:`sample`
          clips images).
        """
        y, g = self.batch_inputs(labels, batch, guidance)
        if sharding is not None:
            y, g = jax.device_put((y, g), sharding)
        return self.batch_fn(steps, batch, sharding)(self.params, key, y, g)

    def sample(
        self, rng: int | Array, num: int, steps: int = 2, labels: Any = None,
        guidance: float | None = None,
    ) -> np.ndarray:  # fmt: skip
        """``num`` samples as numpy float32 ``(num, *shape)`` in data units; images in [-1, 1]
        (clipped).

        Args:
          rng: an int seed or a PRNG key; equal seeds give equal samples.
          num: number of samples.
          steps: network evaluations (consistency) or Heun steps (diffusion).
          labels: class labels (one int or ``num`` ints); default ``i % num_classes``.
          guidance: CFG scale: the student's guidance input, or the teacher's CFG scale for a
            diffusion run (needs labels).
        """
        if num < 1 or steps < 1:
            raise ValueError(f"num and steps must be >= 1, got num={num}, steps={steps}")
        check_fits_in_memory(num, self.shape)
        key = jax.random.key(rng) if isinstance(rng, int | np.integer) else rng
        y = self._labels(labels, num)
        b = min(self.batch_size, num)
        outs, pending = [], None
        for i, start in enumerate(range(0, num, b)):
            n = min(b, num - start)
            yi = None if y is None else jnp.pad(y[start : start + n], (0, b - n))
            x = self.sample_batch(jax.random.fold_in(key, i), b, steps, yi, guidance)
            if pending is not None:  # copy the previous batch while this one computes
                outs.append(np.asarray(pending[0][: pending[1]], np.float32))
            pending = (x, n)
        outs.append(np.asarray(pending[0][: pending[1]], np.float32))
        out = np.concatenate(outs)
        return np.clip(out, -1.0, 1.0) if len(self.shape) == 3 else out


def available_memory_bytes() -> int | None:
    """The host memory available to new allocations (Linux ``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits_in_memory(num: int, shape: tuple[int, ...]) -> None:
    """Raise ValueError when ``num`` float32 samples of ``shape`` (twice: the batches and their
    concatenation) exceed the host's available memory, before any sampling starts."""
    need = 2 * 4 * num * math.prod(shape)
    have = available_memory_bytes()
    if have is not None and need > have:
        per = 4 * math.prod(shape)
        raise ValueError(
            f"{num} samples of shape {tuple(shape)} need about {need / 2**30:.1f} GiB of host "
            f"memory and {have / 2**30:.1f} GiB are available; ask for at most "
            f"{max(have // (2 * per), 1)} at a time (--num) and run several --seed values"
        )


def _decoded(fn: Any, scale: DataScale) -> Any:
    """``fn`` followed by ``scale.decode`` (model units -> data units)."""

    def sample(*args: Any) -> Array:
        return scale.decode(fn(*args))

    return sample


def load_sampler(
    path: str | Path, *, ema: str | None = None, step: int | None = None,
    batch_size: int = 256, mesh: Any = None,
) -> Sampler:  # fmt: skip
    """A :class:`Sampler` with the EMA weights of a training run or of an export folder.

    Args:
      path: the run's workdir (``scm-jax train --workdir``), or an export folder
        (``scm-jax export``, ``scm-jax import-edm2``: ``model.safetensors`` + ``config.json``).
      ema: which EMA (``'halflife'``, ``'power_0.050'``, ...; default the run's first).
      step: which checkpoint (default the latest).
      batch_size: largest batch per network call.
      mesh: place the parameters on this ``jax.sharding.Mesh`` (FSDP rule; replicated when its
        ``fsdp`` axis is 1), e.g. for :meth:`Sampler.sample_batch` with a batch sharding;
        None: the first device.
    Raises:
      FileNotFoundError: not a training run's folder; ValueError: no such EMA;
      scm_jax.run.checkpoint.CheckpointError: no readable checkpoint.
    """
    from scm_jax.networks import build_network
    from scm_jax.run.emas import load_ema_checkpoint
    from scm_jax.run.exports import default_guidance

    params, cfg, _, step = load_ema_checkpoint(path, None, mesh, ema=ema, what="run", step=step)
    nd = build_network(cfg["model"])
    guidance = default_guidance(cfg)
    tf = cfg["trigflow"]
    sampler = Sampler(
        nd, params, sigma_d=tf["sigma_d"], sigma_max=tf["sigma_max"], t_mid=tf["t_mid"],
        objective=cfg["objective"], guidance=guidance, batch_size=batch_size,
        scale=data_scale(cfg.get("dataset") or {}, tf["sigma_d"]),
    )  # fmt: skip
    sampler.step = step
    return sampler
