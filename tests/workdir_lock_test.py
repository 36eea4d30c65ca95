"""One trainer per workdir (scm_jax.train.lock) and metrics.jsonl without repeated steps after a
resume (scm_jax.train.writers.drop_rows_after): unit tests, then real ``scm-jax train``
processes (slow)."""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from helpers import smoke_config
from reliability_test import BATCH, _toy_train_process

from scm_jax.run.checkpoint import Checkpointer
from scm_jax.train import lock as lock_lib
from scm_jax.train.lock import LOCK_FILE, WorkdirInUseError, WorkdirLock, WorkdirLockError
from scm_jax.train.loop import train
from scm_jax.train.writers import DROPPED_FILE, METRICS_FILE, drop_rows_after, read_metrics

HOST = socket.gethostname()
HOLDER = ("import sys, time; from scm_jax.train.lock import WorkdirLock; "
          "WorkdirLock(sys.argv[1], command='holder').acquire(); print('locked', flush=True); "
          "time.sleep(600)")  # fmt: skip


def hold(workdir: Path) -> subprocess.Popen:
    """Another process that takes the workdir's lock and sleeps (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline() == "locked\n"
    return proc


def steps_of(workdir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(workdir)]


def strictly_increasing(steps: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(steps))


# ------------------------------------------------------------------------------------- unit


def test_lock_is_held_then_released_and_a_new_folder_removed(tmp_path):
    work = tmp_path / "new" / "run"
    lines: list[str] = []
    with WorkdirLock(work, log=lines.append, command="scm-jax train x") as lk:
        assert lk.mode == "flock"
        body = json.loads((work / LOCK_FILE).read_text())
        assert (body["pid"], body["host"]) == (os.getpid(), HOST)
        assert body["command"] == "scm-jax train x"
        assert time.time() - body["started"] < 60
    assert lines == []  # nothing to say: a fresh lock
    assert not (tmp_path / "new").exists()  # made for the run, left empty: removed again
    work.mkdir(parents=True)
    (work / "keep").write_text("x")
    with WorkdirLock(work, log=lines.append):
        pass
    assert sorted(os.listdir(work)) == ["keep"] and lines == []  # a clean exit: no .lock left


def test_a_workdir_that_cannot_be_made_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkdirLockError) as e:
        WorkdirLock(tmp_path / "file" / "run").acquire()
    assert str(e.value).startswith(f"cannot create or lock the workdir {tmp_path}/file/run: ")
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_disabled_lock_takes_nothing(tmp_path):
    with WorkdirLock(tmp_path / "run", enabled=False) as lk:  # multi-host: not the coordinator
        assert lk.mode is None
    assert not (tmp_path / "run").exists()


def test_lock_held_by_another_process_is_refused_naming_it(tmp_path):
    proc = hold(tmp_path / "run")
    try:
        with pytest.raises(WorkdirInUseError) as e, WorkdirLock(tmp_path / "run"):
            pass
    finally:
        proc.kill()
        proc.wait()
    msg = str(e.value)
    assert msg.startswith(f"workdir {tmp_path / 'run'} is in use by pid {proc.pid} on host {HOST} "
                          "(since ")  # fmt: skip
    assert msg.endswith(", `holder`); wait for it to finish or use another --workdir")
    assert "\n" not in msg and isinstance(e.value, ValueError)


def test_lock_of_a_killed_process_is_taken_over_with_one_line(tmp_path):
    proc = hold(tmp_path / "run")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "run" / LOCK_FILE).is_file()  # kill -9: no clean-up, the kernel unlocks
    lines: list[str] = []
    with WorkdirLock(tmp_path / "run", log=lines.append):
        assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert lines == [f"taking over the lock of pid {proc.pid} on host {HOST}, which is no longer "
                     f"running ({tmp_path / 'run' / LOCK_FILE})"]  # fmt: skip


def test_plain_lock_file_where_flock_is_unsupported(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock_lib.fcntl, "flock", no_flock)
    lines: list[str] = []
    work, path = tmp_path / "run", tmp_path / "run" / LOCK_FILE
    with WorkdirLock(work, log=lines.append) as lk:
        assert lk.mode == "file" and "does not support flock" in lines[0]
        with pytest.raises(WorkdirInUseError, match=f"in use by pid {os.getpid()} on host"):
            WorkdirLock(work, log=lines.append).acquire()  # this (live) process holds it
    assert not path.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    work.mkdir()
    path.write_text(json.dumps({"pid": int(dead.stdout), "host": HOST, "started": 0}))
    lines.clear()
    with WorkdirLock(work, log=lines.append):
        assert lines[1].startswith(f"taking over the lock of pid {int(dead.stdout)} on host {HOST}")
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0, "command": "c"}))
    with pytest.raises(WorkdirInUseError) as e:
        WorkdirLock(work, log=lines.append).acquire()
    assert "locked by pid 1 on host elsewhere" in str(e.value)
    assert str(e.value).endswith(f"if it does not, delete {path} and run again")
    assert path.is_file()  # never removed behind another host's back


def test_real_flock_is_what_is_used_here(tmp_path):
    """The module's premise on this filesystem: the kernel lock excludes a second descriptor."""
    with WorkdirLock(tmp_path):
        fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)


def test_train_refuses_a_locked_workdir_before_any_work(tmp_path):
    """In-process: the refusal comes before the model, the data or config.json."""
    proc = hold(tmp_path / "run")
    try:
        t0 = time.time()
        with pytest.raises(WorkdirInUseError, match=f"pid {proc.pid} on host"):
            train(smoke_config("toy_gmm:smoke", steps=2), tmp_path / "run", log=print)
        assert time.time() - t0 < 5
        assert os.listdir(tmp_path / "run") == [LOCK_FILE]
    finally:
        proc.kill()
        proc.wait()


def test_drop_rows_after_keeps_each_step_once_and_a_copy(tmp_path):
    path = tmp_path / METRICS_FILE
    rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4, 5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')  # torn
    assert drop_rows_after(path, 3) == 3
    assert steps_of(tmp_path) == [1, 2, 3]
    assert [json.loads(x)["step"] for x in (tmp_path / DROPPED_FILE).read_text().splitlines()[:2]
            ] == [4, 5]  # fmt: skip
    before = path.read_bytes()
    assert drop_rows_after(path, 3) == 0 and path.read_bytes() == before  # untouched
    assert drop_rows_after(tmp_path / "none.jsonl", 0) == 0


# ---------------------------------------------------------------------------- real processes


def _lines(text: str, prefix: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(prefix)]


@pytest.mark.slow
def test_two_trainers_started_together_one_is_refused_at_once(tmp_path):
    """Both start at the same moment (the second with another learning rate): one trains to the
    end (exit 0, each step once in metrics.jsonl), the other exits with 2 and the one line
    before it builds anything; config.json is the winner's. Then a sequential second run
    resumes normally."""
    steps, run = 40, tmp_path / "run"
    every = [f"--config.train.log_every_kimg={5 * BATCH / 1000}",
             f"--config.train.ckpt_every_kimg={10 * BATCH / 1000}"]  # fmt: skip
    t0 = time.time()
    procs = [_toy_train_process(run, steps, *every),
             _toy_train_process(run, steps, *every, "--config.optim.lr=0.0003")]  # fmt: skip
    outs, ends = {}, {}
    try:
        while len(ends) < 2 and time.time() - t0 < 300:
            for i, p in enumerate(procs):
                if i not in ends and p.poll() is not None:
                    ends[i] = time.time() - t0
                    outs[i] = p.stdout.read()
            time.sleep(0.1)
    finally:
        for p in procs:
            p.kill()
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], outs
    won, lost = codes.index(0), codes.index(2)
    assert ends[lost] < ends[won]
    *before, refusal = outs[lost].strip().splitlines()  # before: the distributed set-up line
    assert before == ["single process: 8 cpu devices"], outs[lost]
    assert refusal.startswith(f"scm-jax train: error: workdir {run} is in use by pid "
                              f"{procs[won].pid} on host {HOST} (since "), outs  # fmt: skip
    assert refusal.endswith("`); wait for it to finish or use another --workdir")
    assert "`scm-jax train --config toy_gmm:smoke" in refusal
    print(f"refused after {ends[lost]:.1f} s; the winner finished after {ends[won]:.1f} s")
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == [1e-4, 3e-4][won]
    assert not list(run.glob("config.*.json")) and not (run / LOCK_FILE).exists()
    assert steps_of(run) == list(range(5, steps + 1, 5))
    assert Checkpointer(run, read_only=True).all_steps()[-1] == steps

    cfg = smoke_config("toy_gmm:smoke", steps=steps + 5, **{"train.sample_every_kimg": 0.0,
                       "optim.lr": 2e-4})  # fmt: skip
    lines: list[str] = []
    assert train(cfg, run, log=lines.append)["step"] == steps + 5  # sequential: allowed
    assert f"resumed {run} at step {steps} ({steps * BATCH / 1000:.1f} kimg)" in lines
    assert not [ln for ln in lines if "taking over" in ln]
    assert (run / f"config.{steps}.json").is_file()


@pytest.mark.slow
def test_kill_9_leaves_a_stale_lock_the_next_train_takes_over_and_sample_ignores(tmp_path):
    """A trainer holds the lock; ``scm-jax sample`` on its workdir works meanwhile. After kill -9
    (no clean-up) the next train says whose lock it takes over, resumes from the checkpoint and
    metrics.jsonl has each step once (the killed run's rows after the checkpoint dropped)."""
    run = tmp_path / "run"
    proc = _toy_train_process(run, 100_000, f"--config.train.log_every_kimg={BATCH / 1000}",
                              f"--config.train.ckpt_every_kimg={20 * BATCH / 1000}")  # fmt: skip
    try:
        for line in proc.stdout:  # a checkpoint at step 20 is written by step 30
            if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= 30:
                break
        env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
        sample = subprocess.run(
            [sys.executable, "-m", "scm_jax", "sample", "--workdir", str(run), "--steps", "1",
             "--num", "4", "--out", str(tmp_path / "s.npz")],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert sample.returncode == 0, sample.stdout + sample.stderr
        assert proc.poll() is None and (tmp_path / "s.npz").is_file()  # it still trains
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    saved = Checkpointer(run, read_only=True).all_steps()[-1]
    assert max(steps_of(run)) > saved  # rows the resumed run will redo
    lines: list[str] = []
    cfg = smoke_config("toy_gmm:smoke", steps=saved + 3, **{"train.sample_every_kimg": 0.0,
                       "train.ckpt_every_kimg": 20 * BATCH / 1000})  # fmt: skip
    assert train(cfg, run, log=lines.append)["step"] == saved + 3
    assert f"taking over the lock of pid {proc.pid} on host {HOST}, which is no longer running " \
           f"({run / LOCK_FILE})" == lines[0]  # fmt: skip
    assert f"resumed {run} at step {saved} ({saved * BATCH / 1000:.1f} kimg)" in lines
    assert steps_of(run) == list(range(1, saved + 4))
    assert max(json.loads(x)["step"] for x in (run / DROPPED_FILE).read_text().splitlines()) \
        > saved  # fmt: skip


@pytest.mark.slow
def test_sigterm_stop_then_resume_logs_each_step_once(tmp_path):
    """SIGTERM: the run checkpoints, releases the lock (no .lock left) and exits 128 + 15; the
    resumed run reports no take-over and metrics.jsonl has strictly increasing unique steps."""
    steps, run = 150, tmp_path / "run"
    proc = _toy_train_process(run, steps, f"--config.train.log_every_kimg={3 * BATCH / 1000}")
    try:
        for line in proc.stdout:
            if line.startswith("step "):
                proc.send_signal(signal.SIGTERM)
                break
        proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert not (run / LOCK_FILE).exists()
    cut = Checkpointer(run, read_only=True).all_steps()[-1]
    assert cut < steps
    lines: list[str] = []
    cfg = smoke_config("toy_gmm:smoke", steps=steps, **{"train.sample_every_kimg": 0.0,
                       "train.log_every_kimg": 3 * BATCH / 1000})  # fmt: skip
    assert train(cfg, run, log=lines.append)["step"] == steps
    assert not [ln for ln in lines if "taking over" in ln]
    got = steps_of(run)
    assert strictly_increasing(got) and got[-1] == steps and cut in got
