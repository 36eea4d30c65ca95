"""Checkpoints with orbax: periodic and final, asynchronous, keep-N, restored into shardings.

A run's workdir holds ``checkpoints/<step>/`` with three items:

* ``state``: ``{'step', 'params', 'opt_state', 'rng'}`` (everything but the EMAs), and
  ``'critic'`` for DMD / rCM runs (the fake score and its optimiser state);
* ``emas``: ``{name: network params}``, what samplers, teachers and exports load on their own;
* ``meta``: JSON ``{'step', 'nimg', 'batch_size', 'seed', 'ema_names', 'objective',
  'identity', 'nonfinite_steps_total', 'nonfinite_in_a_row', 'time'}``; ``identity`` holds the
  config fields that decide the saved state and the data order
  (``scm_jax.run.layout.run_identity``; checkpoints written before it existed lack it).

The data position is a pure function of (seed, step) (``scm_jax.data.arrays``) and the per-step
randomness of (key, step), so ``state`` + ``meta`` are all a resumed run needs to continue
bit-identically.

Failure handling:

* **atomic**: orbax writes each checkpoint to ``<step>.orbax-checkpoint-tmp-*`` and renames it
  when complete; step discovery ignores such folders, so a run killed mid-save leaves the
  previous checkpoint the newest;
* **damaged**: :meth:`Checkpointer.restore_newest` (training) and :meth:`restore_emas` without a
  step (samplers, teachers) fall back to the previous checkpoint with a warning when the newest
  cannot be read (truncated or corrupted files fail orbax's reads and OCDBT's checksums);
  :meth:`set_aside` renames a damaged one to ``<step>.damaged`` (never deleted) so the run can
  write that step again;
* **checksums, write errors** (``scm_jax.run.checksums``): ``checksums.json`` is verified
  before items are read (a mismatch is damage); an OS error while writing raises one line;
* **another run**: a checkpoint whose ``meta`` identity differs from the config raises
  :class:`CheckpointMismatchError` naming the fields, before any array is read.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from scm_jax.console import emit
from scm_jax.run import checksums
from scm_jax.run.orbax_console import ignore_closed_loop_callbacks
from scm_jax.run.state import TrainState

CHECKPOINT_DIR = "checkpoints"
DAMAGED_SUFFIX = ".damaged"  # a damaged checkpoint set aside: <step>.damaged (orbax ignores it)
_MAX_LISTED = 8  # differing fields named in a mismatch message


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the run's state.

    ``detail``: the underlying error's first line, for damaged checkpoints ('' otherwise).
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class CheckpointMismatchError(CheckpointError):
    """A checkpoint written by a run with another identity (architecture, objective, batch...)."""


def _warn(line: str) -> None:
    emit(line, sys.stderr)


def checkpoint_dir(path: str | Path) -> Path:
    """``<workdir>/checkpoints`` for a workdir, or ``path`` itself if it is that folder."""
    path = Path(path)
    return path if path.name == CHECKPOINT_DIR else path / CHECKPOINT_DIR


def split_state(state: TrainState) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state item, emas item)`` of a TrainState (see the module docstring)."""
    item = {"step": state.step, "params": state.params, "opt_state": state.opt_state,
            "rng": state.rng}  # fmt: skip
    if state.critic is not None:  # DMD / rCM only: other runs' checkpoints keep their layout
        item["critic"] = state.critic
    return item, state.emas


def join_state(item: dict[str, Any], emas: dict[str, Any]) -> TrainState:
    """Inverse of :func:`split_state`."""
    return TrainState(item["step"], item["params"], item["opt_state"], emas, item["rng"],
                      item.get("critic"))  # fmt: skip


class Checkpointer(checksums.CheckpointIntegrity):
    """Saves and restores a run's checkpoints (a thin layer over ``ocp.CheckpointManager``).

    Args:
      workdir: the run's folder (checkpoints go to ``<workdir>/checkpoints``).
      keep: how many checkpoints to keep (the newest ``keep``).
      async_save: write in a background thread (training continues while files are written).
      read_only: open an existing run without creating anything (samplers, teachers).
    """

    def __init__(
        self, workdir: str | Path, *, keep: int = 3, async_save: bool = True,
        read_only: bool = False,
    ) -> None:  # fmt: skip
        ignore_closed_loop_callbacks()
        self.directory = checkpoint_dir(workdir)
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoints in {str(workdir)!r} (no {self.directory})")
        self.async_save = async_save and not read_only
        self.restored_step: int | None = None  # the step the last restore read
        self._pending: int | None = None  # the step being written
        self._unverified_noted = self._closed = False
        checksums.quiet_orbax_write_errors()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max(int(keep), 1),
            enable_async_checkpointing=self.async_save,
            create=not read_only,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._finalized)
            if self.async_save else None,
        )  # fmt: skip
        self.manager = ocp.CheckpointManager(
            self.directory.resolve(), options=options, item_names=("state", "emas", "meta")
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def save(
        self, state: TrainState, meta: dict[str, Any], *, force: bool = True,
        log: Callable[[str], None] = _warn,
    ) -> bool:  # fmt: skip
        """Start saving ``state`` at its step (asynchronously); returns whether a save started.

        Warns to ``log`` when the disk looks too small for it. Raises
        :class:`~scm_jax.run.checksums.CheckpointWriteError` when this save or the previous
        (asynchronous) one met an OS error."""
        item, emas = split_state(state)
        step = int(meta["step"])
        self.wait()  # the previous save's errors belong to its step
        if jax.process_index() == 0:
            checksums.check_free_space(self.directory, checksums.tree_nbytes((item, emas)), step,
                                       log)  # fmt: skip
        self._pending = step
        with self._write_errors():
            started = self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(item),
                    emas=ocp.args.StandardSave(emas),
                    meta=ocp.args.JsonSave(meta),
                ),
                force=force,
            )
            if started and not self.async_save and jax.process_index() == 0:
                checksums.write_checksums(self.directory / str(step))
        if not self.async_save:
            self._pending = None
        return started

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The ``meta`` item of checkpoint ``step`` (default: the latest)."""
        step = self._step(step)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            self._verify(step, ("meta",))
        except Exception as e:  # orbax raises a variety of types for damaged files
            raise self._damaged(step, e) from e
        return dict(out["meta"])

    def restore(self, target: TrainState, step: int | None = None) -> TrainState:
        """Restore the full state into ``target``'s shapes, dtypes and shardings.

        Args:
          target: abstract state (``jax.ShapeDtypeStruct`` leaves with ``sharding``).
          step: which checkpoint (default: the latest).
        Raises:
          CheckpointError: no checkpoint, or one that is damaged or of another architecture.
        """
        step = self._step(step)
        item_t, emas_t = split_state(target)
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(item_t), emas=ocp.args.StandardRestore(emas_t)
                ),
            )
            self._verify(step, ("state", "emas"))
        except Exception as e:
            raise self._damaged(step, e) from e
        self.restored_step = step
        return join_state(out["state"], out["emas"])

    def restore_emas(
        self, target: dict[str, Any], step: int | None = None, *,
        config: Mapping[str, Any] | None = None, log: Callable[[str], None] = _warn,
    ) -> dict[str, Any]:  # fmt: skip
        """Restore only the EMA trees (``{name: abstract net params}``) of checkpoint ``step``.

        Without ``step``: the newest readable checkpoint, falling back past damaged ones with a
        warning to ``log``; :attr:`restored_step` says which step was read. ``config``: the
        run's config (its ``config.json``); a checkpoint whose ``model.*`` or ``ema.*``
        identity differs raises :class:`CheckpointMismatchError`.
        """

        def restore(s: int) -> dict[str, Any]:
            if config is not None:  # what decides the EMA trees (objective, batch... may differ)
                self.check_identity(config, s, only=("model.", "ema."))
            try:
                out = self.manager.restore(
                    s, args=ocp.args.Composite(emas=ocp.args.StandardRestore(target))
                )
                self._verify(s, ("emas",))
            except Exception as e:
                raise self._damaged(s, e) from e
            self.restored_step = s
            return out["emas"]

        if step is not None:
            return restore(self._step(step))
        return self._newest(restore, log)[0]

    def restore_newest(
        self, target: TrainState, *, config: Mapping[str, Any] | None = None,
        log: Callable[[str], None] = _warn,
    ) -> tuple[TrainState, int, list[int]]:  # fmt: skip
        """Restore the newest checkpoint that can be read, falling back past damaged ones.

        Args:
          target: as :meth:`restore`.
          config: the run's config; a checkpoint of another identity raises
            :class:`CheckpointMismatchError` (no fallback: that is not damage).
          log: where the warning about each damaged checkpoint goes.
        Returns:
          ``(state, its step, damaged steps newer than it)`` (left in place: see
          :meth:`set_aside`). With several processes all agree on the oldest step any of them
          could restore.
        Raises:
          CheckpointError: no checkpoint could be restored (the message has the newest's error).
        """

        def restore(s: int) -> TrainState:
            if config is not None:
                self.check_identity(config, s)
            return self.restore(target, s)

        state, step, damaged = self._newest(restore, log)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            agreed = int(np.min(multihost_utils.process_allgather(np.int32(step))))
            if agreed != step:
                state, step = restore(agreed), agreed
                damaged = [s for s in self.all_steps() if s > agreed]
        return state, step, damaged

    def _newest(self, restore: Callable[[int], Any], log: Callable[[str], None]):
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        damaged: list[int] = []
        newest_error: CheckpointError | None = None
        for step in steps:
            try:
                return restore(step), step, damaged
            except CheckpointMismatchError:
                raise
            except CheckpointError as e:
                newest_error = newest_error or e
                damaged.append(step)
                older = [s for s in steps if s < step]
                if len(steps) > 1:  # one checkpoint only: the error below says it all
                    then = f"trying step {older[0]}" if older else "no older checkpoint"
                    log(f"warning: checkpoint {self.directory / str(step)} is damaged and was "
                        f"not used ({e.detail or e}); {then}")  # fmt: skip
        assert newest_error is not None
        if len(steps) == 1:
            raise newest_error
        raise CheckpointError(
            f"none of the checkpoints {sorted(steps)} in {self.directory} could be restored; the "
            f"newest: {newest_error}"
        )

    def check_identity(
        self, config: Mapping[str, Any], step: int | None = None, *,
        only: tuple[str, ...] | None = None,
    ) -> None:  # fmt: skip
        """Raise :class:`CheckpointMismatchError` unless checkpoint ``step`` (default: the newest
        whose ``meta`` is readable) was written by a run with ``config``'s identity (objective,
        ``model.*``, data shape, batch, seed, EMAs, optimiser; ``only``: just the fields with
        these prefixes). Checkpoints written before ``meta`` recorded the identity are compared
        on their objective and batch only."""
        from scm_jax.run.layout import identity_diff

        if step is None:
            for s in sorted(self.all_steps(), reverse=True):
                try:
                    return self.check_identity(config, s, only=only)
                except CheckpointMismatchError:
                    raise
                except CheckpointError:
                    continue
            return None
        meta = self.read_meta(step)
        saved = meta.get("identity")
        if saved is None:  # an older checkpoint
            saved = {k: meta[k] for k in ("objective", "batch_size") if k in meta}
            diff = {k: v for k, v in identity_diff(saved, config).items() if k in saved}
        else:
            diff = identity_diff(saved, config)
        if only is not None:
            diff = {k: v for k, v in diff.items() if k.startswith(only)}
        if diff:
            items = list(diff.items())
            lines = "; ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in items[:_MAX_LISTED])
            if len(items) > _MAX_LISTED:
                lines += f"; and {len(items) - _MAX_LISTED} more"
            raise CheckpointMismatchError(
                f"checkpoint {self.directory / str(step)} belongs to a run with another config "
                f"({lines}). Use a new --workdir, or that run's config (its config.json); to "
                f"start a new run from its weights, pass --config.init_from=DIR"
            )
        return None

    def set_aside(
        self, steps: list[int], *, is_main_process: bool = True,
        log: Callable[[str], None] = _warn,
    ) -> list[Path]:  # fmt: skip
        """Rename damaged checkpoints ``<step>`` to ``<step>.damaged`` (``.damaged.1``, ... if
        taken): orbax ignores them, nothing is deleted, and the run may write those steps
        again. Only the main process renames; all processes then re-read the step list."""
        moved: list[Path] = []
        if is_main_process:
            for step in steps:
                src = self.directory / str(step)
                dst, i = src.with_name(f"{step}{DAMAGED_SUFFIX}"), 0
                while dst.exists():
                    i += 1
                    dst = src.with_name(f"{step}{DAMAGED_SUFFIX}.{i}")
                src.rename(dst)
                moved.append(dst)
                log(f"  kept the damaged checkpoint as {dst} (not deleted)")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("scm_jax_checkpoint_set_aside")
        self.manager.reload()
        return moved

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk (raises CheckpointWriteError for
        an OS error of theirs)."""
        with self._write_errors():
            self.manager.wait_until_finished()
        self._pending = None

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        if self._closed:  # after a write error
            return
        try:
            self.wait()
        finally:
            self.manager.close()

    def _step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no complete checkpoint in {self.directory}")
        elif step not in self.manager.all_steps():
            raise CheckpointError(
                f"no checkpoint at step {step} in {self.directory}; have {self.all_steps()}"
            )
        return step

    def _damaged(self, step: int, e: Exception) -> CheckpointError:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = first.split(" See full TensorStore details")[0]  # then a repr of the spec
        first = f"{type(e).__name__}: {first[:300]}"
        return CheckpointError(
            f"checkpoint {self.directory / str(step)} could not be restored ({first}). It is "
            "damaged or was written by a run with a different model or optimiser; nothing was "
            f"changed (checkpoints there: {self.all_steps()})",
            detail=first,
        )
