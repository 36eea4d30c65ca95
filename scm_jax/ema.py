"""Exponential moving averages of the parameters: half-life EMA and EDM2's power-function EMA.

Pure functions of pytrees; durations count images (EDM2 convention), so an EMA means the same
thing at any batch size.

* Half-life EMA (EDM, sCM's CIFAR-10 runs: half-life 0.5 Mimg): beta = 0.5^(batch / halflife).
* Power-function EMA (EDM2 §3.1, sCM's ImageNet runs: sigma_rel = 0.05): after T images the
  average weights the parameters at time t in proportion to t^gamma; beta_T =
  (1 - batch / T)^(gamma + 1). The relative width sigma_rel of that profile and gamma satisfy
  sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) (EDM2 Eq. 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def power_exponent(sigma_rel: float) -> float:
    """gamma of a power-function EMA of relative width ``sigma_rel`` (inverts power_sigma_rel).

    Solves gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0 for its largest real root
    (the cubic is EDM2 Eq. 3 multiplied out). Valid for 0 < sigma_rel < sqrt(1/12) (gamma > 0).
    """
    if not 0 < sigma_rel < 12**-0.5:
        raise ValueError(f"sigma_rel={sigma_rel} must be in (0, {12**-0.5:.4f})")
    inv = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_sigma_rel(gamma: float) -> float:
    """Relative width sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) of the t^gamma profile."""
    return float(np.sqrt((gamma + 1) / (gamma + 2) ** 2 / (gamma + 3)))


def power_ema_beta(gamma: float, nimg: Array | float, batch_size: int) -> Array:
    """Decay of a power-function EMA at the update that brings the image count to ``nimg``.

    beta = (1 - batch_size / nimg)^(gamma + 1); 0 at the first update (the EMA starts at the
    parameters), approaching 1 as training proceeds.
    """
    nimg = jnp.asarray(nimg, jnp.float32)
    return jnp.maximum(1.0 - batch_size / jnp.maximum(nimg, batch_size), 0.0) ** (gamma + 1)


def halflife_ema_beta(
    halflife_nimg: float, batch_size: int, nimg: Array | float | None = None, rampup: float = 0.0
) -> Array:
    """Decay 0.5^(batch / halflife) of a half-life EMA.

    With ``rampup`` > 0 the half-life is min(halflife, rampup * nimg) (EDM's EMA ramp-up), which
    keeps early averages from being dominated by the random initialisation.
    """
    halflife = jnp.asarray(halflife_nimg, jnp.float32)
    if rampup > 0:
        if nimg is None:
            raise ValueError("an EMA ramp-up needs the current image count nimg")
        halflife = jnp.minimum(halflife, rampup * jnp.asarray(nimg, jnp.float32))
    return 0.5 ** (batch_size / jnp.maximum(halflife, 1e-8))


def ema_update(ema: Any, params: Any, beta: Array | float) -> Any:
    """ema <- beta ema + (1 - beta) params, leaf by leaf (dtypes of ``ema`` kept)."""
    return jax.tree.map(lambda e, p: (beta * e + (1 - beta) * p).astype(e.dtype), ema, params)


def ema_names(power_std: Sequence[float], halflife_kimg: float) -> list[str]:
    """Names of the EMA trees a config asks for: ``'power_0.050'``... and ``'halflife'``."""
    names = [f"power_{s:.3f}" for s in power_std]
    if halflife_kimg > 0:
        names.append("halflife")
    return names


def init_emas(params: Any, power_std: Sequence[float], halflife_kimg: float) -> dict[str, Any]:
    """One EMA tree per profile, each a copy of ``params`` (see :func:`ema_names`)."""
    return {name: jax.tree.map(jnp.copy, params) for name in ema_names(power_std, halflife_kimg)}


def update_emas(
    emas: dict[str, Any],
    params: Any,
    nimg: Array | float,
    batch_size: int,
    power_std: Sequence[float],
    halflife_kimg: float,
    rampup: float = 0.0,
) -> dict[str, Any]:
    """Advance every EMA tree by one optimiser step that brought the image count to ``nimg``.

    Args:
      emas: trees from :func:`init_emas` (same ``power_std`` and ``halflife_kimg``).
      params: the parameters after the step.
      nimg: images seen including this step's batch; batch_size: global batch.
      power_std: sigma_rel of each power-function EMA; halflife_kimg: half-life (0: none).
      rampup: EMA ramp-up ratio of the half-life EMA (0: none).
    Returns:
      The updated dict, same keys.
    """
    out = {}
    for s in power_std:
        name = f"power_{s:.3f}"
        out[name] = ema_update(
            emas[name], params, power_ema_beta(power_exponent(s), nimg, batch_size)
        )
    if halflife_kimg > 0:
        beta = halflife_ema_beta(halflife_kimg * 1000, batch_size, nimg, rampup)
        out["halflife"] = ema_update(emas["halflife"], params, beta)
    return out
