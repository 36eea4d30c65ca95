"""The ``scm-jax`` command line.

  scm-jax train  --config configs/mnist.py --workdir runs/mnist [--config.total_kimg=100 ...]
  scm-jax sample --workdir runs/mnist --steps 2 --num 64 --out samples.png [--labels 3]
  scm-jax info   --config configs/imagenet512.py:size=xxl,objective=scd [--devices N] [--json]
                 [--mesh data=8,fsdp=8] [--batch B] [--micro-batches K] [--remat block]
                 [--compile | --topology v5p-64] [--config.model.dropout=0.2 ...]
  scm-jax config --config configs/mnist.py [--json | --check]
  scm-jax data-stats --config configs/mnist.py [--num N] [--json]
  scm-jax fid-weights --from pt_inception-2015-12-05-6726825d.pth --out weights/
  scm-jax fid-stats --data /data/cifar10/train.tar.gz --out c10_train.npz [--num N]
                    [--ref other.npz] [--inception weights/inception_fid.npz]
  scm-jax eval   --workdir runs/c10_scd --ref c10_train.npz --steps 1,2 --num 50000
                 [--teacher-nfe 35] [--guidance 1.5] [--json-out eval.json]
  scm-jax eval   --workdir runs/c10_scd --consistency [--num 256] [--teacher DIR]
  scm-jax export --workdir runs/mnist --to safetensors|torch|onnx|stablehlo --out exports/mnist
                 [--ema NAME] [--step N]
  scm-jax import-edm2 --from edm2-img512-s.safetensors --out teachers/edm2_s [--sigma-data 0.5]
  scm-jax phema  --workdir runs/in64 --sigma-rel 0.05,0.1 [--at-step N | --at-kimg K] [--out DIR]

``--config`` takes ``path.py[:arg]`` (``configs/`` may be omitted: ``imagenet512:size=xxl``);
``--config.a.b=value`` overrides a field, with ml-collections' parsing and type checks.

Errors a user can cause (a bad config, a missing path, a wrong argument) print one message
(``scm-jax <command>: error: ...``, one line per problem) without a traceback and exit with 2;
an output that could not be written (disk full, ...; the old file is left unchanged) and a
training run stopped by non-finite steps exit with 1, one stopped by a signal with 128 + its
number (docs/reliability.md lists the messages).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections
from absl import flags
from ml_collections import config_flags

from scm_jax.config import defaults
from scm_jax.files import WriteError, check_output_folder


class UsageError(Exception):
    """A mistake on the command line or in the config; printed without a traceback (exit 2)."""


class CommandError(Exception):
    """A command that ran but could not finish (e.g. training diverged); printed without a
    traceback (exit 1)."""


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
        resolved = defaults.resolve_config_path(path)
        defaults.load_config(f"{resolved}{sep}{arg}")  # get_config errors, without a traceback
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
        raise UsageError(_unknown_field_message(e, overrides)) from None


def _unknown_field_message(e: Exception, overrides: Sequence[str]) -> str:
    """One line for an override naming a field the config does not have."""
    text = str(e.args[0] if e.args else e).replace("\\n", "\n").replace("\\'", "'")
    lines = [ln.strip().strip("'\"\\") for ln in text.splitlines() if ln.strip()]
    bad = next((o.split("=", 1)[0] for o in overrides if lines and lines[0] in o), None)
    hint = next((f" ({ln[0].lower()}{ln[1:]})" for ln in lines[1:] if "mean" in ln), "")
    field = bad.removeprefix("--config.") if bad else (lines[0] if lines else "?")
    return f"unknown config field {field!r}{hint}; `scm-jax config --config ...` prints every field"


def parse_mesh(text: str | None) -> dict[str, int]:
    """``'data=8,fsdp=8'`` -> ``{'data': 8, 'fsdp': 8}`` (None -> {})."""
    out: dict[str, int] = {}
    for part in filter(None, (text or "").split(",")):
        axis, _, size = part.partition("=")
        if not axis.strip() or not size.strip().lstrip("-").isdigit():
            raise UsageError(f"--mesh {text!r}: expected AXIS=SIZE pairs like data=8,fsdp=8")
        out[axis.strip()] = int(size)
    return out


def _prepare_jax(topology: str | None, n: int) -> None:
    """Before jax's backends start: ``--topology`` keeps the host on CPU (libtpu is only asked
    for the topology's compile-only devices); ``--compile`` on CPU asks XLA:CPU for ``n``
    simulated devices. Through the environment (JAX_PLATFORMS, XLA_FLAGS'
    ``--xla_force_host_platform_device_count``) while jax is not imported, else through
    ``jax.config`` while no backend is initialised (a config file may import jax); after that
    nothing changes and ``info`` says so if devices are missing."""
    import os

    flag = "--xla_force_host_platform_device_count="
    kept, count = [], n
    for f in os.environ.get("XLA_FLAGS", "").split():
        if f.startswith(flag) and f[len(flag) :].isdigit():
            count = max(count, int(f[len(flag) :]))
        else:
            kept.append(f)
    if not topology and n <= 1:
        return
    if "jax" not in sys.modules:
        if topology:
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
        else:
            os.environ["XLA_FLAGS"] = " ".join([*kept, f"{flag}{count}"])
        return
    import jax

    try:
        if topology:
            jax.config.update("jax_platforms", "cpu")
        else:
            jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # backends already initialised
        pass


def cmd_info(config: ml_collections.ConfigDict, argv: Sequence[str]) -> int:
    """``scm-jax info``: parameters, FLOPs and memory per device of a config (abstract shapes;
    ``--compile``: the real train step compiled ahead of time)."""
    parser = argparse.ArgumentParser(prog="scm-jax info", description=cmd_info.__doc__)
    parser.add_argument("--devices", type=int, help="devices (default 1; --topology: its own)")
    parser.add_argument("--mesh", help="mesh axis sizes, e.g. data=8,fsdp=8 (default config.mesh)")
    parser.add_argument("--batch", type=int, help="global batch (default config.batch_size)")
    parser.add_argument("--micro-batches", type=int, help="override config.train.micro_batches")
    parser.add_argument("--remat", choices=("none", "block", "full"), help="override model.remat")
    parser.add_argument(
        "--compile", action="store_true",
        help="compile the train step for the devices (CPU: simulated) and report its memory",
    )  # fmt: skip
    parser.add_argument("--topology", help="compile for a TPU topology via libtpu, e.g. v5p-64")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    mesh = parse_mesh(args.mesh)
    if args.compile or args.topology:
        _prepare_jax(args.topology, args.devices or 1)
    from scm_jax import info as info_lib  # imports jax
    from scm_jax import info_text
    from scm_jax.train.aot import parse_tpu_topology
    from scm_jax.train.build import with_overrides

    try:
        devices = args.devices
        if devices is None:
            devices = parse_tpu_topology(args.topology)["chips"] if args.topology else 1
        config = with_overrides(
            config, batch_size=args.batch, micro_batches=args.micro_batches, remat=args.remat
        )
        target = None
        if args.compile or args.topology:  # devices and libtpu checked before the slow parts
            sizes = info_lib.mesh_axis_sizes(config.mesh, devices, mesh)
            target = info_lib.compile_target(sizes, args.topology)
        info = info_lib.model_info(config, devices=devices, mesh=mesh)
        if target is not None:
            info["compiled"] = info_lib.compiled_info(config, target)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(json.dumps(info, indent=2) if args.json else info_text.format_info(info))
    return 0


def cmd_config(config: ml_collections.ConfigDict, argv: Sequence[str]) -> int:
    """``scm-jax config``: print the resolved config (after arguments and overrides), or
    ``--check`` it as ``train`` does at start-up (every problem, one line each)."""
    parser = argparse.ArgumentParser(prog="scm-jax config", description=cmd_config.__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of YAML-like text")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and the paths it names; print 'ok' or the "
                        "problems (exit 2)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.check:
        from scm_jax.config.validate import validate

        try:
            validate(config)
        except ValueError as e:
            raise UsageError(str(e)) from None
        print("ok: the config passes the start-up checks of `scm-jax train`")
        return 0
    print(config.to_json_best_effort(indent=2) if args.json else str(config), end="")
    return 0


def _check_output(check: Callable[..., Path], path: str, flag: str) -> None:
    """``scm_jax.files.check_output_*`` with its one-line ``ValueError`` as a usage error."""
    try:
        check(path, flag)
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_train(config: ml_collections.ConfigDict, argv: Sequence[str]) -> int:
    """``scm-jax train``: train (or resume) the run of a config in a workdir."""
    parser = argparse.ArgumentParser(prog="scm-jax train", description=cmd_train.__doc__)
    parser.add_argument("--workdir", required=True, help="the run's folder (resumed if it exists)")
    args = parser.parse_args(argv)
    _check_output(check_output_folder, args.workdir, "--workdir")  # before anything compiles
    from scm_jax import distributed  # imports jax: keep `--help` fast
    from scm_jax.train.errors import USAGE, exit_status
    from scm_jax.train.loop import train

    try:
        distributed.initialize()  # before anything touches a device (multi-process runs)
        result = train(config, args.workdir)
    except Exception as e:  # one line for what the user or the run caused; bugs keep tracebacks
        status = exit_status(e)
        if status is None:
            raise
        raise (UsageError if status == USAGE else CommandError)(str(e)) from None
    if result["interrupted"] is not None:
        return 128 + int(result["interrupted"])
    return 0


def cmd_data_stats(config: ml_collections.ConfigDict, argv: Sequence[str]) -> int:
    """``scm-jax data-stats``: per-channel mean and std of a config's data (docs/method.md)."""
    from scm_jax.data.stats_command import data_stats_main  # lazy: imports the data sources

    try:
        return data_stats_main(config, argv)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise UsageError(str(e)) from None


def cmd_sample(config: ml_collections.ConfigDict, argv: Sequence[str]) -> int:
    """``scm-jax sample``: draw samples from a run's EMA weights into a PNG grid or an .npz."""
    from scm_jax.sample_command import sample_main

    return _eval_errors(sample_main, argv)


def cmd_fid_weights(config: ml_collections.ConfigDict, argv: Sequence[str]) -> int:
    """``scm-jax fid-weights``: convert the FID Inception-v3 (.pt/.pth) to DIR/inception_fid.npz."""
    from scm_jax.eval.fid_weights import main as fid_weights_main  # lazy: torch only here

    return fid_weights_main(argv)


def _eval_errors(main: Callable[[Sequence[str]], int], argv: Sequence[str]) -> int:
    """Run an evaluation command, turning its input errors into one-line usage errors."""
    from scm_jax.run.checkpoint import CheckpointError

    try:
        return main(argv)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        raise UsageError(str(e)) from None


def cmd_fid_stats(config: ml_collections.ConfigDict, argv: Sequence[str]) -> int:
    """``scm-jax fid-stats``: Inception feature statistics of a dataset (FID against --ref)."""
    from scm_jax.eval.commands import fid_stats_main  # lazy: imports jax

    return _eval_errors(fid_stats_main, argv)


def cmd_eval(config: ml_collections.ConfigDict, argv: Sequence[str]) -> int:
    """``scm-jax eval``: FID and sampling time of a run's EMA model (and of its teacher)."""
    from scm_jax.eval.commands import eval_main  # lazy: imports jax

    return _eval_errors(eval_main, argv)


def _export_errors(main: Callable[[Sequence[str]], int], argv: Sequence[str]) -> int:
    """Run an export command, turning its input errors (missing packages too) into one line."""
    from scm_jax.run.checkpoint import CheckpointError

    try:
        return main(argv)
    except (ValueError, FileNotFoundError, CheckpointError, ImportError) as e:
        raise UsageError(str(e)) from None


def cmd_export(config: ml_collections.ConfigDict, argv: Sequence[str]) -> int:
    """``scm-jax export``: a run's EMA weights as safetensors, PyTorch, ONNX or StableHLO."""
    from scm_jax.export.command import export_main  # lazy: torch/onnx only where asked for

    return _export_errors(export_main, argv)


def cmd_import_edm2(config: ml_collections.ConfigDict, argv: Sequence[str]) -> int:
    """``scm-jax import-edm2``: EDM2 weights (a state dict) as an sCD teacher."""
    from scm_jax.export.command import import_edm2_main

    return _export_errors(import_edm2_main, argv)


def cmd_phema(config: ml_collections.ConfigDict, argv: Sequence[str]) -> int:
    """``scm-jax phema``: EDM2 post-hoc EMA: any sigma_rel from a run's EMA snapshots."""
    from scm_jax.export.posthoc import phema_main

    return _export_errors(phema_main, argv)


COMMANDS: dict[str, Callable[[ml_collections.ConfigDict, Sequence[str]], int]] = {
    "train": cmd_train,
    "sample": cmd_sample,
    "info": cmd_info,
    "config": cmd_config,
    "data-stats": cmd_data_stats,
    "fid-weights": cmd_fid_weights,
    "fid-stats": cmd_fid_stats,
    "eval": cmd_eval,
    "export": cmd_export,
    "import-edm2": cmd_import_edm2,
    "phema": cmd_phema,
}
# Commands that read a run's saved config instead of --config.
NO_CONFIG = ("sample", "fid-weights", "fid-stats", "eval", "export", "import-edm2", "phema")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scm-jax`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: scm-jax {{{','.join(COMMANDS)}}} --config FILE[:ARGS] [options]"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        for name, fn in COMMANDS.items():
            print(f"  {name:12s} {(fn.__doc__ or '').strip()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"scm-jax: unknown command {command!r}\n{usage}", file=sys.stderr)
        return 2
    try:
        config_args, rest = split_config_args(rest)
        if any(a in ("-h", "--help") for a in rest) or command in NO_CONFIG:
            if config_args and command in NO_CONFIG:
                raise UsageError(f"{command} reads the run's own config; drop {config_args[0]}")
            return COMMANDS[command](ml_collections.ConfigDict(), rest)
        return COMMANDS[command](config_from_args(config_args), rest)
    except UsageError as e:
        print(f"scm-jax {command}: error: {e}", file=sys.stderr)
        return 2
    except (CommandError, WriteError) as e:  # WriteError: nothing was replaced (one line)
        print(f"scm-jax {command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
