"""The train state and its creation directly in its sharding.

A :class:`TrainState` holds everything a run needs to continue bit-identically: the step, the
parameters ``{'net': F_theta, 'weight': w_phi}``, the optimiser state, one EMA tree of the
network per EMA profile, and the run's base PRNG key (raw ``uint32`` key data, so orbax can
store it). Per-step randomness is ``fold_in(key, step)``: a resumed run draws exactly the numbers
the uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scm_jax import ema as ema_lib
from scm_jax import sharding
from scm_jax.networks import NetworkDef

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree; checkpointed as a whole).

    Attributes:
      step: int32 scalar, optimiser steps taken.
      params: ``{'net': ..., 'weight': ...}`` float parameters.
      opt_state: the optax state of ``params``.
      emas: ``{name: net params}``, one per EMA profile (``scm_jax.ema.ema_names``).
      rng: ``(2,)`` uint32 key data of the run's base key (``jax.random.key_data``).
      critic: DMD / rCM's fake score ``{'params': {'net', 'weight'}, 'opt_state'}``
        (``scm_jax.train.step_dmd``); None for the other objectives.
    """

    step: Array
    params: dict[str, Any]
    opt_state: Any
    emas: dict[str, Any]
    rng: Array
    critic: Any = None

    def key(self) -> Array:
        """The run's typed base PRNG key."""
        return jax.random.wrap_key_data(self.rng)


def init_state(
    nd: NetworkDef,
    tx: optax.GradientTransformation,
    key: Array,
    *,
    power_std: Sequence[float],
    halflife_kimg: float,
    init_net: Any = None,
    per_leaf: bool = False,
) -> TrainState:
    """A fresh state at step 0.

    Args:
      nd: the network; tx: the optimiser.
      key: typed PRNG key; split into the parameter key and the run's base key.
      power_std, halflife_kimg: the EMA profiles (``config.ema``).
      init_net: network parameters to start from (a teacher's or an ``init_from`` run's EMA);
        leaves the network lacks there (e.g. a student's guidance input) stay freshly
        initialised (:func:`merge_params`). The weighting head always starts fresh.
      per_leaf: draw each weight separately (``NetworkDef.init_per_leaf``; shards cleanly).
    Returns:
      The state; EMAs start at the initial network parameters.
    """
    k_params, k_run = jax.random.split(key)
    params = nd.init_per_leaf(k_params) if per_leaf else nd.init(k_params)
    if init_net is not None:
        params = {**params, "net": merge_params(params["net"], init_net)[0]}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        emas=ema_lib.init_emas(params["net"], power_std, halflife_kimg),
        rng=jax.random.key_data(k_run),
    )


def merge_params(fresh: Any, loaded: Any) -> tuple[Any, list[str]]:
    """Take every leaf of ``loaded`` that ``fresh`` has (same path and shape); keep the rest.

    Returns:
      ``(tree with the structure, dtypes and the remaining leaves of fresh, paths kept fresh)``.
    """
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(loaded)}
    kept: list[str] = []

    def pick(path, leaf):
        other = flat.get(jax.tree_util.keystr(path))
        if other is not None and other.shape == leaf.shape:
            return jnp.asarray(other, leaf.dtype)
        kept.append(jax.tree_util.keystr(path))
        return leaf

    return jax.tree_util.tree_map_with_path(pick, fresh), kept


def state_shardings(
    abstract: TrainState, mesh: Mesh, rules: Sequence[Sequence[Any]] = sharding.DEFAULT_RULES
) -> TrainState:
    """Shardings of every leaf by ``rules`` (``scm_jax.sharding``: parameters, optimizer moments
    and EMAs alike); the step and key are replicated."""
    shard = sharding.state_shardings(abstract, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    return shard.replace(step=replicated, rng=replicated)


def create_sharded_state(
    make_state: Callable[..., TrainState], mesh: Mesh, key: Array, *args: Any,
    rules: Sequence[Sequence[Any]] = sharding.DEFAULT_RULES,
) -> tuple[TrainState, TrainState]:  # fmt: skip
    """Create the state directly in its sharding, never whole on one device.

    Args:
      make_state: ``(key, *args) -> TrainState`` (e.g. :func:`init_state` with its options
        bound). Arrays it needs (initial parameters from a teacher or ``init_from``) go in
        ``args``, not in a closure: they are jit arguments, not compile-time constants.
      mesh: the device mesh (``scm_jax.sharding.make_mesh``).
      key: typed PRNG key; args: further arguments of ``make_state``.
      rules: the sharding rules (``config.mesh.rules``).
    Returns:
      ``(state, shardings)``.
    """
    abstract = jax.eval_shape(make_state, key, *args)
    shardings = state_shardings(abstract, mesh, rules)
    return jax.jit(make_state, out_shardings=shardings)(key, *args), shardings


def abstract_state(
    make_state: Callable[..., TrainState], mesh: Mesh, key: Array, *args: Any,
    rules: Sequence[Sequence[Any]] = sharding.DEFAULT_RULES,
) -> tuple[TrainState, TrainState]:  # fmt: skip
    """``(abstract state, shardings)`` of ``make_state(key, *args)``, nothing materialised."""
    abstract = jax.eval_shape(make_state, key, *args)
    return abstract, state_shardings(abstract, mesh, rules)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """Attach ``shardings`` to an abstract tree: the target orbax restores into."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
