"""A run's EMA networks: which EMA to read, and reading it from a checkpoint or an export folder.

The sampler, evaluation, export and the training loop's teachers and ``init_from`` all read a
finished run's EMA parameters through these functions (floor 3 of docs/architecture.md: a run's
files). :func:`load_ema_checkpoint` checks the architecture against the config the reader expects
and places the parameters in the reader's shardings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from scm_jax.ema import ema_names
from scm_jax.networks import build_network
from scm_jax.run.checkpoint import Checkpointer
from scm_jax.run.exports import is_export, load_export
from scm_jax.run.layout import check_same_architecture, load_run_config
from scm_jax.sharding import DEFAULT_RULES, state_shardings


def ema_name_for(
    run_config: Mapping[str, Any], sigma_rel: float = 0.0, ema: str | None = None
) -> str:
    """Which EMA of a run to load: ``ema`` by name, else ``power_<sigma_rel>`` if asked for,
    else the run's first one.

    Raises:
      ValueError: the run has no such EMA (the message lists those it has).
    """
    names = ema_names(run_config["ema"]["power_std"], run_config["ema"]["halflife_kimg"])
    if not names:
        raise ValueError("that run keeps no EMA (ema.power_std empty and halflife_kimg 0)")
    if ema is not None:
        if ema not in names:
            raise ValueError(f"the run keeps EMAs {names}; no {ema!r}")
        return ema
    if sigma_rel:
        want = f"power_{sigma_rel:.3f}"
        if want not in names:
            raise ValueError(
                f"the run keeps EMAs {names}, not {want}; set --config.teacher.ema_std to one of "
                "its sigma_rel values (or 0 for its first EMA)"
            )
        return want
    return names[0]


def check_export_ema(
    cfg: Mapping[str, Any], where: str | Path, *, sigma_rel: float = 0.0, ema: str | None = None,
    step: int | None = None,
) -> str:  # fmt: skip
    """The EMA name of an export folder's weights, checked against what a caller asks for.

    An export holds one set of weights: ``ema`` or ``step`` must name them, and ``sigma_rel``
    must match when the export is of a power EMA (``power_0.050``) or a post-hoc one
    (``phema_0.050``, ``scm-jax phema``); an export of another kind, such as an EDM2 import, is
    taken whatever ``sigma_rel`` says.

    Raises:
      ValueError: the export holds other weights (the message says which).
    """
    name = str(cfg.get("ema"))
    if ema is not None and ema != name:
        raise ValueError(f"{where} is an export of EMA {name!r}; no {ema!r}")
    if step is not None and step != cfg.get("step"):
        raise ValueError(f"{where} is an export of step {cfg.get('step')}; no step {step}")
    kind = name.split("_", 1)[0]
    want = f"{kind}_{sigma_rel:.3f}"
    if sigma_rel and kind in ("power", "phema") and name != want:
        raise ValueError(f"{where} is an export of EMA {name}, not {want}; set "
                         "--config.teacher.ema_std to match (or 0)")  # fmt: skip
    return name


def ema_of(
    path: str | Path, cfg: Mapping[str, Any], *, sigma_rel: float = 0.0, ema: str | None = None,
    step: int | None = None,
) -> str:  # fmt: skip
    """The EMA a run (:func:`ema_name_for`) or an export folder (:func:`check_export_ema`)
    serves for ``sigma_rel`` / ``ema``; ``cfg``: its config.json."""
    if is_export(path):
        return check_export_ema(cfg, path, sigma_rel=sigma_rel, ema=ema, step=step)
    return ema_name_for(cfg, sigma_rel, ema)


def load_ema_params(
    workdir: str | Path, model_cfg: Mapping[str, Any] | None, mesh: Mesh | None, *,
    sigma_rel: float = 0.0, ema: str | None = None, what: str = "checkpoint",
    step: int | None = None, rules: Sequence[Sequence[Any]] = DEFAULT_RULES,
) -> tuple[Any, dict[str, Any], str]:  # fmt: skip
    """:func:`load_ema_checkpoint` without the step: ``(net params, run config, EMA name)``."""
    params, cfg, name, _ = load_ema_checkpoint(
        workdir, model_cfg, mesh, sigma_rel=sigma_rel, ema=ema, what=what, step=step, rules=rules
    )
    return params, cfg, name


def load_ema_checkpoint(
    workdir: str | Path, model_cfg: Mapping[str, Any] | None, mesh: Mesh | None, *,
    sigma_rel: float = 0.0, ema: str | None = None, what: str = "checkpoint",
    step: int | None = None, rules: Sequence[Sequence[Any]] = DEFAULT_RULES,
) -> tuple[Any, dict[str, Any], str, int | None]:  # fmt: skip
    """Load a run's EMA network parameters, sharded over ``mesh``, and name their step.

    Args:
      workdir: the other run's folder, or an export folder (``scm-jax export``/``import-edm2``;
        its one set of weights, see :func:`check_export_ema`).
      model_cfg: the ``model`` section the parameters must fit (dropout/guidance may differ);
        None: the run's own network (no check).
      mesh: where to place them (sharded by ``rules`` like a student); None: the first device.
      sigma_rel: which power EMA (0: the run's first EMA); ema: an EMA by name instead.
      what: a word for error messages ('teacher', 'init_from run').
      step: which checkpoint (default: the newest readable one; a damaged newer one is
        skipped with a warning on stderr).
      rules: the sharding rules (``config.mesh.rules``).
    Returns:
      ``(net params, the run's config dict, EMA name, checkpoint step)``: the step of the
      checkpoint actually read (after a fallback past a damaged newer one, the older step); an
      export folder's recorded ``step``.
    Raises:
      FileNotFoundError / ValueError / CheckpointError: not a run, another architecture, no such
        EMA, or no readable checkpoint.
    """
    run_cfg = load_run_config(workdir)
    if model_cfg is not None:
        check_same_architecture(model_cfg, run_cfg["model"], what=what, where=str(workdir))
    nd = build_network(run_cfg["model"])
    abstract_net = nd.abstract_params()["net"]
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shard = jax.tree.map(lambda _: device, abstract_net)
    else:
        shard = state_shardings(abstract_net, mesh, rules)
    if is_export(workdir):  # an export folder: one set of weights (scm_jax.run.exports)
        params, cfg = load_export(workdir)
        name = check_export_ema(cfg, workdir, sigma_rel=sigma_rel, ema=ema, step=step)
        return jax.device_put(params, shard), cfg, name, cfg.get("step")
    name = ema_name_for(run_cfg, sigma_rel, ema)
    all_names = ema_names(run_cfg["ema"]["power_std"], run_cfg["ema"]["halflife_kimg"])
    target_one = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_net, shard
    )
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        emas = ckpt.restore_emas({n: target_one for n in all_names}, step, config=run_cfg)
    finally:
        ckpt.close()
    return emas[name], run_cfg, name, ckpt.restored_step
