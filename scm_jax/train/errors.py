"""How a training run's errors end the process: the one mapping both entry points use
(``scm-jax train`` in ``scm_jax/cli.py`` and the absl ``python -m scm_jax.main``).

* exit 2, one line: what the user can fix (a bad config, missing data or teacher, a workdir
  holding another run or in use by another trainer, no readable checkpoint, a missing package);
* exit 1, one line: a run that started but could not finish (non-finite steps in a row; a
  checkpoint write that failed with an OS error, e.g. a full disk: the newest complete checkpoint
  is intact);
* anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

USAGE, FAILED = 2, 1


def exit_status(e: BaseException) -> int | None:
    """The exit status of training error ``e`` (:data:`USAGE` or :data:`FAILED`), or None for an
    error that is not the user's or the run's (a bug: re-raise it)."""
    from scm_jax.run.checkpoint import CheckpointError
    from scm_jax.run.checksums import CheckpointWriteError
    from scm_jax.train.stopping import NonfiniteStepsError

    if isinstance(e, NonfiniteStepsError | CheckpointWriteError):
        return FAILED
    if isinstance(e, ValueError | FileNotFoundError | CheckpointError | ImportError):
        return USAGE
    return None
