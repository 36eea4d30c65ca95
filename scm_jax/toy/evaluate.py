"""How close a trained consistency model is to the exact answer on a Gaussian mixture.

* flow-map error: mean ||f_theta(z, t_max) - Phi(z)|| / data std, with Phi the exact PF-ODE flow
  map from t_max to 0 (``gmm.flow_map``) -- what sCD should learn;
* sliced Wasserstein-2 to fresh data of 1-step and 2-step samples, of the exact teacher's samples
  Phi(z), and of a second data set (the noise floor of the metric at this sample size);
* mode coverage and precision of 1- and 2-step samples and of data (``metrics.mode_statistics``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from scm_jax import trigflow
from scm_jax.gmm import GaussianMixture, flow_map
from scm_jax.guidance import ApplyFn
from scm_jax.sampling import sample_consistency
from scm_jax.toy.metrics import mode_statistics, sliced_wasserstein

Array = jax.Array


def evaluate_consistency_model(
    apply_fn: ApplyFn,
    params: Any,
    gmm: GaussianMixture,
    key: Array,
    *,
    sigma_d: float = 0.5,
    sigma_max: float = 80.0,
    t_mid: float = 1.1,
    num_samples: int = 8192,
) -> dict[str, float]:
    """Flow-map error and sliced Wasserstein distances of a consistency model on ``gmm``.

    Args:
      apply_fn, params: the student (``ApplyFn`` convention; ``params`` is its network part).
      gmm: the data mixture; key: PRNG key.
      sigma_d, sigma_max, t_mid: TrigFlow data std, start noise level and the 2-step midpoint.
      num_samples: samples per set.
    Returns:
      ``flow_map_error`` (relative to the data std), ``sw_1step``, ``sw_2step``, ``sw_teacher``
      (exact teacher samples), ``sw_data_floor`` (data vs independent data), ``sw_noise``
      (the prior N(0, sigma_d^2 I) vs data).
    """
    t_max = trigflow.t_max(sigma_max, sigma_d)
    k_z, k_data, k_floor, k_sw, k1, k2 = jax.random.split(key, 6)
    n, d = num_samples, gmm.dim
    z = trigflow.sample_noise(k_z, (n, d), sigma_d)
    phi = flow_map(gmm, z, t_max, 0.0, sigma_d, num_steps=400)  # RK4 error ~2e-9 at 400 steps

    @jax.jit
    def one_step(p: Any, z: Array) -> Array:
        t = jnp.full((n,), t_max, z.dtype)
        return trigflow.consistency_fn(z, t, apply_fn(p, z / sigma_d, t), sigma_d)

    def sample(times: tuple[float, ...], k: Array) -> Array:
        run = jax.jit(lambda p, k: sample_consistency(apply_fn, p, k, (n, d), times, sigma_d))
        return run(params, k)

    data = gmm.sample(k_data, n)
    sw = lambda x: float(sliced_wasserstein(x, data, k_sw))  # noqa: E731
    err = jnp.mean(jnp.linalg.norm(one_step(params, z) - phi, axis=-1)) / gmm.data_std()
    return {
        "flow_map_error": float(err),
        "sw_1step": sw(sample((t_max,), k1)),
        "sw_2step": sw(sample((t_max, t_mid), k2)),
        "sw_teacher": sw(phi),
        "sw_data_floor": sw(gmm.sample(k_floor, n)),
        "sw_noise": sw(z),
    }


def evaluate_modes(
    apply_fn: ApplyFn,
    params: Any,
    gmm: GaussianMixture,
    key: Array,
    *,
    sigma_d: float = 0.5,
    sigma_max: float = 80.0,
    t_mid: float = 1.1,
    num_samples: int = 8192,
) -> dict[str, dict[str, Any]]:
    """Mode coverage and precision (``metrics.mode_statistics``) of a student on ``gmm``.

    Arguments as :func:`evaluate_consistency_model`. Returns ``{'modes_1step', 'modes_2step',
    'modes_data'}``, the last of fresh data (the reference at this sample size).
    """
    t_max = trigflow.t_max(sigma_max, sigma_d)
    k1, k2, k_data = jax.random.split(key, 3)
    shape = (num_samples, gmm.dim)
    arrays = gmm.arrays()

    def sample(times: tuple[float, ...], k: Array) -> Array:
        run = jax.jit(lambda p, k: sample_consistency(apply_fn, p, k, shape, times, sigma_d))
        return run(params, k)

    return {
        "modes_1step": mode_statistics(sample((t_max,), k1), *arrays),
        "modes_2step": mode_statistics(sample((t_max, t_mid), k2), *arrays),
        "modes_data": mode_statistics(gmm.sample(k_data, num_samples), *arrays),
    }
