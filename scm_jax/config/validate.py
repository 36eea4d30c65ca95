"""Config validation at start-up: every problem of a config at once, one line each.

:func:`problems` checks a resolved config in three passes and returns one line per problem:

1. **fields**: each key of each known section against the table :data:`SECTIONS` (type, range or
   choice); a key that a known section does not have is a problem too (a typo in a config file;
   ml-collections already refuses unknown ``--config.a.b`` overrides). Top-level sections that no
   table knows are left alone, so a newer objective's section does not make this module refuse
   a config; it registers its own table with :func:`register_section`.
2. **relations** between fields (:data:`RELATIONS`): t_mid in (0, t_max), the batch over the
   micro-batches, the data's shape against the network, a teacher for sCD, ... New objectives add
   theirs with :func:`register_relation`.
3. **paths** (unless ``check_paths=False``): the files a run reads exist (``dataset.path``,
   ``teacher.workdir``, ``init_from``, ``evals.ref``, ``evals.inception``,
   ``evals.consistency_teacher``).

:func:`validate` raises one :class:`ConfigError` (a ValueError) listing them all. ``scm-jax
train`` calls it before it builds anything (no compilation, no data loading); ``scm-jax config
--check`` prints the result. What needs the devices (the batch over data x fsdp devices, mesh
sizes against the device count) is checked where the mesh is built (``scm_jax.sharding``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from scm_jax import objectives
from scm_jax.config.checks import Check, ConfigError
from scm_jax.config.relations import RELATIONS, Relation, _dmd
from scm_jax.config.tables import _DEFAULTS, EMA_STD_MAX, FIELDS, SECTIONS
from scm_jax.networks import build as networks

__all__ = [
    "EMA_STD_MAX", "SECTIONS", "ConfigError", "problems", "register_relation",
    "register_section", "validate",
]  # fmt: skip


def register_section(name: str, checks: Mapping[str, Check]) -> None:
    """Add (or extend) the table of a section, e.g. a new objective's ``dmd`` options."""
    SECTIONS.setdefault(name, {}).update(checks)


def register_relation(relation: Relation) -> Relation:
    """Add a cross-field rule ``(config, check_paths) -> [problem, ...]`` (usable as decorator)."""
    RELATIONS.append(relation)
    return relation


def _field_problems(
    cfg: Mapping[str, Any],
    sections: Mapping[str, Mapping[str, Check]] | None = None,
    fields: Mapping[str, Check] | None = None,
) -> list[str]:
    """Pass 1: each field against its check, unknown keys of known sections (default tables:
    :data:`SECTIONS`, :data:`FIELDS`)."""
    out: list[str] = []
    sections = SECTIONS if sections is None else sections
    for key, check in (FIELDS if fields is None else fields).items():
        if key not in cfg:
            out.append(f"{key}: missing")
        elif msg := check(cfg[key]):
            out.append(f"{key}={cfg[key]!r}: {msg}")
    for section, table in sections.items():
        if section not in cfg:
            if all(k.startswith("?") for k in table):
                continue
            out.append(f"{section}: missing section")
            continue
        values = cfg[section]
        if not isinstance(values, Mapping):
            out.append(f"{section}: must be a section (a dict), not {type(values).__name__}")
            continue
        known = {k.lstrip("?"): (check, k.startswith("?")) for k, check in table.items()}
        allowed = set(known) | set(_DEFAULTS.get(section, {}))  # a new default is a known key
        if section == "model":  # the keys are the architecture's (scm_jax.networks)
            allowed = _model_keys(values.get("arch"), allowed)
        for key, (check, optional) in known.items():
            if key not in values:
                if not optional:
                    out.append(f"{section}.{key}: missing")
            elif msg := check(values[key]):
                out.append(f"{section}.{key}={values[key]!r}: {msg}")
        unknown = sorted(set(values) - allowed)
        if unknown:
            names = ", ".join(f"{section}.{k}" for k in unknown)
            out.append(f"unknown key(s) {names}; known: {', '.join(sorted(allowed))}")
    return out


def _model_keys(arch: Any, table_keys: set[str]) -> set[str]:
    """The keys a ``model`` section of ``arch`` may have (``build_network``'s rule); all keys
    of the table while the arch itself is unknown (its own problem is reported)."""
    cls = networks.ARCHS.get(arch) if isinstance(arch, str) else None
    if cls is None:
        return table_keys
    import dataclasses

    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "remat_blocks"}
    return fields | set(networks._NON_NET_KEYS)


# ---------------------------------------------------------------------------------- relations


def dmd_problems(config: Mapping[str, Any]) -> list[str]:
    """The problems of a dmd / rcm config's ``dmd`` section and its cross-field rules (what
    ``scm_jax.train.dmd_config.validate_dmd_config`` raises); [] for other objectives."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    name = config.get("objective")
    if not (objectives.known(name) and objectives.get(name).critic):
        return []
    section = {"dmd": config.get("dmd", {})}
    return _field_problems(section, {"dmd": SECTIONS["dmd"]}, {}) + _dmd(config, False)


def problems(config: Mapping[str, Any], *, check_paths: bool = True) -> list[str]:
    """Every problem of ``config`` (a ConfigDict or a plain dict), one line each; [] if none.

    Args:
      config: a resolved config (``configs/*.py`` + overrides).
      check_paths: also check that the files and folders the config names exist.
    """
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    out = _field_problems(config)
    model_fields_ok = not any(p.startswith(("model", "unknown key(s) model.")) for p in out)
    for relation in RELATIONS:
        out += relation(config, check_paths)
    if model_fields_ok and isinstance(config.get("model"), Mapping):
        try:  # what only the architecture knows (resolution divisibility, head widths, ...)
            networks.build_network(dict(config["model"]))
        except (ValueError, TypeError) as e:
            out.append(str(e) if str(e).startswith("model.") else f"model: {e}")
    return out


def validate(config: Mapping[str, Any], *, check_paths: bool = True) -> None:
    """Raise :class:`ConfigError` listing every problem of ``config`` (see :func:`problems`)."""
    found = problems(config, check_paths=check_paths)
    if found:
        raise ConfigError(found)
