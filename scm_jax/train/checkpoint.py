"""Checkpoints with orbax: periodic and final, asynchronous, keep-N, restored into shardings.

A run's workdir holds ``checkpoints/<step>/`` with three items:

* ``state``: ``{'step', 'params', 'opt_state', 'rng'}`` (everything but the EMAs), and
  ``'critic'`` for DMD / rCM runs (the fake score and its optimiser state);
* ``emas``: ``{name: network params}``, what samplers, teachers and exports load on their own;
* ``meta``: JSON ``{'step', 'nimg', 'batch_size', 'seed', 'ema_names', 'objective'}``.

The data position is a pure function of (seed, step) (``scm_jax.data.arrays``) and the per-step
randomness of (key, step), so ``state`` + ``meta`` are all a resumed run needs to continue
bit-identically. Orbax writes each checkpoint to a temporary folder and renames it when complete,
so a run killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from scm_jax.train.state import TrainState

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the run's state."""


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


class Checkpointer:
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
        self.directory = checkpoint_dir(workdir)
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoints in {str(workdir)!r} (no {self.directory})")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max(int(keep), 1),
            enable_async_checkpointing=async_save and not read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory.resolve(), options=options, item_names=("state", "emas", "meta")
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, meta: dict[str, Any], *, force: bool = True) -> bool:
        """Start saving ``state`` at its step (asynchronously); returns whether a save started."""
        item, emas = split_state(state)
        step = int(meta["step"])
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(item),
                emas=ocp.args.StandardSave(emas),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The ``meta`` item of checkpoint ``step`` (default: the latest)."""
        step = self._step(step)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
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
        except Exception as e:
            raise self._damaged(step, e) from e
        return join_state(out["state"], out["emas"])

    def restore_emas(self, target: dict[str, Any], step: int | None = None) -> dict[str, Any]:
        """Restore only the EMA trees (``{name: abstract net params}``) of checkpoint ``step``."""
        step = self._step(step)
        try:
            out = self.manager.restore(
                step, args=ocp.args.Composite(emas=ocp.args.StandardRestore(target))
            )
        except Exception as e:
            raise self._damaged(step, e) from e
        return out["emas"]

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.wait_until_finished()
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
        return CheckpointError(
            f"checkpoint {self.directory / str(step)} could not be restored ({first[:300]}). "
            "It is damaged or was written by a run with a different model or optimiser; "
            "nothing was changed. Point --workdir at a fresh folder, or remove that checkpoint "
            "to fall back to an earlier one."
        )
