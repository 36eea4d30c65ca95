"""scm_jax.files: outputs are replaced whole or not at all, a failed write leaves no temporary
file and the old output byte-identical, and the CLI reports it in one line (exit 1)."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest

from scm_jax import files

REPO = Path(__file__).resolve().parent.parent
OLD = b"the old output, which must survive\n" * 100


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(files.TMP_SUFFIX))


@pytest.fixture
def old(tmp_path) -> Path:
    p = tmp_path / "out.npz"
    p.write_bytes(OLD)
    return p


def test_exception_in_the_body_keeps_the_old_file_and_no_temporary(old):
    with pytest.raises(RuntimeError, match="boom"), files.atomic_write(old) as f:
        f.write(b"half of the new")
        raise RuntimeError("boom")
    assert old.read_bytes() == OLD and leftovers(old.parent) == []


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_oserror_is_one_line_and_changes_nothing(old, monkeypatch, where):
    if where in ("fsync", "replace"):
        real = getattr(os, where)
        calls = []

        def failing(*a, **k):
            calls.append(a)
            raise enospc()

        monkeypatch.setattr(os, where, failing)
    with pytest.raises(files.WriteError) as info, files.atomic_write(old) as f:
        f.write(b"new content")
        if where == "write":
            raise enospc()
    if where != "write":
        monkeypatch.setattr(os, where, real)
        assert calls
    msg = str(info.value)
    assert msg == (f"could not write {old}: [Errno 28] No space left on device; "
                   f"{old} was left unchanged")  # fmt: skip
    assert "\n" not in msg and info.value.errno == errno.ENOSPC
    assert isinstance(info.value, OSError)  # callers catching OSError still do
    assert old.read_bytes() == OLD and leftovers(old.parent) == []


def test_a_new_file_that_fails_is_not_created(tmp_path):
    p = tmp_path / "new.json"
    with pytest.raises(files.WriteError, match=r"new\.json was not created"):
        with files.atomic_write(p, "w") as f:
            f.write("{")
            raise enospc()
    assert list(tmp_path.iterdir()) == []


def test_success_replaces_whole_with_the_usual_permissions(old):
    os.chmod(old, 0o600)
    files.write_bytes_atomic(old, b"new")
    assert old.read_bytes() == b"new" and leftovers(old.parent) == []
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(old.stat().st_mode) == 0o666 & ~umask
    files.write_json_atomic(old, {"a": 1}, indent=2)
    assert json.loads(old.read_text()) == {"a": 1} and old.read_text().endswith("}\n")
    files.write_text_atomic(old, "é")
    assert old.read_bytes() == "é".encode()


def test_unserialisable_json_writes_nothing(old):
    with pytest.raises(TypeError):
        files.write_json_atomic(old, {"a": object()})
    assert old.read_bytes() == OLD and leftovers(old.parent) == []


def test_atomic_path_for_path_writers(tmp_path):
    from scm_jax.run.state_dict import load_safetensors, save_safetensors

    p = tmp_path / "w.safetensors"
    p.write_bytes(OLD)
    save_safetensors(p, {"a": np.arange(3, dtype=np.float32)})
    np.testing.assert_array_equal(load_safetensors(p)["a"], np.arange(3))
    assert stat.S_IMODE(p.stat().st_mode) & 0o044  # not safetensors' 0600
    before = p.read_bytes()
    with pytest.raises(ValueError), files.atomic_path(p) as tmp:
        tmp.write_bytes(b"partial")
        raise ValueError("writer failed")
    assert p.read_bytes() == before and leftovers(tmp_path) == []


def test_staged_files_move_in_together_or_not_at_all(tmp_path):
    (tmp_path / "m.onnx").write_bytes(OLD)
    with pytest.raises(files.WriteError), files.staged_files(tmp_path, last=("m.onnx",)) as s:
        (s / "m.onnx").write_bytes(b"new")
        (s / "m.onnx.data").write_bytes(b"new data")
        raise enospc()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert (tmp_path / "m.onnx").read_bytes() == OLD
    with files.staged_files(tmp_path, last=("m.onnx",)) as s:
        (s / "m.onnx").write_bytes(b"new")
        (s / "m.onnx.data").write_bytes(b"new data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx").read_bytes() == b"new"


def test_replace_folder_swaps_and_restores(tmp_path, monkeypatch):
    dest, src = tmp_path / "d", tmp_path / "s"
    dest.mkdir()
    (dest / "f").write_bytes(OLD)
    src.mkdir()
    (src / "f").write_bytes(b"new")
    real, calls = os.rename, []

    def second_fails(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise enospc()
        real(a, b)

    monkeypatch.setattr(os, "rename", second_fails)
    with pytest.raises(files.WriteError, match="d was left unchanged"):
        files.replace_folder(src, dest)
    monkeypatch.setattr(os, "rename", real)
    assert (dest / "f").read_bytes() == OLD and (src / "f").exists()
    files.replace_folder(src, dest)
    assert (dest / "f").read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["d"]


def test_output_checks(tmp_path):
    ro = tmp_path / "ro.npz"
    ro.write_bytes(OLD)
    os.chmod(ro, 0o444)
    ro_dir = tmp_path / "ro_dir"
    ro_dir.mkdir()
    os.chmod(ro_dir, 0o555)
    try:
        for path, fragment in [
            (tmp_path, "is a folder; give a file name"),
            (ro, "is read-only; choose another file"),
            (tmp_path / "no" / "x.npz", "does not exist; create it"),
            (ro / "x.npz", "is a file, not a folder"),
            (ro_dir / "x.npz", f"the folder {str(ro_dir)!r} is read-only"),
            ("", "give a file name"),
        ]:
            with pytest.raises(ValueError, match=re.escape(fragment)):
                files.check_output_file(path)
        files.check_output_file(tmp_path / "new.npz")
        files.check_output_file(tmp_path / "a" / "b" / "new.npz", make_parents=True)
        with pytest.raises(ValueError, match="is read-only"):
            files.check_output_file(ro_dir / "a" / "new.npz", make_parents=True)
        with pytest.raises(ValueError, match="is a file; give a folder"):
            files.check_output_folder(ro, "--workdir")
        with pytest.raises(ValueError, match="empty path means the current folder"):
            files.check_output_folder("", "--workdir")
        with pytest.raises(ValueError, match="is read-only"):
            files.check_output_folder(ro_dir / "new")
        files.check_output_folder(tmp_path / "new" / "deeper")
    finally:
        os.chmod(ro_dir, 0o755)
    assert ro.read_bytes() == OLD


def test_one_implementation_of_the_rename():
    """No module outside scm_jax/files.py makes its own temporary file and rename (those owned
    elsewhere: the checkpoint manager; workdir's rename of an old config is no write)."""
    allowed = {"files.py", "run/checkpoint.py", "train/lock.py", "train/loop.py"}
    found = []
    for p in sorted((REPO / "scm_jax").rglob("*.py")):
        rel = p.relative_to(REPO / "scm_jax").as_posix()
        if rel in allowed:
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(r"os\.replace\(|\.rename\(|with_name\(f\"\.", line):
                found.append(f"{rel}:{i}: {line.strip()}")
    assert found == ['run/layout.py:144: os.replace(path, workdir / f"config.{step}.json")']


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A toy run trained for one step."""
    from scm_jax.config import defaults
    from scm_jax.train.loop import train

    cfg = defaults.load_config("toy_gmm:smoke")
    with cfg.unlocked():
        cfg.dataset.source = "synthetic"
        cfg.total_kimg = cfg.batch_size / 1000
    path = tmp_path_factory.mktemp("atomic") / "run"
    train(cfg, path, log=lambda line: None)
    return path


def cli(*argv: str) -> tuple[int, str, str]:
    from scm_jax import cli as cli_lib

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_lib.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("inject", ["savez", "fsync"])
def test_sample_on_a_full_disk_keeps_the_old_file(run, tmp_path, monkeypatch, inject):
    """``scm-jax sample --out old.npz`` on a full disk: exit 1, one line, the old file whole."""
    old = tmp_path / "old.npz"
    old.write_bytes(OLD)
    if inject == "savez":  # part of the archive written, then the disk is full

        def savez(f, **arrays):
            f.write(b"PK\x03\x04" + b"\x00" * 4096)
            raise enospc()

        monkeypatch.setattr(np, "savez", savez)
    else:  # the data fit the page cache; the disk says no when it is flushed

        def fsync(fd):
            raise enospc()

        monkeypatch.setattr(os, "fsync", fsync)
    code, stdout, stderr = cli("sample", "--workdir", run, "--num", 4, "--out", old)
    assert code == 1, (stdout, stderr)
    assert "Traceback" not in stdout + stderr
    assert stderr.strip() == (f"scm-jax sample: error: could not write {old}: [Errno 28] No space "
                              f"left on device; {old} was left unchanged")  # fmt: skip
    assert old.read_bytes() == OLD
    assert sorted(os.listdir(tmp_path)) == ["old.npz"]


def test_sample_writes_over_an_old_file(run, tmp_path):
    old = tmp_path / "old.npz"
    old.write_bytes(OLD)
    code, _, stderr = cli("sample", "--workdir", run, "--num", 4, "--out", old)
    assert code == 0, stderr
    with np.load(old) as f:
        assert f["x"].shape == (4, 2)
    assert sorted(os.listdir(tmp_path)) == ["old.npz"]
