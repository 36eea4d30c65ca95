"""Finding and loading config files: ``--config path.py[:arg]`` and its short names.

A ``--config`` path is used exactly as given when it names a file. Two short forms reach the
repository's own ``configs/`` folder from anywhere: a bare name (``mnist``, ``mnist.py``) and
``configs/<name>.py`` (the README's spelling, valid from any working folder). Anything else that
does not exist is an error naming what was looked for; it never silently loads a repository config
of the same name (``some/dir/toy_gmm.py`` that does not exist is not ``configs/toy_gmm.py``).

A config file that fails (a syntax error, an exception or a missing import in the module or in
``get_config``, a ``get_config`` that returns something other than a ConfigDict) raises
:class:`ConfigFileError`: one line with the file, the line and the error.
"""

from __future__ import annotations

import importlib.util
import traceback
from pathlib import Path

import ml_collections

REPO_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


# Where a ValueError is the argument check of a config's ``get_config(arg)`` (parse_arg,
# check_choice): its message already says what to fix.
_ARGUMENT_CHECKERS = {Path(__file__).resolve(), Path(__file__).resolve().with_name("defaults.py")}


class ConfigFileError(ValueError):
    """A config file that cannot be loaded (the message: file, line and error, one line)."""


def available_configs() -> list[str]:
    """The short names of the repository's configs (``configs/*.py``), sorted."""
    return sorted(p.stem for p in REPO_CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def resolve_config_path(path: str) -> Path:
    """The config file ``path`` names.

    ``path`` as given when it is a file; ``mnist`` / ``mnist.py`` (no folder) and
    ``configs/mnist.py`` (when no such file exists relative to the working folder) are short
    forms of the repository's ``configs/mnist.py``.

    Raises:
      FileNotFoundError: no such file (the message names every place looked at), or a folder.
    """
    given = Path(path)
    if not path:
        raise FileNotFoundError("--config is empty; give a config file, e.g. configs/mnist.py")
    if given.is_file():
        return given
    bare = given.parent.as_posix() == "." and given.suffix == ""  # `mnist`: a short name
    if given.is_dir() and not bare:
        raise FileNotFoundError(
            f"config {path!r} is a folder, not a config file; give the .py file itself "
            "(e.g. configs/mnist.py)"
        )
    looked = [str(given)]
    parent = given.parent.as_posix()
    if parent in (".", "configs") and given.suffix in (".py", ""):
        short = REPO_CONFIG_DIR / f"{given.stem}.py"
        looked.append(str(short))
        if short.is_file():
            return short
    raise FileNotFoundError(
        f"config file {path!r} not found (looked for {', '.join(looked)}); the repository's "
        f"configs: {', '.join(available_configs())} (give one as NAME or configs/NAME.py)"
    )


def _where(path: Path, e: BaseException) -> str:
    """``'line N'`` of the innermost traceback frame in ``path`` ('' if none)."""
    if isinstance(e, SyntaxError) and e.lineno is not None:
        return f"line {e.lineno}"
    target = path.resolve()
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
             if Path(f.filename).resolve() == target]  # fmt: skip
    return f"line {lines[-1]}" if lines else ""


def _fail(path: Path, e: BaseException, what: str) -> ConfigFileError:
    where = _where(path, e)
    text = str(e.msg if isinstance(e, SyntaxError) else e).strip().splitlines()
    first = text[0] if text else ""
    return ConfigFileError(
        f"{path}{', ' + where if where else ''}: {what}: {type(e).__name__}"
        f"{': ' + first if first else ''}"
    )


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load ``'path/to/config.py[:arg]'`` by calling its ``get_config(arg)``.

    Returns the (locked) ConfigDict. Overrides are plain attribute assignments afterwards
    (use ``with config.unlocked():`` to add fields), or ``--config.a.b=v`` on the command line.

    Raises:
      FileNotFoundError: see :func:`resolve_config_path`.
      ConfigFileError: the file does not import, has no ``get_config``, ``get_config`` raises or
        returns something that is not a ConfigDict.
    """
    path_str, _, arg = spec.partition(":")
    path = resolve_config_path(path_str)
    module_spec = importlib.util.spec_from_file_location(f"scm_jax_config_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigFileError(f"{path} cannot be loaded as a Python module (is it a .py file?)")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # any error of the user's file, reported in one line
        raise _fail(path, e, "the config file failed to load") from None
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigFileError(f"{path} has no get_config(arg) function")
    try:
        config = get_config(arg or None)
    except Exception as e:
        frames = traceback.extract_tb(e.__traceback__)
        if (
            isinstance(e, ValueError)
            and frames
            and Path(frames[-1].filename).resolve() in _ARGUMENT_CHECKERS
        ):  # the argument checks of config.defaults (parse_arg): the message says what to fix
            raise ConfigFileError(str(e).strip()) from None
        raise _fail(path, e, f"get_config({arg or None!r}) failed") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigFileError(
            f"{path}: get_config({arg or None!r}) returned {type(config).__name__}, not an "
            "ml_collections.ConfigDict"
        )
    return config
