"""``--config`` paths are used exactly as given (with two short forms of the repository's own
configs), and a config file that fails says where in one line (issue 22)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scm_jax import cli
from scm_jax.config import files as config_files

REPO_CONFIGS = config_files.REPO_CONFIG_DIR


@pytest.mark.parametrize("spec", ["mnist", "mnist.py", "configs/mnist.py"])
def test_short_names_reach_the_repository_configs_from_any_folder(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_files.resolve_config_path(spec) == REPO_CONFIGS / "mnist.py"


def test_a_file_is_used_exactly_as_given(tmp_path, monkeypatch):
    own = tmp_path / "mnist.py"  # shadows the repository's config of that name
    body = "def get_config(arg):\n    return ml_collections.ConfigDict({'mine': 1})\n"
    own.write_text("import ml_collections\n" + body)
    monkeypatch.chdir(tmp_path)
    assert config_files.resolve_config_path("mnist.py") == Path("mnist.py")
    assert config_files.load_config(str(own)).mine == 1


@pytest.mark.parametrize("spec", ["some/dir/toy_gmm.py", "other/mnist", "configs/nope.py"])
def test_a_path_that_does_not_exist_is_an_error_not_the_repository_config(spec, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"config file '{spec}' not found") as e:
        config_files.resolve_config_path(spec)
    assert "toy_gmm" in str(e.value)  # lists what exists


def test_a_folder_named_like_a_config_is_an_error(tmp_path):
    folder = tmp_path / "toy_gmm.py"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="is a folder, not a config file"):
        config_files.resolve_config_path(str(folder))
    with pytest.raises(FileNotFoundError, match="is a folder"):
        config_files.resolve_config_path(str(tmp_path))


BROKEN = {
    "syntax.py": ("def get_config(arg):\n    x = 1 +\n", "line 2: the config file failed to "
                  "load: SyntaxError"),
    "imports.py": ("import not_a_module_xyz\n", "line 1: the config file failed to load: "
                   "ModuleNotFoundError: No module named 'not_a_module_xyz'"),
    "raises.py": ("def get_config(arg):\n    a = 1\n    raise RuntimeError('boom')\n",
                  "line 3: get_config(None) failed: RuntimeError: boom"),
    "keyerror.py": ("def get_config(arg):\n    return {}['x']\n",
                    "line 2: get_config(None) failed: KeyError: 'x'"),
    "none.py": ("def get_config(arg):\n    return None\n",
                "get_config(None) returned NoneType, not an ml_collections.ConfigDict"),
    "valueerror.py": ("def get_config(arg):\n    return int('x')\n",
                      "line 2: get_config(None) failed: ValueError: invalid literal"),
    "dict.py": ("def get_config(arg):\n    return {'a': 1}\n", "returned dict, not an"),
    "noget.py": ("x = 1\n", "has no get_config(arg) function"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_failing_config_file_gives_one_line_with_file_and_line(name, tmp_path, capsys):
    source, expect = BROKEN[name]
    path = tmp_path / name
    path.write_text(source)
    with pytest.raises(config_files.ConfigFileError, match="^" + str(path)) as e:
        config_files.load_config(str(path))
    assert expect in str(e.value) and "\n" not in str(e.value)
    assert cli.main(["config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expect in err and "Traceback" not in err


def test_a_bad_argument_of_a_config_keeps_its_own_message():
    with pytest.raises(config_files.ConfigFileError, match=r"^unknown size 'q'; choose one of"):
        config_files.load_config("mnist:size=q")


def test_configlib_alias_is_the_defaults_module():
    """Config files written before the config package (``from scm_jax import configlib``) keep
    working: the alias is the same module object, not a copy to keep in step."""
    from scm_jax import configlib
    from scm_jax.config import defaults

    assert configlib is defaults
    assert configlib.assemble is defaults.assemble
