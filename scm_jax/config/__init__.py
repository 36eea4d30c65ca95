"""Configs: how a run is described, loaded and checked (floor 2 of docs/architecture.md).

- ``defaults``: the sections every config has, their defaults, and the helpers config files
  build on (``assemble``, ``unet_model``, ``edm2_model``, ``parse_arg``, ``dmd_options``).
- ``files``: finding and loading a config file (``load_config("mnist:size=s")``), with one-line
  errors for a file that fails.
- ``durations``: schedules written in steps, kimg or a fraction of the run, resolved to steps.
- ``validate`` (``checks``, ``tables``, ``relations``): every problem of a config in one
  :class:`~scm_jax.config.checks.ConfigError` before anything is built.

Config files in ``configs/`` import ``from scm_jax.config import defaults``; the old spelling
``from scm_jax import configlib`` still works (an alias of ``defaults``).
"""
