"""Multi-process start-up (scm_jax.distributed) and the launchers in launch/.

Fast: the environment rules and their error messages, the single-process path, the CLI hook,
launch/local.sh with trivial commands, and that XLA accepts launch/xla_flags.sh. Slow: a tiny
training run as 2 processes x 4 CPU devices (launch/local.sh) equals 1 process x 8 devices.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO

from scm_jax import cli, distributed
from scm_jax.distributed import DistributedConfigError, Plan, plan_from_env

LOCAL_SH = REPO / "launch" / "local.sh"
COORD = {"SCM_JAX_COORDINATOR": "10.0.0.1:1234"}
SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "16",
         "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}  # fmt: skip
OMPI = {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_RANK": "3"}  # fmt: skip


def explicit(n="2", pid="1", **more) -> dict[str, str]:
    return {**COORD, "SCM_JAX_NUM_PROCESSES": n, "SCM_JAX_PROCESS_ID": pid, **more}


def test_nothing_in_the_environment_is_one_process():
    assert plan_from_env({}) == Plan("single")
    assert not plan_from_env({"PATH": "/bin"}).multi_process


def test_explicit_variables():
    plan = plan_from_env(explicit(SCM_JAX_LOCAL_DEVICE_IDS="0, 2,3"))
    assert plan == Plan("explicit", "10.0.0.1:1234", 2, 1, (0, 2, 3))
    assert plan.multi_process
    # Explicit wins over a SLURM environment; SCM_JAX_DISTRIBUTED=off over everything.
    assert plan_from_env({**SLURM, **explicit()}).method == "explicit"
    off = plan_from_env({**SLURM, **explicit(), "SCM_JAX_DISTRIBUTED": "off"})
    assert off.method == "single" and "SCM_JAX_DISTRIBUTED=off" in off.note
    assert plan_from_env({"SCM_JAX_DISTRIBUTED": "jax"}).method == "jax"
    ipv6 = plan_from_env(explicit(SCM_JAX_COORDINATOR="[::1]:80"))
    assert ipv6.coordinator == "[::1]:80"


def test_cluster_detection_mirrors_jax():
    assert plan_from_env(SLURM) == Plan("slurm", None, 16, 9)
    one_task = plan_from_env({**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"})
    assert one_task.method == "single" and "SLURM" in one_task.note
    # JAX's SLURM detection needs all five variables (salloc shells lack the step's).
    assert plan_from_env({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}) == Plan(
        "single"
    )
    assert plan_from_env({**SLURM, "SCM_JAX_LOCAL_DEVICE_IDS": "0,1"}).local_device_ids == (0, 1)
    assert plan_from_env(OMPI) == Plan("ompi", None, 4, 3)
    assert plan_from_env({**OMPI, "OMPI_COMM_WORLD_SIZE": "1"}).method == "single"
    assert plan_from_env({}, on_tpu_vm=True) == Plan("tpu")


@pytest.mark.parametrize(
    "env, message",
    [
        (COORD, "SCM_JAX_COORDINATOR is set but SCM_JAX_NUM_PROCESSES and SCM_JAX_PROCESS_ID "
                "are not"),
        ({"SCM_JAX_NUM_PROCESSES": "2", "SCM_JAX_PROCESS_ID": "0"},
         "are set but SCM_JAX_COORDINATOR is not"),
        ({**COORD, "SCM_JAX_PROCESS_ID": "0"}, "SCM_JAX_NUM_PROCESSES is not"),
        (explicit(n="two"), "SCM_JAX_NUM_PROCESSES='two' is not an integer"),
        (explicit(n="0", pid="0"), "SCM_JAX_NUM_PROCESSES=0 must be >= 1"),
        (explicit(pid="-1"), "SCM_JAX_PROCESS_ID=-1 must be >= 0"),
        (explicit(pid="2"), "SCM_JAX_PROCESS_ID=2 is out of range for SCM_JAX_NUM_PROCESSES=2; "
                            "process ids run from 0 to 1"),
        (explicit(SCM_JAX_COORDINATOR="10.0.0.1"), "'10.0.0.1' is not host:port"),
        (explicit(SCM_JAX_COORDINATOR=":1234"), "is not host:port"),
        (explicit(SCM_JAX_COORDINATOR="host:99999"), "is not host:port"),
        (explicit(SCM_JAX_LOCAL_DEVICE_IDS="0,x"), "SCM_JAX_LOCAL_DEVICE_IDS='0,x'"),
        (explicit(SCM_JAX_LOCAL_DEVICE_IDS="0,0"), "repeats an id"),
        ({"SCM_JAX_DISTRIBUTED": "yes"}, "SCM_JAX_DISTRIBUTED='yes': use 'off'"),
        ({**SLURM, "SLURM_NTASKS": "lots"}, "SLURM_NTASKS='lots' is not an integer"),
    ],
)  # fmt: skip
def test_bad_environment_gives_one_clear_line(env, message):
    with pytest.raises(DistributedConfigError) as info:
        plan_from_env(env)
    text = str(info.value)
    assert message in text and "\n" not in text
    assert isinstance(info.value, ValueError)  # the CLI prints ValueErrors as usage errors


def test_single_process_initialize_summarises_once():
    lines: list[str] = []
    info = distributed.initialize(environ={}, log=lines.append)
    assert (info.process_index, info.process_count) == (0, 1)
    assert info.device_count == info.local_device_count == jax.device_count()
    assert lines == [f"single process: {jax.device_count()} cpu devices"]
    assert distributed.initialize(environ={}, log=None).method == "single"  # again: harmless


def test_summary_lines():
    info = distributed.DistributedInfo(1, 16, 1, 16, "gpu", "slurm", "node01:65000")
    assert info.summary() == ("process 1 of 16 (SLURM, coordinator node01:65000): 1 local / 16 "
                              "global gpu devices")  # fmt: skip
    one = distributed.DistributedInfo(0, 1, 8, 8, "gpu", "single", None, "a SLURM step of one task")
    assert one.summary() == "single process (a SLURM step of one task): 8 gpu devices"


def test_multi_process_after_the_backend_started_is_refused():
    jax.devices()  # the backend is running in this test process
    assert distributed.backend_initialized() is True
    with pytest.raises(RuntimeError, match="call initialize\\(\\) before any other JAX call"):
        distributed.initialize(environ=explicit(), log=None)
    assert not jax.distributed.is_initialized()


def test_train_command_reads_the_environment_first(tmp_path, capsys, monkeypatch):
    """A half-set environment stops `scm-jax train` with one line, before anything is written."""
    monkeypatch.setenv("SCM_JAX_COORDINATOR", "localhost:1234")
    code = cli.main(["train", "--config", "mnist:smoke", "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("scm-jax train: error: SCM_JAX_COORDINATOR is set but"), err
    assert not (tmp_path / "run").exists()


def run_local(*args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run([str(LOCAL_SH), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})  # fmt: skip


def test_local_sh_sets_the_environment_and_prefixes_lines():
    show = ('echo "$SCM_JAX_PROCESS_ID/$SCM_JAX_NUM_PROCESSES $SCM_JAX_COORDINATOR $JAX_PLATFORMS '
            '$XLA_FLAGS"; echo to-stderr >&2')  # fmt: skip
    proc = run_local("3", "bash", "-c", show, env={"SCM_JAX_CPU_DEVICES": "2"})
    assert proc.returncode == 0, proc.stderr
    lines = sorted(proc.stdout.splitlines())
    assert [ln.split()[0] for ln in lines] == ["[p0]", "[p0]", "[p1]", "[p1]", "[p2]", "[p2]"]
    ports = set()
    for i in range(3):
        (info,) = [ln for ln in lines if ln.startswith(f"[p{i}] {i}/3 ")]
        _, _, coordinator, platform, *flags = info.split()
        ports.add(coordinator)
        assert coordinator.startswith("127.0.0.1:") and platform == "cpu"
        assert flags == ["--xla_force_host_platform_device_count=2"]  # conftest's 8 replaced
        assert f"[p{i}] to-stderr" in lines
    assert len(ports) == 1
    assert "[launch] 3 processes x 2 cpu devices" in proc.stderr


def test_local_sh_stops_the_others_when_one_fails():
    script = ('if [ "$SCM_JAX_PROCESS_ID" = 1 ]; then sleep 0.3; exit 7; fi; '
              'trap "echo stopped; exit 1" TERM; sleep 60 & wait')  # fmt: skip
    proc = run_local("3", "bash", "-c", script, timeout=30)
    assert proc.returncode == 7
    assert "[launch] process 1 exited with status 7; stopping the others" in proc.stderr
    assert sorted(proc.stdout.split()) == ["[p0]", "[p2]", "stopped", "stopped"]


def test_local_sh_forwards_ctrl_c_to_every_process():
    """SIGINT to the launcher reaches each process once; stopping on it is not a failure."""
    import signal

    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGINT, lambda *a: (print('got SIGINT'), sys.exit(130)))\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")  # fmt: skip
    # A shell cannot trap a signal ignored when it started (as SIGINT is for background jobs,
    # e.g. a CI run under nohup ... &): give the launcher the default disposition, as a terminal
    # would (a handled signal is reset to the default on exec; an ignored one stays ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([str(LOCAL_SH), "2", sys.executable, "-c", code], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)
    ready = [proc.stdout.readline() for _ in range(2)]
    assert sorted(ready) == ["[p0] ready\n", "[p1] ready\n"], ready
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert sorted(out.splitlines()) == ["[p0] got SIGINT", "[p1] got SIGINT"]
    assert "stopping the others" not in err


@pytest.mark.parametrize("args", [["0", "true"], ["2"], ["x", "true"]])
def test_local_sh_usage_errors(args):
    proc = run_local(*args)
    assert proc.returncode == 2 and proc.stderr.startswith("launch/local.sh: "), proc.stderr


def test_xla_flags_are_known_to_this_jaxlib():
    """XLA aborts on unknown flags: start JAX on CPU with launch/xla_flags.sh and run a jit."""
    script = (f'. "{REPO}/launch/xla_flags.sh" && . "{REPO}/launch/xla_flags.sh" && '
              f'echo "$XLA_FLAGS" && exec "{sys.executable}" -c '
              '"import jax; print(jax.jit(lambda x: x + 1)(1))"')  # fmt: skip
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    flags, result = proc.stdout.split("\n")[:2]
    assert result == "2"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags.split()
    assert len(flags.split()) == len(set(flags.split()))  # sourcing twice adds nothing


# The tiny run: mnist:smoke narrowed to one resolution, global batch 8, logged every step.
STEPS = 3
TINY = ["--config", "mnist:smoke", f"--config.total_kimg={STEPS * 8 / 1000}",
        "--config.train.log_every_kimg=0.008", "--config.train.sample_grid=4",
        "--config.train.teacher_sample_steps=2", "--config.model.channel_mult=(1,)",
        "--config.model.attn_resolutions=()", "--config.model.channels_per_head=8"]  # fmt: skip


def restore_numpy(workdir: Path, step: int) -> dict:
    """A checkpoint's ``state`` and ``emas`` items on one device, whatever topology wrote it."""
    import orbax.checkpoint as ocp

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    out = {}
    for item in ("state", "emas"):
        path = workdir / "checkpoints" / str(step) / item
        with ocp.StandardCheckpointer() as ckpt:
            meta = ckpt.metadata(path)
            meta = getattr(meta, "item_metadata", meta)  # orbax 0.11 / 0.12 wrappers
            meta = getattr(meta, "tree", meta)
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                                  meta)  # fmt: skip
            out[item] = jax.tree.map(np.asarray, ckpt.restore(path, target))
    return out


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    """2 processes x 4 CPU devices (launch/local.sh) == 1 process x 8 devices, same batch."""
    from scm_jax.train.writers import read_metrics

    env = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "SCM_JAX_CPU_DEVICES": "4"}  # as conftest
    two = tmp_path / "two"
    proc = run_local("2", sys.executable, "-m", "scm_jax.cli", "train", *TINY, "--workdir",
                     str(two), env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    out = proc.stdout.splitlines()
    assert any(ln.startswith("[p0] process 0 of 2 (SCM_JAX_* environment, coordinator 127.0.0.1:")
               and ln.endswith("4 local / 8 global cpu devices") for ln in out), out  # fmt: skip
    assert not any("process 1 of 2" in ln for ln in out)  # the summary is process 0's
    assert cli.main(["train", *TINY, "--workdir", str(tmp_path / "one")]) == 0  # 1 x 8 devices

    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(two)
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in m2], [r["loss"] for r in m1], rtol=1e-5)
    s1, s2 = restore_numpy(tmp_path / "one", STEPS), restore_numpy(two, STEPS)
    assert jax.tree.structure(s1) == jax.tree.structure(s2)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (two / "samples").iterdir()) == [
        f"{STEPS:08d}_1step.png", f"{STEPS:08d}_2step.png"]  # fmt: skip
