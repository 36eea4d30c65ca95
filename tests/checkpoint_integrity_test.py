"""Checkpoint integrity (scm_jax.run.checksums): checksums catch a flipped bit that orbax reads
silently, older checkpoints without checksums still restore, a full disk ends a run with one
line, a second signal during the last checkpoint write is quiet, and readers name the step they
actually restored after a fallback."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from helpers import folder_digest, quiet, read_and_react, tree_bytes
from reliability_test import BATCH, points_npz, restore_raw, toy_on

import scm_jax
from scm_jax import cli
from scm_jax.run import checksums
from scm_jax.run.checkpoint import Checkpointer
from scm_jax.run.emas import load_ema_checkpoint
from scm_jax.run.exports import load_export
from scm_jax.run.state import TrainState
from scm_jax.train.loop import train

EVERY_2 = {"train.ckpt_every_kimg": 2 * BATCH / 1000}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """A 6-step toy sCT run with checkpoints at steps 2, 4 and 6 (copy it before damaging)."""
    root = tmp_path_factory.mktemp("integrity")
    data = points_npz(root / "points.npz")
    train(toy_on(data, 6, **EVERY_2), root / "run", log=quiet)
    return root / "run"


def copy_run(run: Path, tmp_path: Path) -> Path:
    shutil.copy(run.parent / "points.npz", tmp_path / "points.npz")
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def flip_a_bit(step_dir: Path, items: tuple[str, ...] = ("state", "emas")) -> Path:
    """Flip one bit in the middle of the largest array data file (OCDBT
    ``ocdbt.process_<i>/d/``; the merged ``d/`` b-tree files have TensorStore's own CRC) of a
    checkpoint's ``items``; returns the file."""
    files = [p for item in items for p in (step_dir / item).glob("ocdbt.process_*/d/*")]
    f = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40
    f.write_bytes(bytes(data))
    return f


def lines_of(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def test_every_checkpoint_records_checksums_of_its_files(toy_run):
    for step in (2, 4, 6):
        step_dir = toy_run / "checkpoints" / str(step)
        listed = json.loads((step_dir / checksums.CHECKSUMS_FILE).read_text())["files"]
        on_disk = checksums.compute_checksums(step_dir)["files"]
        assert listed == on_disk and any("/d/" in n for n in listed)
        assert {n.split("/")[0] for n in listed} == {"state", "emas", "meta"}


def test_a_flipped_bit_that_orbax_reads_silently_is_detected(tmp_path, capfd):
    """Arrays large enough to be stored out of line (OCDBT data files without a checksum of
    their own): orbax restores a flipped bit as other values; the checksums catch it and every
    reader falls back to the previous checkpoint with one warning line."""
    rng = np.random.default_rng(0)
    net = {"w": jnp.asarray(rng.standard_normal((256, 512), np.float32)), "b": jnp.zeros(4)}
    ckpt = Checkpointer(tmp_path)
    for step in (1, 2):
        ckpt.save(TrainState(jnp.int32(step), {"net": net}, (), {"halflife": net},
                             jnp.zeros(2, jnp.uint32)), {"step": step})  # fmt: skip
    ckpt.close()
    flip_a_bit(tmp_path / "checkpoints" / "2", ("emas",))
    raw = restore_raw(tmp_path, 2)  # orbax alone: no error, other values
    assert not np.array_equal(np.asarray(raw["emas"]["halflife"]["w"]), np.asarray(net["w"]))

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                 sharding=device), t)  # fmt: skip
    ckpt = Checkpointer(tmp_path, read_only=True)
    capfd.readouterr()
    emas = ckpt.restore_emas(like({"halflife": net}))
    assert ckpt.restored_step == 1 and np.array_equal(np.asarray(emas["halflife"]["w"]), net["w"])
    err = lines_of(capfd.readouterr().err)
    assert len(err) == 1 and "checksum mismatch: emas/" in err[0], err
    target = TrainState(*like((jnp.int32(0), {"net": net}, (), {"halflife": net},
                               jnp.zeros(2, jnp.uint32))))  # fmt: skip
    lines: list[str] = []
    _, step, damaged = ckpt.restore_newest(target, log=lines.append)
    assert (step, damaged) == (1, [2]) and len(lines) == 1 and "checksum mismatch" in lines[0]
    ckpt.set_aside(damaged, log=lines.append)
    assert ckpt.all_steps() == [1] and (tmp_path / "checkpoints" / "2.damaged").is_dir()
    ckpt.close()


def test_a_damaged_file_makes_the_run_resume_from_the_previous_checkpoint(toy_run, tmp_path, capfd):
    """Readers and training fall back to step 4 with one warning line each, the run keeps the
    damaged checkpoint as ``6.damaged`` (bytes unchanged) and goes on. (In the toy's tiny
    checkpoints the values live in TensorStore's CRC'd b-tree; the flipped file is one that
    only the checksums cover.)"""
    run = copy_run(toy_run, tmp_path)
    ckpts = run / "checkpoints"
    flip_a_bit(ckpts / "6", ("emas",))  # what samplers read too
    damaged = folder_digest(ckpts / "6")

    capfd.readouterr()
    sampler = scm_jax.load_sampler(run)
    assert sampler.step == 4 and sampler.sample(0, 2, steps=1).shape == (2, 2)
    err = lines_of(capfd.readouterr().err)
    assert len(err) == 1, err  # one line: no "Exception ignored" or tracebacks around it
    assert err[0].startswith(f"warning: checkpoint {ckpts / '6'} is damaged and was not used")
    assert "checksum mismatch" in err[0] and err[0].endswith("trying step 4")

    lines: list[str] = []
    assert (
        train(toy_on(run.parent / "points.npz", 8, **EVERY_2), run, log=lines.append)["step"] == 8
    )
    warn = [ln for ln in lines if ln.startswith("warning:")]
    assert len(warn) == 1 and "checksum mismatch" in warn[0], lines
    assert f"resumed {run} at step 4 (0.0 kimg)" in lines
    assert folder_digest(ckpts / "6.damaged") == damaged
    assert Checkpointer(run, read_only=True).all_steps() == [4, 6, 8]


def test_a_checkpoint_without_checksums_still_restores(toy_run, tmp_path, capfd):
    """Checkpoints written before checksums existed: read unverified, said once."""
    run = copy_run(toy_run, tmp_path)
    for f in (run / "checkpoints").glob(f"*/{checksums.CHECKSUMS_FILE}"):
        f.unlink()
    capfd.readouterr()
    ckpt = Checkpointer(run, read_only=True)
    assert ckpt.read_meta()["step"] == 6
    sampler = scm_jax.load_sampler(run)
    assert sampler.step == 6
    err = lines_of(capfd.readouterr().err)
    assert len(err) == 2 and all("has no checksums.json" in ln for ln in err), err  # 1 per reader
    assert err[0].endswith("read unverified")
    ckpt.close()


def test_export_after_a_fallback_records_the_step_of_its_weights(toy_run, tmp_path, capfd):
    run = copy_run(toy_run, tmp_path)
    flip_a_bit(run / "checkpoints" / "6", ("emas",))
    out = tmp_path / "export"
    argv = ["export", "--workdir", str(run), "--to", "safetensors", "--out", str(out)]
    assert cli.main(argv) == 0
    assert json.loads((out / "config.json").read_text())["step"] == 4
    weights, _ = load_export(out)
    at_4, _, _, step = load_ema_checkpoint(run, None, None, step=4)
    assert step == 4
    assert tree_bytes(weights) == tree_bytes(jax.tree.map(np.asarray, at_4))


def test_a_full_disk_during_a_checkpoint_write_ends_with_one_line(tmp_path, capfd, monkeypatch):
    """ENOSPC injected into orbax's write of checkpoint 4 (its meta file, on orbax's thread):
    exit 1 with one line naming the step, the folder and the intact step 2; no partial folder;
    step 2 restores (checksums verified)."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch

    original = jch.JsonCheckpointHandler._save_fn

    async def full_disk(self, x, directory):
        if x.get("step") == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
        return await original(self, x, directory)

    monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", full_disk)
    data = points_npz(tmp_path / "points.npz")
    run = tmp_path / "run"
    capfd.readouterr()
    code = cli.main(["train", "--config", "toy_gmm:smoke",
                     f"--config.total_kimg={6 * BATCH / 1000}",
                     f"--config.train.ckpt_every_kimg={2 * BATCH / 1000}",
                     "--config.dataset.source=npz", f"--config.dataset.path={data}",
                     "--config.dataset.num_examples=0", "--config.train.sample_every_kimg=0",
                     "--workdir", str(run)])  # fmt: skip
    out, err = capfd.readouterr()
    assert code == 1
    assert "Traceback" not in out + err and "ERROR" not in err, err[-3000:]
    assert lines_of(err) == [
        f"scm-jax train: error: could not write checkpoint 4 to {run / 'checkpoints'}: "
        "[Errno 28] No space left on device; the newest complete checkpoint (step 2) is intact"
    ]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2"]
    monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", original)
    sampler = scm_jax.load_sampler(run)
    assert sampler.step == 2 and capfd.readouterr().err == ""


def test_write_errors_are_recognised_from_oserrors_and_tensorstore_messages(tmp_path):
    d = tmp_path / "checkpoints"
    e = checksums.write_error(8, d, OSError(errno.EROFS, "Read-only file system"), 6)
    assert str(e) == (f"could not write checkpoint 8 to {d}: [Errno 30] Read-only file system; "
                      "the newest complete checkpoint (step 6) is intact")  # fmt: skip
    ts = ValueError('UNKNOWN: Error writing local file "/x/d/abc": [OS error 28: No space left '
                    "on device]\nmore")  # fmt: skip
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = ts
    e = checksums.write_error(2, d, wrapped, None)
    assert "[OS error 28: No space left on device]" in str(e) and "\n" not in str(e)
    assert str(e).endswith("no earlier checkpoint exists")
    assert checksums.write_error(2, d, TypeError("a bug"), None) is None  # raised as it is


def test_a_small_disk_is_warned_about_before_the_write(tmp_path, monkeypatch):
    usage = types.SimpleNamespace(total=10**9, used=10**9 - 1000, free=1000)
    monkeypatch.setattr(checksums.shutil, "disk_usage", lambda _path: usage)
    lines: list[str] = []
    assert not checksums.check_free_space(tmp_path, 5000, 400, lines.append)
    assert lines == [f"warning: checkpoint 400 needs about 0.00 GB but {tmp_path} has 0.00 GB "
                     "free; the write will probably fail (free space or lower "
                     "train.keep_checkpoints)"]  # fmt: skip
    assert checksums.check_free_space(tmp_path, 500, 400, lines.append) and len(lines) == 1


def test_verification_reports_a_missing_or_resized_file(toy_run, tmp_path):
    run = copy_run(toy_run, tmp_path)
    step_dir = run / "checkpoints" / "2"
    assert checksums.verify_checksums(step_dir, ("state", "emas", "meta"))
    (step_dir / "meta" / "metadata").write_text('{"step": 2}  ')
    with pytest.raises(checksums.ChecksumError, match="meta/metadata has"):
        checksums.verify_checksums(step_dir, ("meta",))
    assert checksums.verify_checksums(step_dir, ("emas",))  # only the items read
    # processes split the files: together they check every one
    names = sorted(json.loads((step_dir / "checksums.json").read_text())["files"])
    target = [n for n in names if n.startswith("state/")][-1]
    (step_dir / target).unlink()
    hits = 0
    for i in range(3):
        try:
            checksums.verify_checksums(step_dir, ("state",), process_index=i, process_count=3)
        except checksums.ChecksumError as e:
            hits += 1
            assert f"{target} is missing" in str(e)
    assert hits == 1


def test_abandoned_orbax_coroutines_are_not_reported(monkeypatch):
    """What a failing restore leaves behind: orbax coroutines collected with an error (one
    "Exception ignored in: <coroutine ...>" report each) are dropped; others are not."""
    from orbax.checkpoint._src.path import async_path

    from scm_jax.run.orbax_console import ignore_closed_loop_callbacks

    reported: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    ignore_closed_loop_callbacks()  # what every Checkpointer installs (once)

    async def ours():
        return None

    for coro in (async_path.exists(Path(".")), ours()):
        err = RuntimeError("coroutine ignored GeneratorExit")
        sys.unraisablehook(types.SimpleNamespace(
            exc_type=RuntimeError, exc_value=err, exc_traceback=None, err_msg=None,
            object=coro))  # fmt: skip
        coro.close()
    assert [u.object.cr_code.co_name for u in reported] == ["ours"]


SLOW_META_WRITE = """
import sys, time
from orbax.checkpoint._src.handlers.json_checkpoint_handler import JsonCheckpointHandler as J
original = J._save_fn
async def slow(self, x, directory):
    print("writing the checkpoint", flush=True)
    time.sleep(2.0)
    return await original(self, x, directory)
J._save_fn = slow
from scm_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_second_sigterm_during_the_checkpoint_write_is_quiet(tmp_path):
    """SIGTERM, then SIGTERM again while the checkpoint is being written (made to take 2 s):
    one line says the write finishes first, no tracebacks (orbax's threads used to fail with
    "cannot schedule new futures after shutdown"), exit 143, the checkpoint is complete (its
    checksums verify)."""
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_META_WRITE, "train", "--config", "toy_gmm:smoke",
         "--config.total_kimg=400", f"--config.train.log_every_kimg={10 * BATCH / 1000}",
         "--config.train.sample_every_kimg=0", "--config.train.ckpt_every_kimg=0",
         "--workdir", str(tmp_path / "run")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip

    def react(line: str) -> bool:  # SIGTERM at the first progress line, again during the write
        if line.startswith(("step ", "writing the checkpoint")):
            proc.send_signal(signal.SIGTERM)
        return line.startswith("writing the checkpoint")

    text = read_and_react(proc, react)
    assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "Traceback" not in text and "cannot schedule" not in text, text[-3000:]
    assert "signal 15: stopping once the checkpoint is written" in text, text[-3000:]
    ckpt = Checkpointer(tmp_path / "run", read_only=True)
    (step,) = ckpt.all_steps()
    assert checksums.verify_checksums(ckpt.directory / str(step), checksums.ITEMS)
    assert f"stopped by signal 15 at step {step}" in text
