"""The training loop: ``train(config, workdir)`` behind ``scm-jax train`` and ``scm_jax.main``.

One function runs every objective from a config: it builds the mesh and network, loads the data
and (for sCD) the teacher, creates the train state directly in its FSDP sharding (or restores the
workdir's latest checkpoint, data position and RNG included), then steps a jitted, state-donating
update, logging metrics, writing sample grids and checkpoints at the config's intervals (in
images; post-hoc EMA snapshots with ``ema.snapshot_every_kimg``, ``scm_jax.run.snapshots``).
The config is validated first (``scm_jax.config.validate``: every problem at once, before
anything is compiled or loaded), then the workdir is locked (one trainer per workdir:
``scm_jax.train.lock``). SIGTERM / SIGINT (and JAX's preemption notices on multi-host runs)
stop it after the current step with a checkpoint, so a preempted job resumes exactly where it
stopped; a run of ``train.max_consecutive_nonfinite`` skipped (non-finite) steps stops it with a
checkpoint and :class:`~scm_jax.train.stopping.NonfiniteStepsError`
(``scm_jax.train.stopping``). A damaged newest checkpoint is set aside and the run resumes from
the previous one (``scm_jax.run.checkpoint``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from scm_jax import objectives
from scm_jax.config import durations as config_durations
from scm_jax.config.validate import validate
from scm_jax.console import emit
from scm_jax.data.prefetch import Prefetcher
from scm_jax.data.scale import data_scale
from scm_jax.data.sources import load_dataset
from scm_jax.networks import build_network
from scm_jax.optim import make_optimizer
from scm_jax.run.checkpoint import Checkpointer
from scm_jax.run.emas import load_ema_checkpoint
from scm_jax.run.layout import (
    check_same_architecture,
    load_run_config,
    prepare_workdir,
    run_identity,
)
from scm_jax.run.sampler import Sampler
from scm_jax.run.snapshots import SnapshotWriter
from scm_jax.run.state import abstract_state, create_sharded_state, with_shardings
from scm_jax.sharding import activation_rules, batch_sharding, check_batch, mesh_from_config
from scm_jax.train import metrics as metrics_lib
from scm_jax.train.build import jit_train_step, state_fn, train_step_from_config
from scm_jax.train.evals import PeriodicConsistency, PeriodicEval
from scm_jax.train.lock import WorkdirLock, is_coordinator
from scm_jax.train.previews import write_previews
from scm_jax.train.progress import Progress
from scm_jax.train.stopping import NonfiniteGuard, NonfiniteStepsError, StopSignals
from scm_jax.train.teacher import Teacher, check_same_scale, load_teacher
from scm_jax.train.writers import create_writers


def every_steps(kimg: float, batch_size: int) -> int:
    """An interval in thousands of images as a step count (0 = never)."""
    return 0 if kimg <= 0 else max(1, round(kimg * 1000 / batch_size))


def _initial_net(config, mesh, teacher: Teacher | None, log) -> Any:
    """Network parameters a new run starts from: ``init_from``, else the sCD teacher, else None."""
    if config.init_from:
        source_cfg = load_run_config(config.init_from)
        check_same_architecture(config.model, source_cfg["model"], what="init_from run",
                                where=config.init_from)  # fmt: skip
        check_same_scale(config, source_cfg, what="init_from run", where=config.init_from)
        net, _, name, step = load_ema_checkpoint(
            config.init_from, config.model, mesh, what="init_from run", rules=config.mesh.rules
        )
        log(f"initialised from {config.init_from} (EMA {name}) at step {step}")
        return net
    if teacher is not None and teacher.nd is not None:
        log(f"student initialised from the teacher {teacher.source}")
        return teacher.params
    return None


STD_TOLERANCE = 0.25  # warn when the data's std is further than this from sigma_d (relative)


def check_data_std(source: Any, sigma_d: float, log: Callable[[str], None]) -> dict[str, float]:
    """Measure the std and the RMS (about zero) of the first (up to) 2,048 training examples in
    model units; warn in one line when either is more than 25 % away from sigma_d. TrigFlow's
    noise, its time proposal and t_mid assume data of mean 0 and std sigma_d (sCM §2.1): the
    RMS is what the noise is compared with, so a large mean counts too. ``dataset.normalize``
    puts the data there. Returns ``{'std', 'rms'}``."""
    x, _ = source.take(np.arange(min(len(source), 2048)))
    x = np.asarray(x, np.float64)
    std, rms = float(np.std(x)), float(np.sqrt(np.mean(x * x)))
    worst = max(abs(std / sigma_d - 1), abs(rms / sigma_d - 1))
    if worst > STD_TOLERANCE:
        log(f"warning: the training data has std {std:.3f} and RMS {rms:.3f} in model units "
            f"(mean {float(np.mean(x)):+.3f}), {worst:.0%} away from sigma_d = {sigma_d:g}; "
            "TrigFlow's noise levels assume mean 0 and std sigma_d: set --config.dataset."
            "normalize=per_channel with the statistics of `scm-jax data-stats` "
            "(docs/method.md)")  # fmt: skip
    return {"std": std, "rms": rms}


def _print(line: str) -> None:
    if jax.process_index() == 0:  # one copy of the progress, not one per process
        emit(line)  # flushed: logs of batch jobs go to files; a closed pipe is survived


def train(
    config: ml_collections.ConfigDict, workdir: str | Path, *, log: Callable[[str], None] = _print
) -> dict[str, Any]:
    """Train (or resume) the run of ``config`` in ``workdir``.

    Args:
      config: a resolved config (``configs/*.py`` + overrides).
      workdir: the run's folder: ``config.json``, ``checkpoints/``, ``metrics.jsonl``,
        TensorBoard events and ``samples/``. An existing run there is resumed.
      log: where progress lines go.
    Returns:
      ``{'step', 'nimg', 'seconds', 'interrupted' (signal number or None), 'samples' (paths),
      'metrics' (the last logged scalars), 'evals' ({step: periodic FID scalars}),
      'consistency' ({step: consistency-error scalars})}``.
    Raises:
      ValueError (``scm_jax.config.checks.ConfigError``: every problem of the config, one per line)
      / FileNotFoundError / CheckpointError with a clear message for a bad config, missing data
      or teacher, a workdir holding another run or no readable checkpoint, or one in use by
      another trainer (``WorkdirInUseError``, ``scm_jax.train.lock``); nothing is overwritten.
      CheckpointWriteError (``scm_jax.run.checksums``, one line) when an OS error (full disk,
      read-only filesystem...) stops a checkpoint write; the newest complete checkpoint is
      intact. NonfiniteStepsError after ``train.max_consecutive_nonfinite`` skipped steps in a
      row (a checkpoint of the last good parameters is written first).
    """
    validate(config)  # before anything is built, compiled or loaded
    with WorkdirLock(workdir, log=log, enabled=is_coordinator()):  # before any other work
        return _train(config, workdir, log)


def _train(config: ml_collections.ConfigDict, workdir: str | Path, log: Callable) -> dict:
    """:func:`train` with the validated config, holding the workdir's lock."""
    config = config_durations.resolve_durations(config)  # warm-up, DMD start in steps; EMA in kimg
    workdir = Path(workdir)
    t_start = time.time()
    sigma_d = float(config.trigflow.sigma_d)
    is_main = jax.process_index() == 0
    nd = build_network(config.model)
    mesh = mesh_from_config(config.mesh)  # checks the rules and the device count
    rules = config.mesh.rules
    check_batch(config.batch_size, mesh, config.train.micro_batches)
    periodic = PeriodicEval.create(config, mesh, nd.sample_shape, workdir, log)  # checks first
    source = load_dataset(config.dataset, sigma_d=sigma_d, seed=config.seed)
    if tuple(source.shape) != nd.sample_shape:
        raise ValueError(
            f"the data's examples have shape {tuple(source.shape)} but the network takes "
            f"{nd.sample_shape} (dataset.shape / model.img_resolution / img_channels)"
        )
    check_data_std(source, sigma_d, log)
    scale = data_scale(config.dataset, sigma_d)
    distil = objectives.get(config.objective).needs_teacher  # sCD, DMD, rCM
    teacher = load_teacher(config, mesh) if distil else None
    consistency = PeriodicConsistency.create(config, mesh, source, teacher, workdir, log,
                                             is_main_process=is_main)  # fmt: skip
    tx, schedule = make_optimizer(**config.optim, batch_size=config.batch_size)

    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints)
    latest = ckpt.latest_step()
    per_leaf = mesh.shape["fsdp"] * mesh.shape["tensor"] > 1  # params split: draw per leaf
    make_state = state_fn(config, nd, tx, per_leaf=per_leaf)  # (key, init_net) -> TrainState

    key = jax.random.key(config.seed)
    counts = {}  # a resumed run's non-finite step counts
    if latest is not None:  # another run's workdir or checkpoint: refused before any read
        prepare_workdir(workdir, config, has_checkpoint=True, check_only=True)
        ckpt.check_identity(config)
        target, shardings = abstract_state(make_state, mesh, key, None, rules=rules)
        state, latest, damaged = ckpt.restore_newest(
            with_shardings(target, shardings), config=config, log=log
        )
        meta = ckpt.read_meta(latest)
        counts = {"total": int(meta.get("nonfinite_steps_total", 0)),
                  "in_a_row": int(meta.get("nonfinite_in_a_row", 0))}  # fmt: skip
    changes = prepare_workdir(
        workdir, config, has_checkpoint=latest is not None, step=latest or 0,
        is_main_process=is_main,
    )  # fmt: skip
    if latest is not None:
        if damaged:
            ckpt.set_aside(damaged, is_main_process=is_main, log=log)
        log(f"resumed {workdir} at step {latest} ({latest * config.batch_size / 1000:.1f} kimg)")
        for line in changes:
            log(f"  changed since the checkpoint: {line}")
    else:
        init_net = _initial_net(config, mesh, teacher, log)
        state, shardings = create_sharded_state(make_state, mesh, key, init_net, rules=rules)

    total_steps = math.ceil(config.total_kimg * 1000 / config.batch_size)
    start = int(state.step)
    step_fn = train_step_from_config(  # the one builder (train.build): info and AOT use it too
        config, nd, None if teacher is None else teacher.apply_fn, mesh=mesh, tx=tx,
        schedule=schedule,
    )  # fmt: skip
    jit_step = jit_train_step(step_fn, shardings, mesh)
    accumulate = jax.jit(_accumulate)
    teacher_params = None if teacher is None else teacher.params
    x_sharding = batch_sharding(mesh, rules)

    log_every = every_steps(config.train.log_every_kimg, config.batch_size)
    ckpt_every = every_steps(config.train.ckpt_every_kimg, config.batch_size)
    sample_every = every_steps(config.train.sample_every_kimg, config.batch_size)
    eval_every = every_steps(config.evals.every_kimg, config.batch_size)
    snap_every = every_steps(config.ema.snapshot_every_kimg, config.batch_size)
    snapshots = None
    if snap_every:  # post-hoc EMA snapshots (scm_jax.run.snapshots, `scm-jax phema`)
        snapshots = SnapshotWriter(workdir, config.ema.power_std, config.batch_size,
                                   is_main_process=is_main, log=log)  # fmt: skip
        snapshots.start(start)
    cons_every = every_steps(config.evals.consistency_every_kimg, config.batch_size)
    ema_names = list(state.emas)
    sampler = Sampler(
        nd, None, sigma_d=sigma_d, sigma_max=config.trigflow.sigma_max,
        t_mid=config.trigflow.t_mid, objective=config.objective,
        guidance=0.5 * (config.teacher.guidance_min + config.teacher.guidance_max), scale=scale,
    )  # fmt: skip

    def previews(st) -> list[str]:
        params = st.emas[ema_names[0]] if ema_names else st.params["net"]
        return write_previews(
            sampler.with_params(params), workdir, int(st.step), writers,
            num=config.train.sample_grid, ode_steps=config.train.teacher_sample_steps,
            seed=config.seed, is_main_process=is_main,
        )  # fmt: skip

    teacher_sampler = None
    if periodic is not None and teacher is not None and teacher.nd is not None:
        teacher_sampler = Sampler(
            teacher.nd, teacher.params, sigma_d=sigma_d, sigma_max=config.trigflow.sigma_max,
            objective="diffusion", scale=scale,
        )  # fmt: skip
    evals: dict[int, dict[str, float]] = {}

    def evaluate(st) -> None:
        params = st.emas[ema_names[0]] if ema_names else st.params["net"]
        evals[int(st.step)] = periodic(sampler.with_params(params), int(st.step), writers,
                                       teacher_sampler, is_main_process=is_main)  # fmt: skip
        progress.restart_timer(int(st.step))  # the evaluation is not training time

    measured: dict[int, dict[str, float]] = {}

    def measure(st) -> None:  # the consistency error (evals.consistency_every_kimg)
        params = st.emas[ema_names[0]] if ema_names else st.params["net"]
        measured[int(st.step)] = consistency(nd, params, int(st.step), writers, is_main)
        progress.restart_timer(int(st.step))  # not training time either

    identity = run_identity(config)
    guard = NonfiniteGuard(config.train.max_consecutive_nonfinite, **counts, log=log)

    def save(st) -> None:
        guard.sync()  # the counts of the state being saved (the save waits for it anyway)
        s = int(st.step)
        ckpt.save(st, {
            "step": s, "nimg": s * config.batch_size, "batch_size": config.batch_size,
            "seed": config.seed, "objective": config.objective, "ema_names": ema_names,
            "identity": identity, "nonfinite_steps_total": guard.total,
            "nonfinite_in_a_row": guard.in_a_row, "time": time.time(),
        }, log=log)  # fmt: skip

    n_params = sum(x.size for x in jax.tree.leaves(state.params["net"]))
    log(
        f"{config.objective} on {config.dataset.name} ({len(source)} examples): "
        f"{n_params / 1e6:.2f} M parameters, batch {config.batch_size}, "
        f"{total_steps} steps ({config.total_kimg:g} kimg); mesh "
        + " x ".join(f"{a}={n}" for a, n in mesh.shape.items())
        + f" on {jax.devices()[0].platform}; workdir {workdir}"
    )
    if teacher is not None:
        log(f"teacher: {teacher.source}")
    writers = create_writers(workdir, is_main_process=is_main, start_step=start)  # drops redone
    progress = Progress(total_steps, start_step=start, batch_size=config.batch_size, print_fn=log)
    samples: list[str] = []
    last: dict[str, float] = {}
    empty = metrics_lib.empty_metrics(metrics_lib.NUM_TIME_BINS)
    acc, logged_at = empty, start
    saved_at = start if latest is not None else -1
    num_classes = nd.num_classes
    with StopSignals() as stop, activation_rules(mesh, rules), Prefetcher(
        source, batch_size=config.batch_size, seed=config.seed, start_step=start,
        flip=config.dataset.flip, process_index=jax.process_index(),
        process_count=jax.process_count(), depth=config.train.prefetch_batches,
        stop_step=total_steps,
    ) as batches:  # fmt: skip
        for step, x, labels in batches:
            if stop.should_stop(step):
                break
            xg = jax.make_array_from_process_local_data(x_sharding, x)
            yg = None
            if num_classes:
                yg = jax.make_array_from_process_local_data(x_sharding, labels.astype(np.int32))
            state, values = jit_step(state, xg, yg, teacher_params)
            acc = accumulate(acc, values)
            s = step + 1
            guard.after_step(s, values)  # reads step s - 1's counts: no wait for step s
            if (log_every and s % log_every == 0) or s == total_steps:
                guard.sync()  # the metrics below wait for step s anyway
                last = progress_log(progress, writers, s, acc, guard.total)
                acc, logged_at = empty, s
            if guard.should_stop:
                break
            if snapshots is not None and s % snap_every == 0:
                snapshots.write(s, state.emas)
            if sample_every and s % sample_every == 0 and s < total_steps:
                samples += previews(state)
            if eval_every and s % eval_every == 0 and s < total_steps:
                evaluate(state)
            if cons_every and s % cons_every == 0 and s < total_steps:
                measure(state)
            if ckpt_every and s % ckpt_every == 0 and s < total_steps:
                save(state)  # syncs the guard
                saved_at = s
                if guard.should_stop:
                    break
    final = int(state.step)
    guard.sync()
    diverged = guard.should_stop
    if final != saved_at:  # first: nothing after the last step may lose it
        with stop.writing(log):  # a signal now lets the write finish (scm_jax.train.stopping)
            save(state)
            if stop.signum is not None:  # stopping anyway: on disk before anything else
                ckpt.wait()
    if snapshots is not None:
        if final != snapshots.last_step:
            snapshots.write(final, state.emas)
        snapshots.wait()
    if final != logged_at:
        last = progress_log(progress, writers, final, acc, guard.total)
    if (stop.signum is None and not diverged) or final == total_steps:
        samples += previews(state)
        if periodic is not None and final not in evals:
            evaluate(state)
        if consistency is not None and final not in measured:
            measure(state)
    with stop.writing(log):
        ckpt.close()
    writers.close()
    if diverged:
        raise NonfiniteStepsError(guard.stop_message(final))
    interrupted = stop.signum if final < total_steps else None
    if interrupted is not None:
        log(f"stopped by signal {interrupted} at step {final}; checkpoint saved, run the same "
            "command to resume")  # fmt: skip
    else:
        log(f"done: {final} steps in {time.time() - t_start:.1f} s; checkpoints in "
            f"{ckpt.directory}")  # fmt: skip
    return {"step": final, "nimg": final * config.batch_size, "seconds": time.time() - t_start,
            "interrupted": interrupted, "samples": samples, "metrics": last, "evals": evals,
            "consistency": measured, "nonfinite_steps_total": guard.total}  # fmt: skip


def _accumulate(acc: metrics_lib.TrainMetrics, values: dict[str, Any]) -> Any:
    """Add one step's values to the interval's metrics."""
    return acc.merge(
        metrics_lib.make_step_metrics(num_time_bins=metrics_lib.NUM_TIME_BINS, **values)
    )


def progress_log(
    progress: Progress, writers: Any, step: int, acc: Any, nonfinite_total: int = 0
) -> dict[str, float]:
    """Summarise accumulated metrics, print the progress line and write the scalars (with
    ``nonfinite_steps_total``, the run's skipped steps so far)."""
    scalars = metrics_lib.summarize(acc)
    scalars["nonfinite_steps_total"] = float(nonfinite_total)
    progress.update(step, scalars)
    scalars.update(progress.timing_scalars())
    writers.write_scalars(step, scalars)
    return scalars
