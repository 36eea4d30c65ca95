"""The ``scm-jax`` command line.

  scm-jax info   --config configs/imagenet512.py:size=xxl,objective=scd [--devices N] [--json]
                 [--config.model.dropout=0.2 ...]
  scm-jax config --config configs/mnist.py [--json]

``--config`` takes ``path.py[:arg]`` (``configs/`` may be omitted: ``imagenet512:size=xxl``);
``--config.a.b=value`` overrides a field, with ml-collections' parsing and type checks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from scm_jax import configlib


class UsageError(Exception):
    """A mistake on the command line or in the config; printed without a traceback."""


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``--config``/``--config.*`` arguments (and their values) from the rest."""
    config_args, rest = [], []
    it = iter(argv)
    for arg in it:
        if arg == "--config" or (arg.startswith("--config.") and "=" not in arg):
            value = next(it, None)
            if value is None:
                raise UsageError(f"{arg} needs a value")
            config_args.append(f"{arg}={value}")
        elif arg.startswith("--config=") or arg.startswith("--config."):
            config_args.append(arg)
        else:
            rest.append(arg)
    return config_args, rest


def config_from_args(config_args: Sequence[str]) -> ml_collections.ConfigDict:
    """Load ``--config=path[:arg]`` and apply ``--config.a.b=v`` overrides (ml-collections rules).

    Raises:
      UsageError: no ``--config``, a missing file, a bad ``get_config`` argument or override.
    """
    spec = next((a.split("=", 1)[1] for a in config_args if a.startswith("--config=")), None)
    if spec is None:
        raise UsageError("--config is required, e.g. --config configs/mnist.py")
    path, sep, arg = spec.partition(":")
    try:
        resolved = configlib.resolve_config_path(path)
        configlib.load_config(f"{resolved}{sep}{arg}")  # get_config errors, without a traceback
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    overrides = [a for a in config_args if a.startswith("--config.")]
    argv = ["scm-jax", f"--config={resolved}{sep}{arg}", *overrides]
    fv = flags.FlagValues()
    # ml-collections discovers the override flags from sys_argv at definition time.
    config_flags.DEFINE_config_file(
        "config", None, "config file", flag_values=fv, lock_config=True, sys_argv=argv
    )
    try:
        fv(argv)
        return fv.config
    except flags.Error as e:
        raise UsageError(f"bad override: {e}") from None
    except (KeyError, AttributeError) as e:
        raise UsageError(
            f"unknown config field {str(e.args[0] if e.args else e).strip(chr(39) + chr(34))!r} "
            f"in {' '.join(overrides)}; "
            "`scm-jax config --config ...` prints every field"
        ) from None


def cmd_info(config: ml_collections.ConfigDict, argv: Sequence[str]) -> int:
    """``scm-jax info``: parameters, FLOPs and state bytes of a config (abstract shapes only)."""
    parser = argparse.ArgumentParser(prog="scm-jax info", description=cmd_info.__doc__)
    parser.add_argument("--devices", type=int, default=1, help="shard the state over N devices")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    from scm_jax.info import format_info, model_info  # imports jax: keep `--help` fast

    try:
        info = model_info(config, devices=args.devices)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_config(config: ml_collections.ConfigDict, argv: Sequence[str]) -> int:
    """``scm-jax config``: print the resolved config (after arguments and overrides)."""
    parser = argparse.ArgumentParser(prog="scm-jax config", description=cmd_config.__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of YAML-like text")
    args = parser.parse_args(argv)
    print(config.to_json_best_effort(indent=2) if args.json else str(config), end="")
    return 0


COMMANDS: dict[str, Callable[[ml_collections.ConfigDict, Sequence[str]], int]] = {
    "info": cmd_info,
    "config": cmd_config,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scm-jax`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: scm-jax {{{','.join(COMMANDS)}}} --config FILE[:ARGS] [options]"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        for name, fn in COMMANDS.items():
            print(f"  {name:8s} {(fn.__doc__ or '').strip()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"scm-jax: unknown command {command!r}\n{usage}", file=sys.stderr)
        return 2
    try:
        config_args, rest = split_config_args(rest)
        if any(a in ("-h", "--help") for a in rest):
            return COMMANDS[command](ml_collections.ConfigDict(), rest)
        return COMMANDS[command](config_from_args(config_args), rest)
    except UsageError as e:
        print(f"scm-jax {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
